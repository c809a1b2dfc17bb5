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

import math
import sys

import numpy as np
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


def _bucket_from_top(counts, k: int) -> tuple[int, int, int]:
    """(b, above, inside): the bucket holding the k-th largest key (1 <= k <= total), the
    count of keys in higher buckets, and the count in bucket b. `counts`: a histogram as a
    torch tensor (any device) or a numpy array; shared by topk_mask and the streamed TopK."""
    if isinstance(counts, torch.Tensor):
        counts = counts.cpu().numpy()
    above_or_in = np.cumsum(counts[::-1])[::-1]
    # above_or_in[b] = keys in buckets >= b; the boundary is the highest b with >= k of them.
    b = int(np.count_nonzero(above_or_in >= k)) - 1
    above = int(above_or_in[b + 1]) if b + 1 < len(counts) else 0
    return b, above, int(above_or_in[b]) - above


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


# ---- the same selection, streamed: slice by slice over several passes -----------------------


class TopK:
    """The k largest of n int32 keys seen in flat order, slice by slice, over two passes
    (equal keys: lower flat index first). Afterwards `bits(key, start)` gives any slice's
    membership as int32 -1 (kept) / 0: key > threshold, or key == threshold at a flat
    index <= cut.

    Pass 1 counts the high 15 bits of every key; pass 2 keeps the boundary bucket's
    entries (low 16 bits and flat index), usually a small share of the tensor, which
    settles the exact threshold and the last tie kept. Only when that bucket is too
    large to keep does a third pass find the cut by counting ties.
    """

    def __init__(self, n: int, k: int, keep_limit: int | None = None):
        self.n, self.k = n, k
        self.threshold, self.cut = -1, n  # k == n: every key > -1
        self.stage = "done"
        # Boundary entries kept for the tie cut (12 bytes each); beyond, a third pass.
        self._keep_limit = 2 << 20 if keep_limit is None else keep_limit
        if k == 0:
            self.threshold = (1 << 31) - 1  # nothing is above the largest key
        elif k < n:
            self.stage = "high"
            self._counts = np.zeros(_HIGH_BINS, dtype=np.int64)

    @classmethod
    def known(cls, n: int, k: int, threshold: int, cut: int) -> "TopK":
        """A selection whose boundary the planner already found (the plan's `cutoff`):
        no counting pass. The mask it gives is still checked against the plan's digest."""
        top = cls(n, k)
        top.threshold, top.cut, top.stage = int(threshold), int(cut), "done"
        return top

    def feed(self, key: torch.Tensor, start: int) -> None:
        if self.stage == "high":
            self._counts += torch.bincount(key >> 16, minlength=_HIGH_BINS).numpy()
        elif self.stage == "low":
            idx = torch.nonzero((key >> 16) == self._bucket).reshape(-1)
            if not idx.numel():
                return
            low = key[idx] & 0xFFFF
            if self._idx is None:
                self._counts += torch.bincount(low, minlength=_LOW_BINS).numpy()
                return
            self._lows.append(low)
            self._idx.append(idx + start)
            self._kept += idx.numel()
            if self._kept > self._keep_limit:  # too many to keep: count, and cut ties in a third pass
                self._counts = torch.bincount(torch.cat(self._lows), minlength=_LOW_BINS).numpy()
                self._lows = self._idx = None
        elif self.stage == "cut" and self._seen < self._ties:
            tie = key == self.threshold
            found = int(tie.sum())
            if self._seen + found >= self._ties:
                self.cut = start + int(torch.nonzero(tie).reshape(-1)[self._ties - self._seen - 1])
            self._seen += found

    def finish_pass(self) -> None:
        if self.stage == "high":
            b, above, inside = _bucket_from_top(self._counts, self.k)
            self._bucket, self._need = b, self.k - above
            del self._counts
            if self._need == inside:  # the whole boundary bucket stays
                self.threshold, self.stage = (b << 16) - 1, "done"
            else:
                self._lows, self._idx, self._kept, self.stage = [], [], 0, "low"
        elif self.stage == "low":
            if self._idx is not None:
                lows = torch.cat(self._lows) if self._lows else torch.zeros(0, dtype=torch.int32)
                self._counts = torch.bincount(lows, minlength=_LOW_BINS).numpy()
            t, above, equal = _bucket_from_top(self._counts, self._need)
            del self._counts
            self.threshold = (self._bucket << 16) | t
            ties = self._need - above
            if ties == equal:  # every key equal to the threshold stays
                self.cut, self.stage = self.n, "done"
            elif self._idx is not None:
                self.cut, self.stage = int(torch.cat(self._idx)[lows == t][ties - 1]), "done"
            else:
                self.cut, self._ties, self._seen, self.stage = -1, ties, 0, "cut"
            self._lows = self._idx = None
        elif self.stage == "cut":
            if self.cut < 0:
                raise MergeplanError("top-k tie count changed between passes; are the inputs being modified?")
            self.stage = "done"

    @property
    def done(self) -> bool:
        return self.stage == "done"

    def bits(self, key: torch.Tensor, start: int) -> torch.Tensor:
        """int32 membership of a slice's keys (flat indices start, start+1, ...): -1 kept, 0 not."""
        end = start + key.numel()
        if end - 1 <= self.cut:  # every tie here is kept: key >= threshold
            return torch.sub(self.threshold - 1, key).bitwise_right_shift_(31)
        if start > self.cut:  # no tie here is kept: key > threshold
            return torch.sub(self.threshold, key).bitwise_right_shift_(31)
        idx = torch.arange(start, end, device=key.device)
        keep = (key > self.threshold) | ((key == self.threshold) & (idx <= self.cut))
        return keep.to(torch.int32).neg_()

    def mask(self, key: torch.Tensor, start: int) -> torch.Tensor:
        """bool membership of a slice's keys."""
        return self.bits(key, start) != 0


# ---- the same selection in one pass, given a band that probably holds the boundary ----------


class BitPacker:
    """A flat mask's bytes as masks.pack_bits makes them (np.packbits, big-endian bit
    order), produced slice by slice: slices of any length, the bits continue across them."""

    def __init__(self) -> None:
        self._tail = np.zeros(0, dtype=bool)

    def push(self, bits: torch.Tensor) -> np.ndarray:
        """The packed bytes this slice completes (nonzero = kept)."""
        b = bits.numpy().astype(bool, copy=False)
        if len(self._tail):
            b = np.concatenate([self._tail, b])
        whole = len(b) - len(b) % 8
        self._tail = b[whole:].copy()
        return np.packbits(b[:whole], bitorder="big")

    def flush(self) -> np.ndarray:
        """The last, partly filled byte (if any); call once, after the last slice."""
        tail, self._tail = self._tail, np.zeros(0, dtype=bool)
        return np.packbits(tail, bitorder="big")


class PackedBits(BitPacker):
    """A flat bool mask appended slice by slice and kept packed (BitPacker's bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[np.ndarray] = []

    def add(self, bits: torch.Tensor) -> None:
        self._parts.append(self.push(bits))

    def array(self) -> np.ndarray:
        """The packed mask (uint8), tail included; call once, after the last slice."""
        return np.concatenate(self._parts + [self.flush()])


class BandTopK:
    """The k largest of n keys (equal keys: lower flat index first) in ONE pass, given a
    band [lo, hi] of keys that probably holds the k-th largest (from a sample): keys above
    hi are kept for sure (packed bits), the band's entries are kept aside (key, index).
    `resolve()` then settles the exact set when the k-th key fell inside the band (the
    usual case), or returns False when it did not, or when the band held more than
    `keep_limit` entries: the caller then counts exactly over more passes (TopK). The set
    is topk_mask's by construction: everything above the band, then the band's entries in
    the total order (key descending, index ascending) up to k."""

    def __init__(self, n: int, k: int, lo: int, hi: int, keep_limit: int):
        self.n, self.k, self.lo, self.hi = n, k, lo, hi
        self._limit = keep_limit
        self._above = PackedBits()
        self._n_above = 0
        self._keys: list[torch.Tensor] = []
        self._idx: list[torch.Tensor] = []
        self._kept = 0
        self.failed = False
        self.threshold = self.cut = -1
        self.packed: np.ndarray | None = None

    def feed(self, key: torch.Tensor, start: int) -> None:
        above = key > self.hi
        self._above.add(above)  # counted once at the end, from the packed bits
        if self.failed:
            return
        # above implies key >= lo, so the band is (key >= lo) xor above: two passes, not three
        idx = torch.nonzero(key.ge(self.lo).bitwise_xor_(above)).reshape(-1)
        if idx.numel():
            self._kept += idx.numel()
            if self._kept > self._limit:
                self.failed, self._keys, self._idx = True, [], []
                return
            self._keys.append(key[idx])
            self._idx.append((idx + start).to(torch.int32))  # tensors have < 2**31 elements

    def resolve(self) -> bool:
        """Settle threshold, cut and the packed mask; False when the band missed."""
        packed = self._above.array()
        self._n_above = int(np.bitwise_count(packed).sum())
        need = self.k - self._n_above
        if self.failed or need <= 0 or need > self._kept:
            self.failed = True
            return False
        keys = torch.cat(self._keys).numpy()
        self._keys = []
        idx = torch.cat(self._idx).numpy()
        self._idx = []
        # The band's entries arrived in flat order, so equal keys are already in index
        # order: the threshold comes from counting keys (no sort), and of the entries equal
        # to it the first `ties` are kept.
        span = int(keys.max()) - int(keys.min()) + 1
        if span <= 1 << 22:
            counts = np.bincount(keys - keys.min(), minlength=span)
            b, above, _ = _bucket_from_top(counts, need)
            threshold = int(keys.min()) + b
        else:
            threshold = int(np.partition(keys, len(keys) - need)[len(keys) - need])
            above = int(np.count_nonzero(keys > threshold))
        ties = need - above
        equal = keys == threshold
        keep = (keys > threshold) | (equal & (np.cumsum(equal) <= ties))
        kept = idx[keep].astype(np.int64)
        self.threshold, self.cut = threshold, int(idx[equal][ties - 1])
        np.bitwise_or.at(packed, kept >> 3, (0x80 >> (kept & 7)).astype(np.uint8))
        self.packed = packed
        return True


def band_from_sample(sample: torch.Tensor, k: int, n: int) -> tuple[int, int]:
    """(lo, hi): keys between which the k-th largest of n keys lies with high probability,
    from int32 keys sampled from the n. A sample of all n gives the exact key (lo == hi)."""
    s = torch.sort(sample.reshape(-1), descending=True).values
    size = s.numel()
    if size == n:
        t = int(s[k - 1])
        return t, t
    p = k / n
    r = p * size
    # five standard deviations of the sample quantile, plus slack for clustered samples
    margin = int(5 * math.sqrt(size * p * (1 - p)) + 0.002 * size) + 8
    hi_at, lo_at = math.floor(r) - margin, math.ceil(r) + margin
    hi = int(s[hi_at]) if hi_at >= 0 else (1 << 31) - 1
    lo = int(s[lo_at]) if lo_at < size else 0
    return lo, hi
