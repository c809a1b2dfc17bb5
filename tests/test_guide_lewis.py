import re

import numpy as np
import pytest
import torch

from mergeplan.guides import ModelInput, run_guides
from mergeplan.guides.lewis import normalised_deltas, scale_densities, wanda_score
from test_calib_family import family, load64, module_inputs64, texts_of, tokenise, one_thread  # noqa: F401

LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj$")
ORDER = ["q", "k", "v", "o", "gate", "up", "down"]


# -- the math on hand-made numbers --------------------------------------------------------
def test_deltas_are_absolute_differences_normalised_over_layers():
    base = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    ft = np.array([[2.0, 2.0], [1.0, 7.0], [5.0, 8.0]])
    np.testing.assert_allclose(normalised_deltas(base, ft), [[1 / 3, 0], [2 / 3, 3 / 5], [0, 2 / 5]])
    # a component whose score never moved keeps zeros (no 0/0)
    np.testing.assert_array_equal(normalised_deltas(base, base.copy()), np.zeros((3, 2)))


def test_minmax_and_clip_scaling():
    d = np.array([[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_allclose(scale_densities(d, 0.3, 0.8, "minmax"), [[0.3, 0.55], [0.425, 0.8]])
    np.testing.assert_allclose(scale_densities(np.full((2, 2), 0.2), 0.3, 0.8, "minmax"), np.full((2, 2), 0.55))
    np.testing.assert_allclose(scale_densities(np.array([[0.1, 0.5], [0.9, 0.3]]), 0.3, 0.8, "clip"), [[0.3, 0.5], [0.8, 0.3]])
    # a missing (layer, component) pair stays missing and does not move the range
    got = scale_densities(np.array([[0.0, np.nan], [1.0, 0.5]]), 0.4, 1.0, "minmax")
    assert np.isnan(got[0, 1])
    np.testing.assert_allclose(got[[0, 1, 1], [0, 0, 1]], [0.4, 1.0, 0.7])


def test_wanda_score_is_the_frobenius_norm_of_the_wanda_metric():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(7, 5))
    ms = rng.random(5)
    explicit = np.linalg.norm(np.abs(W) * np.sqrt(ms)[None, :], "fro")
    assert wanda_score((W**2).sum(0), ms) == pytest.approx(explicit, rel=1e-12)


# -- end to end against a float64 recomputation -------------------------------------------
def _ref_scores(model_dir, seqs):
    m = load64(model_dir)
    names = [n for n, _ in m.named_modules() if LINEAR.match(n)]
    x = module_inputs64(m, seqs, names)
    out = {}
    for n in names:
        W = m.get_submodule(n).weight.detach().numpy()
        out[n] = np.linalg.norm(np.abs(W) * np.sqrt((x[n] ** 2).mean(0))[None, :])
    return out


def _ref_densities(sb, sf, gamma, eps):
    names = sorted(sb)
    L = 1 + max(int(LINEAR.match(n).group(1)) for n in names)
    delta = {}
    for comp in ORDER:
        per = {n: abs(sf[n] - sb[n]) for n in names if LINEAR.match(n).group(3) == comp}
        tot = sum(per.values())
        assert len(per) == L
        delta.update({n: v / tot for n, v in per.items()})
    lo, hi = min(delta.values()), max(delta.values())
    return {n: gamma + (v - lo) * (eps - gamma) / (hi - lo) for n, v in delta.items()}


@pytest.fixture(scope="module")
def lewis_run(family):
    cal = {"data": {t: str(p) for t, p in family.data.items() if t != "legal"}, "samples": 4, "seq_len": 12, "batch_size": 3}
    models = [ModelInput(t, family.models[t]) for t in ("math", "code")]
    dec = run_guides({"lewis": {"gamma": 0.3, "epsilon": 0.9}}, cal, ModelInput("base", family.base), models, family.root, quiet=True)
    return dec


def test_densities_match_float64_recomputation(family, lewis_run):
    dec = lewis_run
    for task in ("math", "code"):
        seqs = tokenise(family.base, texts_of(family.data[task])[:4], 12)
        sb, sf = _ref_scores(family.base, seqs), _ref_scores(family.models[task], seqs)
        want = _ref_densities(sb, sf, 0.3, 0.9)
        for n, v in want.items():
            got = dec.densities[n + ".weight"][task]
            assert got == pytest.approx(v, rel=1e-4, abs=1e-6), (task, n)
            st = dec.tensor_stats[n + ".weight"]
            assert st["lewis.score_base"][task] == pytest.approx(sb[n], rel=1e-4)
            assert st["lewis.score"][task] == pytest.approx(sf[n], rel=1e-4)


def test_only_decoder_linears_get_densities_and_grids_are_stored(lewis_run):
    dec = lewis_run
    assert len(dec.densities) == 2 * 7
    assert all(LINEAR.match(t.rsplit(".", 1)[0]) for t in dec.densities)
    ps = dec.plan_stats["lewis"]
    assert ps["components"] == ORDER and ps["layers"].tolist() == [0, 1]
    for key in ("score_base", "score", "delta", "density"):
        for task in ("math", "code"):
            a = ps[key][task]
            assert a.dtype == np.float32 and a.shape == (2, 7)
    # each component's deltas sum to one over layers; densities span [gamma, epsilon]
    np.testing.assert_allclose(ps["delta"]["math"].sum(0), np.ones(7), rtol=1e-6)
    d = ps["density"]["code"]
    assert d.min() == pytest.approx(0.3) and d.max() == pytest.approx(0.9)
    assert dec.densities["model.layers.1.mlp.up_proj.weight"]["code"] == pytest.approx(float(d[1, 5]))
    assert dec.guides["lewis"]["scaling"] == "minmax" and "densities 0.300..0.900" in dec.guides["lewis"]["summary"]


def _ref_wanda_pruned_scores(model_dir, seqs, sparsity):
    """Block by block: score with the block's unpruned weights, then prune it (stable sort)."""
    m = load64(model_dir)
    names = [n for n, _ in m.named_modules() if LINEAR.match(n)]
    scores = {}
    for layer in range(len(m.model.layers)):
        here = [n for n in names if int(LINEAR.match(n).group(1)) == layer]
        x = module_inputs64(m, seqs, here)  # earlier blocks are already pruned
        for n in here:
            W = m.get_submodule(n).weight
            metric = np.abs(W.detach().numpy()) * np.sqrt((x[n] ** 2).mean(0))[None, :]
            scores[n] = np.linalg.norm(metric)
            k = int(metric.shape[1] * sparsity)
            with torch.no_grad():
                for r in range(metric.shape[0]):
                    W[r, np.argsort(metric[r], kind="stable")[:k]] = 0.0
    return scores


def test_wanda_prune_option_matches_a_block_by_block_float64_reference(family):
    cal = {"data": str(family.data["legal"]), "samples": 3, "seq_len": 12, "batch_size": 2}
    dec = run_guides(
        {"lewis": {"wanda_prune": True, "wanda_sparsity": 0.5, "scaling": "clip", "gamma": 0.05, "epsilon": 1.0}},
        cal, ModelInput("base", family.base), [ModelInput("legal", family.models["legal"])], family.root, quiet=True,
    )
    seqs = tokenise(family.base, texts_of(family.data["legal"])[:3], 12)
    sb = _ref_wanda_pruned_scores(family.base, seqs, 0.5)
    sf = _ref_wanda_pruned_scores(family.models["legal"], seqs, 0.5)
    for n in sb:
        st = dec.tensor_stats[n + ".weight"]
        assert st["lewis.score_base"]["legal"] == pytest.approx(sb[n], rel=1e-4), n
        assert st["lewis.score"]["legal"] == pytest.approx(sf[n], rel=1e-4), n
    # block 1 of the pruned run differs from an unpruned measurement (the option does something)
    plain = _ref_scores(family.base, seqs)
    assert dec.tensor_stats["model.layers.1.mlp.down_proj.weight"]["lewis.score_base"]["legal"] != pytest.approx(
        plain["model.layers.1.mlp.down_proj"], rel=1e-3)
    # clip scaling: normalised deltas clipped to [0.05, 1.0]
    delta = dec.plan_stats["lewis"]["delta"]["legal"]
    np.testing.assert_allclose(dec.plan_stats["lewis"]["density"]["legal"], np.clip(delta, 0.05, 1.0), rtol=1e-6)
