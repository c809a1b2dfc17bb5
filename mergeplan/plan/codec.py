"""Plan file codec: canonical msgpack, typed binary arrays, a digest over the body.

File layout (a msgpack array of four items, so the version can be read before the body):

    ["mergeplan", <format version: int>, <body: bin>, <digest: str "sha256:<hex>">]

The body is itself msgpack of the plan as a map with sorted keys; floats are always
float64, numpy arrays are ext type 1. The same Plan therefore encodes to the same bytes,
and the digest is sha256 over the body bytes exactly.

Reading is strict, since a received plan is untrusted: every value is checked while the
dataclasses are built (schema.py), and a body must be the very bytes its plan encodes to.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from ..errors import PlanFormatError
from . import canonical, schema
from .model import FORMAT_NAME, FORMAT_VERSION, ModelRef, Plan, TensorPlan

_EXT_ARRAY = canonical.EXT_ARRAY
# Little-endian dtypes allowed inside a plan; anything else is a bug or a hostile file.
_ARRAY_DTYPES = schema.ARRAY_DTYPES


# -- arrays ------------------------------------------------------------------------------
_pack_array = canonical.pack_array


def _unpack_ext(code: int, data: bytes) -> Any:
    # Every length in the header is checked against the payload before numpy sees it.
    where = "a typed array"
    if code != _EXT_ARRAY:
        raise schema.Corrupt(where, f"has the unknown msgpack extension type {code}")
    n = data[0] if data else 0
    dt = data[1 : 1 + n].decode("ascii", "replace")
    if not data or dt not in _ARRAY_DTYPES or len(data) < 2 + n:
        raise schema.Corrupt(where, f"has the unsupported dtype {dt[:16]!r}")
    ndim = data[1 + n]
    off = 2 + n + 8 * ndim
    if ndim > schema.MAX_NDIM or len(data) < off:
        raise schema.Corrupt(where, "has a malformed shape")
    shape = struct.unpack_from(f"<{ndim}Q", data, 2 + n)
    numel = math.prod(shape)
    dtype = np.dtype(dt)
    if numel >= schema.MAX_NUMEL or len(data) - off != numel * dtype.itemsize:
        raise schema.Corrupt(where, f"of shape {list(shape)} does not match its {len(data) - off} bytes")
    if dt == "|b1" and numel and np.frombuffer(data, np.uint8, numel, off).max() > 1:
        raise schema.Corrupt(where, "of booleans holds bytes other than 0 and 1")
    return np.frombuffer(data, dtype, numel, off).reshape(shape).copy()


# -- plan <-> plain dict -----------------------------------------------------------------
# Records are built shallowly (canonical.canon copies them anyway): asdict() would deep-copy every
# fingerprint and numpy array, and dataclasses.fields() per record costs as much again.
_MODEL_KEYS = [f.name for f in dataclasses.fields(ModelRef)]
_TENSOR_KEYS = [f.name for f in dataclasses.fields(TensorPlan)]


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    d["models"] = [
        {k: v for k in _MODEL_KEYS if (v := getattr(m, k)) is not None or k not in schema.OMITTED_WHEN_NONE}
        for m in plan.models
    ]
    d["tensors"] = [_tensor_to_dict(t) for t in plan.tensors]
    for k in schema.PLAN_OMITTED_WHEN_NONE:  # written only when set: older plans stay canonical
        if d[k] is None:
            del d[k]
    return d


def _tensor_to_dict(t: TensorPlan) -> dict[str, Any]:
    d = {k: getattr(t, k) for k in _TENSOR_KEYS}
    d["shape"] = list(t.shape)
    d["contributions"] = [
        {"model": c.model, "weight": c.weight, "mask": c.mask, "source": c.source} for c in t.contributions
    ]
    return d


def plan_from_dict(d: dict[str, Any], where: str = "plan") -> Plan:
    """The Plan in a decoded body; PlanFormatError naming the first field that is not
    acceptable (type, range, unknown key: plan/schema.py)."""
    try:
        return schema.plan(d)
    except schema.Corrupt as e:
        raise _hostile(where, e) from None


def _hostile(where: str, e: schema.Corrupt) -> PlanFormatError:
    return PlanFormatError(
        f"{where}: {e.path or 'plan body'} {e.problem}; the plan is corrupt or hostile: "
        "re-create it with `mergeplan plan` or get a fresh copy from its author"
    )


# -- bytes -------------------------------------------------------------------------------
canonical_bytes = canonical.canonical_bytes


def encode_body(plan: Plan) -> bytes:
    return canonical_bytes(plan_to_dict(plan))


def body_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def plan_digest(plan: Plan) -> str:
    return body_digest(encode_body(plan))


def encode_plan(plan: Plan) -> bytes:
    body = encode_body(plan)
    return msgpack.packb([FORMAT_NAME, FORMAT_VERSION, body, body_digest(body)], use_bin_type=True)


def decode_plan(data: bytes, where: str = "plan") -> Plan:
    return decode_plan_with_digest(data, where)[0]


_LEAD = b"\x94" + msgpack.packb(FORMAT_NAME)  # [ "mergeplan", ...


def _outer(data: bytes) -> list:
    """msgpack.unpackb(data), with the body a view into `data` when the file has the layout
    encode_plan writes: a 70B plan's body is 30 MB, and copying it cost 17 ms of `show`."""
    v = len(_LEAD)
    if data[:v] == _LEAD and len(data) > v + 2 and data[v] < 0x80 and data[v + 1] in _BIN_LEN:
        size = _BIN_LEN[data[v + 1]]
        start = v + 2 + size
        n = int.from_bytes(data[v + 2 : start], "big")
        if start + n <= len(data):
            try:
                digest = msgpack.unpackb(data[start + n :], raw=False)
            except Exception:  # not one value after the body: the full parse says what is wrong
                digest = None
            if isinstance(digest, str):
                return [FORMAT_NAME, data[v], memoryview(data)[start : start + n], digest]
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


_BIN_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of the length that follows


def decode_plan_with_digest(data: bytes, where: str = "plan") -> tuple[Plan, str]:
    """The plan and the digest its file records, which decoding checked against the body
    (so it equals plan_digest(plan) without re-encoding the plan)."""
    if type(data) is not bytes:
        # The body stays a view of `data` while it is hashed, decoded and compared: a buffer
        # someone could change meanwhile (bytearray, mmap) is copied first.
        data = bytes(data)
    try:
        outer = _outer(data)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise PlanFormatError(f"{where}: not a mergeplan plan file or truncated ({type(e).__name__}); re-create it with `mergeplan plan`") from e
    if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == FORMAT_NAME):
        raise PlanFormatError(f"{where}: not a mergeplan plan file (no 'mergeplan' header); re-create it with `mergeplan plan`")
    _, version, body, digest = outer
    if not isinstance(version, int) or isinstance(version, bool):
        raise PlanFormatError(f"{where}: plan header has no integer format version; the file is corrupt")
    if version > FORMAT_VERSION:
        raise PlanFormatError(
            f"{where}: plan format v{version} was written by a newer mergeplan; this one reads up to "
            f"v{FORMAT_VERSION}: upgrade mergeplan (pip install -U mergeplan)"
        )
    if version < 1:
        raise PlanFormatError(f"{where}: plan format v{version} is not a valid version; the file is corrupt")
    mismatch = PlanFormatError(
        f"{where}: plan digest does not match its contents (corrupt or edited by hand); re-create it or restore a copy")
    if not isinstance(body, (bytes, memoryview)):
        raise mismatch
    hashed = _hash_aside(body)
    try:
        with _gc_paused():
            plan = _decode_body(body, where)
    except Exception:
        if hashed() != digest:  # a body that does not match its digest says so first, as
            raise mismatch from None  # it did when the digest was checked before decoding
        raise
    if hashed() != digest:
        raise mismatch
    return plan, digest


def _hash_aside(body: bytes | memoryview) -> Callable[[], str]:
    """body_digest(body), computed on another core while the body decodes: sha256 drops the
    GIL, and for a 70B plan's 30 MB it is 17 ms of `show` and of the review's start."""
    if len(body) < 1 << 20:
        d = body_digest(body)
        return lambda: d
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(body_digest(body)), daemon=True)
    try:
        t.start()
    except RuntimeError:  # no thread to be had (process limits): hash here, later
        return lambda: body_digest(body)

    def result() -> str:
        t.join()
        return out[0] if out else body_digest(body)
    return result


def _decode_body(body: bytes, where: str) -> Plan:
    try:
        d = msgpack.unpackb(body, raw=False, ext_hook=_unpack_ext, strict_map_key=True)
    except schema.Corrupt as e:
        raise _hostile(where, e) from None
    except Exception as e:  # msgpack: bad bytes, truncation, nesting deeper than its stack
        raise PlanFormatError(f"{where}: plan body is corrupt ({type(e).__name__}); re-create it with `mergeplan plan`") from e
    plan = plan_from_dict(d, where)
    # One encoding per plan: the file's digest is then always plan_digest(plan), and two
    # bodies that differ in bytes (key order, number widths, duplicate keys) never decode
    # to the same plan.
    if not canonical.encodes_to(plan_to_dict(plan), body):
        raise PlanFormatError(
            f"{where}: plan body is not canonical (key order, number encoding or duplicate keys differ from "
            "what mergeplan writes); the plan is corrupt or hostile: re-create it with `mergeplan plan`"
        )
    return plan


@contextmanager
def _gc_paused():
    # Decoding allocates an object per value and frees almost none, so the cyclic collector
    # would scan the growing heap again and again: 2-3x the decode time of a plan with
    # thousands of small records (measured in benchmarks/diff_bench.py).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_plan(path: str | os.PathLike) -> Plan:
    return read_plan_with_digest(path)[0]


def read_plan_with_digest(path: str | os.PathLike) -> tuple[Plan, str]:
    """read_plan, and the plan file's digest: `show` and `review` print it without
    re-encoding a 30 MB plan to hash it again."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise PlanFormatError(f"{p}: plan file not found; create one with `mergeplan plan RECIPE -o {p}`") from None
    except IsADirectoryError:
        raise PlanFormatError(f"{p}: is a directory, not a plan file") from None
    return decode_plan_with_digest(data, where=str(p))


def write_plan(plan: Plan, path: str | os.PathLike) -> str:
    """Write atomically (temp file beside the target, then rename); return the digest."""
    p = Path(path)
    data = encode_plan(plan)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        # Never leave a half-written plan behind, not even on Ctrl-C.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return body_digest(msgpack.unpackb(data)[2])
