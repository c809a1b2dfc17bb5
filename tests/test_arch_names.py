"""Component labels from stored tensor names (mergeplan/arch.py), without building models."""

from __future__ import annotations

import pytest

from mergeplan import arch
from mergeplan.plan.names import parse_name


@pytest.mark.parametrize("name, layer, label", [
    ("model.layers.3.self_attn.q_proj.weight", 3, "q"),
    ("model.layers.3.self_attn.q_proj.bias", 3, "q"),
    ("model.layers.0.self_attn.qkv_proj.weight", 0, "qkv"),
    ("model.layers.0.mlp.gate_up_proj.weight", 0, "gate_up"),
    ("transformer.h.1.attn.c_attn.weight", 1, "qkv"),
    ("transformer.h.1.attn.c_proj.weight", 1, "o"),
    ("transformer.h.1.mlp.c_proj.weight", 1, "down"),  # same module name as attn's, another label
    ("transformer.h.1.mlp.c_fc.bias", 1, "up"),
    ("transformer.wpe.weight", None, "embed_pos"),
    ("gpt_neox.layers.2.attention.query_key_value.weight", 2, "qkv"),
    ("gpt_neox.layers.2.attention.dense.weight", 2, "o"),
    ("gpt_neox.layers.2.mlp.dense_4h_to_h.weight", 2, "down"),
    ("gpt_neox.embed_in.weight", None, "embed"),
    ("embed_out.weight", None, "lm_head"),
    ("gpt_neox.final_layer_norm.weight", None, "norm"),
    ("model.layers.5.block_sparse_moe.gate.weight", 5, "router"),
    ("model.layers.5.block_sparse_moe.experts.12.w2.weight", 5, "e12.down"),
    ("model.layers.5.mlp.gate.weight", 5, "router"),
    ("model.layers.5.mlp.gate_proj.weight", 5, "gate"),
    ("model.layers.5.mlp.experts.0.up_proj.weight", 5, "e0.up"),
    ("model.layers.5.mlp.shared_expert.down_proj.weight", 5, "sh.down"),
    ("model.layers.5.mlp.shared_expert_gate.weight", 5, "sh_router"),
    ("model.layers.1.pre_feedforward_layernorm.weight", 1, "pre_ff_norm"),
    ("model.layers.1.self_attn.k_norm.weight", 1, "k_norm"),
    ("model.layers.1.some_new_thing.weight", 1, "some_new_thing"),  # unknown: the module's own name
])
def test_labels(name, layer, label):
    p = parse_name(name)
    assert (p.layer, p.component) == (layer, label)


def test_order_and_short_labels():
    labels = ["e10.down", "down", "e2.up", "router", "q", "e2.gate", "e10.gate", "lm_head", "zz", "embed"]
    assert sorted(labels, key=arch.component_key) == [
        "embed", "q", "down", "router", "e2.gate", "e2.up", "e10.gate", "e10.down", "lm_head", "zz"]
    shorts = [arch.short_label(c) for c in (*arch.COMPONENTS, "e127.down", "e3.gate")]
    assert all(len(s) <= 5 for s in shorts)
    assert len(set(shorts)) == len(shorts)  # headers tell columns apart


def test_renamed_weights_resolve_to_the_stored_name():
    stored = {"embed_out.weight", "model.layers.0.block_sparse_moe.gate.weight",
              "model.layers.0.block_sparse_moe.experts.3.w3.weight", "model.layers.0.mlp.experts.1.down_proj.weight"}
    assert arch.stored_name("lm_head.weight", stored) == "embed_out.weight"
    assert arch.stored_name("model.layers.0.mlp.gate.weight", stored) == "model.layers.0.block_sparse_moe.gate.weight"
    assert arch.stored_name("model.layers.0.mlp.q.weight", stored) is None
    assert arch.expert_tensor("model.layers.0.mlp.experts", 3, "up", stored) == \
        "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    assert arch.expert_tensor("model.layers.0.mlp.experts", 1, "down", stored) == \
        "model.layers.0.mlp.experts.1.down_proj.weight"
    assert arch.expert_tensor("model.layers.0.mlp.experts", 2, "down", stored) is None


def test_edit_groups_cover_fused_moe_and_gemma_components():
    """`mlp`, `norms` and `experts` in the review's edit dialog reach every architecture's
    own labels (one table in mergeplan.arch), limited to those the plan has."""
    from mergeplan.arch import component_groups

    known = ["input_norm", "q", "k", "v", "o", "post_norm", "pre_ff_norm", "gate_up", "down", "post_ff_norm",
             "router", "sh_router", "sh.gate", "sh.up", "sh.down", "e0.gate", "e0.up", "e0.down", "e1.down", "norm"]
    g = component_groups(known)
    assert g["attn"] == ["q", "k", "v", "o"]
    assert g["norms"] == ["input_norm", "post_norm", "pre_ff_norm", "post_ff_norm", "norm"]
    assert g["mlp"] == ["gate_up", "down", "router", "sh_router", "sh.gate", "sh.up", "sh.down",
                        "e0.gate", "e0.up", "e0.down", "e1.down"]
    assert g["experts"] == ["router", "sh_router", "sh.gate", "sh.up", "sh.down", "e0.gate", "e0.up", "e0.down", "e1.down"]
