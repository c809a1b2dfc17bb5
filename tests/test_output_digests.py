"""Merged bytes never change by accident: every data-free method's output shards on the
tiny families are compared with sha256 digests recorded before the trust-issue refactor
(tests/data/output_digests.json). A change that alters them is a bug unless the merge math
was meant to change; then re-record with
`python tests/test_output_digests.py --record` and say why in the commit."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import family_recipe  # noqa: E402

DIGESTS = Path(__file__).resolve().parent / "data" / "output_digests.json"

# method -> per-model inline parameters, plus extra top-level YAML
CASES = {
    "linear": ("weight: 0.5", ""),
    "task_arithmetic": ("weight: 0.7", ""),
    "ties": ("weight: 0.5, density: 0.5", ""),
    "ties_nonorm": ("weight: 0.5, density: 0.3", "parameters: {normalize: false}"),
    "dare_linear": ("weight: 0.5, density: 0.5", ""),
    "dare_ties": ("weight: 0.5, density: 0.4", ""),
    "breadcrumbs": ("weight: 0.5, density: 0.8, gamma: 0.05", ""),
    "breadcrumbs_ties": ("weight: 0.5, density: 0.8, gamma: 0.05", ""),
    "della": ("weight: 0.5, density: 0.5, epsilon: 0.1", ""),
    "della_linear": ("weight: 0.5, density: 0.5, epsilon: 0.1", ""),
    "cabs": ("weight: 0.5, n: 8", "parameters: {m: 16}"),
}


def _outputs(fam, tmp: Path, threads: int) -> dict[str, dict[str, str]]:
    from mergeplan.apply import ApplyOptions, apply_plan
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    got = {}
    for case, (params, extra) in CASES.items():
        method = case.split("_nonorm")[0]
        models = {fam.finetunes["math"]: params, fam.finetunes["code"]: params, fam.finetunes["legal"]: params}
        r = family_recipe(tmp / f"{case}.yaml", method, None if method == "linear" else fam.base, models, extra)
        plan = build_plan(load_recipe(r), PlanOptions(threads=threads, quiet=True))
        out = tmp / f"out-{case}-{threads}"
        apply_plan(plan, out, ApplyOptions(threads=threads))
        got[case] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in sorted(out.iterdir()) if p.name.endswith((".safetensors", ".index.json"))}
    return got


@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_match_recorded_digests(tiny_family, tiny_family_bf16, tmp_path, threads):
    want = json.loads(DIGESTS.read_text())
    for label, fam in (("float32", tiny_family), ("bfloat16", tiny_family_bf16)):
        d = tmp_path / label
        d.mkdir()
        assert _outputs(fam, d, threads) == want[label], label


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    import torch

    from conftest import tiny_family_builder

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        rec = {}
        for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            fam = tiny_family_builder.build_family(t / f"fam-{label}", steps=0, seed=0, dtype=dtype)
            (t / label).mkdir()
            rec[label] = _outputs(fam, t / label, 1)
        DIGESTS.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v) for v in rec.values())} cases in {DIGESTS}")
