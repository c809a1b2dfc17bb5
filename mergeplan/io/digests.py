"""Content digests of input tensors and copied files: recorded by the planner, checked by apply.

Why per tensor: apply reads every byte of every tensor it merges anyway, so hashing what
it reads, in the worker threads that read it (the hash releases the GIL on large
updates), catches any changed byte at a few per cent of the wall time, where a separate
pass over whole shards would read everything twice.

Why BLAKE3 for tensors: it is a cryptographic hash (a model publisher cannot make a
second version of a tensor with the same digest) at 4.4 GB/s on one core here, against
1.7 GB/s for sha256 with the SHA extensions: 2.5 times less CPU for the check. Copied
files and whole shards keep sha256, the digest the Hugging Face cache names blobs by.

The shard header (hashed separately) and the safetensors rule that tensors tile the data
region leave no byte of a shard uncovered.

In a plan a model's fingerprint holds the digests as one bin of 32-byte BLAKE3 values in
the order of its `tensors` table (`tensor_blake3`), and the copied files as
`files: [{file, size, sha256}]`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import TYPE_CHECKING

import blake3

from mergeplan.errors import InputMismatchError, MergeplanError

if TYPE_CHECKING:
    import torch  # imported where a tensor is hashed: checking files and headers needs no torch


def tensor_blake3(t: torch.Tensor) -> bytes:
    """BLAKE3-256 of a tensor's bytes as stored (row-major, little-endian)."""
    import torch

    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return blake3.blake3(memoryview(flat.contiguous().view(torch.uint8).numpy())).digest()


def pack(digests: list[bytes]) -> bytes:
    return b"".join(digests)


def mismatch(where: str, name: str, file: str) -> InputMismatchError:
    return InputMismatchError(
        f"{where}: tensor {name} (shard {file}) differs from the bytes the plan was made from (BLAKE3 digest); "
        "the input changed since planning: restore it, point --model at the original, or re-plan"
    )


class SequentialCheck:
    """BLAKE3 of one tensor fed in order, slice by slice, from any thread; a slice that
    does not continue where the last one ended is not fed (later passes re-read slices).
    `want` None: only record the digest (the planner)."""

    def __init__(self, want: bytes | None, nbytes: int, where: str, name: str, file: str):
        self.want, self.nbytes = want, nbytes
        self.where, self.name, self.file = where, name, file
        self._h = blake3.blake3()
        self._pos = 0
        self._lock = threading.Lock()

    def feed(self, offset: int, data) -> None:
        with self._lock:
            if offset == self._pos and self._pos < self.nbytes:
                self._h.update(data)
                self._pos += len(data)

    @property
    def complete(self) -> bool:
        return self._pos == self.nbytes

    @property
    def fed(self) -> int:
        """Bytes fed so far (from the start, in order)."""
        return self._pos

    def finish(self) -> None:
        """Raise InputMismatchError if the bytes fed differ; a tensor not read whole is re-read."""
        if self._pos != self.nbytes:
            raise RuntimeError(f"tensor {self.name} was not read whole before its check")  # a bug, not input
        if self.want is not None and self._h.digest() != self.want:
            raise mismatch(self.where, self.name, self.file)

    def digest(self) -> bytes:
        self.finish()
        return self._h.digest()


def file_sha256(fd: int, size: int, where: str, sink=None, chunk: int = 8 << 20) -> str:
    """sha256 hex of the first `size` bytes of an open file (read with pread), each chunk
    also handed to `sink` (a copy). A file that ends early is an error, never a short hash."""
    h = hashlib.sha256()
    off = 0
    try:
        while off < size:
            b = os.pread(fd, min(chunk, size - off), off)
            if not b:
                raise MergeplanError(f"{where} ended after {off} of {size} bytes (changed while being read?); retry")
            h.update(b)
            if sink is not None:
                sink(b)
            off += len(b)
    except OSError as e:
        raise MergeplanError(f"cannot read {where}: {e.strerror}") from None
    return h.hexdigest()
