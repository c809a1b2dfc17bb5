"""Sparsification masks for task vectors (deltas), from plain-dict specs.

A spec is what the plan file stores for one (tensor, model):
    {"kind": "magnitude" | "bernoulli" | "breadcrumbs" | "della" | "nm",
     "density": float, "rescale": "inverse" | "l1" | "none",
     "gamma": float (breadcrumbs), "epsilon": float (della), "n": int, "m": int (nm)}
None means "no sparsification"; other keys in a spec are ignored. Formulas, tie-breaks and the tail rule of n:m are in
docs/methods.md; the magnitude order everywhere is the one of `select.topk_mask`
(larger |d| first, equal |d|: lower flat index first).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mergeplan.errors import MergeplanError
from mergeplan.methods.spec import check_spec
from mergeplan.methods.rng import uniform
from mergeplan.methods.select import magnitude_bits, topk_mask

_L1_EPS = 1e-7  # below this L1 norm the rescale is skipped, as mergekit does


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class MaskResult:
    """Which entries of one delta survive, and the factor applied to the survivors.

    scale: None (1), a float, or a float32 tensor shaped like the mask (della's per-entry
    inverse keep probability).
    """

    mask: torch.Tensor
    scale: torch.Tensor | float | None = None

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """float32 delta with dropped entries set to +0.0 and survivors scaled."""
        d = delta.to(torch.float32)
        if self.scale is not None:
            d = d * self.scale
        return torch.where(self.mask.to(d.device), d, torch.zeros((), dtype=d.dtype, device=d.device))


Key = tuple[int, str, str]  # (plan seed, tensor name, model id)


def build_masks(
    specs: Sequence[dict | None],
    deltas: Sequence[torch.Tensor],
    keys: Sequence[Key],
    group: dict | None = None,
) -> list[MaskResult | None]:
    """One MaskResult (or None = keep everything) per delta.

    `group` carries CABS settings: {"order": [indices into deltas]}. Models with an "nm"
    spec are pruned in that order (default: list order), each only among positions no
    earlier one kept, so their masks depend on each other; all other kinds are
    independent per model.
    """
    if not len(specs) == len(deltas) == len(keys):
        raise MergeplanError(
            f"build_masks got {len(specs)} specs, {len(deltas)} deltas and {len(keys)} keys; "
            "pass one of each per model"
        )
    results: list[MaskResult | None] = [None] * len(deltas)
    for i, spec in enumerate(specs):
        if spec is not None:
            check_spec(spec, _where(keys[i]))
            if spec["kind"] != "nm":
                results[i] = _single_mask(spec, deltas[i], keys[i])
    nm_models = [i for i, s in enumerate(specs) if s is not None and s["kind"] == "nm"]
    if nm_models:
        for i, mask in _conflict_aware_nm(specs, deltas, keys, nm_models, group).items():
            results[i] = _finish(mask, specs[i], deltas[i], keys[i])
    return results


def _where(key: Key) -> str:
    return f"tensor {key[1]!r}, model {key[2]!r}"


def magnitude_keep_count(density: float, numel: int) -> int:
    """mergekit's k: max(1, int(density * numel)); density 0 keeps nothing."""
    return 0 if density <= 0 or numel == 0 else min(numel, max(1, int(density * numel)))


def breadcrumbs_window(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """(dropped_top, kept): in magnitude order, skip the dropped_top largest, keep the next
    `kept`. As mergekit: kept = int(density * numel), and the top drop shrinks when the
    two together would exceed the tensor."""
    kept = int(density * numel)
    return min(int(gamma * numel), numel - kept), kept


def _single_mask(spec: dict, delta: torch.Tensor, key: Key) -> MaskResult | None:
    kind, density = spec["kind"], float(spec["density"])
    if density >= 1.0 or delta.numel() == 0:
        return None  # mergekit leaves the delta untouched, rescale included
    if kind == "magnitude":
        mask = topk_mask(delta, magnitude_keep_count(density, delta.numel()))
    elif kind == "breadcrumbs":
        top, kept = breadcrumbs_window(density, float(spec["gamma"]), delta.numel())
        mask = topk_mask(delta, top + kept)
        if top:
            mask &= ~topk_mask(delta, top)
    elif kind == "bernoulli":
        prob = torch.tensor(density, dtype=torch.float32)
        mask = uniform(delta.shape, *key, device=delta.device) < prob.to(delta.device)
        return _finish(mask, spec, delta, key, keep_prob=density)
    else:  # della
        prob = della_keep_prob(delta, density, float(spec["epsilon"]))
        mask = uniform(delta.shape, *key, device=delta.device) < prob
        return _finish(mask, spec, delta, key, keep_prob=prob)
    return _finish(mask, spec, delta, key)


def _finish(
    mask: torch.Tensor,
    spec: dict,
    delta: torch.Tensor,
    key: Key,
    keep_prob: float | torch.Tensor | None = None,
) -> MaskResult:
    """Attach the rescale factor. keep_prob None: a deterministic mask, whose keep
    probability is taken as its kept fraction."""
    mode = spec.get("rescale", "none")
    if mode == "none":
        return MaskResult(mask, None)
    if mode == "l1":
        # float64 sums: the factor must not depend on the reduction order of threads/devices.
        before = float(delta.to(torch.float64).abs().sum())
        after = float(torch.where(mask, delta.to(torch.float64).abs(), 0.0).sum())
        if before < _L1_EPS or after < _L1_EPS:
            return MaskResult(mask, None)
        return MaskResult(mask, before / after)
    if isinstance(keep_prob, torch.Tensor):
        safe = torch.where(keep_prob > 0, keep_prob, torch.ones_like(keep_prob))
        return MaskResult(mask, torch.where(keep_prob > 0, 1.0 / safe, 0.0).to(torch.float32))
    if keep_prob is None:
        kept = int(mask.sum())
        keep_prob = kept / mask.numel() if kept else 0.0
    return MaskResult(mask, 1.0 / keep_prob if keep_prob > 0 else None)


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """float32 keep probability per entry: density - eps + 2 eps * r, where r in [0, 1] is
    the entry's magnitude rank within its row (0 = smallest, 1 = largest; equal |d|: the
    lower index ranks higher). Rows: the tensor viewed as [shape[0], -1]; 0-d/1-d
    tensors are one row. A one-element row gets r = 1/2."""
    rows = delta.reshape(delta.shape[0] if delta.dim() >= 2 else 1, -1)
    cols = rows.shape[1]
    if cols <= 1:
        rank = torch.full(rows.shape, 0.5, dtype=torch.float64, device=delta.device)
    else:
        keys = magnitude_bits(rows).reshape(rows.shape)
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices
        pos = torch.empty_like(order)
        ar = torch.arange(cols, device=delta.device).expand_as(order)
        pos.scatter_(1, order, ar)  # pos 0 = largest in its row
        # Divide by a device tensor: CUDA turns division by a Python number into a
        # reciprocal multiply, which can differ from the CPU in the last bit.
        rank = (cols - 1 - pos).to(torch.float64) / torch.tensor(
            float(cols - 1), dtype=torch.float64, device=delta.device
        )
    prob = (density - epsilon) + 2.0 * epsilon * rank
    return prob.to(torch.float32).reshape(delta.shape)


def nm_mask(delta: torch.Tensor, n: int, m: int, taken: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced n:m mask: in each group of m consecutive (row-major) entries keep n.

    Within a group, positions not in `taken` come first (largest |d| first), then taken
    ones by |d|: a model fills its quota from positions earlier models kept only when the
    free ones run out, so the overlap is the least n:m allows. Tail rule: the last
    numel % m entries form one short group of r that keeps floor(n * r / m) entries
    (never above the density, and zero overlap whenever the densities sum to <= 1).
    """
    numel = delta.numel()
    key = magnitude_bits(delta).to(torch.int64)
    if taken is not None:
        key = key + ((~taken.reshape(-1).to(key.device)).to(torch.int64) << 31)
    mask = torch.zeros(numel, dtype=torch.bool, device=delta.device)
    full = numel - numel % m
    if full and n:
        _keep_top_per_row(key[:full].view(-1, m), n, mask[:full].view(-1, m))
    tail_keep = n * (numel - full) // m
    if tail_keep:
        _keep_top_per_row(key[full:].view(1, -1), tail_keep, mask[full:].view(1, -1))
    return mask.reshape(delta.shape)


def _keep_top_per_row(key: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """Set out[r, c] for the n largest key[r, c] per row; equal keys: lower c wins."""
    width = key.shape[1]
    # Fold the column into the key so all keys in a row differ and top-k is exact
    # (key < 2**32 and width <= m <= 2**24, so the product fits int64).
    unique = key * width + (width - 1 - torch.arange(width, device=key.device))
    idx = torch.topk(unique, n, dim=1, sorted=False).indices
    out.scatter_(1, idx, True)


def _conflict_aware_nm(
    specs: Sequence[dict | None],
    deltas: Sequence[torch.Tensor],
    keys: Sequence[Key],
    nm_models: list[int],
    group: dict | None,
) -> dict[int, torch.Tensor]:
    order = list((group or {}).get("order") or nm_models)
    if sorted(order) != nm_models:
        raise MergeplanError(
            f"CABS order {order} for tensor {keys[nm_models[0]][1]!r} must list each n:m model "
            f"index {nm_models} exactly once"
        )
    ms = {specs[i]["m"] for i in order}
    if len(ms) > 1:
        raise MergeplanError(
            f"CABS models of tensor {keys[order[0]][1]!r} use different group sizes m {sorted(ms)}; "
            "use one m for all models (only n may differ)"
        )
    shapes = {tuple(deltas[i].shape) for i in order}
    if len(shapes) > 1:
        raise MergeplanError(
            f"CABS deltas of tensor {keys[order[0]][1]!r} differ in shape {sorted(shapes)}"
        )
    taken = torch.zeros(deltas[order[0]].shape, dtype=torch.bool, device=deltas[order[0]].device)
    out: dict[int, torch.Tensor] = {}
    for i in order:
        out[i] = nm_mask(deltas[i], specs[i]["n"], specs[i]["m"], taken)
        taken |= out[i]
    return out


def overlap_rate(masks: Sequence[torch.Tensor]) -> float:
    """Share of kept (model, position) pairs whose position another model keeps too:

        sum_i |M_i & (OR_{j != i} M_j)| / sum_i |M_i|      (0.0 when nothing is kept)

    For two masks of equal size this is the CABS paper's |A & B| / |A| (appendix B.1).
    """
    if not masks:
        return 0.0
    cover = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for mask in masks:
        cover += mask.to(cover.device)
    total = int(cover.sum())
    shared = int(torch.where(cover >= 2, cover, 0).sum())
    return shared / total if total else 0.0


def pack_bits(mask: torch.Tensor) -> bytes:
    """Row-major flat mask as bytes, np.packbits big-endian bit order (first entry = MSB)."""
    flat = mask.detach().reshape(-1).to("cpu", torch.bool).numpy()
    return np.packbits(flat, bitorder="big").tobytes()


def unpack_bits(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of pack_bits: a CPU bool tensor of `shape`."""
    numel = math.prod(shape)
    if len(data) != (numel + 7) // 8:
        raise MergeplanError(
            f"packed mask has {len(data)} bytes but shape {tuple(shape)} needs {(numel + 7) // 8}; "
            "the plan file is damaged or the mask belongs to another tensor"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=numel, bitorder="big")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def mask_digest(mask: torch.Tensor) -> str:
    """First 32 hex chars of sha256(pack_bits(mask)): a short fingerprint for the plan."""
    return hashlib.sha256(pack_bits(mask)).hexdigest()[:32]

