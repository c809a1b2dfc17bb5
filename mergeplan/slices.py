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
        self._where = []
        # Content checks against the plan's digests, fed by whichever pass reads each
        # input from its start to its end in order (see verify()).
        # record: hash every input to record its digest (the planner) instead of checking.
        self._checks = [d.checker(name, record) if d is not None else None for d in dirs]
        for d in dirs:
            if d is None:
                self._where.append(None)
                continue
            info = d.info(name)
            self._shape = tuple(info.shape)
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
        n = math.prod(self._shape) if self._shape else 0
        return sum(w[1] * n for w in self._where if w is not None)

    def in_memory(self, buf: torch.Tensor) -> "MemorySlices":
        """Every input read whole into `buf` (uint8, at least nbytes()): the passes then
        slice memory instead of reading the shards again."""
        n = math.prod(self._shape)
        flat: list[torch.Tensor | None] = []
        pos = 0
        for index, w in enumerate(self._where):
            if w is None:
                flat.append(None)
                continue
            part = buf[pos:pos + n * w[1]]
            self._read_into(index, 0, part)
            flat.append(part.view(w[0]))
            pos += n * w[1]
        if flat[0] is not None and len({t.dtype for t in flat}) == 1:
            return MemorySlices.rows(buf[:pos].view(flat[0].dtype).view(len(flat), n), self.models)
        return MemorySlices(flat[0], flat[1:], self.models)

    def _read_into(self, index: int, start: int, buf: torch.Tensor) -> None:
        offset = start * self._where[index][1]
        self._dirs[index].read_into(self.name, offset, buf)
        check = self._checks[index]
        if check is not None:
            check.feed(offset, memoryview(buf.numpy()))

    def digests(self) -> list[bytes | None]:
        """sha256 of each input as read (record mode), base first; None where no input."""
        return [c.digest() if c is not None else None for c in self._checks]

    def verify(self, complete_only: bool = False) -> None:
        """Raise InputMismatchError when an input's bytes, as read, differ from the plan's
        digest. run_streamed reads every input whole and in order at least once, so
        each check has seen every byte by now."""
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
    if files.nbytes() <= IN_MEMORY_INPUTS:
        return files, files.in_memory(grown(workspace, "in", torch.uint8, files.nbytes()))
    return files, files
