"""What a plan's values mean to the screens that show them (`review`, `show`, `diff`).

The one place where display code learns the plan format: which row and component a
tensor belongs to, which fields can be edited, AIM factors, mask bits and mask facts,
and the planner's measured statistics (kept fraction, mask overlap) with whether they
still hold. Pure and torch-free: `show` and the review import it without torch.

Measured statistics describe the masks the planner computed. An edit that changes a
mask (a density edit drops the mask's digest: apply rebuilds it from its recipe) makes
them stale; they are then reported as AT_APPLY (known only when apply builds the mask),
never as the old number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from mergeplan.arch import component_key, short_label

from .model import OP_MERGE, Contribution, Plan, TensorPlan
from .names import parse_name

ROW_EMBED = "emb"  # tensors outside the decoder blocks that feed them (embeddings)
ROW_HEAD = "head"  # tensors outside the blocks after them (final norm, lm_head, others)
RowKey = Union[int, str]
_EMBED_COMPONENTS = {"embed", "embed_pos"}

AT_APPLY = "at apply"
_MASK_META = {"kind", "density", "digest", "bits", "cutoff"}


# -- layout ------------------------------------------------------------------------------
def row_of(name: str) -> RowKey:
    """A tensor's row in layer x component views: its decoder layer, else emb or head."""
    pn = parse_name(name)
    if pn.layer is not None:
        return pn.layer
    return ROW_EMBED if pn.component in _EMBED_COMPONENTS else ROW_HEAD


# Component order and 5-cell short labels (review grid, diff summary) are the architecture
# table's (mergeplan/arch.py, torch-free): fused projections, routers and experts included.
def short_component(comp: str) -> str:
    return short_label(comp)


def sort_components(comps) -> list[str]:
    return sorted(comps, key=component_key)


def row_label(row: RowKey) -> str:
    return f"L{row}" if isinstance(row, int) else str(row)


def row_order(row: RowKey) -> tuple[int, int]:
    """Sort key: emb, layers in order, head."""
    if isinstance(row, int):
        return (1, row)
    return (0, 0) if row == ROW_EMBED else (2, 0)


def numel(t: TensorPlan) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1


def is_vector(t: TensorPlan) -> bool:
    """1-D (or scalar) tensors: norm weights, biases. Range edits leave them out unless chosen."""
    return len(t.shape) <= 1


def editable_fields(plan: Plan) -> list[str]:
    """The PlanEditor fields this plan has values for, per-model fields first."""
    fields: list[str] = []
    if plan.task_models:
        fields += ["density", "weight"]
    if any(t.op == OP_MERGE for t in plan.tensors):
        fields.append("lambda")
    if any(t.relax for t in plan.tensors):
        fields.append("omega")
    return fields


def guided_quantities(plan: Plan) -> list[str]:
    """What the plan's guides decided, most telling first: "density" (LEWIS, CABS...),
    "weight" (Sens), "aim" (AIM relaxation factors); from who set each value."""
    out = []
    for field in ("density", "weight"):
        if any(c.source.get(field) not in (None, "recipe", "edit") for _, c in plan.iter_contributions()):
            out.append(field)
    if any(t.relax for t in plan.tensors):
        out.append("aim")
    return out


# -- AIM ---------------------------------------------------------------------------------
def aim_factors(relax: dict[str, Any] | None) -> np.ndarray | None:
    """AIM factors f = 1 - scores * (1 - omega), in float32 as apply computes them; None
    without AIM. Plans store the per-channel scores, so an omega edit stays exact."""
    if not relax or relax.get("scores") is None:
        return None
    with np.errstate(all="ignore"):  # a hostile omega may overflow float32: inf, not a warning
        scores = np.asarray(relax["scores"], dtype=np.float32)
        return np.float32(1.0) - scores * np.float32(1.0 - float(relax.get("omega", 1.0)))


def aim_mean(relax: dict[str, Any] | None) -> float | None:
    f = aim_factors(relax)
    if f is None or not f.size:
        return None
    with np.errstate(all="ignore"):
        return float(f.mean(dtype=np.float32))


# -- masks -------------------------------------------------------------------------------
def mask_bits(mask: dict[str, Any] | None, n: int) -> np.ndarray | None:
    """An explicit (edited) mask's bits as a flat bool array (masks.pack_bits' layout:
    np.packbits, big-endian bit order); None for recipe masks and dense contributions, and
    for bits that do not hold n values: the size comes from the plan's shape, and a crafted
    plan (1 byte of bits for a 2^30-element shape) made show allocate gigabytes."""
    if not mask or "bits" not in mask:
        return None
    if not isinstance(mask["bits"], bytes) or len(mask["bits"]) != (n + 7) // 8:
        return None
    return np.unpackbits(np.frombuffer(mask["bits"], dtype=np.uint8), count=n, bitorder="big").astype(bool)


def as_planned(c: Contribution) -> bool:
    """The contribution's mask is the one the planner measured: dense, explicit bits, or a
    recipe mask whose digest is still recorded (an edit that changes it drops the digest)."""
    return c.mask is None or "bits" in c.mask or c.mask.get("digest") is not None


@dataclass(frozen=True)
class MaskInfo:
    kind: str  # "dense", "magnitude", "explicit", ...
    params: str  # the recipe parameters apply needs besides density, as "k=v" text
    digest: str  # short digest, or why there is none
    recompute: bool  # apply rebuilds this mask from its recipe without a digest check


def mask_info(c: Contribution) -> MaskInfo:
    m = c.mask
    if m is None:
        return MaskInfo("dense", "", "—", False)
    params = " ".join(f"{k}={m[k]}" for k in sorted(m) if k not in _MASK_META)
    if "bits" in m:
        return MaskInfo("explicit", params, "explicit bits (edited)", False)
    digest = m.get("digest")
    if digest:
        return MaskInfo(str(m.get("kind", "?")), params, str(digest)[:12], False)
    return MaskInfo(str(m.get("kind", "?")), params, f"none: recomputed {AT_APPLY}", True)


# -- statistics that depend on the masks -----------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """A value with how it is known: "exact" (from the plan's own bits or a dense mask),
    "measured" (by the planner, masks unchanged since), "nominal" (the density: no
    measurement recorded), "expected" (d_i * d_j for independent masks) or AT_APPLY
    (value None: an edit changed the mask; apply computes it)."""

    value: float | None
    how: str

    @property
    def pending(self) -> bool:
        return self.value is None

    def text(self, digits: int = 4) -> str:
        if self.value is None:
            return AT_APPLY
        return f"{self.value:.{digits}g}"


def kept(t: TensorPlan, c: Contribution) -> Stat:
    """Fraction of the tensor's entries the model's mask keeps."""
    if c.mask is None:
        return Stat(1.0, "exact")
    bits = mask_bits(c.mask, numel(t))
    if bits is not None:
        return Stat(float(bits.mean()) if bits.size else 0.0, "exact")
    if not as_planned(c):
        return Stat(None, AT_APPLY)
    measured = t.stats.get("kept", {}).get(c.model) if isinstance(t.stats.get("kept"), dict) else None
    if _is_number(measured):
        return Stat(float(measured), "measured")
    return Stat(c.density, "nominal")


def overlap(t: TensorPlan) -> Stat | None:
    """Share of kept (model, position) pairs another model keeps too (the planner's
    measurement); None when the plan has none for this tensor."""
    if not _is_number(t.stats.get("overlap")):
        return None
    if not all(as_planned(c) for c in t.contributions):
        return Stat(None, AT_APPLY)
    return Stat(float(t.stats["overlap"]), "measured")


def pair_overlaps(t: TensorPlan) -> dict[tuple[str, str], Stat]:
    """Fraction of entries both models keep, per ordered model pair: exact when both masks
    are explicit bits; else d_i * d_j, the expectation for independent masks (a magnitude
    mask's real overlap depends on weights the plan does not hold), from current densities."""
    n = numel(t)
    bits = {c.model: mask_bits(c.mask, n) for c in t.contributions}
    out = {}
    for a in t.contributions:
        for b in t.contributions:
            if a.model == b.model:
                continue
            ba, bb = bits[a.model], bits[b.model]
            if ba is not None and bb is not None:
                out[(a.model, b.model)] = Stat(float((ba & bb).mean()) if n else 0.0, "exact")
            else:
                out[(a.model, b.model)] = Stat(a.density * b.density, "expected")
    return out


def tensor_stats(t: TensorPlan) -> dict[str, Any]:
    """The tensor's recorded statistics with the mask-dependent ones as they stand now:
    a kept fraction or overlap an edit made stale is None (AT_APPLY), never the old value."""
    out = dict(t.stats)
    if isinstance(out.get("kept"), dict):
        out["kept"] = {c.model: kept(t, c).value for c in t.contributions if c.model in out["kept"]}
    ov = overlap(t)
    if ov is not None:
        out["overlap"] = ov.value
    return out


# Statistics a guide records that the screens compute live from the plan instead (the
# "mean AIM factor" view follows omega edits; the record is the planner's, frozen).
DERIVED_STATS = frozenset({"aim.mean_factor"})


def is_stale(t: TensorPlan, stat: str, model: str | None = None) -> bool:
    """Whether the recorded statistic `stat` (of `model`, for per-model ones) is known only
    at apply: an edit changed the mask it measured."""
    return (f"{stat}.{model}" if model else stat) in stale_stats(t)


def stale_stats(t: TensorPlan) -> list[str]:
    """Names of the recorded statistics an edit made stale ("kept.<model>", "overlap")."""
    out = [f"kept.{c.model}" for c in t.contributions
           if isinstance(t.stats.get("kept"), dict) and c.model in t.stats["kept"] and kept(t, c).pending]
    ov = overlap(t)
    if ov is not None and ov.pending:
        out.append("overlap")
    return out


# -- what earlier review sessions set by hand ---------------------------------------------------
EditKey = tuple[str, Union[str, None], str]  # (tensor, model or None, field)


def hand_set(plan: Plan) -> dict[EditKey, float]:
    """The value each saved edit session set last, per (tensor, model, field), from the
    edit log. A received plan's log is free-form (the schema checks only its shape), so a
    change that is not [tensor, model or None, field, old, new number] is skipped."""
    out: dict[EditKey, float] = {}
    for entry in plan.edit_log or []:
        for ch in entry.get("changes", []) if isinstance(entry, dict) else []:
            if not (isinstance(ch, (list, tuple)) and len(ch) == 5):
                continue
            tensor, model, field, _, new = ch
            if (isinstance(tensor, str) and isinstance(field, str) and (model is None or isinstance(model, str))
                    and isinstance(new, (int, float)) and not isinstance(new, bool)):
                out[(tensor, model, field)] = float(new)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
