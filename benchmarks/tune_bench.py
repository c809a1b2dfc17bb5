"""Time a tuned plan on the sample family from process start, beside the untuned plan.

    python benchmarks/tune_bench.py [--recipe samples/recipes/tuned.yaml] [--threads 2]

Runs `mergeplan plan RECIPE` (the search) and `mergeplan plan RECIPE --no-tune` (the recipe
as written, calibrated once) in fresh processes, one after the other, and prints wall times,
their ratio, the candidates' count and the search-split and test-split scores of the chosen
plan and of the recipe as written (from the plan's tuning record).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mergeplan.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"mergeplan {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "samples/recipes/tuned.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mergeplan.plan.codec import read_plan

    with tempfile.TemporaryDirectory() as tmp:
        tuned, plain = Path(tmp) / "tuned.plan", Path(tmp) / "plain.plan"
        t_plain = run(["plan", a.recipe, "-o", str(plain), "--no-tune", "-q", "--threads", str(a.threads)])
        t_tuned = run(["plan", a.recipe, "-o", str(tuned), "-q", "--threads", str(a.threads)])
        rec = read_plan(tuned).tuning
    n = len(rec["candidates"]) - 1
    cands = {c["id"]: c for c in rec["candidates"]}
    chosen, recipe = cands[rec["chosen"]], cands[0]
    test = rec.get("test") or {}
    print(f"untuned plan (--no-tune):        {t_plain:6.1f} s")
    print(f"tuned plan, {n} candidates:      {t_tuned:6.1f} s  ({t_tuned / t_plain:.1f}x the untuned plan; "
          f"{(t_tuned - t_plain) / max(n, 1):.2f} s per candidate beyond it)")
    print(f"objective: {rec['objective']['kind']}; chosen #{chosen['id']} {chosen['assignment']}")
    print(f"search split: chosen {chosen['score']:.4f}  recipe as written {recipe['score']:.4f}")
    if test:
        m = test.get("margin") or {}
        print(f"test split:   chosen {test['chosen']:.4f}  recipe as written {test['recipe']:.4f}  "
              f"difference 95% interval {m.get('low', float('nan')):.4f}..{m.get('high', float('nan')):.4f}"
              f"{'  (within noise)' if test.get('within_noise') else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
