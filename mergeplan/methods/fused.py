"""The fused form of combine.merge_deltas for one slice, used by streamed apply.

It differs from merge_deltas only in how it selects: `where(mask, x, 0)` becomes a bit-and
with an all-ones/all-zeros int mask, and the sign election uses clamp/sign/copysign
instead of where (torch.where costs ~10 ns per element on random masks: branch misses).
Both give the same bits for finite values, signed zeros included; a slice whose sign vote
is not finite returns None and goes through registry.merge_tensor itself. That equality
is proven by property tests (tests/test_fused_kernel.py: dtypes, signs, zeros, subnormals,
ties, cancellations, huge values, masks and rescales, weights of every sign), not probed
at run time: a change to combine.py that breaks it fails the tests.
"""

from __future__ import annotations

import math

import torch

from .registry import method_spec


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)  # as combine._device_scalar on the CPU


class FusedMerge:
    """registry.merge_tensor for a GTA method with consensus None or "sum", one slice at a
    time from the float32 base and deltas, without torch.where (see the module doc).
    __call__ returns None when the slice's sign vote is not finite; the caller then runs
    merge_tensor itself."""

    def __init__(self, method: str, params: dict, scales: list[float | None], weights: list[float]):
        spec = method_spec(method)
        self.normalize = params.get("normalize", spec.normalize)
        self.consensus = params.get("consensus_method", spec.consensus)
        self.lam = float(params.get("lambda", 1.0))
        self.scales = scales
        self.w = [_scalar(float(x)) for x in weights]
        total = float(sum(float(x) for x in weights))
        self.total = _scalar(1.0 if abs(total) < 1e-8 else total)
        self.w_col = torch.tensor([float(x) for x in weights], dtype=torch.float32).view(-1, 1)
        # One multiply for all rows only when every model has a scale (x * 1.0 is not
        # written for the others, to keep the operations those of merge_deltas).
        self.s_col = (torch.tensor(scales, dtype=torch.float32).view(-1, 1)
                      if all(x is not None for x in scales) else None)
        self._keep_all: torch.Tensor | None = None

    def rows(self, b32: torch.Tensor, d: torch.Tensor, maskbits: list[torch.Tensor | None]) -> torch.Tensor | None:
        """As __call__ with the deltas as the rows of one [models, slice] tensor: the
        elementwise steps run once over all rows (same operations per element), and only
        the sums over models go row by row, in model order."""
        if self.s_col is None and any(x is not None for x in self.scales):
            return self(b32, list(d.unbind(0)), maskbits)
        if any(b is None for b in maskbits):
            if self._keep_all is None or self._keep_all.numel() < d.shape[1]:
                self._keep_all = torch.full((d.shape[1],), -1, dtype=torch.int32)
            keep_all = self._keep_all[:d.shape[1]]
            maskbits = [keep_all if b is None else b for b in maskbits]
        x = d * self.s_col if self.s_col is not None else d
        # where(mask, x, +0.0) for every model; a model without a mask keeps all bits.
        e = (x.view(torch.int32) & torch.stack(maskbits)).view(torch.float32).mul_(self.w_col)
        if self.consensus is None:
            out = e[0]
            for i in range(1, e.shape[0]):
                out += e[i]
            if self.normalize:
                out /= self.total
        else:
            vote = torch.zeros_like(b32)
            for i in range(e.shape[0]):
                vote += e[i]
            if not math.isfinite(float(vote.sum())):
                return None
            elected = torch.ones_like(vote).copysign_(vote)
            p = e.mul_(elected).clamp_min_(0.0)
            out = torch.zeros_like(b32)
            if self.normalize:
                agreeing_w = torch.sign(p).mul_(self.w_col)
                divisor = torch.zeros_like(b32)
                for i in range(e.shape[0]):
                    divisor += agreeing_w[i]
            p.mul_(elected)
            for i in range(e.shape[0]):
                out += p[i]
            if self.normalize:
                self._normalize(out, divisor)
        return self._finish(b32, out)

    def __call__(self, b32: torch.Tensor, deltas: list[torch.Tensor], maskbits: list[torch.Tensor | None]) -> torch.Tensor | None:
        e = []
        for d, bits, s, wi in zip(deltas, maskbits, self.scales, self.w):
            x = d
            if bits is not None:
                if s is not None:
                    x = x * s
                x = (x.view(torch.int32) & bits).view(torch.float32)  # where(mask, x, +0.0)
            e.append(x * wi)
        if self.consensus is None:
            out = e[0]
            for x in e[1:]:
                out += x
            if self.normalize:
                out /= self.total
        else:
            vote = torch.zeros_like(b32)
            for x in e:
                vote += x
            if not math.isfinite(float(vote.sum())):
                return None  # some e_i is inf/NaN (or the sum overflowed): let merge_tensor decide
            # vote is never -0.0 (a sum that starts at +0.0), so this is where(vote >= 0, 1, -1).
            elected = torch.ones_like(vote).copysign_(vote)
            out = torch.zeros_like(b32)
            divisor = torch.zeros_like(b32) if self.normalize else None
            for x, wi in zip(e, self.w):
                # p = |e_i| where e_i agrees with the elected sign, else a zero; p * elected = e_i.
                p = x.mul_(elected).clamp_min_(0.0)
                if divisor is not None:
                    divisor += torch.sign(p).mul_(wi)  # w_i where agreeing, else a zero
                out += p.mul_(elected)  # adding a zero leaves out (never -0.0) unchanged
            if divisor is not None:
                self._normalize(out, divisor)
        return self._finish(b32, out)

    @staticmethod
    def _normalize(out: torch.Tensor, divisor: torch.Tensor) -> None:
        # divisor[divisor == 0] = 1: sign(x)^2 is 1 except at 0 (and NaN, which stays NaN).
        sq = torch.sign(divisor)
        divisor += sq.mul_(sq).neg_().add_(1.0)
        out /= divisor

    def _finish(self, b32: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.lam != 1.0:
            out *= _scalar(self.lam)
        return b32 + out


def fused_applies(method: str, params: dict, weights: list[float]) -> bool:
    """Whether FusedMerge applies: consensus None/"sum", a base, at least one model, finite
    weights (the property tests cover exactly these)."""
    spec = method_spec(method)
    if not weights or not spec.needs_base or not all(math.isfinite(float(x)) for x in weights):
        return False
    return params.get("consensus_method", spec.consensus) in (None, "sum")
