"""All guides on the sample family of samples/tiny_family.py: sharded checkpoints, the README's
data formats (prompt/response JSONL, plain text), float32 and bfloat16 weights."""

import numpy as np
import pytest

from mergeplan.guides import ModelInput, run_guides
from test_calib_family import one_thread  # noqa: F401

GUIDES = {"lewis": {"gamma": 0.3, "epsilon": 0.8}, "aim": {"omega": 0.4}, "sens": {"temperature": 2.0}}


def _run(fam):
    cal = {"data": {"base": str(fam.data["general"]), **{m: str(fam.data[m]) for m in fam.finetunes}},
           "samples": 3, "seq_len": 24, "batch_size": 3}
    return run_guides(GUIDES, cal, ModelInput("base", fam.base),
                      [ModelInput(m, p) for m, p in fam.finetunes.items()], fam.root, quiet=True)


@pytest.fixture(scope="module")
def f32(tiny_family):
    return _run(tiny_family)


def test_sharded_family_gets_every_decision(f32, tiny_family):
    import json

    stored = set(json.loads((tiny_family.base / "model.safetensors.index.json").read_text())["weight_map"])
    assert set(f32.weights) == stored  # Sens: every stored tensor, names as in the index
    assert set(f32.densities) < stored and set(f32.relax) < stored
    assert all(".layers." in t for t in f32.densities)
    assert "lm_head.weight" in f32.relax and not any("embed" in t for t in f32.relax)
    assert f32.calibration["datasets"][str(tiny_family.data["math"])]["samples"] == 3
    assert f32.calibration["aim_data"] == [str(tiny_family.data["general"])]


def test_bfloat16_weights_give_nearly_the_same_decisions(f32, tiny_family_bf16):
    bf = _run(tiny_family_bf16)
    assert bf.calibration["compute_dtype"]["base"] == "float32"  # CPU computes in float32
    # LEWIS differences of nearly equal scores feel bf16 rounding where a fine-tune barely
    # moved a layer (code hardly touches attention here): same shape, up to ~0.08 apart.
    for m in tiny_family_bf16.finetunes:
        x, y = f32.plan_stats["lewis"]["density"][m].ravel(), bf.plan_stats["lewis"]["density"][m].ravel()
        assert np.corrcoef(x, y)[0, 1] > 0.95, m
        assert np.abs(x - y).max() < 0.12, m
    for t, spec in f32.relax.items():
        np.testing.assert_allclose(bf.relax[t]["scores"], spec["scores"], atol=0.02, err_msg=t)
    for t, per in f32.weights.items():
        for m, v in per.items():
            assert bf.weights[t][m] == pytest.approx(v, rel=0.01), (t, m)
