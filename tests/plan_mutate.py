"""Mutate plan files the way a hostile or broken sender would, then re-sign them.

A re-signed plan passes the envelope check (its digest is recomputed over the mutated
body), so everything behind the digest sees the damage. Shared by tests/test_plan_fuzz.py,
scripts/fuzz_plans.py and any fuzzing of `apply`:

    rng = random.Random(seed)
    data, kind = mutate_plan(encode_plan(make_plan()), rng)
    outcome = through_readers(data, make_plan())  # or your own harness (apply, the TUI)

`kind` names the mutation ("value:nan", "bytes:flip", ...) so outcomes can be counted
by cause. Mutated bodies are packed canonically (sorted keys) where the structure allows,
so most of them get past the reader's canonical-encoding check and reach the checks and
renderers behind it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import struct
import traceback
from pathlib import Path
from typing import Any, Callable

import msgpack

# Strings that have broken terminals or rich markup before, plus plain oddities.
NASTY_STRINGS = (
    "", " ", "[/bold]", "[ft0]", "[bold red]x[/]", "[link=http://x]y[/link]", "\x1b[31mred\x1b[0m",
    "\x1b]0;title\x07", "\x1b[2J", "a\rb", "tab\there", "nul\x00byte", "\x9b31m", "\u202eevil", "\x7f",
    "line\nbreak", "../../etc/passwd", "/abs/path", "x" * 5000, "\ud7ff\ue000", "é" * 40, "%s%n{0}",
)
NASTY_NUMBERS = (
    0, -1, 1, 2, 7, 255, 256, 65536, 2**31, 2**32 + 1, 2**48, 2**62, 2**63 - 1, -(2**63), 2**64 - 1,
    0.0, -0.0, 0.5, 1.0000001, -0.5, 1e-320, 1e308, -1e308, math.nan, math.inf, -math.inf, True, False,
)


def resign(body: bytes, name: str = "mergeplan", version: Any = None) -> bytes:
    """The envelope around `body` with a digest that matches it (version: the current one)."""
    from mergeplan.plan.model import FORMAT_VERSION

    version = FORMAT_VERSION if version is None else version
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return msgpack.packb([name, version, body, digest], use_bin_type=True)


def split(data: bytes) -> tuple[Any, Any, bytes]:
    name, version, body, _ = msgpack.unpackb(data, raw=False)
    return name, version, body


def _load(body: bytes) -> Any:
    # Arrays stay ExtType so they can be mutated as bytes and re-packed unchanged.
    return msgpack.unpackb(body, raw=False, ext_hook=msgpack.ExtType, strict_map_key=False)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        try:
            keys = sorted(obj)
        except TypeError:  # mixed key types: leave the order as it is
            keys = list(obj)
        return {k: _sorted(obj[k]) for k in keys}
    if isinstance(obj, list):
        return [_sorted(v) for v in obj]
    return obj


def _dump(obj: Any) -> bytes:
    return msgpack.packb(_sorted(obj), use_bin_type=True)


# -- walking the decoded body -----------------------------------------------------------
def _slots(obj: Any, out: list, depth: int = 0) -> None:
    """Every (container, key) pair in the tree, so one can be picked uniformly."""
    if depth > 40:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            _slots(v, out, depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            _slots(v, out, depth + 1)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.3:
        return rng.choice(NASTY_NUMBERS)
    if r < 0.55:
        return rng.choice(NASTY_STRINGS)
    if r < 0.62:
        return None
    if r < 0.68:
        return bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 7, 33))))
    if r < 0.76 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if r < 0.84 and depth < 3:
        return {rng.choice(("kind", "density", "x", "bits", "scores", "size", "file")): _random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if r < 0.92:
        return _random_ext(rng)
    return rng.randrange(-(2**63), 2**64)


def _random_ext(rng: random.Random) -> msgpack.ExtType:
    """A typed-array extension with a plausible or a broken header."""
    dt = rng.choice(("<f4", "<f8", "|u1", "|b1", "<i8", ">f4", "<c8", "O", "<f4\x00", ""))
    ndim = rng.choice((0, 1, 1, 2, 3, 9, 255))
    shape = [rng.choice((0, 1, 3, 64, 2**20, 2**33, 2**64 - 1)) for _ in range(min(ndim, 4))]
    head = bytes([len(dt.encode())]) + dt.encode() + bytes([ndim]) + b"".join(struct.pack("<Q", s) for s in shape)
    payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 4, 12, 256))))
    code = rng.choice((1, 1, 1, 0, 2, 127))
    return msgpack.ExtType(code, head + payload)


def _same_type(rng: random.Random, v: Any) -> Any:
    """A hostile value of v's own type, which a reader checking types alone would let through."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([x for x in NASTY_NUMBERS if type(x) is int])
    if isinstance(v, float):
        return rng.choice((math.nan, math.inf, -math.inf, -v, 0.0, -0.0, 1e308, 5e-324, 2.0))
    if isinstance(v, str):
        s = rng.choice(NASTY_STRINGS)
        return rng.choice((s, v + s, s + v))
    if isinstance(v, bytes):
        return v[: rng.randrange(len(v) + 1)] if v and rng.random() < 0.5 else v + bytes(rng.randrange(256) for _ in range(3))
    if isinstance(v, msgpack.ExtType):
        data = bytearray(v.data)
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        return msgpack.ExtType(v.code, bytes(data))
    if isinstance(v, list):
        if v and rng.random() < 0.5:
            n = rng.choice((2, 10, 1000))
            return v * n if len(v) * n < 20_000 else v[:1] * 20_000
        return v[: rng.randrange(len(v) + 1)]
    if isinstance(v, dict):
        v = dict(v)
        v[rng.choice(("zz_extra", "[/bold]", "\x1b[2J", "kind", "digest"))] = _random_value(rng)
        return v
    return _random_value(rng)


def _mutate_slot(rng: random.Random, container: Any, key: Any) -> str:
    v = container[key]
    r = rng.random()
    if r < 0.45:
        container[key] = _same_type(rng, v)
        return "same-type:" + type(v).__name__
    if r < 0.7:
        container[key] = _random_value(rng)
        return "value:" + type(container[key]).__name__
    if r < 0.78 and isinstance(container, dict):
        del container[key]
        return "delete-key"
    if r < 0.82 and isinstance(container, dict):
        container[rng.choice(("zz_extra", "hub", "bits", "cutoff", "axis", "files", "tensor_blake3"))] = _random_value(rng)
        return "extra-key"
    if r < 0.9:
        nest: Any = v
        for _ in range(rng.choice((5, 50, 400))):
            nest = [nest]
        container[key] = nest
        return "nest"
    if r < 0.95 and isinstance(container, list) and len(container) > 1:
        j = rng.randrange(len(container))
        container[key], container[j] = container[j], container[key]
        return "swap"
    container[key] = rng.choice(([], {}, None, "", 0))
    return "empty"


def mutate_structure(body: bytes, rng: random.Random, edits: int | None = None) -> tuple[bytes, str]:
    """Decode the body, change 1-3 random places in the tree, re-pack it canonically."""
    obj = _load(body)
    kinds = []
    for _ in range(edits or rng.choice((1, 1, 1, 2, 3))):
        slots: list = []
        _slots(obj, slots)
        if not slots:
            break
        # Half of the edits land inside tensors' and models' entries, where most fields are.
        focus = [s for s in slots if isinstance(s[0], dict) and s[1] in _FIELDS] if rng.random() < 0.5 else []
        container, key = rng.choice(focus or slots)
        kinds.append(_mutate_slot(rng, container, key))
    try:
        return _dump(obj), kinds[0] if kinds else "none"
    except (ValueError, OverflowError, TypeError):  # nesting too deep for msgpack's packer
        return body, "none"


_FIELDS = {
    "id", "role", "path", "fingerprint", "shards", "tensors", "size", "file", "header_sha256", "sha256",
    "name", "shape", "dtype", "op", "source", "params", "contributions", "relax", "stats", "model",
    "weight", "mask", "kind", "density", "digest", "bits", "n", "m", "gamma", "epsilon", "rescale",
    "omega", "axis", "scores", "lambda", "cabs_order", "kept", "overlap", "method", "seed", "models",
    "notes", "recipe", "text", "guides", "calibration", "edit_log", "changes", "time", "max_shard_size",
    "sens", "sigma", "groups", "out_dtype", "aux_files", "created", "mergeplan_version",
}


def mutate_bytes(body: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Raw damage to the body bytes: flips, inserts, cuts, splices, deep nesting."""
    b = bytearray(body)
    r = rng.random()
    if r < 0.4 and b:
        for _ in range(rng.choice((1, 1, 2, 8))):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), "bytes:flip"
    if r < 0.55:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 5, 9))))
        return bytes(b), "bytes:insert"
    if r < 0.7 and b:
        i = rng.randrange(len(b))
        del b[i : i + rng.choice((1, 2, 9, 100))]
        return bytes(b), "bytes:delete"
    if r < 0.8:
        return bytes(b[: rng.randrange(len(b) + 1)]), "bytes:truncate"
    if r < 0.9:
        # Deeper than msgpack's packer allows: arrays of one element, nested thousands deep.
        depth = rng.choice((100, 1000, 5000))
        return b"\x91" * depth + b"\xc0", "bytes:deep"
    i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
    return bytes(b[:i] + b[j:] + b[i:j]), "bytes:splice"


def mutate_envelope(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    name, version, body = split(data)
    r = rng.random()
    if r < 0.4:
        return resign(body, version=rng.choice((0, -1, 2, 2**40, "1", None, 1.0, True))), "envelope:version"
    if r < 0.6:
        return resign(body, name=rng.choice(("MERGEPLAN", "", "[/bold]"))), "envelope:name"
    if r < 0.8:
        return msgpack.packb([name, version, body, rng.choice(("", "sha256:", 5, None, b"x"))]), "envelope:digest"
    return msgpack.packb([name, version, _load(body), "x"]), "envelope:body-type"


def mutate_plan(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutated, re-signed plan file from the plan file `data`, and the mutation's kind."""
    r = rng.random()
    if r < 0.05:
        return mutate_envelope(data, rng)
    name, version, body = split(data)
    if r < 0.3:
        body, kind = mutate_bytes(body, rng)
    else:
        body, kind = mutate_structure(body, rng)
    return resign(body, name, version), kind


# -- running the readers -----------------------------------------------------------------
# C0 and C1 controls and DEL, but not the newline that separates lines.
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def crash_kind(e: BaseException) -> str:
    """Exception type and the innermost frame inside mergeplan (else the innermost frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/mergeplan/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"crash:{type(e).__name__}@{where}"


def through_readers(data: bytes, orig, strict: bool = False) -> dict[str, str]:
    """Run plan file `data` through everything that reads a received plan without inputs:
    decode, check_plan, show (text, with --tensors), show --json, diff against `orig` (a
    Plan) both ways. Returns stage -> "ok" | "refused" (a MergeplanError) | "problems"
    (validate listed some) | "control-chars" (raw controls in the output) | crash kind.
    `strict` raises instead of returning a crash or control characters, for tests."""
    from rich.console import Console

    from mergeplan.errors import MergeplanError
    from mergeplan.plan.codec import decode_plan
    from mergeplan.plan.diff import diff_plans
    from mergeplan.report import plan_json, print_diff, print_plan
    from mergeplan.validate import check_plan

    out: dict[str, str] = {}

    def stage(name: str, fn: Callable[[io.StringIO], str | None]) -> None:
        buf = io.StringIO()
        try:
            rendered = (fn(buf) or "") + buf.getvalue()
        except MergeplanError:
            out[name] = "refused"
            return
        except Exception as e:  # noqa: BLE001 - every other exception is a bug to count
            if strict:
                raise
            out[name] = crash_kind(e)
            return
        bad = CONTROL.search(rendered)
        if bad and strict:
            raise AssertionError(f"{name}: control character {bad.group()!r} in output: "
                                 f"{rendered[max(0, bad.start() - 60):bad.end() + 20]!r}")
        out[name] = "control-chars" if bad else "ok"

    def console(buf: io.StringIO) -> Console:
        return Console(file=buf, width=120, highlight=False, color_system=None)

    plan = None

    def decode(buf):
        nonlocal plan
        plan = decode_plan(data)

    stage("decode", decode)
    if plan is None:
        return out

    def validate(buf):
        problems = check_plan(plan)
        out["validate-result"] = "problems" if problems else "clean"
        return "\n".join(problems)

    stage("validate", validate)
    stage("show", lambda buf: print_plan(console(buf), plan, "fuzz.plan", tensors=True))
    stage("show-json", lambda buf: json.dumps(plan_json(plan), indent=2, sort_keys=True))
    stage("diff", lambda buf: print_diff(console(buf), diff_plans(orig, plan), "a.plan", "b.plan"))
    stage("diff-rev", lambda buf: print_diff(console(buf), diff_plans(plan, orig), "b.plan", "a.plan"))
    return out
