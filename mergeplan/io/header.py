"""The safetensors header: parsing it from a file and encoding it like the safetensors crate.

File layout: 8-byte little-endian header length N, then N bytes of JSON, then the
tensor data. The JSON maps each tensor name to {"dtype", "shape", "data_offsets"}
(offsets relative to the first data byte), plus an optional "__metadata__" map of
strings.

How `safetensors` (0.4 - 0.8; the Rust `prepare` + `Metadata` serializer) writes it,
which `encode_header` reproduces so our shards are byte-identical to `save_file`:
  * tensors are ordered by dtype DEScending in the crate's `Dtype` enum order (which is
    roughly widest first: U64, I64, F64, C64, F32, U32, I32, BF16, F16, U16, I16, F8...,
    I8, U8, BOOL), ties broken by name in byte order; data is packed back to back in
    that order with no padding between tensors;
  * the JSON is compact serde_json: no spaces, "__metadata__" first, then the tensors
    in data order, each as {"dtype":..,"shape":[..],"data_offsets":[start,end]};
    non-ASCII is written raw as UTF-8, only '"', '\\' and control characters escaped;
  * the JSON is padded with spaces (0x20) to a multiple of 8 bytes, and N counts the
    padding.
The metadata map is a Rust HashMap, so more than one key would come out in a
per-process random order; that is why shards carry exactly {"format": "pt"}.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from mergeplan.errors import MergeplanError
from mergeplan.io.tensors import ST_DTYPE_RANK, ST_ITEMSIZE, nbytes

# Same cap as the safetensors crate: a larger header is refused there too.
MAX_HEADER_SIZE = 100_000_000
_PREFIX = struct.Struct("<Q")


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the first data byte, as in "data_offsets"
    end: int


@dataclass(frozen=True)
class ParsedHeader:
    raw: bytes  # the 8-byte length prefix plus the JSON, exactly as on disk
    metadata: dict[str, str] | None
    entries: dict[str, HeaderEntry]
    file_size: int

    @property
    def data_start(self) -> int:
        return len(self.raw)


def _corrupt(path: os.PathLike | str, what: str) -> MergeplanError:
    return MergeplanError(
        f"corrupt safetensors file {path}: {what}; re-download or re-save this shard"
    )


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_header(path: os.PathLike | str) -> ParsedHeader:
    """Parse and validate one shard's header; every problem is a MergeplanError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergeplanError(f"cannot open safetensors file {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < _PREFIX.size:
            raise _corrupt(path, f"only {size} bytes, too short for a header")
        (n,) = _PREFIX.unpack(_pread_exact(fd, _PREFIX.size, 0))
        if n > MAX_HEADER_SIZE or _PREFIX.size + n > size:
            raise _corrupt(path, f"header length {n} does not fit the file size {size}")
        raw_json = _pread_exact(fd, n, _PREFIX.size)
    finally:
        os.close(fd)
    try:
        obj = json.loads(raw_json.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, "header JSON is not an object")

    data_size = size - _PREFIX.size - n
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(path, "__metadata__ is not a map of strings")
    entries: dict[str, HeaderEntry] = {}
    for name, spec in obj.items():
        entries[name] = _parse_entry(path, name, spec, data_size)
    return ParsedHeader(
        raw=_PREFIX.pack(n) + raw_json, metadata=metadata, entries=entries, file_size=size
    )


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path, name: str, spec: object, data_size: int) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise _corrupt(path, f"entry for tensor {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {name!r} has no dtype")
    if dtype not in ST_ITEMSIZE:
        raise MergeplanError(
            f"tensor {name!r} in {path} has dtype {dtype}, which mergeplan cannot read "
            f"(supported: {', '.join(sorted(ST_ITEMSIZE))})"
        )
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise _corrupt(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin or end > data_size:
        raise _corrupt(
            path, f"tensor {name!r} data_offsets [{begin}, {end}] fall outside the "
            f"{data_size} data bytes (truncated file?)"
        )
    if end - begin != nbytes(dtype, shape):
        raise _corrupt(
            path, f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs "
            f"{nbytes(dtype, shape)}"
        )
    return HeaderEntry(dtype, tuple(shape), begin, end)


def st_order(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, dtype) pairs in the order safetensors lays them out in a file."""
    # Python compares str by code point, which for valid UTF-8 is the same as Rust's
    # byte-wise String ordering.
    return sorted(entries, key=lambda e: (-ST_DTYPE_RANK[e[1]], e[0]))


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...], int, int]],
    metadata: dict[str, str] | None,
) -> bytes:
    """Header bytes (length prefix + padded JSON) for tensors already in file order.

    `tensors` holds (name, dtype, shape, begin, end) with offsets relative to the data start.
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    for name, dtype, shape, begin, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    # serde_json compact output == json.dumps with these separators and raw UTF-8.
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_SIZE:
        raise MergeplanError(
            f"safetensors header would be {len(text)} bytes (limit {MAX_HEADER_SIZE}); "
            "use a smaller max_shard_size"
        )
    return _PREFIX.pack(len(text)) + text
