import math
import re

import numpy as np
import pytest
import torch

from mergeplan.errors import MergeplanError
from mergeplan.guides import ModelInput, run_guides
from mergeplan.guides.sens import alpha, sigma, tau
from test_calib_family import TASKS, family, load64, texts_of, tokenise, one_thread  # noqa: F401


def test_alpha_tau_sigma_by_hand():
    np.testing.assert_allclose(alpha(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]])
    g = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0], [2.0, 2.0, 0.0]])
    np.testing.assert_allclose(tau(g), [3 / 11, 4 / 11, 4 / 11])
    a = np.array([[0.6, 0.8], [1.0, 0.0]])
    t = np.array([0.25, 0.75])
    T = 0.5
    z = [[0.25 * 0.6 / T, 0.25 * 0.8 / T], [0.75 * 1.0 / T, 0.0]]
    want = [[math.exp(z[i][l]) / (math.exp(z[0][l]) + math.exp(z[1][l])) for l in range(2)] for i in range(2)]
    np.testing.assert_allclose(sigma(a, t, T), want, rtol=1e-12)
    np.testing.assert_allclose(sigma(a, t, 1e6), np.full((2, 2), 0.5), atol=1e-6)  # large T: uniform


# -- float64 re-derivation with explicit per-sample autograd ------------------------------
def _group(name):
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return f"layers.{m.group(1)}"
    return {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}[name]


def _ref_sensitivity(model_dir, seqs):
    m = load64(model_dir)
    params = dict(m.named_parameters())
    S = {}
    for s in seqs:
        ids = torch.tensor(s)
        logits = m(input_ids=ids[None]).logits[0]
        logp = torch.log_softmax(logits[:-1], dim=-1)
        loss = -logp[torch.arange(len(s) - 1), ids[1:]].mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, p), gr in zip(params.items(), grads):
            S[_group(n)] = S.get(_group(n), 0.0) + float((p.detach() * gr).abs().sum())
    return S


def _ref_logits(model_dir, seqs):
    m = load64(model_dir)
    with torch.no_grad():
        return [m(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]


@pytest.fixture(scope="module")
def sens_run(family):
    cal = {"data": {t: str(family.data[t]) for t in TASKS}, "samples": 3, "seq_len": 10, "batch_size": 2}
    return run_guides({"sens": {"temperature": 0.05}}, cal, ModelInput("base", family.base),
                      [ModelInput(t, family.models[t]) for t in TASKS], family.root, quiet=True)


def test_coefficients_match_float64_per_sample_autograd(family, sens_run):
    dec = sens_run
    seqs = {t: tokenise(family.base, texts_of(family.data[t])[:3], 10) for t in TASKS}
    groups = ["embed", "layers.0", "layers.1", "norm", "lm_head"]
    S = np.array([[_ref_sensitivity(family.models[t], seqs[t])[g] for g in groups] for t in TASKS])
    g = np.zeros((3, 3))
    for j, tj in enumerate(TASKS):
        expert = _ref_logits(family.models[tj], seqs[tj])
        for i, ti in enumerate(TASKS):
            if i != j:
                other = _ref_logits(family.models[ti], seqs[tj])
                d = np.concatenate([np.linalg.norm(a - b, axis=1) for a, b in zip(other, expert)])
                g[i, j] = d.mean()
    A = S / np.sqrt((S**2).sum(1, keepdims=True))
    t = np.array([g[i].sum() - g[i, i] for i in range(3)])
    t = t / t.sum()
    E = np.exp(t[:, None] * A / 0.05)
    coef = 3 * E / E.sum(0, keepdims=True)

    ps = dec.plan_stats["sens"]
    assert ps["groups"] == groups and ps["models"] == list(TASKS)
    np.testing.assert_allclose(ps["g"], g, rtol=1e-4)
    for i, tk in enumerate(TASKS):
        np.testing.assert_allclose(ps["S"][tk], S[i], rtol=1e-4)
        assert ps["tau"][tk] == pytest.approx(t[i], rel=1e-4)
        np.testing.assert_allclose(ps["coefficient"][tk], coef[i], rtol=1e-4)
    for tensor, grp in [("model.embed_tokens.weight", 0), ("model.layers.0.self_attn.q_proj.weight", 1),
                        ("model.layers.1.post_attention_layernorm.weight", 2), ("model.norm.weight", 3),
                        ("lm_head.weight", 4)]:
        for i, tk in enumerate(TASKS):
            assert dec.weights[tensor][tk] == pytest.approx(coef[i, grp], rel=1e-4), tensor
        assert dec.tensor_stats[tensor]["sens.group"] == groups[grp]
    # the coefficients of a group sum to K: the paper's "multiplied by K to preserve the magnitude"
    np.testing.assert_allclose(sum(ps["coefficient"][tk] for tk in TASKS), np.full(5, 3.0), rtol=1e-5)


def test_every_stored_tensor_gets_a_coefficient(family, sens_run):
    from safetensors import safe_open

    with safe_open(family.base / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert set(sens_run.weights) == stored
    assert "coefficients K*sigma" in sens_run.guides["sens"]["summary"]


def test_cross_task_off_gives_uniform_tau(family):
    cal = {"data": {t: str(family.data[t]) for t in TASKS[:2]}, "samples": 2, "seq_len": 8}
    dec = run_guides({"sens": {"cross_task": False, "per_sample": False}}, cal, ModelInput("base", family.base),
                     [ModelInput(t, family.models[t]) for t in TASKS[:2]], family.root, quiet=True)
    ps = dec.plan_stats["sens"]
    assert ps["tau"] == {"math": 0.5, "code": 0.5} and "g" not in ps


def test_sens_needs_two_fine_tunes_and_each_ones_data(family):
    base = ModelInput("base", family.base)
    with pytest.raises(MergeplanError, match="needs at least two"):
        run_guides({"sens": {}}, {"data": str(family.text)}, base, [ModelInput("math", family.models["math"])], family.root, quiet=True)
    with pytest.raises(MergeplanError, match=r"no entry for fine-tune 'code'.*add `code: PATH`"):
        run_guides({"sens": {}}, {"data": {"math": str(family.data["math"])}}, base,
                   [ModelInput(t, family.models[t]) for t in ("math", "code")], family.root, quiet=True)
