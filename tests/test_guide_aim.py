import numpy as np
import pytest

from mergeplan.guides import ModelInput, run_guides
from mergeplan.guides.aim import channel_scores, factors
from test_calib_family import build_family, family, load64, module_inputs64, tokenise, one_thread  # noqa: F401


def test_scores_and_factors_by_hand():
    a = channel_scores(np.array([1.0, 2.0, 4.0], np.float32))
    np.testing.assert_allclose(a, [0.25, 0.5, 1.0])
    np.testing.assert_allclose(factors(a, 0.4), [0.85, 0.7, 0.4], rtol=1e-6)
    assert factors(a, 1.0).tolist() == [1.0, 1.0, 1.0]  # omega 1: nothing relaxed
    # a channel-less or silent module gives zero scores: factor 1 everywhere
    np.testing.assert_array_equal(channel_scores(np.zeros(3)), np.zeros(3))
    assert a.dtype == np.float32 and factors(a, 0.4).dtype == np.float32


def _text_docs(path):
    return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]


@pytest.fixture(scope="module")
def aim_run(family):
    cal = {"data": {"base": str(family.text), "math": str(family.data["math"])}, "samples": 6, "seq_len": 10, "batch_size": 4}
    return run_guides({"aim": {"omega": 0.3}}, cal, ModelInput("base", family.base),
                      [ModelInput("math", family.models["math"])], family.root, quiet=True)


def test_scores_match_float64_mean_abs_over_the_base_data(family, aim_run):
    dec = aim_run
    assert dec.calibration["aim_data"] == [str(family.text)]  # the base's own entry wins
    m = load64(family.base)
    names = [t[: -len(".weight")] for t in dec.relax]
    x = module_inputs64(m, tokenise(family.base, _text_docs(family.text)[:6], 10), names)
    for n in names:
        s = np.abs(x[n]).mean(0)
        spec = dec.relax[n + ".weight"]
        assert spec["kind"] == "aim" and spec["omega"] == 0.3
        assert spec["scores"].dtype == np.float32
        np.testing.assert_allclose(spec["scores"], s / s.max(), rtol=3e-5, err_msg=n)
        f = 1 - (s / s.max()) * 0.7
        assert dec.tensor_stats[n + ".weight"]["aim.mean_factor"] == pytest.approx(f.mean(), rel=1e-5)


def test_every_weighted_module_but_embeddings_with_the_right_axis(aim_run):
    relax = aim_run.relax
    expected = {"lm_head.weight", "model.norm.weight"}
    for i in range(2):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
    assert set(relax) == expected
    assert relax["model.layers.0.mlp.down_proj.weight"]["axis"] == 1
    assert relax["model.layers.0.mlp.down_proj.weight"]["scores"].shape == (32,)  # intermediate size
    assert relax["model.layers.1.input_layernorm.weight"]["axis"] == 0
    assert relax["lm_head.weight"]["scores"].shape == (16,)
    ps = aim_run.plan_stats["aim"]
    assert ps["mean_factor"].dtype == np.float32 and len(ps["tensors"]) == len(expected)
    assert all(0.3 <= v <= 1.0 for v in ps["min_factor"])


def test_tied_head_is_left_alone(tmp_path):
    fam = build_family(tmp_path / "tied", tie=True, tasks=("math",))
    dec = run_guides({"aim": {}}, {"data": str(fam.data["math"]), "samples": 2, "seq_len": 8},
                     ModelInput("base", fam.base), [ModelInput("math", fam.models["math"])], fam.root, quiet=True)
    assert "lm_head.weight" not in dec.relax and "model.embed_tokens.weight" not in dec.relax
    assert "model.norm.weight" in dec.relax and dec.relax["model.norm.weight"]["omega"] == 0.4  # the default
    assert any("lm_head is tied to the input embeddings" in n for n in dec.calibration["notes"])
