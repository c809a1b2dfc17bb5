"""Canonical encoding in pieces (plan/canonical.py) against msgpack packing the whole value:
the bytes, the digest and the body check must be exactly what packing whole gives,
whatever the arrays' sizes, dtypes and layouts, and whatever the strings hold."""

from __future__ import annotations

import hashlib
import struct

import msgpack
import numpy as np
import pytest

from mergeplan.errors import PlanFormatError
from mergeplan.plan import canonical, decode_plan, encode_plan, plan_digest
from mergeplan.plan.codec import decode_plan_with_digest, plan_to_dict
from plan_factory import make_full_plan
from plan_mutate import resign, split


def whole(obj) -> bytes:
    """The reference: msgpack packs everything, arrays as one ext record each."""
    return msgpack.packb(canonical.canon(obj), default=canonical.default, use_bin_type=True)


def _arrays(rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for dt in sorted(canonical.ARRAY_DTYPES):
        for shape in [(), (0,), (1,), (3,), (2, 5), (7,), (64,), (250,), (4, 4, 4)]:
            a = (rng.random(shape) * 100).astype(np.dtype(dt)) if dt != "|b1" else rng.random(shape) > 0.5
            out.append(a)
    # Layouts the codec must normalise: strided views, big-endian, Fortran order.
    big = rng.random((6, 8)).astype(np.float32)
    out += [big[:, ::2], big.T, big.astype(">f4"), np.asfortranarray(big), np.float32(3.5) * np.ones(16390, ">f8")]
    return out


def _value(rng: np.random.Generator):
    arrays = _arrays(rng)
    d = {f"k{i}": a for i, a in enumerate(arrays)}
    d.update({"zeta": "text ü", "alpha": [1, 2.5, None, True, b"\x00\xd8\x7f", {"b": 1, "a": (2, 3)}],
              "nested": {"z": {"y": arrays[3], "x": [arrays[5], np.int64(7), np.float32(0.25)]}}})
    return dict(reversed(list(d.items())))  # unsorted on purpose


@pytest.mark.parametrize("size", [*range(0, 300), *range(65530, 65541), 70000])
def test_ext_frame_is_msgpacks_framing(size):
    packed = msgpack.packb(msgpack.ExtType(1, b"x" * size))
    assert packed == canonical.ext_frame(size) + b"x" * size


def test_pieces_join_to_the_whole_encoding_and_hash_to_its_digest():
    for seed in range(5):
        obj = _value(np.random.default_rng(seed))
        ref = whole(obj)
        assert canonical.canonical_bytes(obj) == ref
        assert canonical.sha256(obj) == hashlib.sha256(ref).hexdigest()
        assert canonical.encodes_to(obj, ref)


def test_the_whole_plan_encodes_the_same_both_ways():
    d = plan_to_dict(make_full_plan())
    assert canonical.canonical_bytes(d) == whole(d)


def test_a_string_that_imitates_a_placeholder_falls_back_to_packing_whole(monkeypatch):
    """The nonce is random per call; here it is fixed so a string can carry the exact
    placeholder bytes, in the skeleton and overlapping the real ones."""
    nonce = b"N" * 12
    monkeypatch.setattr(canonical.os, "urandom", lambda n: nonce)
    mark = struct.pack(">Bb", 0xD8, 127) + nonce
    a, b = np.arange(5, dtype="<f4"), np.arange(3, dtype="<i8")
    for fake in (mark + struct.pack(">I", 0), mark + struct.pack(">I", 1), mark, mark + mark[:5]):
        for obj in ({"a": a, "s": fake, "z": b}, {"s": fake, "a": a}, {"s": fake.decode("latin-1"), "a": a, "b": b},
                    {"a": a, "b": b, "t": [fake, fake]}):
            ref = whole(obj)
            assert canonical.canonical_bytes(obj) == ref
            assert canonical.sha256(obj) == hashlib.sha256(ref).hexdigest()
            assert canonical.encodes_to(obj, ref)


def test_encodes_to_notices_any_changed_missing_or_extra_byte():
    rng = np.random.default_rng(1)
    obj = {"a": rng.random(1000).astype("<f4"), "b": "name", "c": [rng.random(13), 2.0]}
    ref = whole(obj)
    assert canonical.encodes_to(obj, ref)
    for pos in [*range(0, 40), *rng.integers(0, len(ref), 200), len(ref) - 1]:
        bad = bytearray(ref)
        bad[pos] ^= 1 << int(rng.integers(8))
        assert not canonical.encodes_to(obj, bytes(bad)), pos
    assert not canonical.encodes_to(obj, ref[:-1])
    assert not canonical.encodes_to(obj, ref + b"\x00")
    assert not canonical.encodes_to(obj, b"")


def test_an_array_framed_wider_than_needed_is_not_canonical():
    """ext 32 framing for a small array decodes to the same plan: the reader must refuse it,
    because the check no longer packs the arrays themselves."""
    d = plan_to_dict(make_full_plan())
    ref = canonical.canonical_bytes(d)
    a = next(v for t in d["tensors"] if isinstance((v := (t.get("relax") or {}).get("scores")), np.ndarray))
    head, arr = canonical.array_parts(a)
    rec = canonical.ext_frame(len(head) + arr.nbytes) + head + arr.tobytes()
    assert rec[0] in (0xC7, 0xC8) and ref.count(rec) == 1
    wide = struct.pack(">BIb", 0xC9, len(head) + arr.nbytes, 1) + head + arr.tobytes()
    decode_plan(resign(ref))  # the canonical body reads
    with pytest.raises(PlanFormatError, match="not canonical"):
        decode_plan(resign(ref.replace(rec, wide)))


def _big_plan_file() -> tuple[bytes, bytes]:
    """A plan whose body is over 1 MB, so its digest is taken on a second thread."""
    plan = make_full_plan()
    plan.stats["extra"] = np.arange(400_000, dtype="<f4")
    data = encode_plan(plan)
    return data, split(data)[2]


def test_a_big_body_reads_with_its_digest_checked_beside_the_decoding():
    data, body = _big_plan_file()
    assert len(body) > 1 << 20
    plan, digest = decode_plan_with_digest(data)
    assert digest == plan_digest(plan) == "sha256:" + hashlib.sha256(body).hexdigest()
    # One flipped payload bit decodes fine but must not pass the digest.
    bad = bytearray(body)
    bad[len(body) // 2] ^= 4
    forged = msgpack.packb([*split(data)[:2], bytes(bad), digest], use_bin_type=True)
    with pytest.raises(PlanFormatError, match="digest does not match"):
        decode_plan_with_digest(forged)
    # A body that does not decode and does not match: the digest is named, as before.
    cut = msgpack.packb([*split(data)[:2], body[:-3], digest], use_bin_type=True)
    with pytest.raises(PlanFormatError, match="digest does not match"):
        decode_plan_with_digest(cut)
    # The same truncated body signed anew: now the body itself is what is wrong.
    with pytest.raises(PlanFormatError, match="plan body is corrupt"):
        decode_plan_with_digest(resign(body[:-3]))


def test_an_array_where_a_kind_name_belongs_is_refused_by_name():
    """A mask's or a relaxation's `kind` that is an array made `in` / `!=` raise numpy's
    ValueError (a traceback) instead of the one-line refusal."""
    for n in (0, 2):
        d = plan_to_dict(make_full_plan())
        t = next(t for t in d["tensors"] if t["relax"] is not None and t["contributions"][0]["mask"])
        t["contributions"][0]["mask"]["kind"] = np.zeros(n, "<f4")
        with pytest.raises(PlanFormatError, match=r"mask\.kind must be one of"):
            decode_plan(resign(canonical.canonical_bytes(d)))
        d = plan_to_dict(make_full_plan())
        t = next(t for t in d["tensors"] if t["relax"] is not None)
        t["relax"]["kind"] = np.zeros(n, "<f4")
        with pytest.raises(PlanFormatError, match=r"relax\.kind must be \"aim\""):
            decode_plan(resign(canonical.canonical_bytes(d)))


def test_a_wrong_digest_is_named_first_whatever_the_decoding_raises(monkeypatch):
    data, body = _big_plan_file()
    forged = msgpack.packb([*split(data)[:2], body, "sha256:" + "0" * 64], use_bin_type=True)

    def boom(*a, **k):
        raise ValueError("a bug in a check")

    monkeypatch.setattr("mergeplan.plan.codec.plan_from_dict", boom)
    with pytest.raises(PlanFormatError, match="digest does not match"):
        decode_plan_with_digest(forged)
    with pytest.raises(ValueError, match="a bug in a check"):  # a matching digest: the bug shows
        decode_plan_with_digest(data)


def test_a_buffer_that_can_change_is_read_from_a_copy():
    data, _ = _big_plan_file()
    want = plan_digest(decode_plan(data))
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        plan, digest = decode_plan_with_digest(buf)
        assert digest == plan_digest(plan) == want
    buf = bytearray(data)
    buf[-3] ^= 1  # the recorded digest's last characters
    with pytest.raises(PlanFormatError, match="digest does not match"):
        decode_plan_with_digest(buf)
    buf.extend(b"x")  # no view of it is left behind (BufferError when one is)


def test_bits_that_do_not_fit_the_shape_are_not_unpacked_to_its_size():
    """A crafted plan's 1 byte of mask bits on a 2^30-element tensor made show and the
    review allocate gigabytes (the size came from the shape); such bits are not read."""
    import time

    from mergeplan.plan import Contribution, TensorPlan
    from mergeplan.plan import view

    t = TensorPlan("model.layers.0.mlp.up_proj.weight", (32768, 32768), "bfloat16",
                   contributions=[Contribution("m", 1.0, {"kind": "magnitude", "density": 0.5, "bits": b"\xff"})])
    t0 = time.perf_counter()
    assert view.mask_bits(t.contributions[0].mask, view.numel(t)) is None
    assert view.kept(t, t.contributions[0]).how != "exact"
    assert time.perf_counter() - t0 < 1
    ok = TensorPlan("x.weight", (3, 3), "float32",
                    contributions=[Contribution("m", 1.0, {"kind": "magnitude", "density": 0.5, "bits": b"\xf0\x00"})])
    assert view.kept(ok, ok.contributions[0]).value == 4 / 9


def test_a_vocabulary_record_without_rows_is_a_problem_not_a_crash():
    from mergeplan.plan.rows import record_problem

    assert record_problem((10, 4), {"source": "union", "rows": {}}, []) is not None
