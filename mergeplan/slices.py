"""The one chunked reader: a tensor's inputs (base first, then one per contribution), read
slice by slice from the shards or from memory, for the planner and apply alike.

FileSlices reads with pread (page cache, no mmap) and hashes every input as it is read, to
check it against the plan's digests (apply) or to record them (planner). Mid-size tensors
are read whole once into a reused per-thread buffer (`tensor_inputs`), so every pass then
slices memory.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .io.modeldir import ModelDir
from .io.tensors import st_to_torch
from .plan.model import TensorPlan


class SliceSource:
    """Slices of one tensor in several inputs: index 0 is the base (or None), then one per
    contribution. read() returns a 1-D CPU tensor in the stored dtype."""

    has_base: bool
    models: list[str | None]

    def read(self, index: int, start: int, count: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def peek(self, index: int, start: int, count: int) -> torch.Tensor:
        """As read, out of order (a sample): not part of the inputs' sequential hashing."""
        return self.read(index, start, count)


class MemorySlices(SliceSource):
    """Tensors already in memory (tests, small tensors)."""

    def __init__(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], models: Sequence[str | None] | None = None):
        self._flat = [None if base is None else base.reshape(-1)] + [t.reshape(-1) for t in tensors]
        self.has_base = base is not None
        self.models = list(models) if models is not None else [None] * len(self._flat)
        self.stacked: torch.Tensor | None = None  # [1 + models, numel] when base and inputs are rows of one tensor

    @classmethod
    def rows(cls, stacked: torch.Tensor, models: Sequence[str | None]) -> "MemorySlices":
        """Base and inputs as the rows of one [1 + models, numel] tensor: a slice of all of
        them is then one strided view, converted and subtracted in one call each."""
        src = cls(stacked[0], list(stacked[1:]), models)
        src.stacked = stacked
        return src

    def read(self, index: int, start: int, count: int) -> torch.Tensor:
        return self._flat[index][start:start + count]

    def peek(self, index: int, start: int, count: int) -> torch.Tensor:
        return self.read(index, start, count)


class FileSlices(SliceSource):
    """One tensor's slices read with pread from each input's shard (page cache, no mmap)."""

    def __init__(self, name: str, dirs: Sequence[ModelDir | None], models: Sequence[str | None], record: bool = False):
        self.name = name
        self.has_base = dirs[0] is not None
        self.models = list(models)
        self._dirs = list(dirs)
        self._shape: tuple[int, ...] = ()
        self._numel: list[int] = []  # per input: a grown vocabulary's inputs differ in rows (vocab.py)
        self._where = []
        # A tensor whose inputs are read only in part (a fine-tune's rows beyond the output's,
        # vocab.py): verify() and digests() read the rest so each digest covers the stored tensor.
        self.partial = False
        # Content checks against the plan's digests, fed by whichever pass reads each
        # input from its start to its end in order (see verify()).
        # record: hash every input to record its digest (the planner) instead of checking.
        self._checks = [d.checker(name, record) if d is not None else None for d in dirs]
        for d in dirs:
            if d is None:
                self._where.append(None)
                self._numel.append(0)
                continue
            info = d.info(name)
            self._shape = tuple(info.shape)
            self._numel.append(math.prod(info.shape))
            dtype = st_to_torch(info.dtype)
            self._where.append((dtype, torch.empty((), dtype=dtype).element_size()))

    def read(self, index: int, start: int, count: int) -> torch.Tensor:
        dtype, size = self._where[index]
        buf = torch.empty(count * size, dtype=torch.uint8)
        self._read_into(index, start, buf)
        return buf.view(dtype)

    def peek(self, index: int, start: int, count: int) -> torch.Tensor:
        dtype, size = self._where[index]
        buf = torch.empty(count * size, dtype=torch.uint8)
        self._dirs[index].read_into(self.name, start * size, buf)
        return buf.view(dtype)

    def nbytes(self) -> int:
        """Bytes of all inputs together (one whole tensor each)."""
        return sum(w[1] * n for w, n in zip(self._where, self._numel) if w is not None)

    def in_memory(self, buf: torch.Tensor) -> "MemorySlices":
        """Every input read whole into `buf` (uint8, at least nbytes()): the passes then
        slice memory instead of reading the shards again."""
        flat: list[torch.Tensor | None] = []
        pos = 0
        for index, w in enumerate(self._where):
            if w is None:
                flat.append(None)
                continue
            n = self._numel[index]
            part = buf[pos:pos + n * w[1]]
            self._read_into(index, 0, part)
            flat.append(part.view(w[0]))
            pos += n * w[1]
        if flat[0] is not None and len({t.dtype for t in flat}) == 1 and len(set(self._numel)) == 1:
            return MemorySlices.rows(buf[:pos].view(flat[0].dtype).view(len(flat), self._numel[0]), self.models)
        return MemorySlices(flat[0], flat[1:], self.models)

    def _read_into(self, index: int, start: int, buf: torch.Tensor) -> None:
        offset = start * self._where[index][1]
        self._dirs[index].read_into(self.name, offset, buf)
        check = self._checks[index]
        if check is not None:
            check.feed(offset, memoryview(buf.numpy()))

    def digests(self) -> list[bytes | None]:
        """sha256 of each input as read (record mode), base first; None where no input."""
        self._read_rest()
        return [c.digest() if c is not None else None for c in self._checks]

    def _read_rest(self, chunk: int = 1 << 22) -> None:
        """For a partly used tensor (`partial`), feed each check the bytes no pass read."""
        if not self.partial:
            return
        for index, check in enumerate(self._checks):
            if check is None or check.complete:
                continue
            size = self._where[index][1]
            pos = check.fed // size
            while pos < self._numel[index]:
                count = min(chunk, self._numel[index] - pos)
                self._read_into(index, pos, torch.empty(count * size, dtype=torch.uint8))
                pos += count

    def verify(self, complete_only: bool = False) -> None:
        """Raise InputMismatchError when an input's bytes, as read, differ from the plan's
        digest. run_streamed reads every input whole and in order at least once, so
        each check has seen every byte by now."""
        if not complete_only:
            self._read_rest()
        for check in self._checks:
            if check is not None and (check.complete or not complete_only):
                check.finish()


# Streamed tensors whose inputs take at most this many bytes together are read whole once
# into a per-thread buffer (every pass then slices memory); larger ones are read slice by
# slice from the shards in every pass.
IN_MEMORY_INPUTS = 96 << 20


def grown(ws: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """ws[key], replaced by a larger buffer when it holds fewer than numel elements."""
    buf = ws.get(key)
    if buf is None or buf.numel() < numel:
        ws.pop(key, None)
        buf = ws[key] = torch.empty(numel, dtype=dtype)
    return buf


def tensor_inputs(tp: TensorPlan, base: tuple[str, ModelDir] | None, dirs: dict[str, ModelDir],
                  workspace: dict[str, torch.Tensor], record: bool = False) -> tuple[FileSlices, SliceSource]:
    """(files, src): the one reader of a tensor's inputs (base first, then one per
    contribution) for planner and apply alike. `files` hashes what is read (checks it
    against the plan's digests, or records them); `src` is what the passes read, the
    same files or, for mid-size tensors, everything read once into `workspace`'s buffer
    (fresh buffers would fault in page by page for every tensor)."""
    files = FileSlices(tp.name, [base[1] if base else None] + [dirs[c.model] for c in tp.contributions],
                       [base[0] if base else None] + [c.model for c in tp.contributions], record)
    src: SliceSource = files
    if files.nbytes() <= IN_MEMORY_INPUTS:
        src = files.in_memory(grown(workspace, "in", torch.uint8, files.nbytes()))
    if tp.params.get("vocab") is not None:
        files.partial = True
        src = RowSlices(src, tp)
    return files, src


class RowSlices(SliceSource):
    """Inputs of a tensor whose vocabulary grew (vocab.py), as the output's rows: each model's
    own rows up to the output's, then default rows for those it lacks."""

    stacked = None

    def __init__(self, src: SliceSource, tp: TensorPlan):
        from . import vocab

        self.src, self.has_base, self.models = src, src.has_base, src.models
        rec = tp.params["vocab"]
        out_rows = int(tp.shape[0])
        self.row = math.prod(tp.shape[1:])
        self.have = [min(int(rec["rows"][m]), out_rows) * self.row if m is not None else 0 for m in src.models]
        index = {m: i for i, m in enumerate(src.models) if m is not None}

        def read(m: str, r0: int, r1: int) -> torch.Tensor:
            return src.peek(index[m], r0 * self.row, (r1 - r0) * self.row).reshape(r1 - r0, -1)

        self.lo, d = vocab.default_rows(rec, out_rows, read)
        self.defaults = d.reshape(-1) if d is not None else None

    def _view(self, index: int, start: int, count: int, read) -> torch.Tensor:
        have = self.have[index]
        if start + count <= have:
            return read(index, start, count)
        own = read(index, start, have - start) if start < have else None
        first = max(start, have)
        fill = self.defaults[first - self.lo * self.row:start + count - self.lo * self.row]
        dtype = own.dtype if own is not None else self.src.peek(index, 0, 0).dtype
        fill = fill.to(dtype)
        return torch.cat([own, fill]) if own is not None else fill

    def read(self, index: int, start: int, count: int) -> torch.Tensor:
        return self._view(index, start, count, self.src.read)

    def peek(self, index: int, start: int, count: int) -> torch.Tensor:
        return self._view(index, start, count, self.src.peek)
