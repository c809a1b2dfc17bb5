import pytest

from mergeplan.errors import MergeplanError
from mergeplan.guides import parse_guides, validate_guides
from mergeplan.guides.options import AimOptions, LewisOptions, SensOptions

CAL = {"data": "calib.jsonl"}


def test_defaults_and_switches():
    o = parse_guides({"lewis": {}, "aim": None, "sens": True})
    assert o.lewis == LewisOptions(gamma=0.5, epsilon=0.8, scaling="minmax", wanda_prune=False)
    assert o.aim == AimOptions(omega=0.4) and o.sens == SensOptions(temperature=1.0)
    assert parse_guides({"aim": False}).enabled() == []
    assert parse_guides(None).enabled() == []
    assert parse_guides({"lewis": {"gamma": 0.3, "epsilon": 1}}).lewis.epsilon == 1.0


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"cabs": {"n": 16}}, r"guides.cabs: cabs is a merge method, not a guide: set `merge_method: cabs`"),
        ({"lewsi": {}}, r"^unknown key 'lewsi' in guides \(did you mean 'lewis'\?\); allowed: lewis, aim, sens$"),
        ({"lewis": {"gama": 0.3}}, r"unknown key 'gama' in guides.lewis \(did you mean 'gamma'\?\); allowed: gamma, epsilon, scaling"),
        ({"lewis": {"gamma": 0.9, "epsilon": 0.5}}, r"gamma \(0.9\) must not exceed epsilon \(0.5\)"),
        ({"lewis": {"gamma": 0}}, r"guides.lewis.gamma must be in \(0.0, 1.0\]"),
        ({"lewis": {"epsilon": 1.2}}, r"guides.lewis.epsilon must be in"),
        ({"lewis": {"scaling": "zscore"}}, r"guides.lewis.scaling must be minmax .* or clip"),
        ({"lewis": {"wanda_prune": "yes"}}, r"guides.lewis.wanda_prune must be true or false"),
        ({"lewis": {"wanda_sparsity": 0.3}}, r"wanda_sparsity has no effect without wanda_prune"),
        ({"aim": {"omega": 1.5}}, r"guides.aim.omega must be in \[0.0, 1.0\]"),
        ({"aim": {"omega": "0.4"}}, r"guides.aim.omega must be a number"),
        ({"aim": 0.4}, r"guides.aim must be a mapping of options"),
        ({"sens": {"temperature": 0}}, r"guides.sens.temperature must be in \(0.0, inf\]"),
        ({"sens": {"T": 2}}, r"unknown key 'T' in guides.sens; allowed: temperature, per_sample, cross_task"),
        ("lewis", r"guides must be a mapping \(`guides: \{aim: \{omega: 0.4\}\}`\), not text"),
    ],
)
def test_bad_guides_name_the_key(raw, match):
    with pytest.raises(MergeplanError, match=match):
        parse_guides(raw)


@pytest.mark.parametrize(
    "guides, method, match",
    [
        ({"lewis": {}}, "task_arithmetic", r"guides.lewis sets per-layer densities, but merge_method task_arithmetic sparsifies nothing"),
        ({"lewis": {}}, "linear", r"use one of .*ties"),
        ({"sens": {}}, "linear", r"guides.sens scales each fine-tune's task vector, but merge_method linear"),
        ({"aim": {}}, "linear", r"guides.aim relaxes the merged delta from the base, but merge_method linear has no base"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(guides, method, match):
    with pytest.raises(MergeplanError, match=match):
        validate_guides(guides, CAL, method)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "della", "breadcrumbs_ties", "cabs"])
def test_lewis_composes_with_sparsifying_methods(method):
    notes = validate_guides({"lewis": {}, "aim": {}}, CAL, method)
    assert any("replace the recipe's density" in n for n in notes)
    assert any("omega=0.4" in n for n in notes)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_sens_composes_with_task_vector_methods(method):
    notes = validate_guides({"sens": {"temperature": 2}}, CAL, method)
    assert any("K*sigma" in n for n in notes)
    assert any("one shared calibration set" in n for n in notes)  # single data path for every task
    notes = validate_guides({"sens": {}}, {"data": {"a": "a.jsonl", "b": "b.jsonl"}}, method)
    assert not any("one shared calibration set" in n for n in notes)


def test_calibration_without_guides_and_guides_without_calibration():
    assert validate_guides(None, CAL, "ties") == ["calibration: is set but no guide uses it; it was ignored"]
    assert validate_guides({}, None, "linear") == []
    with pytest.raises(MergeplanError, match="guides need calibration data"):
        validate_guides({"aim": {}}, None, "ties")
    with pytest.raises(MergeplanError, match=r"unknown key 'sample' in calibration \(did you mean 'samples'\?\)"):
        validate_guides({"aim": {}}, {"data": "x", "sample": 3}, "ties")
