"""Calibration on real families: the guides' view of a loaded model matches the stored
tensors (renamed, fused, per-expert), and per-expert and per-head statistics match an
independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arch_models as am
from arch_models import one_torch_thread  # noqa: F401  (autouse fixture)
from mergeplan.calibrate.data import load_calib_set
from mergeplan.calibrate.models import load_model, load_tokenizer
from mergeplan.calibrate.modules import linear_sites, site_modules, stored_tensor_names, weighted_sites
from mergeplan.calibrate.passes import activation_pass
from mergeplan.plan.names import parse_name
from test_apply import load_all

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return am.build("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_neox", "gpt2"])
def test_sites_read_the_stored_tensors(arch, tmp_path):
    fam = am.build(arch, tmp_path)
    model, _ = load_model(fam.base, CPU, torch.float32)
    stored = load_all(fam.base)
    sites = {**linear_sites(model, set(stored)), **weighted_sites(model, set(stored))[0]}
    mods = site_modules(model, sites)
    for n, s in sites.items():
        np.testing.assert_array_equal(mods[n].weight.detach().numpy(), stored[s.tensor], err_msg=n)
    # Every 2-D weight of the decoder blocks (fused, renamed or per expert) is measured.
    lin = {s.tensor for s in linear_sites(model, set(stored)).values()}
    assert lin == {t for t in stored if parse_name(t).layer is not None and stored[t].ndim == 2}


def test_expert_statistics_match_an_independent_computation(mixtral):
    fam = mixtral
    stored = load_all(fam.base)
    model, _ = load_model(fam.base, CPU, torch.float32)
    sites = linear_sites(model, stored_tensor_names(fam.base))
    experts = {n: s for n, s in sites.items() if s.expert is not None}
    assert len(experts) == 2 * 5 * 3
    cs = load_calib_set(str(fam.data), fam.root, load_tokenizer(fam.base), 6, 12)
    batches = cs.batches(3)
    st = activation_pass(model, site_modules(model, experts), ("abs", "sq"), batches, CPU, "base")

    # Independent: capture each MoE block's input, route with the stored router weight
    # (softmax, top 2) and apply the stored per-expert w1/w3, in float64.
    inputs = {0: [], 1: []}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda _m, a, i=i: inputs[i].append(a[0].detach().double())) for i in (0, 1)]
    masks = []
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
            masks.append(mask.reshape(-1).bool())
    for h in hooks:
        h.remove()
    for layer in (0, 1):
        pre = f"model.layers.{layer}.block_sparse_moe"
        router = torch.from_numpy(stored[f"{pre}.gate.weight"]).double()
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer]])
        keep = torch.cat(masks)
        top = torch.topk(torch.softmax(x @ router.T, -1), 2, dim=-1).indices
        for e in range(5):
            rows = (top == e).any(-1) & keep
            xe = x[rows]
            w1, w3 = (torch.from_numpy(stored[f"{pre}.experts.{e}.{w}.weight"]).double() for w in ("w1", "w3"))
            h = torch.nn.functional.silu(xe @ w1.T) * (xe @ w3.T)
            site = f"model.layers.{layer}.mlp.experts.{e}"
            assert st.count.get(f"{site}.gate", 0) == int(rows.sum())
            if not int(rows.sum()):
                assert not st.has(f"{site}.gate")
                continue
            np.testing.assert_allclose(st.sums["sq"][f"{site}.up"], (xe ** 2).sum(0).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(st.sums["abs"][f"{site}.gate"], xe.abs().sum(0).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(st.sums["sq"][f"{site}.down"], (h ** 2).sum(0).numpy(), rtol=1e-4, atol=1e-8)
    # Layer 0's router never sends a token to expert 4 (arch_models._idle_expert): reported, not an error.
    assert st.count["model.layers.0.mlp.experts.4.down"] == 0
    assert any("experts.4" in n and "no calibration token" in n for n in st.notes)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_per_head_norm_statistics_leave_padding_out(arch, tmp_path):
    """q_norm/k_norm see a row per token and head; padding rows weigh 0 as for any module.
    Independent: q_proj's output per head, padding dropped by the mask, summed in float64."""
    fam = am.build(arch, tmp_path)
    model, _ = load_model(fam.base, CPU, torch.float32)
    attn = model.model.layers[1].self_attn
    name = "model.layers.1.self_attn.q_norm"
    cs = load_calib_set(str(fam.data), fam.root, load_tokenizer(fam.base), 6, 12)
    batches = cs.batches(3)
    assert any(bool((m == 0).any()) for _, m in batches)  # there is padding to leave out
    st = activation_pass(model, {name: attn.q_norm}, ("abs",), batches, CPU, "base")
    outs = []
    h = attn.q_proj.register_forward_hook(lambda _m, _a, o: outs.append(o.detach().double()))
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    h.remove()
    d = attn.q_norm.weight.shape[0]
    x = torch.cat([o.reshape(o.shape[0], o.shape[1], -1, d)[m.bool()] for o, (_i, m) in zip(outs, batches)])
    assert st.count[name] == x.shape[0] * x.shape[1]  # tokens x heads
    np.testing.assert_allclose(st.sums["abs"][name], x.abs().sum((0, 1)).numpy(), rtol=1e-5)
    assert not st.notes


def test_unknown_rename_is_refused_before_calibrating(tmp_path):
    """A loaded module whose weight matches no stored name (a rename arch.py does not know)
    would misplace every decision: one clear error instead."""
    from mergeplan.calibrate.modules import check_names
    from mergeplan.errors import MergeplanError

    fam = am.build("gpt_neox", tmp_path)
    model, _ = load_model(fam.base, CPU, torch.float32)
    stored = stored_tensor_names(fam.base)
    check_names(weighted_sites(model, stored)[0], stored, fam.base)  # embed_out is known
    with pytest.raises(MergeplanError, match=r"calibration module lm_head.weight has no tensor .* mergeplan/arch.py"):
        check_names(weighted_sites(model, None)[0], stored, fam.base)  # as if the rename were unknown
