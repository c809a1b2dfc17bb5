"""Calibrate once, decide many: decide() on one CalibStats equals a fresh calibration for
each option set it covers, and refuses option sets it does not cover."""

from __future__ import annotations

import pytest

from mergeplan.calibrate.request import Request
from mergeplan.calibrate.run import calibrate
from mergeplan.calibrate.settings import parse_calibration
from mergeplan.errors import MergeplanError
from mergeplan.guides import ModelInput, parse_guides, run_guides
from mergeplan.guides.decide import decide
from mergeplan.plan.codec import canonical_bytes
from test_calib_family import TASKS, family, one_thread  # noqa: F401

ALL = {"lewis": {"gamma": 0.4, "epsilon": 0.9}, "aim": {"omega": 0.5}, "sens": {"temperature": 2.0}}
# Different decision options only: same passes as ALL (cross_task off just leaves g unused).
ALL_OTHER = {"lewis": {"gamma": 0.2, "epsilon": 0.6, "scaling": "clip"}, "aim": {"omega": 0.1},
             "sens": {"temperature": 0.7, "cross_task": False}}
# Different passes: LEWIS without Sens, Wanda pruning, Sens per batch.
LEWIS_ALONE = {"lewis": {"gamma": 0.3, "epsilon": 0.7}}
WANDA_SENS = {"lewis": {"gamma": 0.3, "epsilon": 0.8, "wanda_prune": True, "wanda_sparsity": 0.3},
              "sens": {"temperature": 1.5, "per_sample": False}}
AIM_ONLY = {"aim": {"omega": 0.7}}


def _cal():
    return {"data": {"base": "math.jsonl", **{t: f"{t}.jsonl" for t in TASKS}}, "samples": 3, "seq_len": 14,
            "batch_size": 2}


def _models(family):
    return ModelInput("base", family.base), [ModelInput(t, family.models[t]) for t in TASKS]


def _fresh(family, guides):
    base, models = _models(family)
    return run_guides(guides, _cal(), base, models, family.root, device="cpu", quiet=True)


def _stats(family, *guide_sets):
    base, models = _models(family)
    opts = [parse_guides(g) for g in guide_sets]
    return calibrate(opts, parse_calibration(_cal(), family.root), base, models, family.root, device="cpu",
                     quiet=True)


def _same(a, b) -> None:
    for part in ("densities", "weights", "relax", "tensor_stats", "plan_stats", "guides"):
        assert canonical_bytes(getattr(a, part)) == canonical_bytes(getattr(b, part)), part
    ra = {k: v for k, v in a.calibration.items() if k not in ("timings_s", "calibrated_for")}
    rb = {k: v for k, v in b.calibration.items() if k not in ("timings_s", "calibrated_for")}
    assert canonical_bytes(ra) == canonical_bytes(rb)
    assert set(a.calibration["timings_s"]) == set(b.calibration["timings_s"])


@pytest.fixture(scope="module")
def all_stats(family):
    return _stats(family, ALL)


def test_decide_with_other_options_equals_a_fresh_run(all_stats, family):
    again = decide(all_stats, parse_guides(ALL_OTHER), "base", list(TASKS))
    fresh = _fresh(family, ALL_OTHER)
    _same(again, fresh)
    # and the options did change the decisions
    first = decide(all_stats, parse_guides(ALL), "base", list(TASKS))
    assert first.densities != again.densities and first.weights != again.weights
    _same(first, _fresh(family, ALL))
    assert "calibrated_for" not in first.calibration and "calibrated_for" in again.calibration


def test_superset_statistics_serve_every_candidate_like_a_fresh_run(family):
    candidates = [ALL, LEWIS_ALONE, WANDA_SENS, AIM_ONLY]
    stats = _stats(family, *candidates)
    for guides in candidates:
        dec = decide(stats, parse_guides(guides), "base", list(TASKS))
        _same(dec, _fresh(family, guides))


def test_statistics_that_miss_a_pass_are_refused(all_stats):
    for guides, needle in ((LEWIS_ALONE, "lewis"), (WANDA_SENS, "wanda_prune"), (AIM_ONLY, None)):
        need = Request.of(parse_guides(guides))
        if needle is None:
            assert all_stats.request.covers(need)  # AIM alone needs nothing ALL did not measure
            continue
        with pytest.raises(MergeplanError, match="calibrate again") as e:
            decide(all_stats, parse_guides(guides), "base", list(TASKS))
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MergeplanError, match="fine-tunes"):
        decide(all_stats, parse_guides(ALL), "base", ["code", "math", "legal"])  # another order


def test_requests_depend_on_measurement_options_only():
    r = Request.of(parse_guides(ALL))
    assert r == Request.of(parse_guides({**ALL, "lewis": {"gamma": 0.1, "epsilon": 0.2}, "aim": {"omega": 0.9}}))
    assert r.covers(Request.of(parse_guides(ALL_OTHER))) and r.covers(Request.of(parse_guides(AIM_ONLY)))
    assert not r.covers(Request.of(parse_guides(LEWIS_ALONE)))  # LEWIS without Sens: another fine-tune pass
    union = Request.of([parse_guides(g) for g in (ALL, LEWIS_ALONE, WANDA_SENS)])
    assert all(union.covers(Request.of(parse_guides(g))) for g in (ALL, ALL_OTHER, LEWIS_ALONE, WANDA_SENS, AIM_ONLY))
    assert not Request.of(parse_guides(AIM_ONLY)).covers(r)
