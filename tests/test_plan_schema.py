"""The strict plan reader: what it refuses (with the field's path), what it keeps."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest

from mergeplan.errors import PlanFormatError
from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, decode_plan, encode_plan, plan_digest
from mergeplan.plan import schema
from mergeplan.plan.codec import _pack_array, canonical_bytes, plan_to_dict
from plan_factory import make_full_plan
from plan_mutate import resign, split


def body() -> dict:
    """The full plan as the plain dict the codec packs: edit it, then sign() it."""
    return plan_to_dict(make_full_plan())


def sign(d: dict, version: int | None = None) -> bytes:
    return resign(canonical_bytes(d), version=version)


def refused(d: dict) -> str:
    with pytest.raises(PlanFormatError) as e:
        decode_plan(sign(d))
    msg = str(e.value)
    assert "\n" not in msg and "corrupt or hostile" in msg
    return msg


def test_schema_names_every_dataclass_field():
    # A field added to a dataclass but not to plan/schema.py would make every plan unreadable.
    for cls, fields in ((Plan, schema.PLAN), (ModelRef, schema.MODEL), (TensorPlan, schema.TENSOR),
                        (Contribution, schema.CONTRIBUTION)):
        assert {f.name for f in dataclasses.fields(cls)} == set(fields), cls.__name__


def test_schema_constants_match_the_kernels():
    # plan/ stays free of torch, so the mask kinds are spelt twice; they must agree.
    from mergeplan.methods.spec import KINDS

    assert schema.MASK_KINDS == KINDS


def test_full_plan_round_trips_and_file_digest_is_plan_digest():
    data = encode_plan(make_full_plan())
    plan = decode_plan(data)
    assert encode_plan(plan) == data
    assert msgpack.unpackb(data)[3] == plan_digest(plan)


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize("path, value, needle", [
    (("tensors", 1, "contributions", 0, "weight"), "1.0", "tensors[1].contributions[0].weight must be a number"),
    (("tensors", 1, "contributions", 0, "weight"), True, "weight must be a number"),
    (("tensors", 1, "shape"), [-1, 64], "tensors[1].shape[0] must be a non-negative integer"),
    (("tensors", 1, "shape"), [2**30, 2**30], "more than 2**48 elements"),
    (("tensors", 1, "shape"), [1] * 17, "at most 16 sizes"),
    (("tensors", 1, "shape"), "64x64", "tensors[1].shape must be a list"),
    (("models", 1, "id"), "math\x1b[2J", "models[1].id contains control characters"),
    (("models", 1, "id"), "", "models[1].id must be a non-empty string"),
    (("models", 1, "id"), "m" * 2000, "at most 1024 characters"),
    (("models", 1, "path"), 7, "models[1].path must be a string"),
    (("tensors", 2, "name"), "a\nb", "tensors[2].name contains control characters"),
    (("tensors", 1, "contributions", 0, "mask", "kind"), "nope", "mask.kind must be one of"),
    (("tensors", 1, "contributions", 0, "mask"), [1, 2], "tensors[1].contributions[0].mask must be a map or nil"),
    (("tensors", 1, "contributions", 1, "mask", "digest"), "XYZ", "mask.digest must be 32 lowercase hex"),
    (("tensors", 1, "contributions", 1, "mask", "cutoff"), [1, 2, 3], "cutoff must be [threshold, index]"),
    (("tensors", 2, "contributions", 0, "mask", "n"), 2.0, "contributions[0].mask.n must be an integer"),
    (("tensors", 1, "relax", "kind"), "other", "tensors[1].relax.kind must be \"aim\""),
    (("tensors", 1, "relax", "scores"), np.ones(64), "relax.scores must be a 1-d array of <f4"),
    (("tensors", 1, "relax", "scores"), np.ones((8, 8), np.float32), "relax.scores must be a 1-d array"),
    (("tensors", 1, "relax", "axis"), 99, "relax.axis is 99, outside"),
    (("tensors", 1, "params", "lambda"), "1", "tensors[1].params.lambda must be a number"),
    (("tensors", 2, "params", "cabs_order"), [0, "1"], "cabs_order[1] must be an integer"),
    (("tensors", 1, "stats", "kept"), {"math": "all"}, "stats.kept.math must be a number"),
    (("models", 0, "fingerprint", "shards"), {}, "fingerprint.shards must be a list"),
    (("models", 0, "fingerprint", "shards", 0, "size"), -5, "shards[0].size is -5, outside"),
    (("models", 0, "fingerprint", "tensors", 0), ["a", "BF16"], "tensors[0] must be [name, dtype, shape]"),
    (("models", 0, "fingerprint", "tensor_blake3"), b"\0" * 31, "one 32-byte digest per entry"),
    (("models", 0, "fingerprint", "files"), [["config.json", 3]], "fingerprint.files[0] must be a map"),
    (("models", 1, "hub"), {"repo": "org/x"}, "models[1].hub lacks the key 'revision'"),
    (("models", 1, "hub"), {"repo": "org/x", "revision": 5}, "hub.revision must be a string"),
    (("seed",), -1, "seed is -1, outside"),
    (("seed",), "7", "seed must be an integer"),
    (("max_shard_size",), 0, "max_shard_size is 0, outside"),
    (("notes",), "one note", "notes must be a list"),
    (("guides", "aim"), "on", "guides.aim must be a map"),
    (("stats", "sens", "sigma", "math"), [0.1, 0.2], "stats.sens.sigma.math must be a typed array"),
    (("edit_log", 0, "changes"), "all", "edit_log[0].changes must be a list"),
])
def test_refused_with_the_field_path(path, value, needle):
    d = body()
    _set(d, path, value)
    assert needle in refused(d)


def test_unknown_and_missing_fields():
    d = body()
    d["zz_future"] = 1
    assert "zz_future is not a field this mergeplan knows" in refused(d)
    d = body()
    d["tensors"][3]["colour"] = "red"
    assert "tensors[3].colour is not a field" in refused(d)
    d = body()
    del d["notes"]
    assert "plan body lacks the field 'notes'" in refused(d)
    d = body()
    del d["tensors"][1]["contributions"][0]["source"]
    assert "tensors[1].contributions[0] lacks the field 'source'" in refused(d)
    d = body()
    d["models"][1]["[/bold]\x1b"] = 1
    msg = refused(d)
    assert "\x1b" not in msg and "'[/bold]\\x1b'" in msg  # odd keys are quoted, never raw


def test_free_form_maps_keep_unknown_keys_but_bound_nesting():
    d = body()
    d["params"]["future_switch"] = {"a": [1, 2.5, None, b"x", "y"]}
    d["tensors"][1]["contributions"][0]["mask"]["note"] = "kept as is"
    plan = decode_plan(sign(d))
    assert plan.params["future_switch"]["a"][1] == 2.5
    deep: object = 1
    for _ in range(schema.MAX_DEPTH + 1):
        deep = [deep]
    d["params"]["deep"] = deep
    assert "params.deep" in refused(d) and "nested more than" in refused(d)
    d = msgpack.unpackb(canonical_bytes(body()), ext_hook=msgpack.ExtType)
    d["calibration"] = {b"raw": 1}
    with pytest.raises(PlanFormatError, match="calibration has a bytes key"):
        decode_plan(resign(msgpack.packb(d, use_bin_type=True)))


def test_fingerprint_accepts_new_optional_keys():
    d = body()
    fp = d["models"][0]["fingerprint"]
    fp["tensor_blake3"] = bytes(range(32)) * len(fp["tensors"])
    fp["files"] = [{"file": "config.json", "size": 12, "sha256": "ab" * 32}]
    fp["future"] = {"anything": [1, 2]}
    plan = decode_plan(sign(d))
    assert plan.models[0].fingerprint["files"][0]["size"] == 12
    assert plan.models[0].fingerprint["future"] == {"anything": [1, 2]}


def test_hub_is_optional_and_written_only_when_set():
    plan = make_full_plan()
    plan.models[1].hub = {"repo": "org/math-7b", "revision": "0" * 40}
    data = encode_plan(plan)
    back = decode_plan(data)
    assert back.models[1].hub == plan.models[1].hub and back.models[0].hub is None
    models = msgpack.unpackb(split(data)[2])["models"]
    assert "hub" not in models[0] and "hub" in models[1]
    # A v1 plan (written before the field existed) reads, and keeps its digest.
    d = body()
    v1 = sign(d, version=1)
    assert plan_digest(decode_plan(v1)) == msgpack.unpackb(v1)[3]
    # hub: nil spelt out is another encoding of the same plan: not canonical.
    d["models"][1]["hub"] = None
    with pytest.raises(PlanFormatError, match="not canonical"):
        decode_plan(sign(d))


def test_numbers_keep_their_type():
    d = body()
    d["tensors"][1]["contributions"][0]["weight"] = 2  # an int weight stays an int
    plan = decode_plan(sign(d))
    assert type(plan.tensors[1].contributions[0].weight) is int
    d["tensors"][1]["contributions"][0]["weight"] = math.nan  # read; check_plan flags it
    assert math.isnan(decode_plan(sign(d)).tensors[1].contributions[0].weight)


def test_non_canonical_bodies_are_refused():
    d = body()
    packed = canonical_bytes(d)
    unsorted = msgpack.packb(dict(reversed(list(msgpack.unpackb(packed).items()))), use_bin_type=True)
    with pytest.raises(PlanFormatError, match="not canonical"):
        decode_plan(resign(unsorted))
    # The same plan with float32 numbers: equal values, other bytes.
    single = msgpack.packb(msgpack.unpackb(packed, ext_hook=msgpack.ExtType), use_bin_type=True, use_single_float=True)
    with pytest.raises(PlanFormatError, match="not canonical"):
        decode_plan(resign(single))


def _ext(dt: str, shape: tuple, payload: bytes, code: int = 1) -> msgpack.ExtType:
    head = bytes([len(dt)]) + dt.encode() + bytes([len(shape)]) + b"".join(n.to_bytes(8, "little") for n in shape)
    return msgpack.ExtType(code, head + payload)


@pytest.mark.parametrize("ext, needle", [
    (_ext("<f4", (3,), b"\0" * 8), "does not match its 8 bytes"),
    (_ext(">f4", (2,), b"\0" * 8), "unsupported dtype '>f4'"),
    (_ext("O", (1,), b"\0" * 8), "unsupported dtype"),
    (_ext("<f4", (2**40, 2**40), b""), "does not match"),
    (_ext("<f4", (1,) * 20, b"\0" * 4), "malformed shape"),
    (_ext("|b1", (2,), b"\x01\x02"), "booleans holds bytes other than 0 and 1"),
    (_ext("<f4", (1,), b"\0" * 4, code=5), "unknown msgpack extension type 5"),
    (msgpack.ExtType(1, b""), "unsupported dtype"),
])
def test_malformed_typed_arrays(ext, needle):
    d = msgpack.unpackb(canonical_bytes(body()), ext_hook=msgpack.ExtType)
    d["stats"]["extra"] = ext
    with pytest.raises(PlanFormatError, match="typed array") as e:
        decode_plan(resign(msgpack.packb(d, use_bin_type=True)))
    assert needle in str(e.value)


def test_deep_nesting_in_bytes_is_refused():
    with pytest.raises(PlanFormatError, match="corrupt"):
        decode_plan(resign(b"\x91" * 5000 + b"\xc0"))


def test_boolean_envelope_version_is_refused():
    name, _, body_bytes = split(encode_plan(make_full_plan()))
    with pytest.raises(PlanFormatError, match="no integer format version"):
        decode_plan(resign(body_bytes, version=True))


def test_arrays_round_trip_through_the_checked_unpacker():
    for a in (np.zeros((0, 3), np.float32), np.arange(6, dtype="<i8").reshape(2, 3), np.array([True, False])):
        d = body()
        d["stats"]["a"] = a
        back = decode_plan(sign(d)).stats["a"]
        assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    assert _pack_array(np.ones(2, "<f4")).code == 1
