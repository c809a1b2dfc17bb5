"""The one editing API for plans, used by the review TUI and the CLI alike.

Editable quantities ("fields"):
- per (tensor, model): "weight" (the model's coefficient) and "density" (its mask's keep fraction);
- per tensor: "lambda" (scale of the merged delta) and "omega" (AIM relaxation strength).

Editing a density invalidates the mask digest the planner recorded (the digest pinned the
mask at the old density), and for CABS also the digests of the models masked after it
(their masks avoid its positions). Those masks keep their recipe (kind, seed key, params)
and their "digest" becomes None, so apply recomputes them from the recipe, which is
deterministic; the digest comes back when the values return to the planned ones. An n:m
mask's density moves in steps of 1/m. Every saved edit is appended to the plan's edit log with old and new values.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import MergeplanError
from .codec import write_plan
from .model import OP_MERGE, Plan, TensorPlan
from .names import parse_name

# Mask keys that pin a recipe mask to the weights the planner saw; an edit that changes
# the mask clears them and apply recomputes the mask from its recipe (diff shows "at apply").
RECOMPUTED_MASK_KEYS = ("digest", "cutoff")
MODEL_FIELDS = ("weight", "density")
TENSOR_FIELDS = ("lambda", "omega")
FIELDS = MODEL_FIELDS + TENSOR_FIELDS

Target = tuple[str, "str | None"]  # (tensor name, model id or None for tensor fields)


@dataclass(frozen=True)
class Change:
    tensor: str
    model: str | None
    field: str
    old: Any
    new: Any


def validate_value(field: str, value: Any) -> float:
    """Return the value as a float or raise MergeplanError saying what range is allowed."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MergeplanError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise MergeplanError(f"{field} must be finite, got {value!r}")
    if field == "density" and not (0.0 < v <= 1.0):
        raise MergeplanError(f"density must be in (0, 1], got {v:g}")
    if field == "omega" and not (0.0 <= v <= 1.0):
        raise MergeplanError(f"omega must be in [0, 1], got {v:g}")
    if field not in FIELDS:
        raise MergeplanError(f"unknown field {field!r}; editable fields: {', '.join(FIELDS)}")
    return v


def get_value(plan: Plan, tensor: str, model: str | None, field: str) -> float | None:
    """The current value, or None where the field does not apply to that tensor/model."""
    t = plan.tensor(tensor)
    if field in MODEL_FIELDS:
        c = t.contribution(model) if model else None
        if c is None:
            return None
        return c.weight if field == "weight" else c.density
    if field == "lambda":
        return float(t.params.get("lambda", 1.0)) if t.op == OP_MERGE else None
    if field == "omega":
        return float(t.relax["omega"]) if t.relax else None
    raise MergeplanError(f"unknown field {field!r}; editable fields: {', '.join(FIELDS)}")


def _put(plan: Plan, tensor: str, model: str | None, field: str, value: Any) -> None:
    t = plan.tensor(tensor)
    if field == "weight":
        c = t.contribution(model)
        c.weight = value
        c.source = {**c.source, "weight": "edit"}
    elif field == "density":
        c = t.contribution(model)
        if c.mask is None:
            # A dense contribution gets a magnitude mask: the data-free, deterministic choice.
            c.mask = {"kind": "magnitude", "density": value, "digest": None}
        elif c.mask.get("kind") == "nm":
            # n:m masks keep n of every m: the density moves in steps of 1/m.
            m = int(c.mask["m"])
            n = min(m, max(1, round(value * m)))
            c.mask = {**c.mask, "n": n, "density": n / m}
        else:
            c.mask = {**c.mask, "density": value}
        c.source = {**c.source, "density": "edit"}
    elif field == "lambda":
        t.params = {**t.params, "lambda": value}
    elif field == "omega":
        t.relax = {**t.relax, "omega": value}


def _refresh_digests(t: TensorPlan, loaded: TensorPlan) -> None:
    """A recorded mask digest stays valid only while the mask's inputs are as planned: its
    own density, and for CABS (sequential masks) the densities of every model masked
    before it. Otherwise it is dropped and apply recomputes the mask without a check."""
    order = t.params.get("cabs_order")
    order = list(order) if order is not None else None
    for i, c in enumerate(t.contributions):
        if c.mask is None or "bits" in c.mask:
            continue
        orig = loaded.contribution(c.model)
        if orig is None or orig.mask is None:
            c.mask["digest"] = None
            c.mask.pop("cutoff", None)
            continue
        deps = [i] if order is None else order[: order.index(i) + 1] if i in order else [i]
        same = all(
            loaded.contribution(t.contributions[j].model) is not None
            and t.contributions[j].density == loaded.contribution(t.contributions[j].model).density
            for j in deps
        )
        # The recorded top-k cutoff pins the mask exactly as the digest does.
        for key in RECOMPUTED_MASK_KEYS:
            if same and key in orig.mask:
                c.mask[key] = orig.mask[key]
            elif key == "digest":
                c.mask[key] = None
            else:
                c.mask.pop(key, None)


def differs(a: Any, b: Any) -> bool:
    """a != b, except that two NaNs (a hand-made or hostile plan's values) are the same
    value: otherwise a NaN would count as an unsaved edit forever."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return False
    return a != b


class PlanEditor:
    """Holds a plan being edited, the plan as loaded, and undo/redo stacks."""

    def __init__(self, plan: Plan, path: str | None = None):
        self.plan = plan
        self.path = path
        # The plan as loaded (or last saved) is copied just before the first change, not
        # here: the deep copy of a 70B plan's 30 MB costs 0.15 s that opening the review
        # would otherwise pay before showing anything. Until then the plan is its own original.
        self._loaded: Plan | None = None
        self._undo: list[list[Change]] = []
        self._redo: list[list[Change]] = []

    @property
    def loaded(self) -> Plan:
        """The plan as loaded or last saved (the plan itself until something changes)."""
        return self.plan if self._loaded is None else self._loaded

    # -- selection ----------------------------------------------------------------------
    def select(
        self,
        layers: Iterable[int] | None = None,
        components: Iterable[str] | None = None,
        pattern: str | None = None,
        models: Iterable[str] | None = None,
        field: str = "density",
        vectors: bool = True,
    ) -> list[Target]:
        """Targets for a field: tensors filtered by layer set, component labels and a
        substring/glob pattern of the name (e.g. "mlp."), crossed with models. `vectors`
        False leaves out 1-D tensors (norm weights, biases), which a range edit meant for
        the matrices must not touch."""
        import fnmatch

        from .view import is_vector

        layer_set = set(layers) if layers is not None else None
        comp_set = set(components) if components is not None else None
        model_ids = list(models) if models is not None else [m.id for m in self.plan.task_models]
        out: list[Target] = []
        for t in self.plan.tensors:
            pn = parse_name(t.name)
            if layer_set is not None and pn.layer not in layer_set:
                continue
            if comp_set is not None and pn.component not in comp_set:
                continue
            if pattern and not (pattern in t.name or fnmatch.fnmatch(t.name, pattern)):
                continue
            if not vectors and is_vector(t):
                continue
            if field in MODEL_FIELDS:
                out += [(t.name, m) for m in model_ids if t.contribution(m) is not None]
            elif get_value(self.plan, t.name, None, field) is not None:
                out.append((t.name, None))
        return out

    # -- edits --------------------------------------------------------------------------
    def get(self, tensor: str, model: str | None, field: str) -> float | None:
        return get_value(self.plan, tensor, model, field)

    def planned(self, tensor: str, model: str | None, field: str) -> float | None:
        return get_value(self.loaded, tensor, model, field)

    def set(self, targets: Iterable[Target], field: str, value: Any) -> list[Change]:
        v = validate_value(field, value)
        return self._apply([(t, m, v) for t, m in targets], field)

    def scale(self, targets: Iterable[Target], field: str, factor: float) -> list[Change]:
        f = validate_value("weight", factor)  # any finite number
        items = []
        for t, m in targets:
            cur = self.get(t, m, field)
            if cur is not None:
                items.append((t, m, validate_value(field, cur * f)))
        return self._apply(items, field)

    def reset(self, targets: Iterable[Target], field: str) -> list[Change]:
        items = [(t, m, self.planned(t, m, field)) for t, m in targets]
        return self._apply([i for i in items if i[2] is not None], field)

    def _apply(self, items: list[tuple[str, str | None, float]], field: str) -> list[Change]:
        # Validate everything first so a failing range edit changes nothing.
        changes = []
        for t, m, v in items:
            old = self.get(t, m, field)
            if old is None:
                raise MergeplanError(f"{t}: has no {field}" + (f" for model {m}" if m else ""))
            c = self.plan.tensor(t).contribution(m) if m else None
            if field == "density" and c is not None and c.mask is not None and "bits" in c.mask:
                raise MergeplanError(f"{t} [{m}]: has an explicit edited mask; its density is fixed by its bits")
            if differs(old, v):
                changes.append(Change(t, m, field, old, v))
        for c in changes:
            self._set(c.tensor, c.model, c.field, c.new)
        if changes:
            self._undo.append(changes)
            self._redo.clear()
        return changes

    def _set(self, tensor: str, model: str | None, field: str, value: Any) -> None:
        if self._loaded is None:
            self._loaded = self.plan.clone()
        _put(self.plan, tensor, model, field, value)
        if field == "density":
            _refresh_digests(self.plan.tensor(tensor), self.loaded.tensor(tensor))

    def undo(self) -> list[Change]:
        if not self._undo:
            return []
        changes = self._undo.pop()
        for c in reversed(changes):
            self._set(c.tensor, c.model, c.field, c.old)
        self._redo.append(changes)
        return changes

    def redo(self) -> list[Change]:
        if not self._redo:
            return []
        changes = self._redo.pop()
        for c in changes:
            self._set(c.tensor, c.model, c.field, c.new)
        self._undo.append(changes)
        return changes

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    # -- pending changes and saving -----------------------------------------------------
    def pending(self) -> list[Change]:
        """Net changes against the plan as loaded (undone edits do not count)."""
        out = []
        for t in self.plan.tensors:
            fields: list[tuple[str | None, str]] = [(c.model, f) for c in t.contributions for f in MODEL_FIELDS]
            fields += [(None, f) for f in TENSOR_FIELDS]
            for m, f in fields:
                new = self.get(t.name, m, f)
                old = self.planned(t.name, m, f)
                if differs(new, old):
                    out.append(Change(t.name, m, f, old, new))
        return out

    @property
    def dirty(self) -> bool:
        return bool(self.pending())

    def save(self, path: str | None = None, tool: str = "review") -> str:
        target = path or self.path
        if not target:
            raise MergeplanError("no file to save to: give a path (save as)")
        changes = self.pending()
        if changes:
            self.plan.edit_log.append(
                {
                    "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "tool": tool,
                    "changes": [[c.tensor, c.model, c.field, c.old, c.new] for c in changes],
                }
            )
        digest = write_plan(self.plan, target)
        self.path = str(target)
        self._loaded = None  # what was saved is the new original
        self._undo.clear()
        self._redo.clear()
        return digest


def tensor_values(t: TensorPlan, field: str) -> dict[str, float]:
    """Per-model values of a model field for one tensor (for tables and grids)."""
    return {c.model: (c.weight if field == "weight" else c.density) for c in t.contributions}
