"""Parse Hugging Face tensor names into (layer, component) for grids and per-layer rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")

# Last meaningful name part -> short component label, in display order.
COMPONENTS = (
    "embed", "input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down", "norm", "lm_head",
)
_ALIASES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o", "dense": "o",
    "query": "q", "key": "k", "value": "v", "c_attn": "qkv", "qkv_proj": "qkv", "c_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
    "c_fc": "up", "fc1": "up", "fc2": "down", "gate_up_proj": "gate_up",
    "input_layernorm": "input_norm", "ln_1": "input_norm", "post_attention_layernorm": "post_norm",
    "ln_2": "post_norm", "embed_tokens": "embed", "wte": "embed", "wpe": "embed_pos",
    "lm_head": "lm_head", "norm": "norm", "ln_f": "norm", "final_layernorm": "norm",
    "q_norm": "q_norm", "k_norm": "k_norm",
}


@dataclass(frozen=True)
class TensorName:
    name: str
    layer: int | None  # decoder block index, None outside the blocks
    component: str  # short label ("q", "down", "embed", ...) or the raw module name
    kind: str  # "weight" | "bias" | other parameter suffix


def parse_name(name: str) -> TensorName:
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    parts = name.split(".")
    kind = parts[-1] if len(parts) > 1 else "weight"
    module = parts[-2] if len(parts) > 1 else parts[0]
    comp = _ALIASES.get(module, module)
    return TensorName(name=name, layer=layer, component=comp, kind=kind)


def num_layers(names) -> int:
    layers = [parse_name(n).layer for n in names]
    present = [x for x in layers if x is not None]
    return (max(present) + 1) if present else 0
