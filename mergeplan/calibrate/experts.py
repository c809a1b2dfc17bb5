"""Mixture-of-experts layers as transformers 5 holds them: one module per layer whose 3-D
parameters hold every expert (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), called as
experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]).

There is no module per expert to hook, so the statistics of expert e's projections are taken
from the experts module's own inputs: the rows (tokens) the router sent to e, and for the down
projection act(x W_gate^T) * (x W_up^T) recomputed on those rows (the expert's own forward,
once more). The stored per-expert weights are [out, in] (see mergeplan/arch.py for names).
"""

from __future__ import annotations

import torch

PROJS = ("gate", "up", "down")


def is_fused_experts(mod: torch.nn.Module) -> bool:
    p = getattr(mod, "_parameters", {})
    gu, dn = p.get("gate_up_proj"), p.get("down_proj")
    return gu is not None and dn is not None and gu.dim() == 3 and dn.dim() == 3 and hasattr(mod, "act_fn")


def num_experts(mod: torch.nn.Module) -> int:
    return int(mod.gate_up_proj.shape[0])


class ExpertInputs:
    """Stands in for the module of one expert projection: its weight as a view [out, in] of the
    fused parameter (Wanda pruning writes through it), and the experts module to hook."""

    def __init__(self, experts: torch.nn.Module, index: int, proj: str):
        self.experts, self.index, self.proj = experts, index, proj

    @property
    def weight(self) -> torch.Tensor:
        if self.proj == "down":
            return self.experts.down_proj.data[self.index]
        half = self.experts.gate_up_proj.shape[1] // 2
        rows = slice(0, half) if self.proj == "gate" else slice(half, 2 * half)
        return self.experts.gate_up_proj.data[self.index, rows]


def routed(top_k_index: torch.Tensor, index: int) -> torch.Tensor:
    """Token rows the router sent to expert `index` (each once, in order)."""
    return (top_k_index == index).any(dim=-1).nonzero().squeeze(1)


def down_inputs(experts: torch.nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input for rows x of expert `index`, as the experts' forward makes it."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[index]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden [T, H], top_k_index [T, k]) from an experts module's call."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    return hidden, index
