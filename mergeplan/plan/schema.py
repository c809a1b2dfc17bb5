"""What a plan reader accepts: the type and range of every field, checked while the
dataclasses are built.

Plans are shared like lock files, so the body behind a valid digest is still someone
else's (anyone can re-sign an edited body). Nothing past the reader may meet a value of
the wrong type, an absurd size or a control character in a name; the first such value
stops the read with its field path (`tensors[12].contributions[0].weight`).

Structure and representable ranges only. Whether the values make sense together (ids
that exist, densities in (0, 1], finite weights, scores as long as the tensor axis) is
validate.check_plan's job, which lists every problem at once instead of the first.

Unknown keys: records that become dataclasses (plan, model, tensor, contribution) refuse
them, since a key this reader cannot keep cannot be honoured either, and dropping it would
change the bytes behind the digest. Maps kept as maps (params, stats, fingerprints, mask
and relax specs, ...) keep unknown keys as they are, checked only as plain data.

Hand-written rather than a pydantic schema: the checks must keep each value's exact type
(an int weight stays an int, or re-encoding would change the bytes), accept typed numpy
arrays, bound nesting, and report one path in the project's one-line error style; a
schema library would need custom hooks for each of those.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

from .model import Contribution, ModelRef, Plan, TensorPlan

MAX_NAME = 1024  # ids, tensor names, dtypes, digests: far above any real one
MAX_PATH = 4096  # PATH_MAX on Linux
MAX_DEPTH = 24  # nesting of free-form values (params, stats, ...); real plans use 4
MAX_NDIM = 16
MAX_NUMEL = 2**48  # elements of one tensor or array (512 TiB of bf16); keeps sizes in int64
# methods.spec.KINDS, spelt again to keep plan/ free of method code (a test checks they agree)
MASK_KINDS = ("magnitude", "bernoulli", "breadcrumbs", "della", "nm")
ARRAY_DTYPES = frozenset({"<f4", "<f8", "<f2", "<i4", "<i8", "<u4", "|u1", "|b1"})

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")

# Where a value sits: "" (the body) or (parent, key). Built as tuples on the way down and
# spelt out only for an error, since most plans have no error and millions of values.
At = Any
Check = Callable[[Any, At], Any]


class Corrupt(Exception):
    """One value the reader refuses: where (a field path) and what is wrong with it."""

    def __init__(self, at: At, problem: str):
        self.path, self.problem = spell(at), problem
        super().__init__(f"{self.path}: {problem}")


def child(at: At, key: Any) -> At:
    return (at, key)


def spell(at: At) -> str:
    """`tensors[12].contributions[0].weight`; odd keys quoted (repr), so a key cannot forge a path."""
    parts = []
    while isinstance(at, tuple):
        at, key = at
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif isinstance(key, str) and _PLAIN_KEY.match(key):
            parts.append(f".{key}")
        else:
            parts.append(f"[{_quote(key)}]")
    return "".join(reversed(parts)).lstrip(".") if parts else str(at)


def _quote(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _kind(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"a {v.dtype.str} array"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", bytes: "bytes",
            list: "a list", dict: "a map", type(None): "nil"}.get(type(v), type(v).__name__)


# -- scalars -----------------------------------------------------------------------------
def _string(v: Any, path: At, limit: int, empty: bool) -> str:
    if not isinstance(v, str):
        raise Corrupt(path, f"must be a string, not {_kind(v)}")
    if len(v) > limit or (not v and not empty):
        raise Corrupt(path, f"must be a {'' if empty else 'non-empty '}string of at most {limit} characters")
    if _CONTROL.search(v):
        raise Corrupt(path, "contains control characters")
    return v


def name(v: Any, path: At) -> str:
    """An identifier: model id, tensor name, method, dtype, kind, digest..."""
    return _string(v, path, MAX_NAME, empty=False)


def label(v: Any, path: At) -> str:
    """A short single-line string that may be empty (times, versions, tools)."""
    return _string(v, path, MAX_NAME, empty=True)


def filepath(v: Any, path: At) -> str:
    return _string(v, path, MAX_PATH, empty=True)


def text(v: Any, path: At) -> str:
    """Free text (notes, the recipe as written): any length, line breaks allowed; printed cleaned."""
    if not isinstance(v, str):
        raise Corrupt(path, f"must be a string, not {_kind(v)}")
    return v


def number(v: Any, path: At) -> int | float:
    """An int or a float (NaN and infinities pass here; check_plan says where they matter)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Corrupt(path, f"must be a number, not {_kind(v)}")
    return v


def integer(lo: int, hi: int) -> Check:
    def check(v: Any, path: At) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Corrupt(path, f"must be an integer, not {_kind(v)}")
        if not lo <= v <= hi:
            raise Corrupt(path, f"is {v}, outside [{lo}, {hi}]")
        return v
    return check


def boolean(v: Any, path: At) -> bool:
    if not isinstance(v, bool):
        raise Corrupt(path, f"must be true or false, not {_kind(v)}")
    return v


def blob(v: Any, path: At) -> bytes:
    if not isinstance(v, bytes):
        raise Corrupt(path, f"must be bytes, not {_kind(v)}")
    return v


def hexdigest(size: int) -> Check:
    pattern = re.compile(f"[0-9a-f]{{{size}}}\\Z")

    def check(v: Any, path: At) -> str:
        if not isinstance(v, str) or not pattern.match(v):
            raise Corrupt(path, f"must be {size} lowercase hex digits")
        return v
    return check


def array(dtypes: frozenset[str] = ARRAY_DTYPES, ndim: int | None = None) -> Check:
    def check(v: Any, path: At) -> np.ndarray:
        if not isinstance(v, np.ndarray):
            raise Corrupt(path, f"must be a typed array, not {_kind(v)}")
        if v.dtype.str not in dtypes or (ndim is not None and v.ndim != ndim):
            raise Corrupt(path, f"must be a {ndim or ''}{'-d ' if ndim else ''}array of {'/'.join(sorted(dtypes))}, "
                                f"not {v.ndim}-d {v.dtype.str}")
        return v
    return check


def shape(v: Any, path: At) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise Corrupt(path, f"must be a list of at most {MAX_NDIM} sizes")
    for i, n in enumerate(v):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise Corrupt(child(path, i), f"must be a non-negative integer, not {_quote(n)}")
    if math.prod(v) >= MAX_NUMEL:
        raise Corrupt(path, f"{_quote(v)} has more than 2**48 elements")
    return tuple(v)


# -- containers --------------------------------------------------------------------------
def optional(check: Check) -> Check:
    return lambda v, path: None if v is None else check(v, path)


def list_of(check: Check) -> Check:
    def run(v: Any, path: At) -> list:
        if not isinstance(v, list):
            raise Corrupt(path, f"must be a list, not {_kind(v)}")
        for i, x in enumerate(v):
            check(x, child(path, i))
        return v
    return run


def map_of(check: Check, key: Check = name) -> Check:
    def run(v: Any, path: At) -> dict:
        if not isinstance(v, dict):
            raise Corrupt(path, f"must be a map, not {_kind(v)}")
        for k, x in v.items():
            if not isinstance(k, str):
                raise Corrupt(path, f"has a {_kind(k)} key; map keys are strings")
            key(k, child(path, k))
            check(x, child(path, k))
        return v
    return run


def plain(v: Any, path: At, depth: int = 0) -> Any:
    """Free-form data: nil, booleans, numbers, strings, bytes, typed arrays, and lists and
    string-keyed maps of those, nested at most MAX_DEPTH deep."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, np.ndarray)):
        return v
    if depth >= MAX_DEPTH:
        raise Corrupt(path, f"is nested more than {MAX_DEPTH} levels deep")
    if isinstance(v, list):
        for i, x in enumerate(v):
            plain(x, child(path, i), depth + 1)
        return v
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise Corrupt(path, f"has a {_kind(k)} key; map keys are strings")
            plain(x, child(path, k), depth + 1)
        return v
    raise Corrupt(path, f"holds {_kind(v)}, which a plan cannot")


def spec(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    """A map with known keys checked by type; other keys are kept as plain data."""
    def run(v: Any, path: At) -> dict:
        if not isinstance(v, dict):
            raise Corrupt(path, f"must be a map, not {_kind(v)}")
        for k in required:
            if k not in v:
                raise Corrupt(path, f"lacks the key {_quote(k)}")
        for k, x in v.items():
            if not isinstance(k, str):
                raise Corrupt(path, f"has a {_kind(k)} key; map keys are strings")
            (fields.get(k) or plain)(x, child(path, k))
        return v
    return run


def record(cls: type, fields: dict[str, Check], path: At, v: Any, omitted: tuple[str, ...] = ()) -> Any:
    """A dataclass from a map with exactly the keys in `fields` (those in `omitted` may be
    absent); `fields` names every field of `cls` (tests/test_plan_schema.py checks)."""
    if not isinstance(v, dict):
        raise Corrupt(path, f"must be a map, not {_kind(v)}")
    if v.keys() != fields.keys():
        for k in v:
            if k not in fields:
                raise Corrupt(child(path, k) if isinstance(k, str) else path,
                              "is not a field this mergeplan knows (a newer mergeplan wrote it, or it was forged)")
        for k in fields:
            if k not in v and k not in omitted:
                raise Corrupt(path, f"lacks the field {_quote(k)}")
    return cls(**{k: fields[k](x, (path, k)) for k, x in v.items()})


def records(cls: type, fields: dict[str, Check], omitted: tuple[str, ...] = ()) -> Check:
    """A list of `cls` records."""
    def run(v: Any, path: At) -> list:
        if not isinstance(v, list):
            raise Corrupt(path, f"must be a list, not {_kind(v)}")
        return [record(cls, fields, child(path, i), x, omitted) for i, x in enumerate(v)]
    return run


# -- the plan ----------------------------------------------------------------------------
def fingerprint(v: Any, path: At) -> dict:
    """A model's identity. Known keys are checked by type, any others kept as plain data:
    apply and validate --inputs compare them against the files."""
    fp = spec({
        "shards": list_of(spec({"file": filepath, "size": integer(0, 2**63 - 1),
                                "header_sha256": hexdigest(64), "sha256": optional(hexdigest(64))},
                               required=("file", "size"))),
        "tensors": list_of(_table_entry),
        "tensor_blake3": blob,  # 32-byte sha256 per `tensors` entry, in that order
        "files": list_of(spec({"file": filepath, "size": integer(0, 2**63 - 1), "sha256": optional(hexdigest(64))},
                              required=("file",))),
    })(v, path)
    if "tensor_blake3" in fp and len(fp["tensor_blake3"]) != 32 * len(fp.get("tensors", [])):
        raise Corrupt(child(path, "tensor_blake3"), "must hold one 32-byte digest per entry of `tensors`")
    return fp


def _table_entry(v: Any, path: At) -> list:
    if not isinstance(v, list) or len(v) != 3:
        raise Corrupt(path, "must be [name, dtype, shape]")
    name(v[0], child(path, 0))
    name(v[1], child(path, 1))
    shape(v[2], child(path, 2))
    return v


_HUB = spec({"repo": name, "revision": name}, required=("repo", "revision"))

_MASK_FIELDS: dict[str, Check] = {
    "density": number, "gamma": number, "epsilon": number, "n": integer(0, 2**63 - 1), "m": integer(0, 2**63 - 1),
    "rescale": name, "digest": optional(hexdigest(32)), "cutoff": list_of(integer(-(2**63), 2**64 - 1)),
    "bits": blob,
}
# Keys each mask kind cannot do without (masks.check_spec checks their ranges).
_MASK_NEEDS = {"magnitude": ("density",), "bernoulli": ("density",), "breadcrumbs": ("density", "gamma"),
               "della": ("density", "epsilon"), "nm": ("n", "m")}


def mask(v: Any, path: At) -> dict:
    if not isinstance(v, dict):
        raise Corrupt(path, f"must be a map or nil, not {_kind(v)}")
    kind = v.get("kind")
    if not isinstance(kind, str) or kind not in MASK_KINDS:  # an array here made `in` raise
        raise Corrupt(child(path, "kind"), f"must be one of {', '.join(MASK_KINDS)}")
    spec(_MASK_FIELDS, required=_MASK_NEEDS[kind])(v, path)
    if "cutoff" in v and len(v["cutoff"]) != 2:
        raise Corrupt(child(path, "cutoff"), "must be [threshold, index]")
    return v


def relax(v: Any, path: At) -> dict:
    if not isinstance(v, dict):
        raise Corrupt(path, f"must be a map or nil, not {_kind(v)}")
    if not isinstance(v.get("kind"), str) or v["kind"] != "aim":
        raise Corrupt(child(path, "kind"), "must be \"aim\", the only relaxation this mergeplan knows")
    return spec({"omega": number, "axis": integer(-MAX_NDIM, MAX_NDIM), "scores": array(frozenset({"<f4"}), 1)},
                required=("omega", "axis", "scores"))(v, path)


_TENSOR_PARAMS = spec({
    "lambda": number, "normalize": boolean, "rescale": boolean, "consensus_method": optional(name),
    "rescale_mode": name, "cabs_order": list_of(integer(0, 2**31)),
})
_TENSOR_STATS = spec({"kept": map_of(number), "overlap": number})
CONTRIBUTION = {"model": name, "weight": number, "mask": optional(mask), "source": map_of(label)}
TENSOR = {
    "name": name, "shape": shape, "dtype": name, "op": name, "source": optional(name), "params": _TENSOR_PARAMS,
    "contributions": records(Contribution, CONTRIBUTION), "relax": optional(relax), "stats": _TENSOR_STATS,
}
# Keys added after format v1 are written only when set, so plans that do not use them stay
# canonical for readers old and new; they may be absent here.
OMITTED_WHEN_NONE = ("hub",)
MODEL = {"id": name, "role": name, "path": filepath, "fingerprint": fingerprint, "hub": optional(_HUB)}
PLAN = {
    "method": name,
    "params": spec({}),
    "seed": integer(0, 2**64 - 1),
    "out_dtype": optional(name),
    "models": records(ModelRef, MODEL, OMITTED_WHEN_NONE),
    "tensors": records(TensorPlan, TENSOR),
    "recipe": spec({"path": filepath, "dir": filepath, "text": text}),
    "guides": map_of(spec({"summary": text})),
    "calibration": spec({}),
    "stats": spec({"sens": spec({"groups": list_of(plain), "sigma": map_of(array())})}),
    "aux_files": list_of(filepath),
    "max_shard_size": lambda v, p: (name if isinstance(v, str) else integer(1, 2**63 - 1))(v, p),
    "notes": list_of(text),
    "mergeplan_version": label,
    "created": label,
    "edit_log": list_of(spec({"time": label, "tool": label, "changes": list_of(list_of(plain))})),
    "aux_model": optional(name),
    "tuning": optional(spec({
        "objective": spec({"kind": name, "direction": name}),
        "strategy": name,
        "chosen": integer(0, 2**31),
        "candidates": list_of(spec({
            "id": integer(0, 2**31), "assignment": map_of(plain, key=label), "score": optional(number),
            "tasks": map_of(spec({"loss": number, "accuracy": number})),
        }, required=("id", "assignment", "score"))),
    }, required=("objective", "candidates", "chosen"))),
}
# Plan-level keys written only when set (see OMITTED_WHEN_NONE).
PLAN_OMITTED_WHEN_NONE = ("aux_model", "tuning")


def plan(d: Any) -> Plan:
    """The Plan in a decoded body, or Corrupt naming the first field that is not acceptable."""
    p = record(Plan, PLAN, "", d, PLAN_OMITTED_WHEN_NONE)
    if p.aux_model is not None and p.aux_model not in {m.id for m in p.models}:
        raise Corrupt(child("", "aux_model"), "names no model of the plan")
    return p
