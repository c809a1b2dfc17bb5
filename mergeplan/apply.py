"""Plan + input model directories -> merged output directory.

Streams one tensor per model at a time, computes in float32, casts once to the output
dtype, writes each tensor straight to its offset in a shard whose header was written
first. Everything goes to a temporary directory beside OUT_DIR, renamed at the end, so a
failure never leaves an output that looks complete. Makes no decision the plan does not
record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, malloc
from .errors import MergeplanError
from .execute import TensorInputs, check_finite, run_tensor
from .stream import CHUNK, FileSlices, run_streamed, streamable
from .io.locate import resolve_model_path
from .io.modeldir import ModelDir
from .io.shards import plan_shards
from .io.tensors import recipe_to_torch, torch_to_st
from .io.writer import ShardWriter, write_index
from .plan.codec import plan_digest
from .plan.model import Plan

Progress = Callable[[int, int, int], None]  # (tensors done, total tensors, input bytes read)

# Streamed tensors whose inputs take at most this many bytes together are read whole once
# into a per-thread buffer (every pass then slices memory); larger ones are read slice by
# slice from the shards in every pass.
_IN_MEMORY_INPUTS = 96 << 20


@dataclass
class ApplyOptions:
    threads: int = 1
    force: bool = False
    full_verify: bool = False
    remap: dict[str, str] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress | None = None
    plan_path: str | None = None
    # Working memory the tensors in flight may claim together (estimates; see _Scheduler
    # and _working_set). A tensor larger than the budget still runs, alone.
    memory_budget: int = 400 << 20
    chunk: int = 0  # elements per slice on the streamed path; 0: stream.CHUNK


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
    bases = [Path(d) for d in (plan.recipe.get("dir"), Path(plan_path).parent if plan_path else None) if d]
    bases.append(Path.cwd())
    paths = {}
    for m in plan.models:
        ref = remap.get(m.id, m.path)
        base_dir = next((b for b in bases if (b / ref).is_dir()), bases[-1])
        try:
            paths[m.id] = resolve_model_path(ref, base_dir)
        except MergeplanError as e:
            raise MergeplanError(f"model {m.id}: {e} (or point to it with --model {m.id}=PATH)") from None
    return paths


def _check_out_dir(out: Path, inputs: dict[str, Path], force: bool) -> None:
    out_r = out.resolve()
    for mid, p in inputs.items():
        p = p.resolve()
        if out_r == p or p in out_r.parents or out_r in p.parents:
            raise MergeplanError(f"output {out} overlaps input model {mid} ({p}); choose another output directory")
    if out.exists() and not force:
        raise MergeplanError(f"output {out} already exists; pass --force to replace it or choose another directory")
    if out.exists() and not out.is_dir():
        raise MergeplanError(f"output {out} exists and is not a directory; remove it or choose another path")


def _model_card(plan: Plan, digest: str, files: list[str]) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [merge, mergeplan]", "---", "",
        "# Merged model", "",
        f"Merged with [mergeplan](https://pypi.org/project/mergeplan/) {__version__} using **{plan.method}**.", "",
        f"Plan digest: `{digest}`", "", "## Inputs", "",
        "| model | role | path |", "|---|---|---|",
    ]
    lines += [f"| {m.id} | {m.role} | `{m.path}` |" for m in plan.models]
    if plan.guides:
        lines += ["", "## Guides", ""] + [f"- {g}: `{json.dumps(_plain(v), sort_keys=True)}`" for g, v in sorted(plan.guides.items())]
    lines += ["", "## Recipe", "", "```yaml", plan.recipe.get("text", "").rstrip(), "```", ""]
    return "\n".join(lines)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if not hasattr(x, "shape")}
    return v


def apply_plan(plan: Plan, out_dir: str | os.PathLike, opts: ApplyOptions | None = None) -> ApplyResult:
    opts = opts or ApplyOptions()
    out = Path(out_dir)
    paths = model_paths(plan, opts.remap, opts.plan_path)
    _check_out_dir(out, paths, opts.force)
    dirs = {mid: ModelDir.open(p, name=mid) for mid, p in paths.items()}
    try:
        # Verify every input before writing anything.
        for m in plan.models:
            dirs[m.id].check_fingerprint(m.fingerprint, full=opts.full_verify)
        for t in plan.tensors:
            for mid in _models_of(plan, t):
                if t.name not in dirs[mid]:
                    raise MergeplanError(f"model {mid}: tensor {t.name} is missing; the inputs do not match the plan")
        return _write(plan, out, dirs, opts)
    finally:
        for d in dirs.values():
            d.close()


def _models_of(plan: Plan, t) -> list[str]:
    if t.op == "copy":
        return [t.source]
    ids = [c.model for c in t.contributions]
    return ([plan.base.id] if plan.base else []) + ids


def _write(plan: Plan, out: Path, dirs: dict[str, ModelDir], opts: ApplyOptions) -> ApplyResult:
    entries = [(t.name, torch_to_st(recipe_to_torch(t.dtype)), tuple(t.shape)) for t in plan.tensors]
    layouts = plan_shards(entries, plan.max_shard_size)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.mergeplan-", dir=parent))
    lock = threading.Lock()
    state = {"done": 0, "bytes": 0}
    try:
        writers = {l.file: ShardWriter(tmp / l.file, l) for l in layouts}
        where = {t.name: l.file for l in layouts for t in l.tensors}

        malloc.return_large_blocks(arenas=opts.threads + 1)  # freed buffers leave RSS (malloc.py)
        workspaces: dict[int, dict[str, torch.Tensor]] = {}  # per worker thread, freed with this call
        base_id = plan.base.id if plan.base else None
        on_cpu = opts.device.type == "cpu"

        def cost(tp) -> int:
            ids = _models_of(plan, tp)
            nbytes = sum(dirs[m].info(tp.name).nbytes for m in ids)
            return _working_set(tp, recipe_to_torch(tp.dtype), nbytes, on_cpu and streamable(plan, tp), len(ids))

        def one(tp) -> None:
            out_dtype = recipe_to_torch(tp.dtype)
            ids = _models_of(plan, tp)
            nbytes = sum(dirs[m].info(tp.name).nbytes for m in ids)
            stream = on_cpu and streamable(plan, tp)
            if stream:
                src = FileSlices(tp.name, [dirs[base_id] if base_id else None] + [dirs[c.model] for c in tp.contributions],
                                 [base_id] + [c.model for c in tp.contributions])
                out_buf = None
                if src.nbytes() <= _IN_MEMORY_INPUTS:
                    # Mid-size tensors: inputs read once into this thread's reused buffers
                    # (fresh ones would fault in page by page for every tensor).
                    ws = workspaces.setdefault(threading.get_ident(), {})
                    src = src.in_memory(_grown(ws, "in", torch.uint8, src.nbytes()))
                    out_buf = _grown(ws, "out" + str(out_dtype), out_dtype, _numel(tp.shape))
                result = run_streamed(plan, tp, src, out_dtype, chunk=opts.chunk or CHUNK, out=out_buf)
                del src
            else:
                result = _whole(plan, tp, dirs, opts.device, base_id).to(out_dtype).to("cpu").contiguous()
            writers[where[tp.name]].write(tp.name, result)
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
            sched = _Scheduler([(cost(tp), tp) for tp in order], opts.memory_budget)
            if opts.threads <= 1:
                sched.work(one)
            else:
                with ThreadPoolExecutor(max_workers=opts.threads) as ex:
                    for f in [ex.submit(sched.work, one) for _ in range(opts.threads)]:
                        f.result()
        finally:
            torch.set_num_threads(prev)
        for w in writers.values():
            w.close()
        write_index(tmp, layouts)
        base_dir = dirs[(plan.base or plan.task_models[0]).id].path
        for f in plan.aux_files:
            src = Path(base_dir) / f
            if src.exists():
                shutil.copy2(src, tmp / f)
        digest = plan_digest(plan)
        (tmp / "README.md").write_text(_model_card(plan, digest, [l.file for l in layouts]))
        (tmp / "mergeplan.json").write_text(json.dumps(
            {"mergeplan_version": __version__, "plan_digest": digest, "method": plan.method,
             "models": [{"id": m.id, "role": m.role, "path": m.path} for m in plan.models]},
            indent=2, sort_keys=True) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        if out.exists():
            # --force: move the old output aside first so a crash never loses both.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return ApplyResult(out, files, len(plan.tensors), state["bytes"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _grown(ws: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """ws[key], replaced by a larger buffer when it holds fewer than numel elements."""
    buf = ws.get(key)
    if buf is None or buf.numel() < numel:
        ws.pop(key, None)
        buf = ws[key] = torch.empty(numel, dtype=dtype)
    return buf


def _whole(plan: Plan, tp, dirs: dict[str, ModelDir], device: torch.device, base_id: str | None) -> torch.Tensor:
    """The whole-tensor path: every input in memory at once (masks that need the whole
    tensor, copies, non-CPU devices)."""
    if tp.op == "copy":
        base = dirs[tp.source].read(tp.name, device)
        check_finite(base, tp.name, tp.source)
        return run_tensor(plan, tp, TensorInputs(base, []))
    base = dirs[base_id].read(tp.name, device) if base_id else None
    tensors = [dirs[c.model].read(tp.name, device) for c in tp.contributions]
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
        return out + slices + boundary + (input_bytes if input_bytes <= _IN_MEMORY_INPUTS else 0)
    return out + input_bytes + 4 * n * (2 * models + 4)


class _Scheduler:
    """Hands tensors to workers in the given order, skipping any whose estimated working
    set does not fit in `limit` beside those in flight (it waits for a later turn, while
    the worker takes a smaller one); a tensor larger than the whole budget runs alone.
    Keeps the few huge tensors (embeddings, head) from being expanded at the same time
    without leaving a worker idle. After a failure, workers stop taking tensors."""

    def __init__(self, jobs: list[tuple[int, object]], limit: int):
        self._todo = list(jobs)
        self.limit = max(0, int(limit))
        self.used = 0
        self._failed = False
        self._cond = threading.Condition()

    def take(self) -> tuple[int, object] | None:
        with self._cond:
            while True:
                if self._failed or not self._todo:
                    return None
                for i, (cost, job) in enumerate(self._todo):
                    if self.used == 0 or self.used + cost <= self.limit:
                        del self._todo[i]
                        self.used += cost
                        return cost, job
                self._cond.wait()

    def finish(self, cost: int, ok: bool = True) -> None:
        with self._cond:
            self.used -= cost
            self._failed |= not ok
            self._cond.notify_all()

    def work(self, run) -> None:
        """Run jobs until none is left (or one failed, here or in another worker)."""
        while (got := self.take()) is not None:
            cost, job = got
            ok = False
            try:
                run(job)
                ok = True
            finally:
                self.finish(cost, ok)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
