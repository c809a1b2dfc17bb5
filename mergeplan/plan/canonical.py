"""Canonical msgpack (sorted keys, float64, typed arrays as ext type 1), in pieces.

A plan's bytes are almost all array payload (AIM scores: ~30 MB in a 70B plan) inside a
small skeleton of maps and numbers. Packing it whole with msgpack copies every payload
three times (into the ext object, into the packer's buffer, into the result), which
was most of the time `show` spent hashing and checking a 70B plan. Here the skeleton is
packed in C with a placeholder per array, and the payloads are handed out as memoryviews
of the arrays themselves: hashing them or comparing them against a file's body touches
each byte once, and joining the pieces gives exactly what msgpack.packb would.

The placeholders are ext type 127 records carrying a random nonce drawn per call, after
the value exists, so no string in a (hostile) plan can imitate one; if the skeleton still
holds anything but exactly the placeholders expected, in order, the value is packed whole.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .schema import ARRAY_DTYPES

EXT_ARRAY = 1
_MARK = 127  # ext type of a placeholder; never written to a file


def array_parts(a: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The ext payload's header (dtype, ndim, shape) and the array as it follows it:
    contiguous, little-endian."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    dt = a.dtype.str
    if dt not in ARRAY_DTYPES:
        raise TypeError(f"plan arrays must be one of {sorted(ARRAY_DTYPES)}, got {dt}")
    head = struct.pack("<B", len(dt)) + dt.encode() + struct.pack("<B", a.ndim)
    return head + struct.pack(f"<{a.ndim}Q", *a.shape), a


def pack_array(a: np.ndarray) -> msgpack.ExtType:
    head, a = array_parts(a)
    return msgpack.ExtType(EXT_ARRAY, b"".join((head, a.data)))  # one copy of the payload, not two


def ext_frame(size: int, code: int = EXT_ARRAY) -> bytes:
    """msgpack's framing of an ext record of `size` bytes: the smallest form, as packb writes."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}.get(size)
    if fixed is not None:
        return struct.pack(">Bb", fixed, code)
    if size <= 0xFF:
        return struct.pack(">BBb", 0xC7, size, code)
    if size <= 0xFFFF:
        return struct.pack(">BHb", 0xC8, size, code)
    return struct.pack(">BIb", 0xC9, size, code)


def default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a plan")


def canon(obj: Any, arrays: list | None = None, nonce: bytes = b"") -> Any:
    """Sort map keys recursively so equal plans give equal bytes. With `arrays`, each
    array is appended to it and replaced by its placeholder."""
    if isinstance(obj, dict):
        return {str(k): canon(obj[k], arrays, nonce) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [canon(v, arrays, nonce) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if arrays is not None and isinstance(obj, np.ndarray):
        arrays.append(obj)
        return msgpack.ExtType(_MARK, nonce + struct.pack(">I", len(arrays) - 1))
    return obj


def packb(obj: Any) -> bytes:
    """Canonical msgpack of a value already passed through canon()."""
    return msgpack.packb(obj, default=default, use_bin_type=True)


def pieces(obj: Any) -> Iterator[bytes | memoryview]:
    """Consecutive pieces whose concatenation is the canonical msgpack of `obj`
    (packb(canon(obj))), array payloads as views of the arrays, not copies."""
    arrays: list[np.ndarray] = []
    nonce = os.urandom(12)
    skeleton = packb(canon(obj, arrays, nonce))
    prefix = struct.pack(">Bb", 0xD8, _MARK) + nonce
    marks, at = [], skeleton.find(prefix)
    while at >= 0:  # every occurrence, overlapping ones included
        marks.append(at)
        at = skeleton.find(prefix, at + 1)
    expected = [struct.pack(">I", i) for i in range(len(arrays))]
    if len(marks) != len(arrays) or any(
        skeleton[m + len(prefix) : m + len(prefix) + 4] != e for m, e in zip(marks, expected)
    ):
        yield packb(canon(obj))  # a string imitated a placeholder: pack the slow way
        return
    pos = 0
    for m, a in zip(marks, arrays):
        yield skeleton[pos:m]
        head, a = array_parts(a)
        yield ext_frame(len(head) + a.nbytes) + head
        if a.nbytes:
            yield a.reshape(-1).view(np.uint8).data
        pos = m + len(prefix) + 4
    yield skeleton[pos:]


def canonical_bytes(obj: Any) -> bytes:
    """Canonical msgpack of any plain value (sorted keys, typed arrays)."""
    return b"".join(pieces(obj))


def sha256(obj: Any) -> str:
    """Hex sha256 of canonical_bytes(obj), without building it."""
    h = hashlib.sha256()
    for p in pieces(obj):
        h.update(p)
    return h.hexdigest()


def encodes_to(obj: Any, data: bytes) -> bool:
    """canonical_bytes(obj) == data, comparing the payloads in place."""
    pos = 0
    for p in pieces(obj):
        n = len(p)
        if pos + n > len(data):
            return False
        if isinstance(p, bytes):
            if data[pos : pos + n] != p:
                return False
        elif not _same(data, pos, p):
            return False
        pos += n
    return pos == len(data)


def _same(data: bytes, pos: int, view: memoryview) -> bool:
    # Eight bytes at a time: a memoryview or bytes comparison goes a byte at a time and
    # took 45 ms for a 70B plan's 30 MB of scores, this 4 ms.
    a = np.frombuffer(view, np.uint8)
    b = np.frombuffer(data, np.uint8, len(a), pos)
    n8 = len(a) // 8 * 8
    if n8 and (a[:n8].view(np.uint64) != b[:n8].view(np.uint64)).any():
        return False
    return bool((a[n8:] == b[n8:]).all())
