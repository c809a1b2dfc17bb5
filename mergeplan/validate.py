"""Plan integrity checks beyond the digest, and input checks against fingerprints."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .errors import InputMismatchError, MergeplanError, PlanFormatError
from .methods.spec import FLOAT_DTYPE_NAMES, check_spec
from .methods.registry import METHODS
from .plan.model import OP_COPY, OP_MERGE, ROLE_BASE, ROLE_TASK, Plan, TensorPlan
from .plan.rows import record_problem, stored_shape


def check_plan(plan: Plan) -> list[str]:
    """Everything apply relies on, as a list of problems (empty when the plan is sound).

    Works on any plan the reader accepts (plan/schema.py fixed the types) and never
    raises: a received plan may be hostile, and `validate` lists all its problems. The
    strings in the problems are the plan's own; printers escape them (safetext)."""
    problems: list[str] = []
    counts = Counter(m.id for m in plan.models)
    if len(counts) != len(plan.models):
        problems.append("duplicate model ids: " + ", ".join(sorted(i for i, n in counts.items() if n > 1)))
    ids = set(counts)
    spec = METHODS.get(plan.method)
    if spec is None:
        problems.append(f"unknown method {plan.method!r} (plan from another mergeplan?)")
    elif spec.needs_base and sum(m.role == ROLE_BASE for m in plan.models) != 1:
        problems.append(f"method {plan.method} needs exactly one base model")
    for m in plan.models:
        if m.role not in (ROLE_BASE, ROLE_TASK):
            problems.append(f"model {m.id}: unknown role {m.role!r}")
    if plan.out_dtype is not None and not _float_dtype(plan.out_dtype):
        problems.append(f"output dtype {plan.out_dtype!r} is not one mergeplan writes (bfloat16, float16, float32)")
    seen: set[str] = set()
    for t in plan.tensors:
        if t.name in seen:
            problems.append(f"{t.name}: listed twice")
        seen.add(t.name)
        if t.op == OP_COPY:
            if t.source not in ids:
                problems.append(f"{t.name}: copies from unknown model {t.source!r}")
            if "vocab" in t.params:
                problems.append(f"{t.name}: a copied tensor has a vocabulary rule (params.vocab); only merged ones do")
        elif t.op != OP_MERGE:
            problems.append(f"{t.name}: unknown operation {t.op!r}")
        else:
            problems += _merge_problems(t, ids, spec)
            if "vocab" in t.params and (problem := record_problem(t.shape, t.params["vocab"], plan.input_models(t))):
                problems.append(f"{t.name}: {problem}")
    return problems


def _float_dtype(name: str) -> bool:
    return isinstance(name, str) and name.strip().lower() in FLOAT_DTYPE_NAMES  # as io.tensors.recipe_to_torch


def _merge_problems(t: TensorPlan, ids: set[str], spec) -> list[str]:
    problems = []
    if not _float_dtype(t.dtype):
        problems.append(f"{t.name}: output dtype {t.dtype!r} is not one mergeplan writes (bfloat16, float16, float32)")
    lam = t.params.get("lambda", 1.0)
    if not math.isfinite(lam):
        problems.append(f"{t.name}: lambda {lam} is not finite")
    order = t.params.get("cabs_order")
    if order is not None and sorted(order) != list(range(len(t.contributions))):
        problems.append(f"{t.name}: cabs_order {order} is not an order of its {len(t.contributions)} contributions")
    numel = math.prod(t.shape)
    models: set[str] = set()
    for c in t.contributions:
        where = f"{t.name} [{c.model}]"
        if c.model not in ids:
            problems.append(f"{t.name}: contribution from unknown model {c.model!r}")
        if c.model in models:
            problems.append(f"{where}: contributes twice")
        models.add(c.model)
        if not math.isfinite(c.weight):
            problems.append(f"{where}: weight {c.weight} is not finite")
        if c.mask is None:
            continue
        if spec is not None and not spec.needs_base:  # merge_tensor refuses masks there
            problems.append(f"{where}: method {spec.name} does not sparsify, but the plan has a mask")
        try:
            check_spec(c.mask, where)
        except MergeplanError as e:
            problems.append(str(e))
        d = c.density
        if not 0.0 < d <= 1.0:
            problems.append(f"{where}: density {d:g} outside (0, 1]")
        bits = c.mask.get("bits")
        if bits is not None and len(bits) != (numel + 7) // 8:
            problems.append(f"{where}: explicit mask has {len(bits)} bytes, expected {(numel + 7) // 8}")
    if t.relax is not None:
        problems += _relax_problems(t)
    return problems


def _relax_problems(t: TensorPlan) -> list[str]:
    problems = []
    axis, scores, om = t.relax["axis"], t.relax["scores"], t.relax["omega"]
    if not -len(t.shape) <= axis < len(t.shape):
        problems.append(f"{t.name}: AIM axis {axis} does not exist in a {len(t.shape)}-d tensor")
    elif len(scores) != t.shape[axis]:
        problems.append(f"{t.name}: AIM scores have {len(scores)} entries, tensor axis {axis} has {t.shape[axis]}")
    elif t.shape[axis] == 0:
        problems.append(f"{t.name}: AIM relaxes along axis {axis}, which has no entries")
    if not np.isfinite(scores).all():
        problems.append(f"{t.name}: AIM scores hold NaN or infinite values")
    if not 0.0 <= om <= 1.0:
        problems.append(f"{t.name}: AIM omega {om:g} outside [0, 1]")
    return problems


def check_inputs(plan: Plan, remap: dict[str, str], full: bool = False, plan_path: str | None = None) -> list[str]:
    """One line per model; raises on the first model that does not match. Reads and hashes
    every tensor when the plan recorded tensor digests (the check apply makes as it reads);
    for older plans, sizes and headers, and with `full` the shards' recorded sha256."""
    from .apply import model_paths
    from .io.modeldir import ModelDir  # torch: only when inputs are read

    lines = []
    paths = model_paths(plan, remap, plan_path)
    dirs: dict[str, ModelDir] = {}
    try:
        for m in plan.models:
            md = dirs[m.id] = ModelDir.open(paths[m.id], name=m.id)
            content = m.content_digests()
            md.check_fingerprint(m.fingerprint, full=full or bool(content), content=content)
            how = "every tensor's digest" if content else ("full shard sha256" if full else "sizes and headers only")
            lines.append(f"model {m.id}: {paths[m.id]} matches ({how})")
        check_against_inputs(plan, dirs)
        source = plan.aux_source
        if source is not None:
            for f, record in aux_records(plan, dirs[source.id]):
                dirs[source.id].check_aux(f, record)
    finally:
        for md in dirs.values():
            md.close()
    return lines


def check_against_inputs(plan: Plan, dirs: dict) -> None:
    """Every tensor the plan merges or copies exists in the models it reads, with the plan's
    shape, in a dtype the operation can take: checked before apply allocates anything, so
    a plan cannot make it reserve memory or write a tensor that the inputs do not back."""
    from .io.tensors import recipe_to_torch, st_to_torch

    if len(set(plan.aux_files)) != len(plan.aux_files):
        raise PlanFormatError("the plan lists a copied file twice in aux_files; the plan is corrupt")
    try:
        from .io.shards import plan_shards

        plan_shards([("x", "F32", (1,))], plan.max_shard_size)
    except Exception:
        raise PlanFormatError(f"the plan's max_shard_size {plan.max_shard_size!r} is not a size; the plan is corrupt") from None
    for t in plan.tensors:
        try:
            out_dtype = recipe_to_torch(t.dtype)
        except Exception:
            raise PlanFormatError(f"{t.name}: output dtype {t.dtype!r} is not one mergeplan writes; the plan is corrupt") from None
        rows = t.params.get("vocab") if t.op == OP_MERGE else None
        if rows is not None and (problem := record_problem(t.shape, rows, plan.input_models(t))):
            raise PlanFormatError(f"{t.name}: {problem}; the plan is corrupt or hostile: re-plan")
        for mid in plan.input_models(t):
            md = dirs[mid]
            if t.name not in md:
                raise InputMismatchError(f"model {mid} ({md.path}): tensor {t.name} is missing; the inputs do not match the plan")
            info = md.info(t.name)
            want = stored_shape(t.shape, rows, mid) if rows is not None else tuple(t.shape)
            if tuple(info.shape) != want:
                raise InputMismatchError(f"model {mid}: tensor {t.name} is {list(info.shape)} but the plan says "
                                         f"{list(want)}; the inputs do not match the plan")
            src = st_to_torch(info.dtype)
            if t.op == OP_COPY and src != out_dtype:
                raise PlanFormatError(f"{t.name}: the plan copies a {info.dtype} tensor as {t.dtype}; the plan is corrupt")
            if t.op == OP_MERGE and not (src.is_floating_point and out_dtype.is_floating_point):
                raise PlanFormatError(f"{t.name}: the plan merges a {info.dtype} tensor into {t.dtype}; only floating "
                                      "point tensors are merged")


def aux_records(plan: Plan, source_dir) -> list[tuple[str, dict | None]]:
    """(file, recorded {file, size, sha256}) for each file the plan copies from its aux
    source. A v2 plan records every one: a file without a record is refused here, for
    validate --inputs and apply alike (None only for a v1 plan, which records none)."""
    recorded = plan.aux_source.file_records()
    legacy = not source_dir.verifies_content  # a plan from before copied files were fingerprinted
    out = []
    for f in plan.aux_files:
        if f not in recorded and not legacy:
            raise MergeplanError(f"the plan copies {f!r} from model {plan.aux_source.id} but records no digest "
                                 "for it; the plan is corrupt or hostile: re-plan")
        out.append((f, recorded.get(f)))
    return out
