"""Recipe parsing never changes a plan by accident: plans built from every recipe in
samples/recipes and from recipes exercising each parameter shape (gradients, filters,
per-model overrides, base handling, rescale_mode none, CABS order, dtypes, shard size) are
compared with digests recorded before the recipe schema moved to pydantic
(tests/data/recipe_plan_digests.json). A change that alters them is a bug unless plans were
meant to change; then re-record with `python tests/test_recipe_plan_digests.py --record`
and say why in the commit.

What varies between runs and machines is blanked before hashing: the creation time, the
recipe's path and text (absolute paths of the temporary family), each model's path, and
the recipe path that prefixes notes (the notes' text and lines are kept), and in the\ncalibration record the data paths and pass timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
DIGESTS = Path(__file__).resolve().parent / "data" / "recipe_plan_digests.json"

# Recipes in the test's own words; "FAM/" is the tiny family's directory.
EXTRA = {
    "gradients_filters": """
merge_method: ties
base_model: FAM/base
models:
  - model: FAM/math
    parameters:
      weight: [0.2, 1.0, 0.6]
      density:
        - filter: self_attn
          value: 0.3
        - filter: mlp
          value: [0.2, 0.8]
        - value: 0.5
  - model: FAM/code
    name: coder
    parameters:
      weight:
        - filter: q_proj
          value: 0.9
        - value: 0.4
  - model: FAM/legal
parameters:
  weight: 0.7
  density: 0.6
  normalize: [true, false]
  int8_mask: true
dtype: float32
out_dtype: bfloat16
seed: 7
""",
    "dare_rescale_none_mergekit_forms": """
merge_method: dare_ties
base_model: {model: {path: FAM/base}}
models:
  - model: FAM/base
    parameters: {weight: 1}
  - model: {model: FAM/math}
    parameters: {weight: 0.5, density: 1e-1}
  - model: FAM/code
    parameters: {weight: 0.5, density: 0.6, lambda: 2}
parameters: {rescale_mode: none, consensus_method: count, lambda: 1.5, max_shard_size: 100KB}
tokenizer_source: base
""",
    "linear_base_as_input": """
merge_method: linear
base_model: FAM/base
models:
  - model: FAM/math
    parameters: {weight: 2}
  - model: FAM/code
    parameters: {weight: [1, 0]}
parameters: {weight: 0.5, normalize: true}
""",
    "della_breadcrumbs_like": """
merge_method: della_linear
base_model: FAM/base
models:
  - {model: FAM/math, parameters: {weight: 1, density: 0.5, epsilon: 0.2}}
  - {model: FAM/code, parameters: {weight: 1, density: [0.3, 0.8]}}
parameters: {epsilon: 0.1, rescale: false}
""",
    "cabs_order_nm": """
merge_method: cabs
base_model: FAM/base
models:
  - {model: FAM/math, name: m, parameters: {weight: 1.1, n: 4}}
  - {model: FAM/code, name: c, parameters: {weight: [1.0, 0.5]}}
  - {model: FAM/legal, name: l, parameters: {weight: 0.8}}
parameters: {n: 8, m: 16, order: [l, c, m]}
""",
}


def _recipes() -> dict[str, str]:
    out = {f"samples/{p.stem}": p.read_text().replace("../family/", "FAM/")
           for p in sorted((ROOT / "samples" / "recipes").glob("*.yaml"))}
    # the guided sample as written, with less calibration text so the test stays quick
    for guided in ("samples/guided", "samples/tuned"):  # tuned: the recipe as written (build_plan skips tune:)
        out[guided] = out[guided].replace("samples: 16", "samples: 4").replace("seq_len: 128", "seq_len: 32")
    out.update({f"extra/{k}": v.lstrip() for k, v in EXTRA.items()})
    return out


def _blank(obj, root: str):
    """Calibration records name the data files (absolute here) and time each pass."""
    if isinstance(obj, dict):
        return {_blank(k, root): _blank(v, root) for k, v in obj.items() if k != "timings_s"}
    if isinstance(obj, list):
        return [_blank(v, root) for v in obj]
    return obj.replace(root, "FAM") if isinstance(obj, str) else obj


def _digest(fam, tmp: Path, label: str, text: str) -> str:
    from mergeplan.plan.codec import plan_digest
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    r = tmp / (label.replace("/", "-") + ".yaml")
    r.write_text(text.replace("FAM/", f"{fam.root}/"))
    plan = build_plan(load_recipe(r), PlanOptions(threads=1, quiet=True, device="cpu"))
    plan.created = ""
    plan.recipe = {}
    plan.notes = [n.replace(str(r), "RECIPE") for n in plan.notes]
    plan.calibration = _blank(plan.calibration, str(fam.root))
    for m in plan.models:
        m.path = m.id
    return plan_digest(plan)


RECIPES = _recipes()


def test_every_recipe_has_a_recorded_digest():
    assert sorted(json.loads(DIGESTS.read_text())) == sorted(RECIPES)


@pytest.mark.parametrize("label", sorted(RECIPES))
def test_plan_matches_recorded_digest(tiny_family, tmp_path, label):
    want = json.loads(DIGESTS.read_text())[label]
    assert _digest(tiny_family, tmp_path, label, RECIPES[label]) == want


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    from conftest import tiny_family_builder

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fam = tiny_family_builder.build_family(t / "fam", steps=0, seed=0)
        (t / "r").mkdir()
        rec = {label: _digest(fam, t / "r", label, text) for label, text in _recipes().items()}
        DIGESTS.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(rec)} plans in {DIGESTS}")
