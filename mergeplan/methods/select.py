"""Exact top-k by magnitude without sorting.

The total order used everywhere in mergeplan: larger |x| first; on equal |x| the lower
flat (row-major) index first. Every "keep the k largest" decision follows it, so top-k
sets are nested (topk(k) is a subset of topk(k+1)) and reproducible bit for bit.

How: |x| in float32, read as an integer, is monotonic in magnitude (the sign bit is
clear), so the k-th largest value can be found by counting instead of sorting: a
histogram of the high 16 bits (sign dropped: 15 bits) finds the boundary bucket, and a
histogram of the low 16 bits of just that bucket's entries finds the exact threshold.
"""

from __future__ import annotations

import sys

import torch

from mergeplan.errors import MergeplanError

_LOW_BINS = 1 << 16  # low 16 bits of the float32 pattern
_HIGH_BINS = 1 << 15  # high 16 bits without the sign bit
_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)  # int16 halves of each float32


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as float32 reinterpreted as int32: a monotonic integer key for the magnitude.

    -0.0 and +0.0 get the same key (0); NaN sorts above +inf.
    """
    return x.detach().to(torch.float32).abs().reshape(-1).view(torch.int32)


def _bucket_from_top(counts: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(b, above, inside): the bucket holding the k-th largest key, the count of keys in
    higher buckets, and the count in bucket b."""
    above_or_in = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,)).cpu()
    # above_or_in[b] = keys in buckets >= b; the boundary is the highest b with >= k of them.
    b = int(torch.count_nonzero(above_or_in >= k).item()) - 1
    above = int(above_or_in[b + 1].item()) if b + 1 < counts.numel() else 0
    return b, above, int(above_or_in[b].item()) - above


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of x) of exactly the k largest |x|; equal |x|: lower flat index wins.

    x may be any float dtype and live on any device; magnitudes are compared in float32.
    k = 0 gives an all-False mask, k = x.numel() an all-True one.
    """
    n = x.numel()
    if not 0 <= k <= n:
        raise MergeplanError(
            f"top-k selection asked for k={k} of a tensor with {n} elements; "
            "k must lie in [0, numel] (check the density)"
        )
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k == n:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    # Work on the two int16 halves of each float32: half the memory traffic of int32 keys.
    halves = x.detach().to(torch.float32).contiguous().view(torch.int16).view(-1, 2)
    high = halves[:, _HI] & 0x7FFF  # sign cleared: the top 15 magnitude bits
    b, above, inside = _bucket_from_top(torch.bincount(high, minlength=_HIGH_BINS), k)
    need = k - above  # how many of the boundary bucket stay
    mask = high > b
    if inside * 8 < n:
        _fill_small_bucket(mask, high == b, halves[:, _LO], need)
    else:
        _fill_large_bucket(mask, high == b, halves[:, _LO], need)
    return mask.reshape(x.shape)


def _low_key(low_half: torch.Tensor) -> torch.Tensor:
    return low_half.to(torch.int32) & 0xFFFF  # the int16 half read as unsigned


def _fill_small_bucket(mask: torch.Tensor, in_bucket: torch.Tensor, low_half: torch.Tensor, need: int) -> None:
    """Usual case: gather the bucket's entries (in index order) and decide among them."""
    idx = torch.nonzero(in_bucket).reshape(-1)
    low = _low_key(low_half[idx])
    t, above, equal = _bucket_from_top(torch.bincount(low, minlength=_LOW_BINS), need)
    tie = low == t
    if need - above < equal:
        tie &= torch.cumsum(tie, 0) <= need - above  # the lowest indices among equals
    mask[idx[(low > t) | tie]] = True


def _fill_large_bucket(mask: torch.Tensor, in_bucket: torch.Tensor, low_half: torch.Tensor, need: int) -> None:
    """Constant or heavily tied tensors: a gather as long as the tensor costs more than a
    few more full passes, so count with outsiders parked in a spare bin instead."""
    low = _low_key(low_half)
    parked = torch.where(in_bucket, low, _LOW_BINS)
    counts = torch.bincount(parked, minlength=_LOW_BINS + 1)[:_LOW_BINS]
    t, above, equal = _bucket_from_top(counts, need)
    mask |= in_bucket & (low > t)
    tie = in_bucket & (low == t)
    if need - above < equal:
        cut = _nth_true_index(tie, need - above) + 1
        tie[cut:] = False
    mask |= tie


_CHUNK = 1 << 16


def _nth_true_index(flags: torch.Tensor, nth: int) -> int:
    """Flat index of the nth (1-based) True in a 1-D bool tensor that has at least nth.

    Counts per chunk first so only one chunk is searched element by element: all-equal
    tensors would otherwise need an index list as long as the tensor.
    """
    head = flags.numel() - flags.numel() % _CHUNK
    per_chunk = flags[:head].view(-1, _CHUNK).sum(dim=1)
    per_chunk = torch.cat([per_chunk, flags[head:].sum().reshape(1)])
    before = torch.cumsum(per_chunk, 0).cpu()
    chunk = int(torch.count_nonzero(before < nth).item())
    seen = int(before[chunk - 1].item()) if chunk else 0
    start = chunk * _CHUNK
    local = torch.nonzero(flags[start : start + _CHUNK]).reshape(-1)
    return start + int(local[nth - seen - 1].item())
