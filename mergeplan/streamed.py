"""One tensor slice by slice: apply's merge (run_streamed) and the planner's mask
records (plan_streamed), both over the same reader (slices.py), the same streamed top-k
(methods/select.TopK) and the same per-slice masks, so what the planner records is what
apply rebuilds and checks.

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
  which give the exact threshold and the last tie kept (select.TopK). It equals
  topk_mask's set by definition, and the recomputed digests are checked against the
  plan as before.
- Bernoulli masks draw the key's generator slice after slice; torch.rand's CPU stream
  is sequential, so the concatenated draws equal one draw of the whole shape.
- The merge is elementwise. By default each slice goes through methods/fused.FusedMerge,
  whose bit-equality with combine.merge_deltas is proven by property tests; a slice whose
  sign vote is not finite goes through registry.merge_tensor itself.
Methods whose masks need the whole tensor at once (della, n:m/CABS, l1 rescale,
explicit mask bits) keep the whole-tensor path: `streamable` says which.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from .whole import check_mask_digest, nonfinite_error, relax_factors, relax_with
from .methods.fused import FusedMerge, fused_applies
from .methods.masks import MaskResult, breadcrumbs_window, magnitude_keep_count, nm_mask
from .methods.spec import check_spec
from .methods.registry import merge_tensor
from .methods.rng import generator_for
from .methods.select import BitPacker, TopK
from .plan.model import OP_MERGE, Plan, TensorPlan
from .slices import SliceSource

CHUNK = 1 << 17  # elements per slice: small enough for cache, large enough that per-op
# overhead (and, with threads, GIL hand-offs) stays a small share
_STREAM_KINDS = ("magnitude", "breadcrumbs", "bernoulli", "della", "nm")


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


# ---- per-contribution masks ---------------------------------------------------------------


@dataclass
class _Mask:
    """How one contribution's mask is made slice by slice, and its rescale factor."""

    kind: str  # "magnitude" | "breadcrumbs" | "bernoulli" | "della" | "nm"
    scale: float | None
    selections: list[TopK] = field(default_factory=list)  # magnitude: [top]; breadcrumbs: [outer, inner?]
    generator: torch.Generator | None = None
    prob: torch.Tensor | None = None
    digest: object | None = None  # hashlib object while checking
    want: str | None = None
    _packer: BitPacker = field(default_factory=BitPacker)
    della: tuple[float, float, int, bool] | None = None  # density, epsilon, row length, inverse rescale
    slice_scale: torch.Tensor | None = None  # della's per-entry rescale for the last slice
    nm: tuple[int, int] | None = None  # CABS: keep n of every m (masks of a tensor depend on each other)

    def slice_bits(self, key: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
        """The slice's mask as int32 -1 (kept) / 0: ready for a bit-and with float32 bits."""
        if self.kind == "bernoulli":
            keep = torch.rand(count, generator=self.generator, dtype=torch.float32) < self.prob
            return keep.to(torch.int32).neg_()
        if self.kind == "della":
            prob = _della_prob(key, *self.della[:3])
            keep = torch.rand(count, generator=self.generator, dtype=torch.float32) < prob
            if self.della[3]:  # masks._finish with a per-entry keep probability
                safe = torch.where(prob > 0, prob, torch.ones_like(prob))
                self.slice_scale = torch.where(prob > 0, 1.0 / safe, 0.0).to(torch.float32)
            return keep.to(torch.int32).neg_()
        bits = self.selections[0].bits(key, start)
        if len(self.selections) > 1:
            bits &= ~self.selections[1].bits(key, start)
        return bits

    def hash_slice(self, mask_bits: torch.Tensor) -> None:
        """Feed mask_digest's byte stream (np.packbits, big-endian, row-major) one slice at a time."""
        self.digest.update(self._packer.push(mask_bits).tobytes())

    def hexdigest(self) -> str:
        self.digest.update(self._packer.flush().tobytes())
        return self.digest.hexdigest()[:32]


def _della_prob(key: torch.Tensor, density: float, epsilon: float, cols: int) -> torch.Tensor:
    """masks.della_keep_prob for whole rows of `cols` keys (|delta| float32 bits): the rank
    of a key within its row needs only that row, so row blocks give the same values."""
    rows = key.view(-1, cols)
    if cols <= 1:
        rank = torch.full(rows.shape, 0.5, dtype=torch.float64)
    else:
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices
        pos = torch.empty_like(order)
        pos.scatter_(1, order, torch.arange(cols).expand_as(order))
        rank = (cols - 1 - pos).to(torch.float64) / torch.tensor(float(cols - 1), dtype=torch.float64)
    return ((density - epsilon) + 2.0 * epsilon * rank).to(torch.float32).reshape(-1)


def della_row(shape: tuple[int, ...]) -> int:
    """della's row length: the tensor viewed as [shape[0], -1]; 0-d/1-d tensors are one row."""
    n = math.prod(shape)
    return n // shape[0] if len(shape) >= 2 and shape[0] else n


def _inverse_scale(kept: int, n: int) -> float | None:
    """masks._finish's factor for a deterministic mask with `kept` of n entries."""
    keep_prob = kept / n if kept else 0.0
    return 1.0 / keep_prob if keep_prob > 0 else None


def mask_for(plan: Plan, tp: TensorPlan, model: str, spec: dict | None, n: int, check_digests: bool) -> _Mask | None:
    if spec is None:
        return None
    check_spec(spec, f"tensor {tp.name!r}, model {model!r}")  # same refusal as build_masks
    kind, density = spec["kind"], float(spec["density"])
    if kind == "nm":  # built for every n, as masks._conflict_aware_nm does (n = m keeps all)
        m = _Mask(kind, None, nm=(int(spec["n"]), int(spec["m"])))
        if check_digests and spec.get("digest"):
            m.digest, m.want = hashlib.sha256(), spec["digest"]
        return m
    if density >= 1.0:
        return None  # as masks._single_mask: the delta stays untouched, rescale included
    inverse = spec.get("rescale", "none") == "inverse"
    if kind == "bernoulli":
        m = _Mask(kind, (1.0 / density if density > 0 else None) if inverse else None,
                  generator=generator_for(plan.seed, tp.name, model),
                  prob=torch.tensor(density, dtype=torch.float32))
    elif kind == "della":
        m = _Mask(kind, None, generator=generator_for(plan.seed, tp.name, model),
                  della=(density, float(spec["epsilon"]), della_row(tuple(tp.shape)), inverse))
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


# ---- one tensor -----------------------------------------------------------------------------


def slice_row(shape: tuple[int, ...], relax: bool, masks: list) -> int | None:
    """Slices must hold whole rows of this many elements: dim 0's rows for AIM's broadcast,
    della's rows (its ranks are per row); None when any cut will do."""
    rows = ([math.prod(shape) // shape[0]] if relax else []) + [m.della[2] for m in masks if m is not None and m.della]
    rows += [m.nm[1] for m in masks if m is not None and m.nm]  # whole groups of m
    return math.lcm(*rows) if rows else None


def nm_slice(tp: TensorPlan, masks: list, deltas: list) -> dict[int, torch.Tensor]:
    """The CABS n:m masks of one slice of whole groups, as int32 -1/0, built in cabs_order,
    each model choosing among positions no earlier one took (masks._conflict_aware_nm:
    groups are m consecutive entries, so slices of whole groups give the same masks; the
    short tail group is in the last slice)."""
    nm = [i for i, m in enumerate(masks) if m is not None and m.nm]
    if not nm:
        return {}
    order = tp.params.get("cabs_order") or nm
    out: dict[int, torch.Tensor] = {}
    taken = None
    for i in order:
        if i not in nm:
            continue
        n_keep, group = masks[i].nm
        mask = nm_mask(deltas[i], n_keep, group, taken)
        out[i] = mask.to(torch.int32).neg_()
        taken = mask if taken is None else taken | mask
    return out


def slices_of(shape: tuple[int, ...], chunk: int, row: int | None):
    """(start, count) over the flat tensor, in whole rows of `row` elements when given."""
    n = math.prod(shape)
    step = chunk
    if row:
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
    masks = [mask_for(plan, tp, c.model, c.mask, n, check_digests) for c in contribs]
    weights = [float(c.weight) for c in contribs]
    relax = None
    if tp.relax is not None and src.has_base:
        relax = relax_factors(tp.relax, shape)
    slices = list(slices_of(shape, chunk, slice_row(shape, relax is not None, masks)))

    checked = count_passes(src, tp.name, shape, masks, slices)
    everyone = set(range(len(contribs)))

    scales = [m.scale if m else None for m in masks]
    kernel = None
    per_entry = any(m is not None and m.della and m.della[3] for m in masks)  # della's rescale: a tensor
    if fused and not per_entry and fused_applies(plan.method, tp.params, weights):
        kernel = FusedMerge(plan.method, tp.params, scales, weights)
    out = torch.empty(n, dtype=out_dtype) if out is None else out[:n]
    bad = False
    for start, count in slices:
        b32, deltas, stacked_d = slice_deltas(src, start, count, everyone)
        if not checked:
            bad |= not finite_sums(b32, deltas)
        bits = []
        groups = nm_slice(tp, masks, deltas)
        for i, m in enumerate(masks):
            if m is None:
                bits.append(None)
                continue
            if i in groups:
                b = groups[i]
            else:
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
            mres = [None if b is None else MaskResult(b != 0, m.slice_scale if m.kind == "della" else m.scale)
                    for b, m in zip(bits, masks)]
            res = merge_tensor(plan.method, base_raw, tensors, weights, mres, tp.params)
        if relax is not None:
            f, axis = relax
            rows = count * shape[0] // n
            view_shape = (rows,) + shape[1:]
            fs = f[start * shape[0] // n:start * shape[0] // n + rows] if axis == 0 else f
            res = relax_with(b32.view(view_shape), res.view(view_shape), fs, axis).reshape(-1)
        out[start:start + count].copy_(res)
    if bad:
        raise_nonfinite(src, tp.name, shape, slices)
    for c, m in zip(contribs, masks):
        if m is not None and m.digest is not None:
            check_mask_digest(tp.name, c.model, m.hexdigest(), m.want)
    return out.view(shape)


def count_passes(src: SliceSource, name: str, shape: tuple[int, ...], masks: list, slices: list) -> bool:
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
            b32, deltas, _ = slice_deltas(src, start, count, needs if checked else everyone)
            if not checked:
                bad |= not finite_sums(b32, deltas)
            for i in needs:
                key = deltas[i].abs().view(torch.int32)
                for s in masks[i].selections:
                    if not s.done:
                        s.feed(key, start)
        if bad:
            raise_nonfinite(src, name, shape, slices)
        checked = True
        for s in pending:
            s.finish_pass()
        pending = [s for s in pending if not s.done]
    return checked


def slice_deltas(src: SliceSource, start: int, count: int, which: set[int]):
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


def finite_sums(b32: torch.Tensor | None, deltas: list) -> bool:
    """Cheap screen: a float32 sum is finite whenever every term is (a huge but finite
    slice can overflow the sum; raise_nonfinite then counts exactly and finds nothing)."""
    parts = ([b32] if b32 is not None else []) + [d for d in deltas if d is not None]
    return all(math.isfinite(float(p.sum())) for p in parts)


def raise_nonfinite(src: SliceSource, name: str, shape: tuple[int, ...], slices) -> None:
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
