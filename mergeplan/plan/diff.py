"""What changed between two plans, tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .edit import RECOMPUTED_MASK_KEYS
from .model import Contribution, Plan, TensorPlan


@dataclass(frozen=True)
class DiffRow:
    where: str  # "plan", "model <id>", or a tensor name
    model: str | None
    field: str
    old: Any
    new: Any
    # None on that side is a mask's digest or cutoff an edit left to apply to recompute
    # (the mask is still there), not a missing value.
    old_at_apply: bool = False
    new_at_apply: bool = False

    def shown(self, side: str) -> Any:
        """`old` or `new` as a reader should see it: AT_APPLY where it is recomputed there."""
        if getattr(self, f"{side}_at_apply"):
            from .view import AT_APPLY

            return AT_APPLY
        return getattr(self, side)


# The diff rows of those keys; None on a side that still has a mask reads "at apply".
_RECOMPUTED = frozenset(f"mask.{k}" for k in RECOMPUTED_MASK_KEYS)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN in both: the same (hand-made or hostile) value, not a change
    return a == b


def _short(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)} mean={float(v.mean()):.4g}" if v.size else "array[]"
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return v


def _mask_view(m: dict | None) -> dict:
    if m is None:
        return {"mask": None}
    out = {f"mask.{k}": v for k, v in m.items() if k != "bits"}
    if "bits" in m:
        import hashlib

        out["mask.bits"] = hashlib.sha256(m["bits"]).hexdigest()[:16]
    return out


def _tensor_rows(a: TensorPlan, b: TensorPlan) -> list[DiffRow]:
    rows = []
    for f in ("op", "source", "dtype", "shape"):
        if not _same(getattr(a, f), getattr(b, f)):
            rows.append(DiffRow(a.name, None, f, getattr(a, f), getattr(b, f)))
    for k in sorted(set(a.params) | set(b.params)):
        if not _same(a.params.get(k), b.params.get(k)):
            rows.append(DiffRow(a.name, None, k, a.params.get(k), b.params.get(k)))
    ra, rb = a.relax or {}, b.relax or {}
    for k in sorted(set(ra) | set(rb)):
        if not _same(ra.get(k), rb.get(k)):
            rows.append(DiffRow(a.name, None, f"relax.{k}", _short(ra.get(k)), _short(rb.get(k))))
    # By model id through dicts: TensorPlan.contribution() scans the list, which made a
    # tensor with thousands of contributions quadratic (34 s for a crafted 1 MB plan).
    # setdefault keeps the first contribution of an id, as contribution() does.
    by_a: dict[str, Contribution] = {}
    by_b: dict[str, Contribution] = {}
    for c in a.contributions:
        by_a.setdefault(c.model, c)
    for c in b.contributions:
        by_b.setdefault(c.model, c)
    for m in list(by_a) + [m for m in by_b if m not in by_a]:
        ca, cb = by_a.get(m), by_b.get(m)
        if ca is None or cb is None:
            rows.append(DiffRow(a.name, m, "contribution", "present" if ca else None, "present" if cb else None))
            continue
        if not _same(ca.weight, cb.weight):
            rows.append(DiffRow(a.name, m, "weight", ca.weight, cb.weight))
        if not _same(ca.density, cb.density):
            rows.append(DiffRow(a.name, m, "density", ca.density, cb.density))
        ma, mb = _mask_view(ca.mask), _mask_view(cb.mask)
        for k in sorted(set(ma) | set(mb)):
            if k != "mask.density" and not _same(ma.get(k), mb.get(k)):
                pending = k in _RECOMPUTED
                rows.append(DiffRow(a.name, m, k, ma.get(k), mb.get(k),
                                    pending and ca.mask is not None and ma.get(k) is None,
                                    pending and cb.mask is not None and mb.get(k) is None))
    return rows


def _fp_part(v: Any) -> str | None:
    """A fingerprint part as a reader can compare it: its size and a short hash."""
    if v is None:
        return None
    from .canonical import sha256

    try:
        h = sha256(v)[:8]
    except TypeError:  # not a plan value (a hand-made plan): its type is enough
        return type(v).__name__
    return f"{len(v)} entries {h}" if isinstance(v, list) else f"{len(v)} bytes {h}" if isinstance(v, bytes) else h


def diff_plans(a: Plan, b: Plan) -> list[DiffRow]:
    rows: list[DiffRow] = []
    for f in ("method", "seed", "out_dtype", "params", "guides", "calibration", "max_shard_size", "aux_files"):
        va, vb = getattr(a, f), getattr(b, f)
        if not _same(va, vb):
            rows.append(DiffRow("plan", None, f, va, vb))
    ma = {m.id: m for m in a.models}
    mb = {m.id: m for m in b.models}
    for mid in list(ma) + [m for m in mb if m not in ma]:
        x, y = ma.get(mid), mb.get(mid)
        if x is None or y is None:
            rows.append(DiffRow(f"model {mid}", mid, "present", x is not None, y is not None))
            continue
        for f in ("role", "path", "hub"):
            if not _same(getattr(x, f), getattr(y, f)):
                rows.append(DiffRow(f"model {mid}", mid, f, getattr(x, f), getattr(y, f)))
        fx, fy = x.fingerprint or {}, y.fingerprint or {}
        for k in sorted(set(fx) | set(fy), key=str):  # which part: shard files, tensor table, digests
            if not _same(fx.get(k), fy.get(k)):
                rows.append(DiffRow(f"model {mid}", mid, f"fingerprint.{k}", _fp_part(fx.get(k)), _fp_part(fy.get(k))))
    tb = {t.name: t for t in b.tensors}
    seen = set()
    for t in a.tensors:
        seen.add(t.name)
        other = tb.get(t.name)
        if other is None:
            rows.append(DiffRow(t.name, None, "tensor", "present", None))
        else:
            rows += _tensor_rows(t, other)
    for t in b.tensors:
        if t.name not in seen:
            rows.append(DiffRow(t.name, None, "tensor", None, "present"))
    return [DiffRow(r.where, r.model, r.field, _short(r.old), _short(r.new), r.old_at_apply, r.new_at_apply)
            for r in rows]


# -- summary: where the changes are, and what changed ----------------------------------------
@dataclass(frozen=True)
class FieldSummary:
    field: str
    values: int  # diff rows (one per tensor x model, or per tensor)
    tensors: int
    models: int
    old: str  # range of the old values ("0.3..0.9") or an example
    new: str


@dataclass(frozen=True)
class DiffSummary:
    """A diff folded for reading at 80 columns: changed values per (row, component), rows
    with equal counts merged into ranges, and per field how many values changed from what
    to what. Plan- and model-level differences are kept as they are (there are few)."""

    components: list[str]  # components with a change, in display order
    rows: list[tuple[str, list[int]]]  # (row label or range "L3-9", count per component)
    fields: list[FieldSummary]
    global_rows: list[DiffRow]
    tensors: int


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number_span(nums: list[Any]) -> str:
    """`lo..hi` of some numbers (one value when they agree): how a changed range is shown."""
    lo, hi = min(nums), max(nums)
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"


def is_mask_digest(v: Any) -> bool:
    """A mask digest (32 hex characters): where a value is shown, a prefix tells two apart."""
    return isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v)


def _span(vals: list[Any]) -> str:
    nums = [v for v in vals if _is_num(v)]
    if nums and len(nums) == len(vals):
        return number_span(nums)
    shown = list(dict.fromkeys(_text(v) for v in vals))
    text = shown[0] if len(shown) == 1 else f"{len(shown)} different"
    return text if len(text) <= 24 else text[:21] + "..."


def _text(v: Any) -> str:
    if v is None:
        return "-"  # absent; not "none", which is a value (a mask's rescale mode)
    if is_mask_digest(v):
        return v[:12]
    return str(v)


def summarize(rows: list[DiffRow]) -> DiffSummary:
    from .names import parse_name
    from .view import row_label, row_of, row_order, sort_components

    global_rows = [r for r in rows if r.where == "plan" or r.where.startswith("model ")]
    tensor_rows = [r for r in rows if not (r.where == "plan" or r.where.startswith("model "))]
    counts: dict[Any, dict[str, int]] = {}
    comps: set[str] = set()
    by_field: dict[str, list[DiffRow]] = {}
    for r in tensor_rows:
        comp = parse_name(r.where).component
        comps.add(comp)
        cell = counts.setdefault(row_of(r.where), {})
        cell[comp] = cell.get(comp, 0) + 1
        by_field.setdefault(r.field, []).append(r)
    components = sort_components(comps)
    folded: list[tuple[Any, Any, list[int]]] = []  # (first row, last row, counts)
    for row in sorted(counts, key=row_order):
        line = [counts[row].get(c, 0) for c in components]
        prev = folded[-1] if folded else None
        if prev and isinstance(row, int) and isinstance(prev[1], int) and prev[1] == row - 1 and prev[2] == line:
            folded[-1] = (prev[0], row, line)
        else:
            folded.append((row, row, line))
    labels = [(row_label(a) if a == b else f"L{a}-{b}", line) for a, b, line in folded]
    fields = [
        FieldSummary(f, len(rs), len({r.where for r in rs}), len({r.model for r in rs if r.model}),
                     _span([r.shown("old") for r in rs]), _span([r.shown("new") for r in rs]))
        for f, rs in by_field.items()
    ]
    return DiffSummary(components, labels, fields, global_rows, len({r.where for r in tensor_rows}))
