"""Plan + input model directories -> merged output directory.

Streams one tensor per model at a time, computes in float32, casts once to the output
dtype, writes each tensor straight to its offset in a shard whose header was written
first. Everything goes to a temporary directory beside OUT_DIR, renamed at the end, so a
failure never leaves an output that looks complete. Makes no decision the plan does not
record.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from . import interrupt, malloc, vocab
from .errors import MergeplanError, PlanFormatError
from .whole import TensorInputs, check_finite, run_tensor
from .slices import IN_MEMORY_INPUTS, grown, tensor_inputs
from .streamed import CHUNK, run_streamed, streamable
from .io.locate import resolve_model_path
from .io.modeldir import ModelDir
from .io.shards import plan_shards
from .io.tensors import recipe_to_torch, torch_to_st
from .io.writer import MemorySink, ShardWriter, write_index
from .outdir import OutputSlot, check_target, file_mode
from .schedule import MemoryScheduler
from .plan.codec import plan_digest
from .plan.model import Plan
from .plan.model import model_search_dirs
from .provenance import model_card, provenance, provenance_json
from .validate import aux_records, check_against_inputs, check_plan

Progress = Callable[[int, int, int], None]  # (tensors done, total tensors, input bytes read)

# Seconds each tensor waits before it is merged: lets the signal tests interrupt a tiny
# merge mid-run. Unset (0) in normal use.
_DEBUG_DELAY = float(os.environ.get("MERGEPLAN_DEBUG_TENSOR_DELAY", "0") or 0)


@dataclass
class ApplyOptions:
    threads: int = 1
    force: bool = False
    full_verify: bool = False
    remap: dict[str, str] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress | None = None
    plan_path: str | None = None
    # Working memory the tensors in flight may claim together (estimates; see MemoryScheduler
    # and _working_set). A tensor larger than the budget still runs, alone.
    memory_budget: int = 400 << 20
    chunk: int = 0  # elements per slice on the streamed path; 0: stream.CHUNK
    note: Callable[[str], None] | None = None  # one-line notes for the user (stale temp dirs, ...)


@dataclass
class ApplyResult:
    out_dir: Path
    files: list[str]
    tensors: int
    bytes_read: int


def model_paths(plan: Plan, remap: dict[str, str], plan_path: str | None = None) -> dict[str, Path]:
    """Where each plan model lives here: --model NAME=PATH first; else the path as the recipe
    gave it, relative paths tried against the recipe's directory at plan time, then the
    plan file's directory, then the current directory."""
    unknown = sorted(set(remap) - {m.id for m in plan.models})
    if unknown:
        raise MergeplanError(f"--model {unknown[0]}=...: the plan has no model named {unknown[0]}; models: {', '.join(m.id for m in plan.models)}")
    bases = model_search_dirs(plan, plan_path)  # the review's model check looks in the same places
    paths = {}
    for m in plan.models:
        ref = remap.get(m.id, m.path)
        base_dir = next((b for b in bases if (b / ref).is_dir()), None)
        if base_dir is None and m.id not in remap and isinstance(m.hub, dict):
            # Not here under the planner's path: the exact hub commit it was made from
            # (from the local cache when there, which is what HF_HUB_OFFLINE=1 allows).
            ref = f"{m.hub.get('repo')}@{m.hub.get('revision')}"
        base_dir = base_dir or bases[-1]
        try:
            paths[m.id] = resolve_model_path(ref, base_dir)
        except MergeplanError as e:
            raise MergeplanError(f"model {m.id}: {e} (or point to it with --model {m.id}=PATH)") from None
    return paths


def apply_plan(plan: Plan, out_dir: str | os.PathLike, opts: ApplyOptions | None = None) -> ApplyResult:
    """Check the plan (as `validate` does) and the inputs against it, then merge into a
    work folder beside OUT_DIR and rename it into place. Every input byte a tensor uses is
    checked against the plan's digests as it is read; any mismatch, error or signal
    leaves no OUT_DIR behind."""
    opts = opts or ApplyOptions()
    out = Path(out_dir)
    with _checked_inputs(plan, opts, out) as dirs:
        return _write(plan, out, dirs, opts)


def merge_in_memory(plan: Plan, opts: ApplyOptions | None = None) -> dict[str, torch.Tensor]:
    """apply_plan without an output directory: the same checks and the same merge engine,
    each finished tensor handed to a MemorySink. Returns tensor name -> CPU tensor in the
    plan's dtype, bit for bit what apply_plan writes (opts.force is ignored)."""
    opts = opts or ApplyOptions()
    with _checked_inputs(plan, opts, None) as dirs:
        sink = MemorySink([(t.name, recipe_to_torch(t.dtype), tuple(t.shape)) for t in plan.tensors])
        _merge_tensors(plan, dirs, opts, sink.write)
        return sink.close()


@contextmanager
def _checked_inputs(plan: Plan, opts: ApplyOptions, out: Path | None) -> Iterator[dict[str, ModelDir]]:
    """The plan checked, OUT_DIR (when there is one) checked, every input opened and checked
    against the plan's fingerprints; closed on the way out."""
    where = opts.plan_path or "plan"
    problems = check_plan(plan)
    if problems:
        more = f" (and {len(problems) - 1} more; run `mergeplan validate`)" if len(problems) > 1 else ""
        raise PlanFormatError(f"{where}: {problems[0]}{more}; the plan is corrupt or was edited outside mergeplan")
    paths = model_paths(plan, opts.remap, opts.plan_path)
    if out is not None:
        check_target(out, paths, opts.plan_path, opts.force)
    dirs: dict[str, ModelDir] = {}
    try:
        for mid, p in paths.items():
            dirs[mid] = ModelDir.open(p, name=mid)
        # Every input checked before anything is allocated or written.
        for m in plan.models:
            dirs[m.id].check_fingerprint(m.fingerprint, full=opts.full_verify, content=m.content_digests())
        check_against_inputs(plan, dirs)
        unchecked = [m.id for m in plan.models if not dirs[m.id].verifies_content]
        if unchecked and opts.note:
            opts.note(f"the plan records no content digests for {', '.join(unchecked)} (made by an older mergeplan?): "
                      "those inputs are checked by size and headers only; re-plan to check every byte")
        yield dirs
    finally:
        for d in dirs.values():
            d.close()


def _write(plan: Plan, out: Path, dirs: dict[str, ModelDir], opts: ApplyOptions) -> ApplyResult:
    entries = [(t.name, torch_to_st(recipe_to_torch(t.dtype)), tuple(t.shape)) for t in plan.tensors]
    layouts = plan_shards(entries, plan.max_shard_size)
    mode = file_mode()
    with OutputSlot(out) as slot:
        for p in slot.removed_stale:
            if opts.note:
                opts.note(f"removed {p}, left by an earlier apply that was killed")
        tmp = slot.tmp
        writers = {l.file: ShardWriter(tmp / l.file, l) for l in layouts}
        where = {t.name: l.file for l in layouts for t in l.tensors}

        bytes_read = _merge_tensors(plan, dirs, opts, lambda name, t: writers[where[name]].write(name, t))
        for w in writers.values():
            w.close()
        write_index(tmp, layouts)
        source = plan.aux_source
        for f, record in aux_records(plan, dirs[source.id]):
            dirs[source.id].copy_aux(f, tmp / f, record, mode)
        prov = provenance(plan, plan_digest(plan))
        _write_new(tmp / "README.md", model_card(plan, prov), mode)
        _write_new(tmp / "mergeplan.json", provenance_json(prov), mode)
        files = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        interrupt.defer()  # a signal from here on cannot fail a run whose output has landed
        if interrupt.requested():
            raise KeyboardInterrupt  # a signal whose exception Python dropped: never land
        slot.commit(opts.force)
        return ApplyResult(out, files, len(plan.tensors), bytes_read)


def _merge_tensors(plan: Plan, dirs: dict[str, ModelDir], opts: ApplyOptions,
                   put: Callable[[str, torch.Tensor], None]) -> int:
    """Merge every tensor of the plan on opts.threads workers and hand each result to
    `put(name, tensor)` (a shard writer's write, or MemorySink.write): the tensor is in the
    plan's dtype on the CPU and may be a view of a reused buffer, valid only during the
    call. Returns the input bytes read."""
    lock = threading.Lock()
    state = {"done": 0, "bytes": 0}
    malloc.return_large_blocks(arenas=opts.threads + 1)  # freed buffers leave RSS (malloc.py)
    workspaces: dict[int, dict[str, torch.Tensor]] = {}  # per worker thread, freed with this call
    base_id = plan.base.id if plan.base else None
    on_cpu = opts.device.type == "cpu"

    def cost(tp) -> int:
        ids = plan.input_models(tp)
        nbytes = sum(dirs[m].info(tp.name).nbytes for m in ids)
        return _working_set(tp, recipe_to_torch(tp.dtype), nbytes, on_cpu and streamable(plan, tp), len(ids))

    def one(tp) -> None:
        if _DEBUG_DELAY:
            time.sleep(_DEBUG_DELAY)
        out_dtype = recipe_to_torch(tp.dtype)
        nbytes = sum(dirs[m].info(tp.name).nbytes for m in plan.input_models(tp))
        stream = on_cpu and streamable(plan, tp)
        if stream:
            ws = workspaces.setdefault(threading.get_ident(), {})
            files, src = tensor_inputs(tp, (base_id, dirs[base_id]) if base_id else None, dirs, ws)
            out_buf = grown(ws, "out" + str(out_dtype), out_dtype, _numel(tp.shape)) if src is not files else None
            try:
                result = run_streamed(plan, tp, src, out_dtype, chunk=opts.chunk or CHUNK, out=out_buf)
            except MergeplanError:
                # A changed input shows as a mask digest or NaN error too; name the cause.
                files.verify(complete_only=True)
                raise
            files.verify()  # every input byte this tensor used, hashed as it was read
            del src, files
        else:
            result = _whole(plan, tp, dirs, opts.device, base_id).to(out_dtype).to("cpu").contiguous()
        put(tp.name, result)
        del result
        if nbytes >= 16 << 20:
            malloc.trim()  # give back what this tensor's slices left free in the heaps
        with lock:
            state["done"] += 1
            state["bytes"] += nbytes
            if opts.progress:
                opts.progress(state["done"], len(plan.tensors), state["bytes"])

    # Each worker runs single-threaded torch ops; parallelism comes from tensors in
    # flight, so --threads N means N cores and results cannot depend on N.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Largest first so the tail of the run is not one huge tensor on one thread.
        order = sorted(plan.tensors, key=lambda t: -_numel(t.shape))
        sched = MemoryScheduler([(cost(tp), tp) for tp in order], opts.memory_budget)
        if opts.threads <= 1:
            sched.work(one)
        else:
            with ThreadPoolExecutor(max_workers=opts.threads) as ex:
                futures = [ex.submit(sched.work, one) for _ in range(opts.threads)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    sched.stop()  # workers finish the tensor in hand, take no other
                    raise
    finally:
        torch.set_num_threads(prev)
    return state["bytes"]


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _whole(plan: Plan, tp, dirs: dict[str, ModelDir], device: torch.device, base_id: str | None) -> torch.Tensor:
    """The whole-tensor path: every input in memory at once (masks that need the whole
    tensor, copies, non-CPU devices)."""
    if tp.op == "copy":
        base = dirs[tp.source].read(tp.name, device)
        check_finite(base, tp.name, tp.source)
        return run_tensor(plan, tp, TensorInputs(base, []))
    base = dirs[base_id].read(tp.name, device) if base_id else None
    tensors = [dirs[c.model].read(tp.name, device) for c in tp.contributions]
    if tp.params.get("vocab") is not None:  # a grown vocabulary: the output's rows (vocab.py)
        view = vocab.whole_inputs(tp, dirs, dict(zip(plan.input_models(tp), ([base] if base_id else []) + tensors)))
        base = view[base_id] if base_id else None
        tensors = [view[c.model] for c in tp.contributions]
    if base is not None:
        check_finite(base, tp.name, base_id)
    for c, t in zip(tp.contributions, tensors):
        check_finite(t, tp.name, c.model)
    return run_tensor(plan, tp, TensorInputs(base, tensors))


def _working_set(tp, out_dtype: torch.dtype, input_bytes: int, streamed: bool, models: int) -> int:
    """Rough peak bytes of one tensor in flight. Streamed: the output buffer plus slices.
    Whole: the inputs plus float32 copies (base, deltas, masks, merge temporaries)."""
    n = _numel(tp.shape)
    out = n * torch.empty((), dtype=out_dtype).element_size()
    if streamed:
        # slices, the boundary-bucket entries TopK keeps (12 bytes each, at most 2M per model),
        # and for mid-size tensors the inputs held whole
        slices = 64 * CHUNK * (models + 2)
        boundary = 12 * min(2 << 20, n // 32) * models
        return out + slices + boundary + (input_bytes if input_bytes <= IN_MEMORY_INPUTS else 0)
    return out + input_bytes + 4 * n * (2 * models + 4)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
