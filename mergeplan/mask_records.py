"""What the planner records of each tensor's masks, in one streamed pass.

Per contribution: the mask digest, the kept count and, for magnitude masks, the top-k
cutoff apply rebuilds the mask from; per tensor: the overlap of the models' masks. The
masks are the ones streamed.run_streamed builds (same per-slice code), so apply's digest
check compares like with like.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .methods.select import BandTopK, PackedBits, band_from_sample
from .plan.model import Plan, TensorPlan
from .slices import SliceSource
from .streamed import (CHUNK, count_passes, slice_deltas, finite_sums, mask_for, nm_slice, raise_nonfinite, slice_row,
                       slices_of)


@dataclass
class MaskRecord:
    """What the planner records of one contribution's mask."""

    digest: str
    kept: int
    cutoff: list[int] | None  # magnitude masks: [threshold, cut] (see planner.magnitude_cutoff)


_SAMPLE_BLOCKS, _SAMPLE_BLOCK = 256, 256  # 65,536 keys per model: the band is ~2% of a tensor


def plan_streamed(plan: Plan, tp: TensorPlan, src: SliceSource, chunk: int = CHUNK) -> tuple[list[MaskRecord | None], float | None]:
    """The planner's view of tp's masks: per contribution its digest, kept count and
    (magnitude) top-k cutoff, plus the mask overlap when two or more models are masked.
    The same values as building each mask whole (build_masks, mask_digest,
    magnitude_cutoff, overlap_rate); apply rebuilds these masks and checks the digests.
    Every input is read whole, hashed and checked finite.

    One pass over the inputs: a sample of each model's keys gives a band that probably
    holds the top-k boundary (select.band_from_sample), and the pass keeps what is above
    the band and the band's entries (select.BandTopK), which settles the exact set. When a
    band misses (rare), the exact counting passes run instead (_plan_counted)."""
    shape = tuple(tp.shape)
    n = math.prod(shape)
    contribs = tp.contributions
    masks = _fresh_masks(plan, tp, n)
    masked = [i for i, m in enumerate(masks) if m is not None]
    ranked = [i for i in masked if masks[i].kind in ("magnitude", "breadcrumbs")]
    samples = _sample_keys(src, n, ranked)
    limit = max(1 << 20, n // 8)
    bands = {i: [BandTopK(n, s.k, *band_from_sample(samples[i], s.k, n), limit) if 0 < s.k < n else None
                 for s in masks[i].selections] for i in ranked}
    if any(b is None for bs in bands.values() for b in bs):
        return _plan_counted(plan, tp, src, chunk)
    draws = {i: PackedBits() for i in masked if masks[i].kind in ("bernoulli", "della", "nm")}
    slices = list(slices_of(shape, chunk, slice_row(shape, False, masks)))
    everyone = set(range(len(contribs)))
    bad = False
    for start, count in slices:
        b32, deltas, _ = slice_deltas(src, start, count, everyone)
        bad |= not finite_sums(b32, deltas)
        groups = nm_slice(tp, masks, deltas)
        for i, bits in draws.items():
            if i in groups:
                bits.add(groups[i] != 0)
                continue
            key = deltas[i].abs().view(torch.int32) if masks[i].kind == "della" else None
            bits.add(masks[i].slice_bits(key, start, count) != 0)
        for i in ranked:
            key = deltas[i].abs().view(torch.int32)
            for band in bands[i]:
                band.feed(key, start)
    if bad:
        raise_nonfinite(src, tp.name, shape, slices)
    if not all(b.resolve() for bs in bands.values() for b in bs):
        return _plan_counted(plan, tp, src, chunk)
    packed: dict[int, np.ndarray] = {i: bits.array() for i, bits in draws.items()}
    for i in ranked:
        outer = bands[i][0].packed
        packed[i] = outer if len(bands[i]) == 1 else outer & ~bands[i][1].packed
    records: list[MaskRecord | None] = [None] * len(masks)
    for i in masked:
        cutoff = [bands[i][0].threshold, bands[i][0].cut] if masks[i].kind == "magnitude" else None
        kept = int(np.bitwise_count(packed[i]).sum())
        records[i] = MaskRecord(hashlib.sha256(packed[i].tobytes()).hexdigest()[:32], kept, cutoff)
    overlap = None
    if len(masked) > 1:
        total = sum(r.kept for r in records if r is not None)
        shared = 0
        for i in masked:
            others = np.zeros_like(packed[i])
            for j in masked:
                if j != i:
                    others |= packed[j]
            shared += int(np.bitwise_count(packed[i] & others).sum())
        overlap = shared / total if total else 0.0
    return records, overlap


def _fresh_masks(plan: Plan, tp: TensorPlan, n: int) -> list:
    """The per-slice masks the plan's specs describe, built as if no digest or cutoff
    were recorded yet (the planner is computing them)."""
    specs = [None if c.mask is None else {k: v for k, v in c.mask.items() if k not in ("digest", "cutoff")}
             for c in tp.contributions]
    return [mask_for(plan, tp, c.model, spec, n, False) for c, spec in zip(tp.contributions, specs)]


def _sample_keys(src: SliceSource, n: int, which: list[int]) -> dict[int, torch.Tensor]:
    """Keys |t_i - base| (float32 bits) of the contributions in `which` at spread-out
    positions: every position of a small tensor, else _SAMPLE_BLOCKS blocks."""
    if not which:
        return {}
    if n <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
        starts, size = [0], n
    else:
        step = (n - _SAMPLE_BLOCK) / (_SAMPLE_BLOCKS - 1)
        starts, size = [int(b * step) for b in range(_SAMPLE_BLOCKS)], _SAMPLE_BLOCK
    out: dict[int, list[torch.Tensor]] = {i: [] for i in which}
    for st in starts:
        b32 = src.peek(0, st, size).float()
        for i in which:
            out[i].append((src.peek(i + 1, st, size).float() - b32).abs().view(torch.int32))
    return {i: torch.cat(v) for i, v in out.items()}


def _plan_counted(plan: Plan, tp: TensorPlan, src: SliceSource, chunk: int = CHUNK) -> tuple[list[MaskRecord | None], float | None]:
    """plan_streamed by exact counting passes (TopK) and a final pass: for the rare band
    that misses its boundary."""
    shape = tuple(tp.shape)
    n = math.prod(shape)
    contribs = tp.contributions
    masks = _fresh_masks(plan, tp, n)
    slices = list(slices_of(shape, chunk, slice_row(shape, False, masks)))
    checked = count_passes(src, tp.name, shape, masks, slices)
    masked = [i for i, m in enumerate(masks) if m is not None]
    for i in masked:
        masks[i].digest = hashlib.sha256()
    kept = [0] * len(masks)
    lowest: list[int | None] = [None] * len(masks)  # magnitude: smallest kept key
    last: list[int] = [-1] * len(masks)  # ... and the last flat index holding it
    total = shared = 0
    bad = False
    for start, count in slices:
        b32, deltas, _ = slice_deltas(src, start, count, set(range(len(contribs))) if not checked else set(masked))
        if not checked:
            bad |= not finite_sums(b32, deltas)
        cover = None
        groups = nm_slice(tp, masks, deltas)
        for i in masked:
            m = masks[i]
            key = deltas[i].abs().view(torch.int32) if m.kind != "bernoulli" else None
            b = groups[i] if i in groups else m.slice_bits(key, start, count)
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
        raise_nonfinite(src, tp.name, shape, slices)
    records: list[MaskRecord | None] = [None] * len(masks)
    for i in masked:
        m = masks[i]
        cutoff = [lowest[i], last[i]] if m.kind == "magnitude" and lowest[i] is not None else None
        records[i] = MaskRecord(m.hexdigest(), kept[i], cutoff)
    overlap = (shared / total if total else 0.0) if len(masked) > 1 else None
    return records, overlap
