"""Plan integrity checks beyond the digest, and input checks against fingerprints."""

from __future__ import annotations

import math
from .errors import MergeplanError
from .io.modeldir import ModelDir
from .methods.registry import METHODS
from .plan.model import OP_COPY, OP_MERGE, ROLE_BASE, ROLE_TASK, Plan


def check_plan(plan: Plan) -> list[str]:
    """Everything apply relies on, as a list of problems (empty when the plan is sound)."""
    problems: list[str] = []
    ids = [m.id for m in plan.models]
    if len(set(ids)) != len(ids):
        problems.append("duplicate model ids: " + ", ".join(sorted({i for i in ids if ids.count(i) > 1})))
    if plan.method not in METHODS:
        problems.append(f"unknown method {plan.method!r} (plan from another mergeplan?)")
    elif METHODS[plan.method].needs_base and sum(m.role == ROLE_BASE for m in plan.models) != 1:
        problems.append(f"method {plan.method} needs exactly one base model")
    for m in plan.models:
        if m.role not in (ROLE_BASE, ROLE_TASK):
            problems.append(f"model {m.id}: unknown role {m.role!r}")
    seen = set()
    for t in plan.tensors:
        if t.name in seen:
            problems.append(f"{t.name}: listed twice")
        seen.add(t.name)
        if t.op == OP_COPY:
            if t.source not in ids:
                problems.append(f"{t.name}: copies from unknown model {t.source!r}")
            continue
        if t.op != OP_MERGE:
            problems.append(f"{t.name}: unknown operation {t.op!r}")
            continue
        numel = math.prod(t.shape)
        for c in t.contributions:
            if c.model not in ids:
                problems.append(f"{t.name}: contribution from unknown model {c.model!r}")
            if not math.isfinite(c.weight):
                problems.append(f"{t.name} [{c.model}]: weight {c.weight} is not finite")
            if c.mask is not None:
                d = c.density
                if not 0.0 < d <= 1.0:
                    problems.append(f"{t.name} [{c.model}]: density {d:g} outside (0, 1]")
                bits = c.mask.get("bits")
                if bits is not None and len(bits) != (numel + 7) // 8:
                    problems.append(f"{t.name} [{c.model}]: explicit mask has {len(bits)} bytes, expected {(numel + 7) // 8}")
        if t.relax is not None:
            axis = int(t.relax.get("axis", -1)) % max(1, len(t.shape))
            n = len(t.relax.get("scores", []))
            if n != t.shape[axis]:
                problems.append(f"{t.name}: AIM scores have {n} entries, tensor axis {axis} has {t.shape[axis]}")
            om = float(t.relax.get("omega", 0.0))
            if not 0.0 <= om <= 1.0:
                problems.append(f"{t.name}: AIM omega {om:g} outside [0, 1]")
    return problems


def check_inputs(plan: Plan, remap: dict[str, str], full: bool = False, plan_path: str | None = None) -> list[str]:
    """One line per model; raises on the first model that does not match."""
    from .apply import model_paths

    lines = []
    for m, path in zip(plan.models, model_paths(plan, remap, plan_path).values()):
        with ModelDir.open(path, name=m.id) as md:
            md.check_fingerprint(m.fingerprint, full=full)
            missing = [t.name for t in plan.tensors if t.name not in md and (t.op == OP_MERGE or t.source == m.id)]
            if missing:
                raise MergeplanError(f"model {m.id} ({path}): tensor {missing[0]} is missing")
        lines.append(f"model {m.id}: {path} matches ({'full sha256' if full else 'sizes and headers'})")
    return lines
