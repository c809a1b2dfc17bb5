"""Registry: mergekit 0.1.5 defaults per method, parameter resolution, mask specs."""

from __future__ import annotations

import pytest

from mergeplan.errors import MergeplanError
from mergeplan.methods.registry import METHODS, REQUIRED, mask_spec, resolve_params

# (needs_base, mask kind, consensus, normalize, rescale) as mergekit 0.1.5 registers them
MERGEKIT_015 = {
    "linear": (False, None, None, True, False),
    "task_arithmetic": (True, None, None, False, False),
    "ties": (True, "magnitude", "sum", True, False),
    "dare_linear": (True, "bernoulli", None, False, True),
    "dare_ties": (True, "bernoulli", "sum", False, True),
    "breadcrumbs": (True, "breadcrumbs", None, False, False),
    "breadcrumbs_ties": (True, "breadcrumbs", "sum", False, False),
    "della": (True, "della", "sum", True, True),
    "della_linear": (True, "della", None, False, True),
    "cabs": (True, "nm", None, False, False),
}


def test_defaults_follow_mergekit():
    assert set(METHODS) == set(MERGEKIT_015)
    for name, (base, kind, consensus, normalize, rescale) in MERGEKIT_015.items():
        s = METHODS[name]
        assert (s.needs_base, s.mask_kind, s.consensus, s.normalize, s.rescale) == (
            base, kind, consensus, normalize, rescale), name
        assert s.model_params["weight"] is REQUIRED
    assert METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert METHODS["della"].model_params["epsilon"] == 0.15
    assert METHODS["ties"].model_params["density"] == 1.0
    assert METHODS["ties"].global_params["lambda"] == 1.0
    assert "int8_mask" in METHODS["dare_ties"].global_params
    assert METHODS["dare_ties"].default_rescale == "inverse"
    assert METHODS["ties"].default_rescale == "none"


def test_global_per_model_names_are_defaults_for_every_model():
    g, ms = resolve_params("ties", {"density": 0.4, "weight": 0.5, "normalize": False}, [{}, {"density": 0.7}])
    assert g["normalize"] is False and g["consensus_method"] == "sum"
    assert ms == [{"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.7}]


@pytest.mark.parametrize(
    "method,glob,models,match",
    [
        ("ties", {}, [{"density": 0.5}], "no 'weight'"),
        ("ties", {"gamma": 0.1}, [{"weight": 1}], "does not take"),
        ("ties", {}, [{"weight": 1, "normalize": True}], "not per-model"),
        ("ties", {"consensus_method": "max"}, [{"weight": 1}], "consensus_method"),
        ("dare_ties", {"rescale_mode": "l2"}, [{"weight": 1}], "rescale_mode"),
        ("ties", {}, [{"weight": 1, "density": 1.5}], "density"),
        ("linear", {"normalize": "yes"}, [{"weight": 1}], "normalize"),
        ("cabs", {"m": 32}, [{"weight": 1, "n": 40}], "n:m"),
    ],
)
def test_bad_parameters_raise(method, glob, models, match):
    with pytest.raises(MergeplanError, match=match):
        g, ms = resolve_params(method, glob, models)
        [mask_spec(method, g, m) for m in ms]


def test_mask_spec_translates_rescale_switch_and_mode():
    def spec(method, glob, model):
        g, (m,) = resolve_params(method, glob, [model])
        return mask_spec(method, g, m)

    assert spec("dare_ties", {}, {"weight": 1, "density": 0.3}) == {
        "kind": "bernoulli", "density": 0.3, "rescale": "inverse"}
    assert spec("dare_ties", {"rescale_mode": "l1"}, {"weight": 1, "density": 0.3})["rescale"] == "l1"
    assert spec("dare_ties", {"rescale": False}, {"weight": 1, "density": 0.3})["rescale"] == "none"
    assert spec("ties", {}, {"weight": 1, "density": 1.0}) is None
    assert spec("task_arithmetic", {}, {"weight": 1}) is None
    assert spec("breadcrumbs", {}, {"weight": 1, "density": 0.5})["gamma"] == 0.01
    assert spec("della", {}, {"weight": 1, "density": 0.5})["epsilon"] == 0.15
    assert spec("cabs", {"m": 16}, {"weight": 1, "n": 4}) == {
        "kind": "nm", "n": 4, "m": 16, "density": 0.25, "rescale": "none"}
