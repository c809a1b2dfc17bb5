"""Gradient sensitivity per parameter: sum over samples of sum_j |theta_j * dL/dtheta_j|.

Each parameter's gradient is consumed by a post-accumulate-grad hook the moment backward
produces it and then freed, so at most one parameter's gradient is alive at a time (no
optimizer-sized gradient memory). Sums accumulate in float64 (see abs_product_sum).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mergeplan.errors import MergeplanError


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from 0..t, over targets that are not padding."""
    # with accelerate's device_map the logits may come back on another device than the inputs
    ids, mask = ids.to(logits.device), mask.to(logits.device)
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100
    )


# Elements per float32 chunk: bounds the transient copies of a bf16 embedding (hundreds of
# millions of elements) to a few hundred MB instead of two float32 copies of the whole matrix.
CHUNK = 1 << 24
# Pairwise float32 halvings before the float64 sum on devices without float64 (MPS): each
# level rounds once per element, so the float32 part of the sum is within PAIR_LEVELS * 2^-24
# (6e-7) relative of exact for these non-negative terms, and only 1/2^PAIR_LEVELS of the
# chunk goes to the CPU.
PAIR_LEVELS = 10


@functools.lru_cache(maxsize=None)
def has_float64(device: torch.device) -> bool:
    """Whether tensors on `device` can be float64 (MPS cannot); probed, not guessed by name."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
        return True
    except (TypeError, RuntimeError):
        return False


def accumulator(device: torch.device) -> torch.Tensor:
    """A float64 zero where abs_product_sum's results for `device` live: that device, else the CPU."""
    return torch.zeros((), dtype=torch.float64, device=device if has_float64(device) else "cpu")


def _pairwise_float32(x: torch.Tensor) -> torch.Tensor:
    """x (float32, 1-D) -> partial sums of 2^PAIR_LEVELS consecutive elements, by pairwise halving."""
    block = 1 << PAIR_LEVELS
    pad = (-x.numel()) % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    x = x.view(-1, block)
    while x.shape[1] > 1:
        x = x[:, 0::2] + x[:, 1::2]
    return x.view(-1)


def abs_product_sum(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum |p * g| as a 0-d float64 tensor on accumulator(p.device)'s device, in chunks.

    A float32 running sum (torch.linalg.vector_norm(ord=1) before) lost 3.5% at 2^24 elements
    on the CPU, and sensitivities of large embeddings with it. Each product |p * g| is formed
    in float32 (exact for bf16 inputs, within 2^-24 for float32 ones) and summed in float64
    where the device has float64 (CPU, CUDA, ...), so there is no host sync inside backward.
    MPS has no float64: there the chunk is reduced by pairwise float32 halvings (bounded error,
    see PAIR_LEVELS) and the 1/1024-size partial sums are added in float64 on the CPU; that
    syncs once per chunk, a cost MPS calibration accepts for a sum good to 1e-6.
    """
    pf, gf = p.reshape(-1), g.reshape(-1)
    wide = has_float64(p.device)
    total = accumulator(p.device)
    for start in range(0, pf.numel(), CHUNK):
        prod = (pf[start : start + CHUNK].to(torch.float32) * gf[start : start + CHUNK].to(torch.float32)).abs_()
        if wide:
            total += prod.sum(dtype=torch.float64)
        else:
            total += _pairwise_float32(prod).cpu().to(torch.float64).sum()
    return total


class SensitivityCollector:
    """Hooks every trainable parameter; after each backward the per-parameter sums grow by |theta*g|."""

    def __init__(self, model: torch.nn.Module, label: str):
        self.label = label
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():  # tied parameters come once
            p.requires_grad_(True)
            self.names.append(name)
            self.params.append(p)
        self.acc = [accumulator(p.device) for p in self.params]  # float64: many samples add up
        self._handles: list = []
        self.samples = 0

    def __enter__(self) -> "SensitivityCollector":
        for i, p in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self.params:
            p.grad = None

    def _hook(self, i: int):
        def consume(p: torch.Tensor) -> None:
            self.acc[i] += abs_product_sum(p.detach(), p.grad)
            p.grad = None

        return consume

    def backward(self, loss: torch.Tensor, where: str) -> None:
        """Backpropagate one loss (the caller checked it is finite) and check the sums."""
        loss.backward()
        self.samples += 1
        flags = [torch.isfinite(a) for a in self.acc]
        devices = {f.device for f in flags}
        ok = torch.stack(flags if len(devices) == 1 else [f.cpu() for f in flags]).cpu()
        if not bool(ok.all()):
            # Backward runs from the head down: the latest bad parameter in forward order is
            # where the gradient first went bad; everything before it inherits the NaN.
            bad = self.names[int(torch.nonzero(~ok)[-1])]
            raise MergeplanError(
                f"non-finite gradient (NaN/inf) for {bad} of model {self.label!r} on {where}; "
                "the backward pass overflowed there: calibrate in float32 (calibration.dtype: float32) "
                "or check that module's weights"
            )

    def result(self) -> dict[str, float]:
        return {n: float(a) for n, a in zip(self.names, self.acc)}
