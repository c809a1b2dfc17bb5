"""Combining (masked) task vectors: weighted sums with optional TIES sign consensus.

All arithmetic is float32 and elementwise, in a fixed model order, with separate
multiply and add (no fused multiply-add), so CPU and CUDA give the same bits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergeplan.errors import MergeplanError
from mergeplan.methods.masks import MaskResult

from mergeplan.methods.spec import CONSENSUS  # noqa: E402,F401 - re-exported


def _masked(delta: torch.Tensor, mask: MaskResult | None) -> torch.Tensor:
    return delta.to(torch.float32) if mask is None else mask.apply(delta)


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[MaskResult | None] | None,
    consensus: str | None,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Merged float32 delta.

    e_i = w_i * (mask_i * scale_i * d_i)   (weights first, as mergekit: they sway the sign)
    consensus None:  out = sum_i e_i,   divisor = sum_i w_i (|.| < 1e-8 -> 1)
    consensus "sum": s = sign(sum_i e_i); "count": s = sign(sum_i sign(e_i)); 0 -> +1.
                     a_i = [sign(e_i) == s] (pruned/zero entries never agree)
                     out = sum_i a_i e_i,  divisor = sum_i a_i w_i (0 -> 1), per entry
    normalize: out /= divisor.  Finally out *= lam.
    """
    if not deltas:
        raise MergeplanError("merge_deltas needs at least one delta")
    masks = list(masks) if masks is not None else [None] * len(deltas)
    if not len(weights) == len(masks) == len(deltas):
        raise MergeplanError(
            f"merge_deltas got {len(deltas)} deltas, {len(weights)} weights and {len(masks)} masks; "
            "pass one of each per model"
        )
    if consensus not in (None, *CONSENSUS):
        raise MergeplanError(f"consensus {consensus!r} is not one of sum, count, or none")
    device = deltas[0].device
    w = [_device_scalar(float(x), device) for x in weights]

    def weighted(i: int) -> torch.Tensor:
        return _masked(deltas[i], masks[i]) * w[i]

    if consensus is None:
        out = weighted(0)
        for i in range(1, len(deltas)):
            out += weighted(i)
        if normalize:
            total = float(sum(float(x) for x in weights))
            out /= _device_scalar(1.0 if abs(total) < 1e-8 else total, device)
    else:
        # Pass 1 elects the sign, pass 2 sums the agreeing entries: recomputing e_i costs
        # less memory than holding all of them.
        vote = torch.zeros(deltas[0].shape, dtype=torch.float32, device=device)
        for i in range(len(deltas)):
            e = weighted(i)
            vote += e if consensus == "sum" else torch.sign(e)
        elected = torch.where(vote >= 0, 1.0, -1.0)
        del vote
        out = torch.zeros_like(elected)
        divisor = torch.zeros_like(elected) if normalize else None
        for i in range(len(deltas)):
            e = weighted(i)
            agree = torch.sign(e) == elected
            out += torch.where(agree, e, 0.0)
            if divisor is not None:
                divisor += torch.where(agree, w[i], 0.0)
        if divisor is not None:
            divisor[divisor == 0] = 1.0
            out /= divisor
    if lam != 1.0:
        out *= _device_scalar(float(lam), device)
    return out


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """float32 sum_i w_i T_i, divided by sum_i w_i when normalize (as mergekit's linear)."""
    if not tensors or len(tensors) != len(weights):
        raise MergeplanError(
            f"linear merge got {len(tensors)} tensors and {len(weights)} weights; "
            "pass one weight per model"
        )
    device = tensors[0].device
    out = torch.zeros(tensors[0].shape, dtype=torch.float32, device=device)
    for t, x in zip(tensors, weights):
        out += t.to(torch.float32) * _device_scalar(float(x), device)
    if normalize:
        total = float(sum(float(x) for x in weights))
        if total == 0:
            raise MergeplanError(
                "linear merge with normalize: the weights sum to 0, so there is nothing to "
                "divide by; change the weights or set normalize: false"
            )
        out /= _device_scalar(total, device)
    return out


def _device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on `device`. Dividing by a Python number would let CUDA
    multiply by its reciprocal instead (one bit off the CPU result)."""
    return torch.tensor(value, dtype=torch.float32, device=device)
