"""Write safetensors shards tensor by tensor, in any order, from several threads; or,
for an in-memory merge (`mergeplan eval`, tuning), keep the tensors (MemorySink).

The header goes down first and the file is sized up front, so each tensor is one
positioned write into its own byte range; the finished file is byte-identical to
`safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})`.
A failure leaves a partial file behind: the caller writes into a temporary directory
and deletes it (apply never renames an incomplete output into place).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import torch

from mergeplan.errors import MergeplanError
from mergeplan.io.modeldir import INDEX_FILE
from mergeplan.io.shards import ShardLayout
from mergeplan.io.tensors import torch_to_st

_MAX_WRITE = 1 << 30


def _space_error(path: Path, needed: int, what: str, e: OSError) -> MergeplanError:
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free there"
    except OSError:
        free = "free space unknown"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MergeplanError(
            f"disk full: {what} needs {needed} bytes in {path} ({free}); free space or "
            "write the output to another disk"
        )
    return MergeplanError(f"cannot write {path} ({what}, {needed} bytes): {e.strerror or e}")


class ShardWriter:
    """One output shard. Create, write() every tensor of the layout, close()."""

    def __init__(self, path: str | os.PathLike, layout: ShardLayout):
        self.path = Path(path)
        self.layout = layout
        self._lock = threading.Lock()
        self._pending = {t.name for t in layout.tensors}
        self._claimed: set[str] = set()
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666
            )
        except OSError as e:
            raise MergeplanError(f"cannot create {self.path}: {e.strerror}") from None
        try:
            self._pwrite_all(layout.header, 0, "the header")
            self._reserve()
        except BaseException:
            self.abort()
            raise

    def _reserve(self) -> None:
        size, data = self.layout.size, self.layout.data_size
        if data == 0:
            return
        try:
            # Real allocation, so a full disk fails now rather than halfway through.
            os.posix_fallocate(self._fd, len(self.layout.header), data)
            return
        except AttributeError:  # no posix_fallocate on this platform
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise _space_error(self.path, size, "preallocating the shard", e) from None
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise _space_error(self.path, size, "sizing the shard", e) from None

    def _pwrite_all(self, data, offset: int, what: str) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self._fd, mv[done:done + _MAX_WRITE], offset + done)
        except OSError as e:
            raise _space_error(self.path, len(mv) - done, what, e) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (dtype and shape must match the layout) at its offset; thread-safe."""
        if name not in self.layout:
            raise MergeplanError(f"tensor {name!r} does not belong in {self.path.name}")
        slot = self.layout.slot(name)
        dtype = torch_to_st(tensor.dtype)
        if dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise MergeplanError(
                f"tensor {name!r} for {self.path.name} is {dtype}{list(tensor.shape)}, "
                f"the layout expects {slot.dtype}{list(slot.shape)}"
            )
        with self._lock:
            if self._fd is None:
                raise MergeplanError(f"{self.path} is already closed; cannot write {name!r}")
            if name in self._claimed:
                raise MergeplanError(f"tensor {name!r} written twice to {self.path.name}")
            self._claimed.add(name)
        if slot.nbytes:
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._pwrite_all(raw.numpy(), slot.start, f"tensor {name!r}")
        with self._lock:
            self._pending.discard(name)

    def close(self) -> None:
        """Flush to disk and close; fails if any tensor of the layout was not written."""
        if self._fd is None:
            return
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise MergeplanError(
                f"{self.path} closed with {len(missing)} tensor(s) unwritten "
                f"(first: {missing[0]!r}); the shard is incomplete"
            )
        try:
            os.fsync(self._fd)
        except OSError as e:
            self.abort()
            raise _space_error(self.path, self.layout.size, "flushing the shard", e) from None
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        """Close without checks (error path); the partial file stays for the caller to delete."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class MemorySink:
    """Where the merge engine hands finished tensors when no output directory is wanted:
    the same write(name, tensor) as ShardWriter, with the same checks (expected name,
    dtype and shape, written once), into a dict. Thread-safe."""

    def __init__(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self._expected = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        self._tensors: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._expected.get(name)
        if want is None:
            raise MergeplanError(f"tensor {name!r} is not one of the plan's tensors")
        if tensor.dtype != want[0] or tuple(tensor.shape) != want[1]:
            raise MergeplanError(f"tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                                 f"the plan expects {want[0]}{list(want[1])}")
        # The engine may hand a view of a buffer it reuses for the next tensor: keep a copy.
        kept = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        with self._lock:
            if name in self._tensors:
                raise MergeplanError(f"tensor {name!r} merged twice")
            self._tensors[name] = kept

    def close(self) -> dict[str, torch.Tensor]:
        """The tensors, in the plan's order; fails if any was not merged."""
        missing = [n for n in self._expected if n not in self._tensors]
        if missing:
            raise MergeplanError(f"{len(missing)} tensor(s) were not merged (first: {missing[0]!r})")
        return {n: self._tensors[n] for n in self._expected}


def write_index(
    out_dir: str | os.PathLike, layouts: list[ShardLayout], extra_metadata: dict | None = None
) -> Path | None:
    """Write model.safetensors.index.json as transformers' save_pretrained does (only if sharded).

    metadata holds total_size (tensor bytes, headers excluded) and total_parameters (sum
    of element counts), plus `extra_metadata` (e.g. provenance); weight_map maps every
    tensor to its file. Keys sorted, indent 2, trailing newline. Returns the path or None.
    """
    if len(layouts) <= 1:
        return None
    total_size = sum(t.nbytes for lay in layouts for t in lay.tensors)
    total_params = sum(_numel(t.shape) for lay in layouts for t in lay.tensors)
    index = {
        "metadata": {"total_parameters": total_params, "total_size": total_size,
                     **(extra_metadata or {})},
        "weight_map": {t.name: lay.file for lay in layouts for t in lay.tensors},
    }
    path = Path(out_dir) / INDEX_FILE
    content = json.dumps(index, indent=2, sort_keys=True) + "\n"
    try:
        path.write_text(content, encoding="utf-8")
    except OSError as e:
        raise _space_error(path, len(content.encode()), "the shard index", e) from None
    return path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
