"""`mergeplan diff` on crafted ~1 MB plan pairs: seconds per shape of plan.

    python benchmarks/diff_bench.py [--size-mb 1] [--repeat 3]

A plan received from someone else may be shaped to make a reader slow. Each case builds
two plans of about --size-mb encoded bytes that differ everywhere, writes them to disk and
times what `mergeplan diff --tensors` does (read both, diff_plans, the summary and every
change printed to a file-backed console, 80 columns). Cases: one tensor with thousands of contributions (the lookup by
model id), many tensors, many models, and the same tensor name repeated.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, diff_plans, read_plan, write_plan
from mergeplan.report import print_diff

# Approximate encoded bytes of one unit of each case, to size the plans.
_CONTRIB_BYTES = 88
_TENSOR_BYTES = 146
_MODEL_BYTES = 47
_SAME_NAME_BYTES = 125


def wide_tensor(n: int, shift: float) -> Plan:
    """One tensor with n contributions (a model id each)."""
    models = [ModelRef("base", "base", "b")] + [ModelRef(f"m{i}", "task", f"m{i}") for i in range(n)]
    contribs = [Contribution(f"m{i}", 1.0 + shift) for i in range(n)]
    return Plan("ties", models, [TensorPlan("w", (4, 4), "float32", contributions=contribs)])


def many_tensors(n: int, shift: float) -> Plan:
    models = [ModelRef("base", "base", "b"), ModelRef("a", "task", "a")]
    tensors = [TensorPlan(f"model.layers.{i}.mlp.w", (4, 4), "float32", contributions=[Contribution("a", 1.0 + shift)])
               for i in range(n)]
    return Plan("ties", models, tensors)


def many_models(n: int, shift: float) -> Plan:
    models = [ModelRef("base", "base", "b")] + [ModelRef(f"m{i}", "task", f"p{i}{shift}") for i in range(n)]
    return Plan("ties", models, [TensorPlan("w", (4, 4), "float32", op="copy", source="base")])


def same_names(n: int, shift: float) -> Plan:
    models = [ModelRef("base", "base", "b"), ModelRef("a", "task", "a")]
    tensors = [TensorPlan("w", (4, 4), "float32", contributions=[Contribution("a", 1.0 + shift)]) for _ in range(n)]
    return Plan("ties", models, tensors)


CASES = {
    "one tensor, many contributions": (wide_tensor, _CONTRIB_BYTES),
    "many tensors": (many_tensors, _TENSOR_BYTES),
    "many models": (many_models, _MODEL_BYTES),
    "one tensor name repeated": (same_names, _SAME_NAME_BYTES),
}


def time_diff(a: Path, b: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = diff_plans(read_plan(a), read_plan(b))
    print_diff(Console(file=io.StringIO(), width=80, highlight=False), rows, a, b, tensors=True)
    return time.perf_counter() - t0, len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for label, (make, unit) in CASES.items():
            n = int(args.size_mb * 1e6 / unit)
            a, b = Path(tmp) / "a.plan", Path(tmp) / "b.plan"
            write_plan(make(n, 0.0), a)
            write_plan(make(n, 0.5), b)
            times = []
            for _ in range(args.repeat):
                dt, rows = time_diff(a, b)
                times.append(dt)
            print(f"{label:34s} n={n:7d}  {a.stat().st_size / 1e6:5.2f} MB  {rows:7d} rows  "
                  f"diff {statistics.median(times):7.2f} s (median of {args.repeat})")


if __name__ == "__main__":
    main()
