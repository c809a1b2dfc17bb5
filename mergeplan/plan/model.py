"""The plan: one data model shared by the planner, the file codec, the CLI, the TUI and apply.

A plan records every decision apply needs, per tensor and per model, so that apply makes
none of its own. Plain dataclasses of plain values (numbers, strings, dicts, lists, bytes
and float32 numpy arrays) so the codec can serialise them canonically.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import PlanFormatError

FORMAT_NAME = "mergeplan"
# 2: fingerprints carry per-tensor and copied-file sha256 digests that apply must check;
# a v1 reader would ignore them, so v2 plans are refused there rather than half-checked.
FORMAT_VERSION = 2

DIGEST_SIZE = 32  # bytes per recorded tensor digest (BLAKE3-256)

ROLE_BASE = "base"
ROLE_TASK = "task"

OP_MERGE = "merge"  # combine base + task models with the plan's method
OP_COPY = "copy"  # take the tensor from one model unchanged (e.g. tokenizer-bound tensors)


@dataclass
class ModelRef:
    """One input model: its id (recipe `name:` or directory basename), role and fingerprint."""

    id: str
    role: str
    path: str  # as the recipe gave it; apply may remap it with --model NAME=PATH
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # {"repo": "org/name", "revision": <commit>} when the model came from the Hugging Face
    # cache: a receiver without the path fetches exactly that commit.
    hub: dict[str, str] | None = None

    # -- what the fingerprint records (its layout: docs/plan-format.md) ------------------
    def content_digests(self) -> dict[str, bytes]:
        """tensor name -> the BLAKE3 digest the planner recorded (empty for plans without)."""
        fp = self.fingerprint
        blob = fp.get("tensor_blake3")
        names = [t[0] for t in fp.get("tensors", [])]
        if blob is None:
            return {}
        if not isinstance(blob, (bytes, bytearray)) or len(blob) != DIGEST_SIZE * len(names):
            # The schema checks this on read; a hand-built plan gets the same one-line error.
            raise PlanFormatError(f"model {self.id}: malformed tensor digests in the fingerprint; re-plan")
        return {n: bytes(blob[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]) for i, n in enumerate(names)}

    def file_records(self) -> dict[str, dict[str, Any]]:
        """copied file name -> {file, size, sha256} as the planner recorded it."""
        return {f["file"]: f for f in self.fingerprint.get("files", []) if isinstance(f, dict) and "file" in f}


@dataclass
class Contribution:
    """What one task model contributes to one tensor.

    `mask` is None (dense) or a mask spec dict: {"kind", "density", kind params...,
    "digest": hex of the mask the planner computed (None when an edit invalidated it and
    apply must recompute without a check), "bits": packed bits for an explicit mask}.
    `source` says who set each value: {"weight": "recipe"|"sens"|"edit", "density": ...}.
    """

    model: str
    weight: float
    mask: dict[str, Any] | None = None
    source: dict[str, str] = field(default_factory=dict)

    @property
    def density(self) -> float:
        if self.mask is None:
            return 1.0
        return float(self.mask.get("density", 1.0))


@dataclass
class TensorPlan:
    """Every decision for one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype name: "bfloat16" | "float16" | "float32" | ...
    op: str = OP_MERGE
    source: str | None = None  # model id, for OP_COPY
    params: dict[str, Any] = field(default_factory=dict)  # resolved method params: lambda, normalize, ...
    contributions: list[Contribution] = field(default_factory=list)
    # AIM relaxation: {"kind": "aim", "omega": float, "axis": int, "scores": float32 array};
    # apply scales the merged delta by f = 1 - scores * (1 - omega) along `axis`.
    relax: dict[str, Any] | None = None
    # Guide statistics behind the decisions, for review: scalars and small arrays.
    stats: dict[str, Any] = field(default_factory=dict)

    def contribution(self, model_id: str) -> Contribution | None:
        for c in self.contributions:
            if c.model == model_id:
                return c
        return None


@dataclass
class Plan:
    method: str
    models: list[ModelRef]
    tensors: list[TensorPlan]
    params: dict[str, Any] = field(default_factory=dict)  # global method params as resolved
    seed: int = 0
    out_dtype: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # {"path": str, "text": str}
    guides: dict[str, Any] = field(default_factory=dict)  # guide name -> its params and summary
    calibration: dict[str, Any] = field(default_factory=dict)  # settings + data digest
    stats: dict[str, Any] = field(default_factory=dict)  # plan-level statistics for review
    aux_files: list[str] = field(default_factory=list)  # copied from the base model
    max_shard_size: int | str = 5_000_000_000  # bytes or a size string such as "2GB"
    notes: list[str] = field(default_factory=list)
    mergeplan_version: str = ""
    created: str = ""
    edit_log: list[dict[str, Any]] = field(default_factory=list)
    # The model whose config and tokenizer files are copied when it is not the base:
    # `tokenizer_source: union` takes them from the model holding the union vocabulary (vocab.py).
    aux_model: str | None = None
    # How a `tune:` search chose this plan (mergeplan/tune/record.py): the objective, the
    # held-out split, every candidate with its scores and which one the plan is. None (and
    # absent from the file) for a plan made without a search.
    tuning: dict[str, Any] | None = None

    # -- lookups -------------------------------------------------------------------------
    @property
    def base(self) -> ModelRef | None:
        for m in self.models:
            if m.role == ROLE_BASE:
                return m
        return None

    @property
    def task_models(self) -> list[ModelRef]:
        return [m for m in self.models if m.role == ROLE_TASK]

    @property
    def aux_source(self) -> ModelRef | None:
        """The model whose config and tokenizer files are copied: aux_model when set (union
        vocabulary), else the base, else the first task."""
        if self.aux_model is not None:
            return self.model(self.aux_model)
        return self.base or next(iter(self.task_models), None)

    def input_models(self, t: "TensorPlan") -> list[str]:
        """Ids of the models a tensor reads: its copy source, or the base (if any) and each
        contribution, in the order apply and the planner read them."""
        if t.op == OP_COPY:
            return [t.source]
        return ([self.base.id] if self.base else []) + [c.model for c in t.contributions]

    def model(self, model_id: str) -> ModelRef:
        for m in self.models:
            if m.id == model_id:
                return m
        raise KeyError(model_id)

    def tensor(self, name: str) -> TensorPlan:
        idx = self._index().get(name)
        if idx is None:
            raise KeyError(name)
        return self.tensors[idx]

    def _index(self) -> dict[str, int]:
        # Rebuilt when the tensor list changed length; tensors are not renamed in place.
        # Keyed on the list's length, not the dict's: with a name listed twice (a corrupt
        # plan) the two differ, and every lookup would rebuild the index.
        n, cache = getattr(self, "_name_index", (-1, None))
        if cache is None or n != len(self.tensors):
            cache = {}
            for i, t in enumerate(self.tensors):
                cache.setdefault(t.name, i)  # the first of a repeated name, as a scan finds it
            object.__setattr__(self, "_name_index", (len(self.tensors), cache))
        return cache

    def iter_contributions(self) -> Iterator[tuple[TensorPlan, Contribution]]:
        for t in self.tensors:
            for c in t.contributions:
                yield t, c

    def clone(self) -> "Plan":
        return copy.deepcopy(self)


def float32_array(values: Any) -> np.ndarray:
    """Numeric vectors in a plan are float32 arrays (stored as typed binary, not lists)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32))


# -- where the inputs are ----------------------------------------------------------------------
def model_search_dirs(plan: Plan, plan_path: str | None) -> list[Path]:
    """Directories a relative model path is tried against, in apply's order: the recipe's
    directory at plan time, the plan file's directory, the current directory."""
    bases = [Path(d) for d in (plan.recipe.get("dir"), Path(plan_path).parent if plan_path else None) if d]
    bases.append(Path.cwd())
    return bases
