"""Recipe + inputs (+ guide decisions) -> Plan.

Resolves every per-layer parameter, folds in what the guides decided, computes each
mask once to record its digest, and fingerprints the inputs. No decision is left for apply.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import __version__, malloc
from . import vocab as _vocab
from .errors import MergeplanError
from .whole import TensorInputs, check_finite, compute_masks, deltas_of
from .io import digests as _digests
from .io.locate import resolve_model_path
from .io.modeldir import ModelDir
from .io.tensors import st_to_torch, torch_to_recipe
from .methods.masks import build_masks, mask_digest, overlap_rate
from .methods.select import magnitude_bits
from .methods.registry import METHODS, mask_spec, resolve_params
from .schedule import MemoryScheduler
from .mask_records import plan_streamed
from .slices import IN_MEMORY_INPUTS, tensor_inputs
from .streamed import CHUNK, streamable
from .plan.model import (
    OP_COPY, OP_MERGE, ROLE_BASE, ROLE_TASK, Contribution, ModelRef, Plan, TensorPlan,
)
from .plan.names import num_layers, parse_name
from .recipe import Recipe

Progress = Callable[[str, int, int], None]  # (stage, done, total)

_DEFAULT_SHARD = 5_000_000_000
_BIG = 16 * 1024 * 1024  # elements
# The mask pass does fewer operations per element than apply's merge, so per-slice overhead
# weighs more: twice apply's slice measured 5-8% faster at the same peak memory.
_PLAN_CHUNK = 2 * CHUNK


@dataclass
class PlanOptions:
    device: str = "auto"
    threads: int = 1
    # Also sha256 whole shards (a second read of everything). Not needed for apply's
    # checks, which use the per-tensor digests recorded while the planner reads.
    full_hash: bool = False
    quiet: bool = False
    remap: dict[str, str] = field(default_factory=dict)
    progress: Progress | None = None
    memory_budget: int = 400 << 20  # working memory the tensors in flight may claim together


@dataclass
class _Inputs:
    base: ModelRef | None
    tasks: list[ModelRef]
    dirs: dict[str, ModelDir]


def _open_models(recipe: Recipe, opts: PlanOptions) -> _Inputs:
    recipe_dir = recipe.dir
    spec = METHODS[recipe.merge_method]
    dirs: dict[str, ModelDir] = {}

    def open_one(ms) -> ModelDir:
        ref = opts.remap.get(ms.name, ms.ref)
        return ModelDir.open(resolve_model_path(ref, recipe_dir), name=ms.name)

    base = None
    if spec.needs_base:
        if recipe.base_model is None:
            raise MergeplanError(f"merge_method {recipe.merge_method} needs a base_model; add `base_model: PATH` to the recipe")
        dirs[recipe.base_model.name] = open_one(recipe.base_model)
        base = ModelRef(recipe.base_model.name, ROLE_BASE, recipe.base_model.ref)
    tasks = []
    for ms in recipe.models:
        if base is not None and ms.name == base.id:
            continue  # mergekit lets the base appear in `models`; it adds no task vector
        dirs[ms.name] = open_one(ms)
        tasks.append(ModelRef(ms.name, ROLE_TASK, ms.ref))
    if not tasks:
        raise MergeplanError("the recipe lists no model to merge besides the base; add entries under `models:`")
    return _Inputs(base, tasks, dirs)


def _check_tensor_tables(inp: _Inputs, rows: dict | None = None) -> list[str]:
    """All models must hold the reference model's tensors with the same shapes and dtypes
    (except the rows of a grown vocabulary's tensors, `rows`: vocab.py)."""
    rows = rows or {}
    ref_id = inp.base.id if inp.base else inp.tasks[0].id
    ref = inp.dirs[ref_id]
    names = ref.tensor_names()
    for mid, md in inp.dirs.items():
        if mid == ref_id:
            continue
        for n in names:
            if n not in md:
                raise MergeplanError(f"model {mid} ({md.path}): tensor {n} is missing (present in {ref_id}); all models must share the same architecture")
            a, b = ref.info(n), md.info(n)
            if tuple(a.shape) != tuple(b.shape) and n not in rows:
                raise MergeplanError(f"model {mid}: tensor {n} has shape {list(b.shape)} but {ref_id} has {list(a.shape)}; models must share the same architecture")
            if a.dtype != b.dtype:
                raise MergeplanError(f"model {mid}: tensor {n} is {b.dtype} but {ref_id} has {a.dtype}; convert the models to one dtype first")
        extra = sorted(set(md.tensor_names()) - set(names))
        if extra:
            raise MergeplanError(f"model {mid}: has tensor {extra[0]} that {ref_id} lacks ({len(extra)} in all); models must share the same architecture")
    return names


def _tensor_plans(recipe: Recipe, inp: _Inputs, names: list[str], decisions, rows: dict | None = None) -> list[TensorPlan]:
    spec = METHODS[recipe.merge_method]
    ref = inp.dirs[inp.base.id if inp.base else inp.tasks[0].id]
    nl = num_layers(names)
    task_ids = [t.id for t in inp.tasks]
    # recipe.models may hold the base too (mergekit allows it); map its indices to tasks.
    recipe_index = {m.name: i for i, m in enumerate(recipe.models)}
    plans = []
    for name in names:
        info = ref.info(name)
        dtype = torch_to_recipe(st_to_torch(info.dtype))
        if not st_to_torch(info.dtype).is_floating_point:
            src = inp.base.id if inp.base else inp.tasks[0].id
            plans.append(TensorPlan(name, tuple(info.shape), dtype, op=OP_COPY, source=src))
            continue
        layer = parse_name(name).layer
        gp, per_model = recipe.tensor_params(name, layer, nl)
        per_model = [per_model[recipe_index[t]] for t in task_ids]
        gp, per_model = resolve_params(recipe.merge_method, gp, per_model)
        contribs = []
        for t, mp in zip(task_ids, per_model):
            source = {"weight": "recipe"}
            if decisions is not None and t in decisions.densities.get(name, {}):
                d = float(decisions.densities[name][t])
                if spec.mask_kind == "nm":
                    # CABS keeps n of every m: LEWIS's density becomes the nearest n (at least 1).
                    m = int(gp["m"])
                    mp["n"] = min(m, max(1, round(d * m)))
                else:
                    mp["density"] = d
                source["density"] = "lewis"
            elif "density" in mp or "n" in mp:
                source["density"] = "recipe"
            weight = float(mp["weight"])
            if decisions is not None and t in decisions.weights.get(name, {}):
                weight *= float(decisions.weights[name][t])
                source["weight"] = "recipe*sens"
            mask = mask_spec(recipe.merge_method, gp, mp, where=f"{name} [{t}]")
            contribs.append(Contribution(t, weight, mask, source))
        params = {k: v for k, v in gp.items() if k not in ("m", "order", "int8_mask")}
        if spec.mask_kind == "nm":
            order = gp.get("order")
            names_in_order = [recipe.models[i].name for i in order] if order is not None else task_ids
            params["cabs_order"] = [task_ids.index(n) for n in names_in_order if n in task_ids]
        relax = decisions.relax.get(name) if decisions is not None else None
        stats = dict(decisions.tensor_stats.get(name, {})) if decisions is not None else {}
        shape = tuple(info.shape)
        if rows and name in rows:  # a grown vocabulary: the output's rows (vocab.py)
            params["vocab"] = rows[name]
            out_rows = max(rows[name]["rows"].values()) if rows[name]["source"] == "union" else shape[0]
            shape = (out_rows, *shape[1:])
        plans.append(TensorPlan(name, shape, recipe.output_dtype or dtype, op=OP_MERGE,
                                params=params, contributions=contribs, relax=relax, stats=stats))
    return plans


def magnitude_cutoff(delta: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """[threshold, cut] of a magnitude top-k mask: kept = key > threshold, or key ==
    threshold at a flat index <= cut (key: |delta| float32 bits as int32). Recorded so
    apply can rebuild the mask in one pass instead of re-counting; apply still checks
    the rebuilt mask against the digest."""
    key = magnitude_bits(delta)
    kept = mask.reshape(-1)
    threshold = int(key[kept].min())
    cut = int(torch.nonzero(kept & (key == threshold)).max())
    return [threshold, cut]


def _digest_masks(plan: Plan, inp: _Inputs, opts: PlanOptions) -> dict[str, dict[str, bytes]]:
    """Compute every mask once; record its digest (and CABS overlap) in the plan. Returns
    the BLAKE3 digest of every input tensor read on the way (model id -> tensor -> digest)."""
    # Largest first; tensors above _BIG elements run one at a time, since each holds every
    # model's float32 delta at once (a 32k x 4k embedding: 0.5 GB per model).
    todo = sorted((t for t in plan.tensors if t.op == OP_MERGE), key=lambda t: -math.prod(t.shape))
    total = len(todo)
    big = threading.Lock()
    seen: dict[str, dict[str, bytes]] = {mid: {} for mid in inp.dirs}

    def read(mid: str, name: str) -> torch.Tensor:
        t = inp.dirs[mid].read(name)
        seen[mid][name] = _digests.tensor_blake3(t)  # hashed while hot in cache; dict set is atomic
        tp = plan.tensor(name)
        if tp.params.get("vocab") is not None:  # the stored rows as the output's (vocab.py)
            t = _vocab.whole_inputs(tp, inp.dirs, {mid: t})[mid]
        return t

    workspaces: dict[int, dict[str, torch.Tensor]] = {}  # per worker thread, freed with this call
    malloc.return_large_blocks(arenas=max(1, opts.threads) + 1)  # as apply: freed buffers leave RSS
    base = (inp.base.id, inp.dirs[inp.base.id]) if inp.base else None

    def one(tp: TensorPlan) -> None:
        if streamable(plan, tp):
            return streamed(tp)
        if math.prod(tp.shape) > _BIG:
            with big:
                return _one(tp)
        return _one(tp)

    def streamed(tp: TensorPlan) -> None:
        # Slice by slice with the reader and top-k apply uses: memory stays at a few slices
        # (plus the inputs of a mid-size tensor), and each input is hashed as it is read.
        ws = workspaces.setdefault(threading.get_ident(), {})
        files, src = tensor_inputs(tp, base, inp.dirs, ws, record=True)
        records, overlap = plan_streamed(plan, tp, src, chunk=_PLAN_CHUNK)
        if files.nbytes() >= 16 << 20:
            malloc.trim()  # give back what this tensor's slices left free in the heaps
        for mid, digest in zip(files.models, files.digests()):
            if mid is not None:
                seen[mid][tp.name] = digest
        n = math.prod(tp.shape)
        for c, r in zip(tp.contributions, records):
            if c.mask is None or r is None:
                continue
            c.mask["digest"] = r.digest
            if r.cutoff is not None:
                c.mask["cutoff"] = r.cutoff
            tp.stats.setdefault("kept", {})[c.model] = r.kept / n
        if overlap is not None:
            tp.stats["overlap"] = float(overlap)

    def record(tp: TensorPlan, c: Contribution, m, d: torch.Tensor) -> None:
        c.mask["digest"] = mask_digest(m.mask)
        if c.mask["kind"] == "magnitude":
            c.mask["cutoff"] = magnitude_cutoff(d, m.mask)
        tp.stats.setdefault("kept", {})[c.model] = float(m.mask.float().mean())

    def _one(tp: TensorPlan) -> None:
        base = read(inp.base.id, tp.name) if inp.base else None
        if base is not None:
            check_finite(base, tp.name, inp.base.id)
        masked = base is not None and any(c.mask for c in tp.contributions)
        if masked and tp.params.get("cabs_order") is not None:
            # CABS masks depend on each other: every model's delta at once.
            tensors = [read(c.model, tp.name) for c in tp.contributions]
            for c, t in zip(tp.contributions, tensors):
                check_finite(t, tp.name, c.model)
            deltas = deltas_of(TensorInputs(base, tensors))
            masks = compute_masks(plan, tp, deltas)
            for c, m, d in zip(tp.contributions, masks, deltas):
                if c.mask is not None and m is not None:
                    record(tp, c, m, d)
            real = [m.mask for m in masks if m is not None]
        else:
            # Other masks are per model: one float32 delta in memory at a time. The key
            # (seed, tensor, model) is the same as in apply's build, so the masks are too.
            b32 = base.float() if base is not None else None
            real = []
            for c in tp.contributions:
                t = read(c.model, tp.name)
                check_finite(t, tp.name, c.model)
                if not masked or c.mask is None:
                    continue
                d = t.float() - b32
                del t
                spec = {k: v for k, v in c.mask.items() if k != "digest"}
                (m,) = build_masks([spec], [d], [(plan.seed, tp.name, c.model)], None)
                if m is not None:
                    record(tp, c, m, d)
                    real.append(m.mask)
                del d
        if len(real) > 1:
            tp.stats["overlap"] = float(overlap_rate(real))

    lock = threading.Lock()
    state = {"done": 0}

    def job(tp: TensorPlan) -> None:
        one(tp)
        with lock:
            state["done"] += 1
            if opts.progress:
                opts.progress("masks", state["done"], total)

    # Largest first, within a memory budget: the huge tensors' band entries and bit masks
    # are not held side by side, while the other worker takes smaller tensors.
    sched = MemoryScheduler([(_plan_cost(plan, tp, inp), tp) for tp in todo], opts.memory_budget)
    threads = max(1, opts.threads)
    if threads == 1:
        sched.work(job)
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            futures = [ex.submit(sched.work, job) for _ in range(threads)]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                sched.stop()
                raise
    return seen


def _plan_cost(plan: Plan, tp: TensorPlan, inp: _Inputs) -> int:
    """Rough peak bytes of one tensor in the mask pass. Streamed: slices, the band entries
    and bit masks (about a byte per element and model, generously), and for mid-size
    tensors the inputs held whole. Whole: every input plus float32 deltas and masks."""
    n = math.prod(tp.shape)
    models = len(tp.contributions) + 1
    nbytes = sum(inp.dirs[m].info(tp.name).nbytes for m in plan.input_models(tp))
    if streamable(plan, tp):
        return 64 * CHUNK * (models + 2) + n * models + (nbytes if nbytes <= IN_MEMORY_INPUTS else 0)
    return nbytes + 4 * n * (2 * models + 4)


def _guide_inputs(recipe: Recipe, inp: _Inputs):
    """(base, fine-tunes) as the guides see them; guides need a base."""
    from .guides.base import ModelInput

    if inp.base is None:
        raise MergeplanError("guides need a base_model; add `base_model: PATH` to the recipe")
    return (ModelInput(inp.base.id, inp.dirs[inp.base.id].path),
            [ModelInput(t.id, inp.dirs[t.id].path) for t in inp.tasks])


def _check_stats(recipe: Recipe, stats, base, tasks) -> None:
    """Reused statistics must come from this recipe's calibration settings and models."""
    from .calibrate.settings import parse_calibration

    settings = parse_calibration(recipe.calibration, recipe.dir)
    if settings != stats.settings:
        raise MergeplanError("the calibration statistics given were gathered with other calibration settings "
                             "than this recipe's `calibration:` section; calibrate again for this recipe")
    want = {m.id: str(m.path) for m in [base, *tasks]}
    if want != stats.paths:
        moved = sorted(k for k in set(want) | set(stats.paths) if want.get(k) != stats.paths.get(k))
        raise MergeplanError(f"the calibration statistics given were gathered on other models ({', '.join(moved)} "
                             "differ); calibrate again for this recipe")


def calibrate_recipe(recipe: Recipe, opts: PlanOptions | None = None, options=None):
    """Calibrate once for a guided recipe: CalibStats for its guides, or for every guide
    option set in `options` (candidates of a search), to pass to build_plan(stats=...)."""
    from .calibrate.run import calibrate
    from .calibrate.settings import parse_calibration
    from .guides import parse_guides

    opts = opts or PlanOptions()
    inp = _open_models(recipe, opts)
    try:
        _check_tensor_tables(inp)
        base, tasks = _guide_inputs(recipe, inp)
        candidates = [parse_guides(recipe.guides)] if options is None else list(options)
        return calibrate(candidates, parse_calibration(recipe.calibration, recipe.dir), base, tasks,
                         recipe.dir, device=opts.device, quiet=opts.quiet)
    finally:
        for d in inp.dirs.values():
            d.close()


def build_plan(recipe: Recipe, opts: PlanOptions | None = None, stats=None) -> Plan:
    """Recipe + inputs -> Plan. `stats`: CalibStats from calibrate_recipe (or calibrate) to
    reuse instead of calibrating; it must come from this recipe's calibration settings and
    models and cover its guides (else MergeplanError). The plan equals a fresh one's but
    for calibration timings (and a `calibrated_for` note when the statistics cover more)."""
    opts = opts or PlanOptions()
    if recipe.merge_method not in METHODS:
        raise MergeplanError(f"unknown merge_method {recipe.merge_method!r}; known: {', '.join(sorted(METHODS))}")
    notes = list(recipe.notes)
    if recipe.guides or recipe.calibration:
        from .guides import validate_guides

        # Refuse senseless combinations before any model is opened or calibrated.
        notes += validate_guides(recipe.guides, recipe.calibration, recipe.merge_method)
    inp = _open_models(recipe, opts)
    try:
        ref_id = inp.base.id if inp.base else inp.tasks[0].id
        ordered = {ref_id: inp.dirs[ref_id], **{m: d for m, d in inp.dirs.items() if m != ref_id}}
        rows, aux_model, vnotes = _vocab.plan_rows(recipe.tokenizer_source, ref_id, ordered,
                                                   inp.dirs[ref_id].tensor_names())
        notes += vnotes
        names = _check_tensor_tables(inp, rows)
        decisions = None
        if recipe.guides:
            from .guides import GuideDecisions, parse_guides
            from .guides.decide import decide

            chosen = parse_guides(recipe.guides)
            base, tasks = _guide_inputs(recipe, inp)
            if stats is not None:  # reused (a search): they must be this recipe's
                _check_stats(recipe, stats, base, tasks)
            elif chosen.enabled():
                from .calibrate.run import calibrate
                from .calibrate.settings import parse_calibration

                stats = calibrate(chosen, parse_calibration(recipe.calibration, recipe.dir), base, tasks,
                                  recipe.dir, device=opts.device, quiet=opts.quiet)
            decisions = (GuideDecisions() if stats is None
                         else decide(stats, chosen, base.id, [t.id for t in tasks]))
        models = ([inp.base] if inp.base else []) + inp.tasks
        aux_source = aux_model or (inp.base or inp.tasks[0]).id  # what Plan.aux_source names once the plan exists
        aux = inp.dirs[aux_source].aux_files()
        plan = Plan(
            method=recipe.merge_method,
            models=models,
            tensors=_tensor_plans(recipe, inp, names, decisions, rows),
            params={k: v.to_plain() for k, v in recipe.parameters.items()},
            seed=int(recipe.seed),
            out_dtype=recipe.output_dtype,
            recipe={"path": str(recipe.path) if recipe.path else "", "text": recipe.text,
                    "dir": str(recipe.dir.resolve())},
            guides=decisions.guides if decisions else {},
            calibration=decisions.calibration if decisions else {},
            stats=decisions.plan_stats if decisions else {},
            aux_files=aux,
            max_shard_size=recipe.max_shard_size or _DEFAULT_SHARD,
            notes=notes,
            mergeplan_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            aux_model=aux_model,
        )
        seen = _digest_masks(plan, inp, opts)
        for m in models:
            md = inp.dirs[m.id]
            m.fingerprint = md.fingerprint(full=opts.full_hash, tensor_blake3=seen[m.id],
                                           aux=aux if m.id == aux_source else None)
            m.hub = md.hub
        return plan
    finally:
        for d in inp.dirs.values():
            d.close()
