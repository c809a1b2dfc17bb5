"""What mergeplan knows about model architectures, in one place (no torch here).

Three things, all derived from the tensor names stored in the safetensors files:

* component labels for grids, LEWIS and the per-layer tables: `component_of(name)` gives the
  short label of a stored tensor ("q", "qkv", "gate_up", "router", "e3.down", ...). Fused
  projections keep a fused label (GPT-2 `c_attn` and GPT-NeoX `query_key_value` are "qkv",
  Phi-3 `gate_up_proj` is "gate_up"): one stored tensor is one cell, measured and decided as
  one. Mixture-of-experts weights are labelled per expert ("e{N}.gate|up|down") and the
  router "router"; a shared expert (Qwen2-MoE) "sh.gate|up|down" and its gate "sh_router".
* where a loaded module's weight is stored, for architectures whose transformers classes
  rename weights on load (`stored_candidates`): GPT-NeoX's head is `embed_out` on disk and
  `lm_head` in memory; transformers 5 holds Mixtral/Qwen-MoE experts as one 3-D parameter per
  layer (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) that the
  checkpoints store per expert (`experts.N.w1|w3|w2` for Mixtral, `experts.N.gate_proj|
  up_proj|down_proj` for Qwen-MoE), and Mixtral's router `mlp.gate` is
  `block_sparse_moe.gate` on disk.
* the display order of components (`component_key`) and their 5-cell short forms
  (`short_label`).

Supported and tested families (tests/test_arch_matrix.py): Llama, Mistral, Qwen2, Qwen3,
Gemma2, Gemma3, Phi-3, GPT-2, GPT-NeoX, Mixtral, Qwen2-MoE, Qwen3-MoE. This module is
torch-free (plan readers use it); what must look at loaded torch modules (GPT-2's Conv1D,
routers, the fused experts' in-memory layout) sits beside the hooks, in
calibrate/modules.py and calibrate/experts.py.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.([A-Za-z0-9_]+)$")

# Module path suffixes inside a decoder block (longest match wins) -> label. Suffixes with a
# parent ("attn.c_proj") tell apart modules that share a last name across architectures.
_IN_BLOCK = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "query": "q", "key": "k", "value": "v", "dense": "o",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "attn.c_proj": "o", "attention.dense": "o", "self_attn.dense": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down", "fc1": "up", "fc2": "down",
    "c_fc": "up", "mlp.c_proj": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "gate_up_proj": "gate_up",
    "mlp.gate": "router", "block_sparse_moe.gate": "router", "router": "router",
    "shared_expert.gate_proj": "sh.gate", "shared_expert.up_proj": "sh.up",
    "shared_expert.down_proj": "sh.down", "shared_expert_gate": "sh_router",
    "input_layernorm": "input_norm", "ln_1": "input_norm",
    "post_attention_layernorm": "post_norm", "ln_2": "post_norm",
    "pre_feedforward_layernorm": "pre_ff_norm", "post_feedforward_layernorm": "post_ff_norm",
    "q_norm": "q_norm", "k_norm": "k_norm",
}
_EXPERT_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
# Outside the blocks: the last module name decides.
_TOP = {
    "embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "word_embeddings": "embed",
    "wpe": "embed_pos", "lm_head": "lm_head", "embed_out": "lm_head",
    "norm": "norm", "ln_f": "norm", "final_layernorm": "norm", "final_layer_norm": "norm", "final_norm": "norm",
}

# Display order; expert labels sort after the dense MLP by expert index, then gate, up, down.
COMPONENTS = (
    "embed", "embed_pos", "input_norm", "q", "k", "v", "qkv", "q_norm", "k_norm", "o", "post_norm",
    "pre_ff_norm", "gate", "up", "gate_up", "down", "post_ff_norm", "router", "sh_router", "sh.gate",
    "sh.up", "sh.down", "experts", "norm", "lm_head",
)
_RANK = {c: i for i, c in enumerate(COMPONENTS)}
_PROJ_RANK = {"gate": 0, "up": 1, "down": 2}

_SHORT = {
    "input_norm": "in_n", "post_norm": "post", "lm_head": "head", "embed": "emb", "embed_pos": "pos",
    "gate_up": "g_up", "q_norm": "q_n", "k_norm": "k_n", "pre_ff_norm": "preff", "post_ff_norm": "pstff",
    "router": "rtr", "sh_router": "sh.r", "sh.gate": "sh.g", "sh.up": "sh.u", "sh.down": "sh.d",
}


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def component_of(name: str) -> str:
    """Short component label of a stored tensor name (or of a module name + ".x")."""
    parts = name.split(".")
    module = ".".join(parts[:-1]) if len(parts) > 1 else parts[0]
    m = _LAYER.search(name)
    if m is None:
        last = module.rsplit(".", 1)[-1]
        return _TOP.get(last, last)
    inner = module[m.end():]  # path inside the block, e.g. "mlp.experts.3.w1"
    e = _EXPERT.search(inner)
    if e is not None and e.group(2) in _EXPERT_PROJ:
        return f"e{int(e.group(1))}.{_EXPERT_PROJ[e.group(2)]}"
    bits = inner.split(".")
    for k in range(min(len(bits), 2), 0, -1):
        label = _IN_BLOCK.get(".".join(bits[-k:]))
        if label is not None:
            return label
    return bits[-1]


def component_key(label: str) -> tuple[int, int, int, str]:
    """Sort key that puts components in display order (unknown labels last, by name)."""
    if label.startswith("e") and "." in label and label[1:label.index(".")].isdigit():
        idx, proj = label[1:].split(".", 1)
        return (_RANK["experts"], int(idx), _PROJ_RANK.get(proj, 3), proj)
    return (_RANK.get(label, len(_RANK)), 0, 0, label)


def short_label(label: str) -> str:
    """At most 5 characters, for grid column headers."""
    if label in _SHORT:
        return _SHORT[label]
    if label.startswith("e") and "." in label and label[1:label.index(".")].isdigit():
        idx, proj = label[1:].split(".", 1)
        return f"e{idx}{proj[:1]}"[:5]
    return label[:5]


def is_expert(label: str) -> bool:
    return component_key(label)[0] == _RANK["experts"]


def component_groups(known) -> dict[str, list[str]]:
    """Group names a user may type instead of listing components (the review's edit dialog):
    attn, mlp (dense, fused, shared expert, routers and every expert), norms (every norm,
    Gemma's pre/post feed-forward ones included) and experts (experts and routers), each
    limited to the labels present in `known`."""
    norms = {"input_norm", "post_norm", "pre_ff_norm", "post_ff_norm", "norm", "q_norm", "k_norm"}
    attn = {"q", "k", "v", "o", "qkv", "q_norm", "k_norm"}
    routers = {"router", "sh_router"}
    shared = {"sh.gate", "sh.up", "sh.down"}
    dense = {"gate", "up", "down", "gate_up"}
    groups = {
        "attn": [c for c in known if c in attn],
        "mlp": [c for c in known if c in dense | routers | shared or is_expert(c)],
        "norms": [c for c in known if c in norms],
        "experts": [c for c in known if c in routers | shared or is_expert(c)],
    }
    return groups


# ---- names on disk vs names in memory ----------------------------------------------------

# (in-memory prefix pattern, stored replacement): tried in order, the first one found among
# the stored names wins. A name stored as it is loaded needs none of these.
_RENAMES = (
    (re.compile(r"^lm_head\.(weight|bias)$"), r"embed_out.\1"),  # GPT-NeoX
    (re.compile(r"^(.*\.)mlp\.gate\.weight$"), r"\1block_sparse_moe.gate.weight"),  # Mixtral router
)

# Fused in-memory expert parameters -> per-expert stored projections, by checkpoint style.
# gate_up_proj[e] is [gate; up] stacked along its rows (transformers chunks its output in
# two, gate first); down_proj[e] is the down projection [H, I].
EXPERT_STYLES = {
    "mixtral": ("block_sparse_moe.experts", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen": ("mlp.experts", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}


def stored_candidates(param: str) -> list[str]:
    """Stored names a loaded parameter may have, the name itself first."""
    out = [param]
    for pat, rep in _RENAMES:
        if pat.match(param):
            out.append(pat.sub(rep, param))
    return out


def stored_name(param: str, stored: set[str]) -> str | None:
    """The stored tensor a loaded parameter comes from, or None when no known rename fits."""
    return next((c for c in stored_candidates(param) if c in stored), None)


def expert_tensor(experts_module: str, index: int, proj: str, stored: set[str]) -> str | None:
    """Stored weight of expert `index`'s projection proj ("gate" | "up" | "down") for the fused
    experts module at `experts_module` (e.g. "model.layers.0.mlp.experts"), or None."""
    block = experts_module.rsplit(".", 2)[0]  # "model.layers.0"
    for prefix, names in EXPERT_STYLES.values():
        cand = f"{block}.{prefix}.{index}.{names[proj]}.weight"
        if cand in stored:
            return cand
    return None
