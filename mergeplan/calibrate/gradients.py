"""Gradient sensitivity per parameter: sum over samples of sum_j |theta_j * dL/dtheta_j|.

Each parameter's gradient is consumed by a post-accumulate-grad hook the moment backward
produces it and then freed, so at most one parameter's gradient is alive at a time (no
optimizer-sized gradient memory). Sums are float32 on the parameter's device.
"""

from __future__ import annotations

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


def abs_product_sum(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum |p * g| in float32, in chunks."""
    pf, gf = p.reshape(-1), g.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=p.device)
    for start in range(0, pf.numel(), CHUNK):
        a = pf[start : start + CHUNK].to(torch.float32)
        b = gf[start : start + CHUNK].to(torch.float32)
        total += torch.linalg.vector_norm(a * b, ord=1)
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
        self.acc = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]
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
