"""Merge one tensor slice by slice, reading each slice straight from the input shards.

Why: the whole-tensor path (execute.run_tensor) holds every input plus several float32
copies at once; a 32k x 2048 embedding is 262 MB per float32 copy, so peak memory grows
with the largest tensor x models x threads. Here a tensor costs its output buffer plus a
few slices, whatever its size.

Why the bytes do not change: every output element goes through the float32 operations
of run_tensor, in the same order; only the way the work is cut differs.
- Magnitude masks (ties, breadcrumbs) need the whole tensor only to find a threshold:
  the k largest keys |d| (float32 bits as int32, select.py's key), equal keys: lower
  flat index first. That set is found exactly by counting, slice by slice: a histogram
  of the high 15 bits, then the boundary bucket's entries (low 16 bits, flat index),
  which give the exact threshold and the last tie kept (class TopK). It equals
  topk_mask's set by definition, and the recomputed digests are checked against the
  plan as before.
- Bernoulli masks draw the key's generator slice after slice; torch.rand's CPU stream
  is sequential, so the concatenated draws equal one draw of the whole shape.
- The merge is elementwise. By default each slice goes through the fused kernel below,
  which differs from combine.merge_deltas only in how it selects: `where(mask, x, 0)`
  becomes a bit-and with an all-ones/all-zeros int mask, and the sign election uses
  clamp/sign/copysign instead of where (torch.where costs ~10 ns per element on random
  masks: branch misses). Both give the same bits for finite values (signed zeros
  included); a slice whose sign vote is not finite goes through registry.merge_tensor
  itself, and a probe compares the kernel with merge_tensor on synthetic data before
  its first use for each parameter set, so a change in combine.py falls back instead of
  silently diverging.
Methods whose masks need the whole tensor at once (della, n:m/CABS, l1 rescale,
explicit mask bits) keep the whole-tensor path: `streamable` says which.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import InputMismatchError, MergeplanError
from .execute import nonfinite_error, relax_factors, relax_with
from .io.modeldir import ModelDir
from .io.tensors import st_to_torch
from .methods.masks import MaskResult, breadcrumbs_window, check_spec, magnitude_keep_count
from .methods.registry import method_spec, merge_tensor
from .methods.rng import generator_for
from .plan.model import OP_MERGE, Plan, TensorPlan

CHUNK = 1 << 17  # elements per slice: small enough for cache, large enough that per-op
# overhead (and, with threads, GIL hand-offs) stays a small share
_HIGH_BINS = 1 << 15
_LOW_BINS = 1 << 16
_STREAM_KINDS = ("magnitude", "breadcrumbs", "bernoulli")


# ---- which tensors -------------------------------------------------------------------------


def streamable(plan: Plan, tp: TensorPlan) -> bool:
    """True when run_streamed reproduces run_tensor for this tensor (see the module doc)."""
    if tp.op != OP_MERGE or len(tp.shape) == 0 or math.prod(tp.shape) == 0:
        return False
    if tp.relax is not None and tp.relax.get("kind") != "aim":
        return False
    for c in tp.contributions:
        spec = c.mask
        if spec is None:
            continue
        if "bits" in spec or spec.get("kind") not in _STREAM_KINDS:
            return False
        if spec.get("rescale", "none") not in ("none", "inverse"):
            return False  # l1's float64 sums over the whole tensor are order-dependent
    return True


# ---- reading slices ------------------------------------------------------------------------


class SliceSource:
    """Slices of one tensor in several inputs: index 0 is the base (or None), then one per
    contribution. read() returns a 1-D CPU tensor in the stored dtype."""

    has_base: bool
    models: list[str | None]

    def read(self, index: int, start: int, count: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class MemorySlices(SliceSource):
    """Tensors already in memory (tests, small tensors)."""

    def __init__(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], models: Sequence[str | None] | None = None):
        self._flat = [None if base is None else base.reshape(-1)] + [t.reshape(-1) for t in tensors]
        self.has_base = base is not None
        self.models = list(models) if models is not None else [None] * len(self._flat)
        self.stacked: torch.Tensor | None = None  # [1 + models, numel] when base and inputs are rows of one tensor

    @classmethod
    def rows(cls, stacked: torch.Tensor, models: Sequence[str | None]) -> "MemorySlices":
        """Base and inputs as the rows of one [1 + models, numel] tensor: a slice of all of
        them is then one strided view, converted and subtracted in one call each."""
        src = cls(stacked[0], list(stacked[1:]), models)
        src.stacked = stacked
        return src

    def read(self, index: int, start: int, count: int) -> torch.Tensor:
        return self._flat[index][start:start + count]


class FileSlices(SliceSource):
    """One tensor's slices read with pread from each input's shard (page cache, no mmap)."""

    def __init__(self, name: str, dirs: Sequence[ModelDir | None], models: Sequence[str | None], record: bool = False):
        self.name = name
        self.has_base = dirs[0] is not None
        self.models = list(models)
        self._dirs = list(dirs)
        self._shape: tuple[int, ...] = ()
        self._where = []
        # Content checks against the plan's digests, fed by whichever pass reads each
        # input from its start to its end in order (see verify()).
        # record: hash every input to record its digest (the planner) instead of checking.
        self._checks = [d.checker(name, record) if d is not None else None for d in dirs]
        for d in dirs:
            if d is None:
                self._where.append(None)
                continue
            info = d.info(name)
            self._shape = tuple(info.shape)
            dtype = st_to_torch(info.dtype)
            self._where.append((dtype, torch.empty((), dtype=dtype).element_size()))

    def read(self, index: int, start: int, count: int) -> torch.Tensor:
        dtype, size = self._where[index]
        buf = torch.empty(count * size, dtype=torch.uint8)
        self._read_into(index, start, buf)
        return buf.view(dtype)

    def nbytes(self) -> int:
        """Bytes of all inputs together (one whole tensor each)."""
        n = math.prod(self._shape) if self._shape else 0
        return sum(w[1] * n for w in self._where if w is not None)

    def in_memory(self, buf: torch.Tensor) -> "MemorySlices":
        """Every input read whole into `buf` (uint8, at least nbytes()): the passes then
        slice memory instead of reading the shards again."""
        n = math.prod(self._shape)
        flat: list[torch.Tensor | None] = []
        pos = 0
        for index, w in enumerate(self._where):
            if w is None:
                flat.append(None)
                continue
            part = buf[pos:pos + n * w[1]]
            self._read_into(index, 0, part)
            flat.append(part.view(w[0]))
            pos += n * w[1]
        if flat[0] is not None and len({t.dtype for t in flat}) == 1:
            return MemorySlices.rows(buf[:pos].view(flat[0].dtype).view(len(flat), n), self.models)
        return MemorySlices(flat[0], flat[1:], self.models)

    def _read_into(self, index: int, start: int, buf: torch.Tensor) -> None:
        offset = start * self._where[index][1]
        self._dirs[index].read_into(self.name, offset, buf)
        check = self._checks[index]
        if check is not None:
            check.feed(offset, memoryview(buf.numpy()))

    def digests(self) -> list[bytes | None]:
        """sha256 of each input as read (record mode), base first; None where no input."""
        return [c.digest() if c is not None else None for c in self._checks]

    def verify(self, complete_only: bool = False) -> None:
        """Raise InputMismatchError when an input's bytes, as read, differ from the plan's
        digest. run_streamed reads every input whole and in order at least once, so
        each check has seen every byte by now."""
        for check in self._checks:
            if check is not None and (check.complete or not complete_only):
                check.finish()


# Streamed tensors whose inputs take at most this many bytes together are read whole once
# into a per-thread buffer (every pass then slices memory); larger ones are read slice by
# slice from the shards in every pass.
IN_MEMORY_INPUTS = 96 << 20


def grown(ws: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """ws[key], replaced by a larger buffer when it holds fewer than numel elements."""
    buf = ws.get(key)
    if buf is None or buf.numel() < numel:
        ws.pop(key, None)
        buf = ws[key] = torch.empty(numel, dtype=dtype)
    return buf


def tensor_inputs(tp: TensorPlan, base: tuple[str, ModelDir] | None, dirs: dict[str, ModelDir],
                  workspace: dict[str, torch.Tensor], record: bool = False) -> tuple[FileSlices, SliceSource]:
    """(files, src): the one reader of a tensor's inputs (base first, then one per
    contribution) for planner and apply alike. `files` hashes what is read (checks it
    against the plan's digests, or records them); `src` is what the passes read, the
    same files or, for mid-size tensors, everything read once into `workspace`'s buffer
    (fresh buffers would fault in page by page for every tensor)."""
    files = FileSlices(tp.name, [base[1] if base else None] + [dirs[c.model] for c in tp.contributions],
                       [base[0] if base else None] + [c.model for c in tp.contributions], record)
    if files.nbytes() <= IN_MEMORY_INPUTS:
        return files, files.in_memory(grown(workspace, "in", torch.uint8, files.nbytes()))
    return files, files


# ---- exact top-k by counting ---------------------------------------------------------------


def _bucket_from_top(counts: np.ndarray, k: int) -> tuple[int, int, int]:
    """(b, above, inside): the bucket holding the k-th largest key (1 <= k <= total), the
    count of keys in higher buckets, the count in bucket b."""
    at_or_above = np.cumsum(counts[::-1])[::-1]
    b = int(np.count_nonzero(at_or_above >= k)) - 1
    above = int(at_or_above[b + 1]) if b + 1 < len(counts) else 0
    return b, above, int(at_or_above[b]) - above


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


# ---- per-contribution masks ---------------------------------------------------------------


@dataclass
class _Mask:
    """How one contribution's mask is made slice by slice, and its rescale factor."""

    kind: str  # "magnitude" | "breadcrumbs" | "bernoulli"
    scale: float | None
    selections: list[TopK] = field(default_factory=list)  # magnitude: [top]; breadcrumbs: [outer, inner?]
    generator: torch.Generator | None = None
    prob: torch.Tensor | None = None
    digest: object | None = None  # hashlib object while checking
    want: str | None = None
    _tail: np.ndarray | None = None

    def slice_bits(self, key: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
        """The slice's mask as int32 -1 (kept) / 0: ready for a bit-and with float32 bits."""
        if self.kind == "bernoulli":
            keep = torch.rand(count, generator=self.generator, dtype=torch.float32) < self.prob
            return keep.to(torch.int32).neg_()
        bits = self.selections[0].bits(key, start)
        if len(self.selections) > 1:
            bits &= ~self.selections[1].bits(key, start)
        return bits

    def hash_slice(self, mask_bits: torch.Tensor) -> None:
        """Feed mask_digest's byte stream (np.packbits, big-endian, row-major) one slice at a time."""
        bits = mask_bits.to(torch.uint8).numpy()  # packbits packs nonzero as 1
        if self._tail is not None and len(self._tail):
            bits = np.concatenate([self._tail, bits])
        whole = len(bits) - len(bits) % 8
        self.digest.update(np.packbits(bits[:whole], bitorder="big").tobytes())
        self._tail = bits[whole:].copy()

    def hexdigest(self) -> str:
        if self._tail is not None and len(self._tail):
            self.digest.update(np.packbits(self._tail, bitorder="big").tobytes())
            self._tail = None
        return self.digest.hexdigest()[:32]


def _inverse_scale(kept: int, n: int) -> float | None:
    """masks._finish's factor for a deterministic mask with `kept` of n entries."""
    keep_prob = kept / n if kept else 0.0
    return 1.0 / keep_prob if keep_prob > 0 else None


def _mask_for(plan: Plan, tp: TensorPlan, model: str, spec: dict | None, n: int, check_digests: bool) -> _Mask | None:
    if spec is None:
        return None
    check_spec(spec, f"tensor {tp.name!r}, model {model!r}")  # same refusal as build_masks
    kind, density = spec["kind"], float(spec["density"])
    if density >= 1.0:
        return None  # as masks._single_mask: the delta stays untouched, rescale included
    inverse = spec.get("rescale", "none") == "inverse"
    if kind == "bernoulli":
        m = _Mask(kind, (1.0 / density if density > 0 else None) if inverse else None,
                  generator=generator_for(plan.seed, tp.name, model),
                  prob=torch.tensor(density, dtype=torch.float32))
    elif kind == "magnitude":
        k = magnitude_keep_count(density, n)
        cutoff = spec.get("cutoff") if spec.get("digest") else None  # only with a digest to verify it
        top = TopK.known(n, k, *cutoff) if cutoff is not None else TopK(n, k)
        m = _Mask(kind, _inverse_scale(k, n) if inverse else None, selections=[top])
    else:
        top, kept = breadcrumbs_window(density, float(spec["gamma"]), n)
        sels = [TopK(n, top + kept)] + ([TopK(n, top)] if top else [])
        m = _Mask(kind, _inverse_scale(kept, n) if inverse else None, selections=sels)
    if check_digests and spec.get("digest"):
        m.digest, m.want = hashlib.sha256(), spec["digest"]
    return m


# ---- the fused kernel -----------------------------------------------------------------------


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)  # as combine._device_scalar on the CPU


class _Fused:
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


def _fused_ok(method: str, params: dict, weights: list[float]) -> bool:
    """Whether _fused applies: consensus None/"sum", a base, finite weights."""
    spec = method_spec(method)
    if not spec.needs_base or not all(math.isfinite(float(x)) for x in weights):
        return False
    return params.get("consensus_method", spec.consensus) in (None, "sum")


_PROBE_CACHE: dict[tuple, bool] = {}
_PROBE_LOCK = threading.Lock()


def _probe(method: str, params: dict, weights: list[float], scales: list[float | None], masked: list[bool]) -> bool:
    """Does _fused give merge_tensor's bytes for these parameters? Checked once per
    parameter set on synthetic bf16 data with zeros, signed zeros, ties and cancellations."""
    key = (method, repr(sorted(params.items())), tuple(weights), tuple(scales), tuple(masked))
    with _PROBE_LOCK:
        if key in _PROBE_CACHE:
            return _PROBE_CACHE[key]
    g = torch.Generator().manual_seed(1234)
    n = 4096
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    base[:64] = 0.0
    base[64:128] = -0.0
    tensors = []
    for i in range(len(weights)):
        t = (base.float() + torch.randn(n, generator=g) * 0.004).to(torch.bfloat16)
        t[i * 97:i * 97 + 300] = base[i * 97:i * 97 + 300]  # zero deltas
        t[2000 + i:2100] = -t[2000 + i:2100]  # opposite signs across models
        tensors.append(t)
    keeps = [torch.rand(n, generator=g) < 0.5 if m else None for m in masked]
    masks = [None if k is None else MaskResult(k, s) for k, s in zip(keeps, scales)]
    want = merge_tensor(method, base, tensors, weights, masks, params)
    b32 = base.float()
    deltas = [t.float() - b32 for t in tensors]
    bits = [None if k is None else -k.to(torch.int32) for k in keeps]
    kernel = _Fused(method, params, scales, weights)
    ok = True
    for got in (kernel(b32, deltas, bits), kernel.rows(b32, torch.stack(deltas), bits)):
        ok = ok and got is not None and torch.equal(want.view(torch.int32), got.view(torch.int32))
    with _PROBE_LOCK:
        _PROBE_CACHE[key] = ok
    return ok


# ---- one tensor -----------------------------------------------------------------------------


def _slices(shape: tuple[int, ...], chunk: int, whole_rows: bool):
    """(start, count) over the flat tensor; whole rows of dim 0 when the relaxation needs them."""
    n = math.prod(shape)
    step = chunk
    if whole_rows:
        row = n // shape[0]
        step = max(1, chunk // row) * row
    for start in range(0, n, step):
        yield start, min(step, n - start)


def run_streamed(plan: Plan, tp: TensorPlan, src: SliceSource, out_dtype: torch.dtype,
                 chunk: int = CHUNK, check_digests: bool = True, fused: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """run_tensor(plan, tp, inputs).to(out_dtype) computed slice by slice: same bytes.

    `out`: a 1-D buffer of out_dtype with at least numel elements to fill (reused
    between tensors by apply), else a new tensor.

    Raises the same errors: non-finite inputs (MergeplanError naming the model), a
    recomputed mask that misses the plan's digest (InputMismatchError)."""
    shape = tuple(tp.shape)
    n = math.prod(shape)
    contribs = tp.contributions
    masks = [_mask_for(plan, tp, c.model, c.mask, n, check_digests) for c in contribs]
    weights = [float(c.weight) for c in contribs]
    relax = None
    if tp.relax is not None and src.has_base:
        relax = relax_factors(tp.relax, shape)
    whole_rows = relax is not None  # row blocks reshape to (rows, *shape[1:]) for the broadcast
    slices = list(_slices(shape, chunk, whole_rows))

    checked = _count_passes(src, tp.name, shape, masks, slices)
    everyone = set(range(len(contribs)))

    scales = [m.scale if m else None for m in masks]
    kernel = None
    if fused and _fused_ok(plan.method, tp.params, weights) and _probe(
            plan.method, tp.params, weights, scales, [m is not None for m in masks]):
        kernel = _Fused(plan.method, tp.params, scales, weights)
    out = torch.empty(n, dtype=out_dtype) if out is None else out[:n]
    bad = False
    for start, count in slices:
        b32, deltas, stacked_d = _deltas(src, start, count, everyone)
        if not checked:
            bad |= not _finite_sums(b32, deltas)
        bits = []
        for i, m in enumerate(masks):
            if m is None:
                bits.append(None)
                continue
            key = deltas[i].abs().view(torch.int32) if m.kind != "bernoulli" else None
            b = m.slice_bits(key, start, count)
            if m.digest is not None:
                m.hash_slice(b)
            bits.append(b)
        res = None
        if kernel is not None:
            res = kernel.rows(b32, stacked_d, bits) if stacked_d is not None else kernel(b32, deltas, bits)
        if res is None:
            base_raw = src.read(0, start, count) if src.has_base else None
            tensors = [src.read(i + 1, start, count) for i in range(len(contribs))]
            mres = [None if b is None else MaskResult(b != 0, m.scale) for b, m in zip(bits, masks)]
            res = merge_tensor(plan.method, base_raw, tensors, weights, mres, tp.params)
        if relax is not None:
            f, axis = relax
            rows = count * shape[0] // n
            view_shape = (rows,) + shape[1:]
            fs = f[start * shape[0] // n:start * shape[0] // n + rows] if axis == 0 else f
            res = relax_with(b32.view(view_shape), res.view(view_shape), fs, axis).reshape(-1)
        out[start:start + count].copy_(res)
    if bad:
        _raise_nonfinite(src, tp.name, shape, slices)
    for c, m in zip(contribs, masks):
        if m is not None and m.digest is not None and m.hexdigest() != m.want:
            raise InputMismatchError(
                f"tensor {tp.name}, model {c.model}: the recomputed mask does not match the plan's digest; "
                "the inputs differ from those the plan was made from (run `mergeplan validate --inputs`) "
                "or re-plan"
            )
    return out.view(shape)


def _count_passes(src: SliceSource, name: str, shape: tuple[int, ...], masks: list, slices: list) -> bool:
    """Run the top-k counting passes of every magnitude selection until each knows its
    boundary; returns whether the inputs were read (and checked finite) on the way.

    Slices are read and converted again in every pass: keeping float32 copies between
    passes measured no faster (4 bytes/element from memory vs 2 plus a conversion) and
    costs memory in proportion to the tensor."""
    checked = False
    everyone = set(range(len(masks)))
    pending = [s for m in masks if m is not None for s in m.selections if not s.done]
    while pending:
        bad = False
        needs = {i for i, m in enumerate(masks) if m is not None and any(not s.done for s in m.selections)}
        for start, count in slices:
            b32, deltas, _ = _deltas(src, start, count, needs if checked else everyone)
            if not checked:
                bad |= not _finite_sums(b32, deltas)
            for i in needs:
                key = deltas[i].abs().view(torch.int32)
                for s in masks[i].selections:
                    if not s.done:
                        s.feed(key, start)
        if bad:
            _raise_nonfinite(src, name, shape, slices)
        checked = True
        for s in pending:
            s.finish_pass()
        pending = [s for s in pending if not s.done]
    return checked


@dataclass
class MaskRecord:
    """What the planner records of one contribution's mask."""

    digest: str
    kept: int
    cutoff: list[int] | None  # magnitude masks: [threshold, cut] (see planner.magnitude_cutoff)


def plan_streamed(plan: Plan, tp: TensorPlan, src: SliceSource, chunk: int = CHUNK) -> tuple[list[MaskRecord | None], float | None]:
    """The planner's view of tp's masks, slice by slice: per contribution its digest, kept
    count and (magnitude) top-k cutoff, plus the mask overlap when two or more models are
    masked. The same values as building each mask whole (build_masks, mask_digest,
    magnitude_cutoff, overlap_rate): the masks are the ones run_streamed builds, which
    apply checks against these digests. Every input is read whole and checked finite."""
    shape = tuple(tp.shape)
    n = math.prod(shape)
    contribs = tp.contributions
    specs = [None if c.mask is None else {k: v for k, v in c.mask.items() if k not in ("digest", "cutoff")}
             for c in contribs]
    masks = [_mask_for(plan, tp, c.model, spec, n, False) for c, spec in zip(contribs, specs)]
    slices = list(_slices(shape, chunk, False))
    checked = _count_passes(src, tp.name, shape, masks, slices)
    masked = [i for i, m in enumerate(masks) if m is not None]
    for i in masked:
        masks[i].digest = hashlib.sha256()
    kept = [0] * len(masks)
    lowest: list[int | None] = [None] * len(masks)  # magnitude: smallest kept key
    last: list[int] = [-1] * len(masks)  # ... and the last flat index holding it
    total = shared = 0
    bad = False
    for start, count in slices:
        b32, deltas, _ = _deltas(src, start, count, set(range(len(contribs))) if not checked else set(masked))
        if not checked:
            bad |= not _finite_sums(b32, deltas)
        cover = None
        for i in masked:
            m = masks[i]
            key = deltas[i].abs().view(torch.int32) if m.kind != "bernoulli" else None
            b = m.slice_bits(key, start, count)
            m.hash_slice(b)
            keep = b != 0
            kept[i] += int(keep.sum())
            if m.kind == "magnitude":
                k = key[keep]
                if k.numel():
                    low = int(k.min())
                    at = start + int(torch.nonzero(keep & (key == low)).max())
                    if lowest[i] is None or low < lowest[i]:
                        lowest[i], last[i] = low, at
                    elif low == lowest[i]:
                        last[i] = max(last[i], at)
            if len(masked) > 1:
                cover = keep.to(torch.int32) if cover is None else cover.add_(keep)
        if cover is not None:
            total += int(cover.sum())
            shared += int(torch.where(cover >= 2, cover, 0).sum())
    if bad:
        _raise_nonfinite(src, tp.name, shape, slices)
    records: list[MaskRecord | None] = [None] * len(masks)
    for i in masked:
        m = masks[i]
        cutoff = [lowest[i], last[i]] if m.kind == "magnitude" and lowest[i] is not None else None
        records[i] = MaskRecord(m.hexdigest(), kept[i], cutoff)
    overlap = (shared / total if total else 0.0) if len(masked) > 1 else None
    return records, overlap


def _deltas(src: SliceSource, start: int, count: int, which: set[int]):
    """(float32 base slice, float32 deltas t_i - base of the contributions in `which`
    (without a base: the float32 tensors themselves), as run_tensor's deltas_of; and,
    for row-stacked inputs, all deltas as one [models, slice] tensor, else None)."""
    stacked = getattr(src, "stacked", None)
    if stacked is not None:
        rows = stacked[:, start:start + count]
        # One conversion and one broadcast subtraction for every model: the same float32
        # operations per element as below, in a third of the torch calls.
        f = rows.float()
        b32 = f[0]
        d = f[1:] - b32
        return b32, [r if i in which else None for i, r in enumerate(d.unbind(0))], d
    b32 = src.read(0, start, count).float() if src.has_base else None
    out: list[torch.Tensor | None] = []
    for i in range(len(src.models) - 1):
        if i not in which:
            out.append(None)
            continue
        t = src.read(i + 1, start, count).float()
        out.append(t - b32 if b32 is not None else t)
    return b32, out, None


def _finite_sums(b32: torch.Tensor | None, deltas: list) -> bool:
    """Cheap screen: a float32 sum is finite whenever every term is (a huge but finite
    slice can overflow the sum; _raise_nonfinite then counts exactly and finds nothing)."""
    parts = ([b32] if b32 is not None else []) + [d for d in deltas if d is not None]
    return all(math.isfinite(float(p.sum())) for p in parts)


def _raise_nonfinite(src: SliceSource, name: str, shape: tuple[int, ...], slices) -> None:
    """Count NaN/Inf per input in run_tensor's order (base first) and raise for the first."""
    for index in range(len(src.models)):
        if index == 0 and not src.has_base:
            continue
        bad = 0
        for start, count in slices:
            t = src.read(index, start, count)
            if t.is_floating_point():
                bad += int((~torch.isfinite(t)).sum())
        if bad:
            raise nonfinite_error(name, src.models[index] or f"#{index}", bad)
