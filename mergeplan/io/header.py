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

import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass

from mergeplan.errors import MergeplanError
from mergeplan.io.stdtypes import ST_DTYPE_RANK, ST_ITEMSIZE

# Same cap as the safetensors crate: a larger header is refused there too.
MAX_HEADER_SIZE = 100_000_000
_PREFIX = struct.Struct("<Q")
_U64_MAX = (1 << 64) - 1

# Every header is treated as hostile. What read_header checks, next to the safetensors crate
# (safetensors/src/tensor.rs: `read_metadata`, `Metadata::validate`, checked against 0.8 and
# its main branch of 2026-05), which it is at least as strict as:
#   * as the crate: length cap, UTF-8, JSON as serde_json reads it (no NaN/Infinity, no
#     number out of f64 range, no lone surrogate escape, -0 is a float), `__metadata__` a
#     map of strings (or null), each entry a known dtype, shape and data_offsets of u64
#     ints, no overflow in elements x dtype bits, end - begin equal to that size, and the
#     entries, sorted by (begin, end), tiling the data region: the first begins at 0, each
#     begins where the one before ends (no gap, no overlap), and the last ends at the end
#     of the file (the crate's MetadataIncompleteBuffer: no trailing bytes);
#   * stricter than the crate, as the format spec (its README.md, "Format") asks or because
#     no writer produces it: the JSON must start with '{' (the spec's MUST; the crate lets
#     leading whitespace through since 2026-04); a repeated key anywhere is refused (the
#     spec disallows duplicates; the crate keeps the last of two tensor entries or metadata
#     keys); numbers of more than 20 digits are refused wherever they are; the JSON may only
#     nest as deep as a real header does: top-level object -> entry objects -> flat arrays
#     of at most _MAX_ARRAY scalars (the crate ignores unknown entry fields holding any
#     JSON, nested up to serde_json's depth of 128); an object below the top level has at
#     most _MAX_MEMBERS members; dtypes mergeplan cannot read (F4, F6_*) are refused.
# The nesting, array and member bounds keep memory proportional to what a valid header
# needs: json builds every value of an entry before read_header sees it, so a 90 MB header of
# `[[],[],...]` or `{"a":1,"b":1,...}` would otherwise take gigabytes. They are checked
# on a skeleton of the raw bytes (structural characters outside strings) before any parsing.
_MAX_ARRAY = 64  # numpy's limit on dimensions too; model tensors have a handful
_MAX_MEMBERS = 4096
_MAX_DIGITS = 20  # 2**64 - 1 has 20 digits


@dataclass(frozen=True, slots=True)  # slots: a near-cap header holds about a million of these
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the first data byte, as in "data_offsets"
    end: int


@dataclass(frozen=True)
class ParsedHeader:
    sha256: str  # hex digest of the 8-byte length prefix plus the JSON, exactly as on disk
    header_len: int  # those bytes' count: 8 + N
    metadata: dict[str, str] | None
    entries: dict[str, HeaderEntry]
    file_size: int

    @property
    def data_start(self) -> int:
        return self.header_len


def _corrupt(path: os.PathLike | str, what: str) -> MergeplanError:
    return MergeplanError(
        f"corrupt safetensors file {path}: {what}; re-download or re-save this shard"
    )


class _Refuse(Exception):
    """A problem found while parsing; read_header words it as a MergeplanError for the file."""


def _q(x: object) -> str:
    """repr for a message: hostile names can be megabytes long, and repr escapes newlines."""
    r = repr(x)
    return r if len(r) <= 120 else r[:100] + f"...({len(r)} chars)"


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
        # O_NONBLOCK: opening a FIFO planted in place of a shard would otherwise wait forever
        # for a writer; it changes nothing for the reads of a regular file.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except OSError as e:
        raise MergeplanError(f"cannot open safetensors file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MergeplanError(
                f"safetensors file {path} is not a regular file; refusing to read it"
            )
        size = st.st_size
        if size < _PREFIX.size:
            raise _corrupt(path, f"only {size} bytes, too short for a header")
        prefix = _pread_exact(fd, _PREFIX.size, 0)
        if len(prefix) != _PREFIX.size:
            raise _corrupt(path, "the file shrank while its header was read")
        (n,) = _PREFIX.unpack(prefix)
        if n > MAX_HEADER_SIZE:
            raise _corrupt(path, f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit")
        if _PREFIX.size + n > size:
            raise _corrupt(path, f"header length {n} does not fit the file size {size}")
        raw = _pread_exact(fd, n, _PREFIX.size)
    except OSError as e:  # EIO, ...: still one line naming the file
        raise MergeplanError(f"cannot read safetensors file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) != n:
        raise _corrupt(path, "the file shrank while its header was read")
    digest = hashlib.sha256(prefix)
    digest.update(raw)

    if raw[:1] != b"{":
        raise _corrupt(path, "header JSON does not start with '{'")
    try:
        check_ints = _prescan(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Refuse(f"header is not valid UTF-8 (byte {e.start} of the JSON)") from None
        # The JSON now exists twice (bytes and str); drop the bytes before the parse builds
        # its objects, so the peak holds one copy.
        del raw
        metadata, entries = _Parser(check_ints).parse(text)
        del text
        _check_layout(entries, size - _PREFIX.size - n)
    except _Refuse as e:
        raise _corrupt(path, str(e)) from None
    except _Unsupported as e:
        name, dtype = e.args
        raise MergeplanError(
            f"tensor {_q(name)} in {path} has dtype {_q(dtype)}, which mergeplan cannot read "
            f"(supported: {', '.join(sorted(ST_ITEMSIZE))})"
        ) from None
    return ParsedHeader(digest.hexdigest(), _PREFIX.size + n, metadata, entries, size)


# ---- pre-scan: bound nesting, array length and object size before parsing ---------------

_NOT_STRUCTURAL = bytes(c for c in range(256) if c not in b'"{}[],:')
_DIGIT_MARK = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))  # digit -> '0'
# An array whose elements are not all scalars (a non-comma before its ']') or that has more
# than _MAX_ARRAY elements. Linear: one attempt per '[', each scanning that array's commas.
_BAD_ARRAY = re.compile(rb"\[(?:,{0,%d}[^,\]]|,{%d})" % (_MAX_ARRAY - 1, _MAX_ARRAY))
_BIG_OBJECT = re.compile(rb"\{[^{}]{%d}" % (_MAX_MEMBERS + 1))
_HIGH = rb"\\u[dD][89abAB][0-9a-fA-F]{2}"
_LOW = rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE = re.compile(rb"%s(?!%s)|(?<!%s)%s" % (_HIGH, _LOW, _HIGH, _LOW))
_CHUNK = 1 << 20


def _prescan(raw: bytes) -> bool:
    """Refuse JSON nested or sized beyond what a safetensors header holds; C-speed passes only.

    Works on the skeleton: the structural characters outside strings. Where the skeleton
    and json disagree about what is inside a string, json fails with a syntax error at the
    first such byte, so whatever it builds before that is bounded by these checks too.
    Also refuses lone surrogate escapes anywhere, as serde_json does. Returns whether the
    parse must look at each int: a run of more than _MAX_DIGITS digits exists (Python's
    int() is quadratic in the digits, and raises ValueError past 4300), or a "-0" (serde
    reads -0 as a float, which no shape or offset may be).
    """
    check_ints = b"-0" in raw or _has_long_digit_run(raw)
    # Replace escaped backslashes, then escaped quotes, by two spaces: every '"' left
    # delimits a string and every '\' left starts an escape, and the characters on each
    # side of a replaced escape stay apart. bytes.replace copies even when nothing
    # matches, hence the `in` tests.
    if b"\\\\" in raw:
        raw = raw.replace(b"\\\\", b"  ")
    if b'\\"' in raw:
        raw = raw.replace(b'\\"', b"  ")
    if b"\\u" in raw:
        m = _LONE_SURROGATE.search(raw)
        if m:
            raise _Refuse(
                f"header JSON has a lone UTF-16 surrogate escape {m.group().decode()} (no "
                "UTF-8 text can hold it)"
            )
    skel = raw.translate(None, _NOT_STRUCTURAL)
    # In the skeleton a string is '"' ... '"' around the structural characters it held. Two
    # adjacent quotes close one string and open the next, or wrap nothing structural:
    # dropping them keeps every other character's inside/outside parity.
    if b'""' in skel:
        skel = skel.replace(b'""', b"")
    if b'"' in skel:
        skel = _strip_strings(skel)
    if _BAD_ARRAY.search(skel):
        raise _Refuse(
            f"header JSON has a nested array or one of more than {_MAX_ARRAY} elements "
            "(a safetensors header only holds flat shape and offset lists)"
        )
    skel = skel.translate(None, b"[],")  # now one ':' per object member
    if _BIG_OBJECT.search(skel):
        raise _Refuse(f"header JSON has an object of more than {_MAX_MEMBERS} members")
    braces = skel.translate(None, b":")
    # The only shape allowed: '{' + '{}' * k + '}' (top level, then one object per entry).
    k = len(braces) // 2 - 1
    if not (
        len(braces) % 2 == 0 and braces[:1] == b"{" and braces[-1:] == b"}"
        and braces.count(b"{}", 1, len(braces) - 1) == k
    ):
        raise _Refuse(
            "header JSON is nested deeper than a safetensors header (objects inside tensor "
            "entries), or its brackets do not balance"
        )
    return check_ints


def _has_long_digit_run(raw: bytes) -> bool:
    """Whether some run of digits (in a number or a string) is longer than _MAX_DIGITS.

    A chunk at a time, overlapping by _MAX_DIGITS, so the mapped copy stays small.
    """
    run = b"0" * (_MAX_DIGITS + 1)
    for i in range(0, len(raw), _CHUNK):
        if run in raw[i:i + _CHUNK + _MAX_DIGITS].translate(_DIGIT_MARK):
            return True
    return False


def _strip_strings(skel: bytes) -> bytes:
    """Remove the strings that hold structural characters, a chunk at a time.

    Splitting at '"' leaves strings at every other piece; per chunk, so the list of pieces
    stays small (over the whole skeleton it could be tens of millions of objects).
    """
    out = []
    inside = False
    for i in range(0, len(skel), _CHUNK):
        pieces = skel[i:i + _CHUNK].split(b'"')
        out.append(b"".join(pieces[1 if inside else 0::2]))
        if len(pieces) % 2 == 0:  # an odd number of quotes in this chunk
            inside = not inside
    return b"".join(out)


# ---- parse -------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = frozenset(" \t\n\r")
_DTYPES = {d: d for d in ST_ITEMSIZE}  # one str object per dtype, shared by all entries
_SHAPE_CACHE_MAX = 4096


class _Unsupported(Exception):
    """(name, dtype): a well-formed entry of a dtype mergeplan cannot read."""


class _BadDtype(str):
    """A reason from _Parser.entry that is the dtype itself: unsupported, not corrupt."""


class _Parser:
    """Walks the top-level object by hand and lets json parse one entry object at a time.

    By hand, so that a bad entry stops the parse at once, names its tensor, and never
    piles up: json.loads would build every value first. Each entry object becomes a
    HeaderEntry inside json's object_pairs_hook, so its dict and lists are freed at once.
    """

    def __init__(self, check_ints: bool) -> None:
        self.shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.last_end: int = 0
        self.decoder = json.JSONDecoder(
            object_pairs_hook=self.object,
            # The int hook costs a Python call per number: only used when _prescan saw a
            # long run of digits or a "-0" somewhere.
            parse_int=self.parse_int if check_ints else None,
            parse_float=self.parse_float,  # floats: none in a valid header
            parse_constant=self.constant,
        )

    @staticmethod
    def parse_int(s: str) -> int | float:
        if len(s) - s.startswith("-") > _MAX_DIGITS:
            raise _Refuse(f"header JSON has a number of {len(s)} digits")
        # serde_json reads -0 as a float: refused as a dim or offset, fine elsewhere.
        return -0.0 if s == "-0" else int(s)

    @staticmethod
    def parse_float(s: str) -> float:
        v = float(s)
        if v in (math.inf, -math.inf):  # serde_json: "number out of range"
            raise _Refuse(f"header JSON has a number out of range ({_q(s)})")
        return v

    @staticmethod
    def constant(name: str) -> object:
        raise _Refuse(f"header JSON has {name}, which JSON does not allow")

    def object(self, pairs: list[tuple[str, object]]) -> object:
        if len(pairs) == 3:  # the layout every writer uses
            (k0, dtype), (k1, shape), (k2, offsets) = pairs
            if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":
                e = self.entry(dtype, shape, offsets)
                if type(e) is HeaderEntry:
                    return e
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    raise _Refuse(f"key {_q(k)} appears twice in one object")
                seen.add(k)
        e = self.entry(d.get("dtype"), d.get("shape"), d.get("data_offsets"))
        # Not a valid entry: the dict goes back as is (it may be __metadata__); the
        # top-level walk refuses it, asking entry() for the reason.
        return e if type(e) is HeaderEntry else d

    def entry(self, dtype: object, shape: object, offsets: object) -> HeaderEntry | str:
        """The HeaderEntry, or why these fields are not one (a reason without the name)."""
        if type(dtype) is not str:
            return "has no dtype" if dtype is None else f"has a malformed dtype {_q(dtype)}"
        itemsize = ST_ITEMSIZE.get(dtype)
        if itemsize is None:
            return _BadDtype(dtype)
        if type(shape) is not list:
            return f"has a malformed shape {_q(shape)}"
        if not (type(offsets) is list and len(offsets) == 2):
            return f"has malformed data_offsets {_q(offsets)}"
        begin, end = offsets
        # `type(x) is int` leaves out bool (JSON true/false).
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= _U64_MAX):
            return f"has malformed data_offsets {_q(offsets)}"
        count = 1
        for d in shape:
            # Each dim must fit u64 on its own (serde refuses it otherwise), even if a
            # 0 elsewhere would make the product small.
            if type(d) is not int or not 0 <= d <= _U64_MAX:
                return f"has a malformed shape {_q(shape)}"
            count *= d
            if count > _U64_MAX:  # where the crate's checked_mul overflows
                return f"has a shape {_q(shape)} whose element count overflows 64 bits"
        if count * itemsize * 8 > _U64_MAX:  # the crate counts bits
            return f"has a shape {_q(shape)} whose size overflows 64 bits"
        if end - begin != count * itemsize:
            return (f"spans {end - begin} bytes but {dtype}{_q(shape)} needs "
                    f"{count * itemsize}")
        key = tuple(shape)
        shape_t = self.shapes.get(key)
        if shape_t is None:
            shape_t = key
            if len(self.shapes) < _SHAPE_CACHE_MAX:
                self.shapes[key] = key
        if begin == self.last_end:
            begin = self.last_end  # share the int object with the previous entry's end
        self.last_end = end
        return HeaderEntry(_DTYPES[dtype], shape_t, begin, end)

    def parse(self, text: str) -> tuple[dict[str, str] | None, dict[str, HeaderEntry]]:
        scanstring = json.decoder.scanstring
        # The C scanner behind JSONDecoder.raw_decode, without raw_decode's Python frame.
        scan_once = self.decoder.scan_once
        ws = _WS.match

        def expected(what: str, pos: int) -> _Refuse:
            return _Refuse(f"header JSON is malformed: expected {what} at char {pos}")

        entries: dict[str, HeaderEntry] = {}
        metadata = None
        seen_metadata = False
        pos = 1  # read_header checked the '{'
        if text[pos:pos + 1] in _WS_CHARS:
            pos = ws(text, pos).end()
        if text.startswith("}", pos):
            pos += 1
        else:
            while True:
                if not text.startswith('"', pos):
                    raise expected("a tensor name", pos)
                try:
                    name, pos = scanstring(text, pos + 1, True)
                except ValueError as e:  # JSONDecodeError: unterminated, bad escape, ...
                    raise _Refuse(f"header is not valid JSON ({e})") from None
                if text[pos:pos + 1] in _WS_CHARS:
                    pos = ws(text, pos).end()
                if not text.startswith(":", pos):
                    raise expected("':'", pos)
                pos += 1
                if text[pos:pos + 1] in _WS_CHARS:
                    pos = ws(text, pos).end()
                if name == "__metadata__":
                    if seen_metadata:
                        raise _Refuse("key '__metadata__' appears twice")
                    seen_metadata = True
                    if text.startswith("null", pos):
                        pos += 4
                    else:
                        if text.startswith("{", pos):
                            metadata, pos = self.value(scan_once, text, pos, name)
                        if not (type(metadata) is dict
                                and all(type(v) is str for v in metadata.values())):
                            raise _Refuse("__metadata__ is not a map of strings")
                else:
                    if name in entries:
                        raise _Refuse(f"tensor {_q(name)} appears twice in the header")
                    if not text.startswith("{", pos):
                        raise _Refuse(f"entry for tensor {_q(name)} is not an object")
                    e, pos = self.value(scan_once, text, pos, name)
                    if type(e) is not HeaderEntry:
                        reason = self.entry(e.get("dtype"), e.get("shape"), e.get("data_offsets"))
                        if isinstance(reason, _BadDtype):
                            raise _Unsupported(name, str(reason))
                        raise _Refuse(f"tensor {_q(name)} {reason}")
                    entries[name] = e
                if text[pos:pos + 1] in _WS_CHARS:
                    pos = ws(text, pos).end()
                if text.startswith(",", pos):
                    pos += 1
                    if text[pos:pos + 1] in _WS_CHARS:
                        pos = ws(text, pos).end()
                elif text.startswith("}", pos):
                    pos += 1
                    break
                else:
                    raise expected("',' or '}'", pos)
        if ws(text, pos).end() != len(text):
            raise _Refuse(f"header JSON has data after its end, at char {pos}")
        return metadata, entries

    @staticmethod
    def value(scan_once, text: str, pos: int, name: str) -> tuple[object, int]:
        try:
            return scan_once(text, pos)
        except StopIteration:  # no value at pos; only called at a '{', kept for safety
            raise _Refuse(f"header JSON is malformed: expected a value at char {pos}") from None
        except _Refuse as e:
            raise _Refuse(f"in {_q(name)}: {e}") from None
        except RecursionError:  # the pre-scan bounds nesting to 3; kept as a last guard
            raise _Refuse("header JSON is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError; int() past sys.get_int_max_str_digits()
            raise _Refuse(f"header is not valid JSON ({e})") from None


def _check_layout(entries: dict[str, HeaderEntry], data_size: int) -> None:
    """Entries sorted by (begin, end) must tile [0, data_size] exactly, as the crate requires."""
    # Writers lay the data out in header order, so try that order first; only a header in
    # another order pays for sorting (by name, not by copying the entries).
    end, last, in_order = 0, None, True
    for name, e in entries.items():
        if e.begin != end:
            in_order = False
            break
        end, last = e.end, name
    if not in_order:
        order = list(entries)
        order.sort(key=lambda n: entries[n].end)  # two stable sorts: by (begin, end)
        order.sort(key=lambda n: entries[n].begin)
        end, last = 0, None
        for name in order:
            e = entries[name]
            if e.begin != end:
                span = f"tensor {_q(name)} data_offsets [{e.begin}, {e.end}]"
                if e.begin > end:
                    after = f"tensor {_q(last)}" if last is not None else "the data start"
                    raise _Refuse(f"{span} leave {e.begin - end} unused bytes after {after}")
                raise _Refuse(f"{span} overlap tensor {_q(last)}, which ends at {end}")
            end, last = e.end, name
    if end > data_size:
        e = entries[last]
        raise _Refuse(
            f"tensor {_q(last)} data_offsets [{e.begin}, {e.end}] fall outside the "
            f"{data_size} data bytes (truncated file?)"
        )
    if end < data_size:
        raise _Refuse(
            f"the tensors cover {end} data bytes but the file holds {data_size} after the "
            "header (trailing bytes?)"
        )


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
