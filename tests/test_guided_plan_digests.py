"""Guided plans never change by accident: the plans of guided recipes on the tests' tiny
family are compared with digests recorded before calibration and decisions were split
(tests/data/guided_plan_digests.json). The digest covers the whole plan body except what
changes from run to run or with the temporary directory (creation time, calibration
timings, the recipe's path and directory); recipes use paths relative to the family root.
Torch runs on one thread (calibration's float reductions depend on the thread count).
A change that alters them is a bug unless the guide math was meant to change; then
re-record with `python tests/test_guided_plan_digests.py --record` and say why in the commit."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_calib_family import one_thread  # noqa: E402,F401  (tiny models: one torch thread)

DIGESTS = Path(__file__).resolve().parent / "data" / "guided_plan_digests.json"

_PER_MODEL = "{base: data/general.txt, math: data/math.jsonl, code: data/code.jsonl, legal: data/legal.jsonl}"
_NO_BASE = "{math: data/math.jsonl, code: data/code.jsonl, legal: data/legal.jsonl}"

# case -> (method, per-model parameters, extra top-level YAML, calibration data, guides)
CASES = {
    "ties_all": ("ties", "weight: 1.0, density: 0.5", "parameters: {normalize: true}", _PER_MODEL,
                 "{lewis: {gamma: 0.3, epsilon: 0.8}, aim: {omega: 0.4}, sens: {temperature: 2.0}}"),
    "ta_aim_shared": ("task_arithmetic", "weight: 0.5", "", "data/math.jsonl", "{aim: {omega: 0.3}}"),
    "ties_sens_plain": ("ties", "weight: 0.8, density: 0.4", "", _NO_BASE,
                        "{sens: {temperature: 0.5, per_sample: false, cross_task: false}}"),
    "cabs_lewis_sens": ("cabs", "weight: 0.5", "parameters: {m: 16}", _PER_MODEL,
                        "{lewis: {gamma: 0.25, epsilon: 0.75}, sens: {temperature: 2.0}}"),
    "dare_wanda_aim_pooled": ("dare_ties", "weight: 0.5, density: 0.5", "", _NO_BASE,
                              "{lewis: {gamma: 0.3, epsilon: 0.9, wanda_prune: true, wanda_sparsity: 0.4}, "
                              "aim: {omega: 0.6}}"),
    "breadcrumbs_lewis_clip": ("breadcrumbs_ties", "weight: 0.6, density: 0.8, gamma: 0.05", "", _PER_MODEL,
                               "{lewis: {gamma: 0.4, epsilon: 0.9, scaling: clip}}"),
}
TIED_CASES = ("ties_all",)


def recipe_text(case: str) -> str:
    method, params, extra, data, guides = CASES[case]
    models = "".join(f"  - model: {m}\n    parameters: {{{params}}}\n" for m in ("math", "code", "legal"))
    return (f"merge_method: {method}\nbase_model: base\nmodels:\n{models}{extra}\n"
            f"calibration:\n  data: {data}\n  samples: 3\n  seq_len: 24\n  batch_size: 2\n"
            f"guides: {guides}\nseed: 7\n")


def stable_digest(plan, drop: tuple[str, ...] = ()) -> str:
    """sha256 of the plan body without the run-to-run fields (see the module doc), nor the
    calibration record's keys in `drop`."""
    from mergeplan.plan.codec import canonical_bytes, plan_to_dict

    d = plan_to_dict(plan)
    d.pop("created")
    d["recipe"] = {k: v for k, v in d["recipe"].items() if k not in ("path", "dir")}
    d["calibration"] = {k: v for k, v in d["calibration"].items() if k not in ("timings_s", *drop)}
    return hashlib.sha256(canonical_bytes(d)).hexdigest()


def plan_case(fam_root: Path, case: str, stats=None):
    from mergeplan.planner import PlanOptions, build_plan

    extra = {"stats": stats} if stats is not None else {}  # (--record runs on the code from before stats)
    return build_plan(case_recipe(fam_root, case), PlanOptions(device="cpu", threads=1, quiet=True), **extra)


def case_recipe(fam_root: Path, case: str):
    from mergeplan.recipe import load_recipe

    path = fam_root / f"{case}.yaml"
    path.write_text(recipe_text(case))
    return load_recipe(path)


def digests(fam_root: Path, cases) -> dict[str, str]:
    return {case: stable_digest(plan_case(fam_root, case)) for case in cases}


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory, family_builder):
    return family_builder.build_family(tmp_path_factory.mktemp("tied_family"), steps=0, seed=0, tied=True)


@pytest.mark.parametrize("case", list(CASES))
def test_guided_plans_match_recorded_digests(tiny_family, case):
    want = json.loads(DIGESTS.read_text())
    assert digests(tiny_family.root, [case]) == {case: want["untied"][case]}


def test_tied_family_plan_matches_recorded_digest(tied_family):
    want = json.loads(DIGESTS.read_text())
    assert digests(tied_family.root, TIED_CASES) == want["tied"]


def test_plan_from_reused_statistics_equals_the_recorded_plan(tiny_family):
    """build_plan(stats=...) skips calibration: the same plan for the same options, and the
    same decisions from statistics gathered for more candidates (a search)."""
    from mergeplan.guides import parse_guides
    from mergeplan.planner import PlanOptions, calibrate_recipe

    want = json.loads(DIGESTS.read_text())["untied"]
    rec = case_recipe(tiny_family.root, "ties_all")
    opts = PlanOptions(device="cpu", quiet=True)
    stats = calibrate_recipe(rec, opts)
    assert stable_digest(plan_case(tiny_family.root, "ties_all", stats)) == want["ties_all"]
    more = [parse_guides(rec.guides), parse_guides({"lewis": {}}), parse_guides({"aim": {}})]
    wider = calibrate_recipe(rec, opts, options=more)  # LEWIS alone adds a pass over each fine-tune
    plan = plan_case(tiny_family.root, "ties_all", wider)
    assert "lewis without sens" in plan.calibration["calibrated_for"]
    assert stable_digest(plan, drop=("calibrated_for",)) == want["ties_all"]


def test_incompatible_statistics_are_one_line_errors(tiny_family):
    from mergeplan.errors import MergeplanError
    from mergeplan.planner import PlanOptions, calibrate_recipe

    opts = PlanOptions(device="cpu", quiet=True)
    aim_stats = calibrate_recipe(case_recipe(tiny_family.root, "ta_aim_shared"), opts)
    # other calibration settings (shared data vs per-model data)
    with pytest.raises(MergeplanError, match="other calibration settings"):
        plan_case(tiny_family.root, "ties_all", aim_stats)
    # same settings, guides the statistics do not cover
    text = recipe_text("ta_aim_shared").replace("{aim: {omega: 0.3}}", "{aim: {omega: 0.3}, sens: {}}")
    (tiny_family.root / "sens.yaml").write_text(text)
    from mergeplan.planner import build_plan
    from mergeplan.recipe import load_recipe

    with pytest.raises(MergeplanError, match="gathered for aim, but these guide options need") as e:
        build_plan(load_recipe(tiny_family.root / "sens.yaml"), opts, stats=aim_stats)
    assert "\n" not in str(e.value)


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    import torch

    from conftest import tiny_family_builder

    torch.set_num_threads(1)  # as the tests run: calibration's float sums follow the thread count

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        untied = tiny_family_builder.build_family(t / "fam", steps=0, seed=0)
        tied = tiny_family_builder.build_family(t / "tied", steps=0, seed=0, tied=True)
        rec = {"untied": digests(untied.root, CASES), "tied": digests(tied.root, TIED_CASES)}
        DIGESTS.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v) for v in rec.values())} guided plans in {DIGESTS}")
