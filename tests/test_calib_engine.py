import shutil

import numpy as np
import pytest
import torch

from mergeplan.calibrate.data import load_calib_set
from mergeplan.calibrate.gradients import SensitivityCollector
from mergeplan.calibrate.models import load_model, load_tokenizer
from mergeplan.calibrate.modules import linear_sites, weighted_sites
from mergeplan.calibrate.passes import activation_pass, sensitivity_pass
from mergeplan.errors import MergeplanError
from mergeplan.guides import ModelInput, run_guides
from test_calib_family import CORPUS, build_tokenizer, family, load64, module_inputs64, texts_of, tokenise, one_thread  # noqa: F401

CPU = torch.device("cpu")


def _set(family, task="math", seq_len=12):
    tok = load_tokenizer(family.base)
    return load_calib_set(str(family.data[task]), family.root, tok, samples=5, seq_len=seq_len)


def _mods(model, sites):
    return {n: model.get_submodule(n) for n in sites}


def test_statistics_match_a_float64_per_sequence_reference(family):
    cs = _set(family)
    assert cs.padded > 0  # batches of 3 mix lengths: padding is present and must not count
    model, _ = load_model(family.base, CPU, torch.float32)
    sites, _ = weighted_sites(model)
    st = activation_pass(model, _mods(model, sites), ("abs", "sq"), cs.batches(3), CPU, "base")
    ref = module_inputs64(load64(family.base), tokenise(family.base, texts_of(family.data["math"])[:5], 12), list(sites))
    assert set(st.count) == set(sites)
    for n, x in ref.items():
        assert st.count[n] == x.shape[0] == cs.tokens
        np.testing.assert_allclose(st.mean("abs", n), np.abs(x).mean(0), rtol=2e-5, atol=1e-7, err_msg=n)
        np.testing.assert_allclose(st.mean("sq", n), (x * x).mean(0), rtol=2e-5, atol=1e-7, err_msg=n)
    # forward order, not registration order: the input norm of a block runs before its attention
    assert st.order.index("model.layers.0.input_layernorm") < st.order.index("model.layers.0.self_attn.q_proj")
    assert st.order[-1] == "lm_head"


def test_batch_size_does_not_change_statistics(family):
    cs = _set(family, "legal", seq_len=10)
    model, _ = load_model(family.base, CPU, torch.float32)
    mods = _mods(model, linear_sites(model))
    one = activation_pass(model, mods, ("sq",), cs.batches(1), CPU, "base")
    four = activation_pass(model, mods, ("sq",), cs.batches(4), CPU, "base")
    for n in mods:
        assert one.count[n] == four.count[n]
        np.testing.assert_allclose(one.sums["sq"][n], four.sums["sq"][n], rtol=1e-5)


def test_a_module_whose_hook_never_fires_is_named(family):
    cs = _set(family)
    model, _ = load_model(family.base, CPU, torch.float32)
    model.model.layers[0].mlp.extra = torch.nn.Linear(16, 16)  # registered, never called by forward
    sites = linear_sites(model)
    assert "model.layers.0.mlp.extra" in sites
    with pytest.raises(MergeplanError, match=r"module\(s\) model.layers.0.mlp.extra received no input"):
        activation_pass(model, _mods(model, sites), ("sq",), cs.batches(2), CPU, "base")


def test_nan_activations_name_the_first_module_they_reach(family):
    cs = _set(family)
    model, _ = load_model(family.base, CPU, torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(MergeplanError, match=r"entering model.layers.1.mlp.down_proj of model 'base' in batch 0"):
        activation_pass(model, _mods(model, linear_sites(model)), ("sq",), cs.batches(2), CPU, "base")


def test_nan_loss_names_the_module_that_produced_it(family):
    cs = _set(family)
    model, _ = load_model(family.models["code"], CPU, torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 2] = float("inf")
    with pytest.raises(MergeplanError, match=r"non-finite loss on batch 0 .* in model 'code' first produced by model.layers.1.mlp.up_proj"):
        sensitivity_pass(model, cs.batches(1), CPU, "code")


def test_nan_gradient_names_the_parameter(family):
    cs = _set(family)
    model, _ = load_model(family.models["code"], CPU, torch.float32)
    model.model.layers[0].self_attn.v_proj.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(MergeplanError, match=r"non-finite gradient .* for model.layers.0.self_attn.v_proj.weight of model 'code'"):
        sensitivity_pass(model, cs.batches(1), CPU, "code")
    # the hooks are gone and no gradient is left behind after the failure
    assert all(p.grad is None for p in model.parameters())


def test_gradient_memory_is_released_per_parameter(family):
    cs = _set(family)
    model, _ = load_model(family.models["math"], CPU, torch.float32)
    seen = []
    with SensitivityCollector(model, "math") as sc:
        for ids, mask in cs.batches(1)[:1]:
            out = model(input_ids=ids, attention_mask=mask).logits
            loss = out[:, :-1].logsumexp(-1).mean()
            seen.append(sum(p.grad is not None for p in model.parameters()))
            sc.backward(loss, "batch 0")
            seen.append(sum(p.grad is not None for p in model.parameters()))
    assert seen == [0, 0]
    assert all(v > 0 for v in sc.result().values())


# -- bad inputs through run_guides -------------------------------------------------------
def _guides(family, base=None, models=None, **cal):
    return run_guides(
        {"aim": {"omega": 0.5}},
        {"data": str(family.data["math"]), "samples": 2, "seq_len": 8, **cal},
        ModelInput("base", base or family.base),
        models or [ModelInput("math", family.models["math"])],
        family.root,
        quiet=True,
    )


def test_missing_tokenizer(family, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(family.base / f, bare / f)
    with pytest.raises(MergeplanError, match=r"no usable tokenizer in .*bare.*calibration.tokenizer"):
        _guides(family, base=bare)


def test_fine_tune_with_a_smaller_vocabulary(family, tmp_path):
    # (a larger one that keeps the base's ids is a fine-tune that added tokens: tests/test_arch_vocab.py)
    from transformers import LlamaForCausalLM

    from test_calib_family import tiny_config

    n = load_tokenizer(family.base).__len__()
    other = tmp_path / "other"
    LlamaForCausalLM(tiny_config(n - 7)).save_pretrained(other)
    with pytest.raises(MergeplanError, match=rf"fine-tune 'other' has a smaller vocabulary \(vocab_size {n - 7} vs the base's {n}\)"):
        _guides(family, models=[ModelInput("other", other)])


def test_fine_tune_shipping_another_tokenizer(family, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(family.models["code"], ft)
    words = sorted({w for line in CORPUS["legal"] for w in line.split()}, reverse=True)
    build_tokenizer(ft, [" ".join(words)] + [l for v in CORPUS.values() for l in v])
    with pytest.raises(MergeplanError, match="fine-tune 'code' ships a tokenizer whose vocabulary differs"):
        _guides(family, models=[ModelInput("code", ft)])


def test_unknown_model_in_per_model_data(family):
    with pytest.raises(MergeplanError, match=r"calibration.data names 'maths', which is not a model"):
        _guides(family, data={"maths": "math.jsonl"})


def test_abs_product_sum_in_chunks(monkeypatch):
    from mergeplan.calibrate import gradients

    monkeypatch.setattr(gradients, "CHUNK", 7)  # chunks that do not divide the size
    g = torch.Generator().manual_seed(1)
    p, gr = torch.randn(5, 9, generator=g).bfloat16(), torch.randn(5, 9, generator=g).bfloat16()
    want = np.abs(p.double().numpy() * gr.double().numpy()).sum()
    assert float(gradients.abs_product_sum(p, gr)) == pytest.approx(want, rel=1e-6)
