"""ModelDir: opening HF safetensors dirs, reading tensors, fingerprints, refusals; locate."""

from __future__ import annotations

import builtins
import fnmatch
import hashlib
import io
import json
import os
import pickle
import struct
import threading
from pathlib import Path

import msgpack
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergeplan.errors import InputMismatchError, MergeplanError
from mergeplan.io import locate
from mergeplan.io.modeldir import ModelDir
from mergeplan.io.tensors import (
    ST_ITEMSIZE, ST_TO_TORCH, TORCH_TO_ST, itemsize, nbytes, recipe_to_torch, st_to_torch,
    torch_to_recipe,
)


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "model.embed_tokens.weight": rnd(11, 6).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": rnd(6, 6).to(torch.float16),
        "model.layers.0.mlp.up_proj.weight": rnd(5, 6),
        "model.layers.0.input_layernorm.weight": rnd(6).double(),
        "model.layers.1.mlp.down_proj.weight": rnd(6, 5).to(torch.bfloat16),
        "model.norm.weight": rnd(6).to(torch.bfloat16),
        "lm_head.weight": rnd(11, 6).to(torch.bfloat16),
        "pos_ids": torch.arange(7, dtype=torch.int64),
        "i32": torch.randint(-5, 5, (3, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-5, 5, (4,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-5, 5, (2, 2), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "f8": rnd(3, 4).to(torch.float8_e4m3fn),
        "f8b": rnd(2).to(torch.float8_e5m2),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 3),
    }


def write_single(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text("{}")
    return d


def write_sharded(d: Path, tensors: dict[str, torch.Tensor], n: int = 3, index: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, d / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    if index:
        idx = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    (d / "config.json").write_text("{}")
    return d


def raw_bytes(t: torch.Tensor) -> bytes:
    """Stored bytes of a tensor, derived through numpy rather than the reader's torch views."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def reference_read(d: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor via safetensors.safe_open, with its shard file name."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                out[k] = (sf.get_tensor(k), f.name)
    return out


@pytest.fixture(params=["single", "sharded", "indexless"])
def model(request, tmp_path):
    tensors = mixed_tensors()
    if request.param == "single":
        return write_single(tmp_path / "m", tensors), tensors
    return write_sharded(tmp_path / "m", tensors, index=request.param == "sharded"), tensors


# ---- reading -------------------------------------------------------------------------


def test_tensor_table_and_reads_match_safe_open(model):
    d, tensors = model
    ref = reference_read(d)
    m = ModelDir.open(d)
    assert m.tensor_names() == sorted(ref) == sorted(tensors)
    assert m.name == "m" and m.path == d.resolve()
    raw_files = {f.name: f.read_bytes() for f in d.glob("*.safetensors")}
    for name, (want, file) in ref.items():
        info = m.info(name)
        assert info.file == file
        assert info.dtype == TORCH_TO_ST[want.dtype]
        assert info.shape == tuple(want.shape)
        # start/end are absolute offsets: the bytes there are the tensor's bytes.
        assert raw_files[file][info.start:info.end] == raw_bytes(want)
        got = m.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert raw_bytes(got) == raw_bytes(want) == raw_bytes(tensors[name])
        assert name in m
    assert "nope" not in m
    with pytest.raises(MergeplanError, match="no tensor 'nope'"):
        m.info("nope")


def test_read_returns_an_owning_tensor_of_its_own_size(tmp_path):
    d = write_single(tmp_path / "m", mixed_tensors())
    m = ModelDir.open(d)
    t = m.read("lm_head.weight")
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    before = (d / "model.safetensors").read_bytes()
    t.add_(1)  # writable, and not backed by the file
    assert (d / "model.safetensors").read_bytes() == before
    assert raw_bytes(m.read("lm_head.weight")) == raw_bytes(mixed_tensors()["lm_head.weight"])


def test_read_moves_to_the_requested_device(tmp_path):
    d = write_single(tmp_path / "m", mixed_tensors())
    m = ModelDir.open(d)
    assert m.read("model.norm.weight", device="meta").device.type == "meta"
    assert m.read("model.norm.weight", device=torch.device("cpu")).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_read_onto_cuda(tmp_path):
    tensors = mixed_tensors()
    m = ModelDir.open(write_single(tmp_path / "m", tensors))
    got = m.read("lm_head.weight", device=torch.device("cuda"))
    assert got.is_cuda and torch.equal(got.cpu(), tensors["lm_head.weight"])


def test_concurrent_reads_from_many_threads(tmp_path):
    tensors = mixed_tensors(3)
    d = write_sharded(tmp_path / "m", tensors, n=2)
    m = ModelDir.open(d)
    names = list(tensors) * 6
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(len(names)):
            name = names[(i + offset) % len(names)]
            if raw_bytes(m.read(name)) != raw_bytes(tensors[name]):
                errors.append(name)

    threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    m.close()
    assert raw_bytes(m.read("i8")) == raw_bytes(tensors["i8"])  # reopens lazily after close


def test_truncated_after_open_is_a_clear_error(tmp_path):
    d = write_single(tmp_path / "m", mixed_tensors())
    m = ModelDir.open(d)
    last = max(m.tensor_names(), key=lambda n: m.info(n).end)
    os.truncate(d / "model.safetensors", m.info(last).start + 1)
    with pytest.raises(MergeplanError, match="ended while reading"):
        m.read(last)


# ---- directory shapes and refusals ---------------------------------------------------


class _OpenSpy:
    """Fails the test if anything opens a pickle checkpoint, by any route."""

    def __init__(self, monkeypatch):
        self.touched: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def check(p):
            if str(p).endswith((".bin", ".pt", ".pth")):
                self.touched.append(str(p))
                raise AssertionError(f"pickle file opened: {p}")

        def spy_open(file, *a, **k):
            check(file)
            return real_open(file, *a, **k)

        def spy_os_open(path, *a, **k):
            check(path)
            return real_os_open(path, *a, **k)

        def no_unpickle(*a, **k):
            raise AssertionError("unpickling attempted")

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)
        monkeypatch.setattr(os, "open", spy_os_open)
        monkeypatch.setattr(torch, "load", no_unpickle)
        monkeypatch.setattr(pickle, "load", no_unpickle)
        monkeypatch.setattr(pickle, "loads", no_unpickle)


def test_pickle_only_dir_is_refused_without_opening_it(tmp_path, monkeypatch):
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    spy = _OpenSpy(monkeypatch)
    with pytest.raises(MergeplanError) as ei:
        ModelDir.open(d)
    msg = str(ei.value)
    assert "pytorch_model.bin" in msg and "safetensors only" in msg and str(d) in msg
    assert "\n" not in msg
    assert spy.touched == []


def test_safetensors_preferred_and_pickles_left_alone(tmp_path, monkeypatch):
    d = write_single(tmp_path / "both", mixed_tensors())
    (d / "pytorch_model.bin").write_bytes(b"junk")
    (d / "training_args.bin").write_bytes(b"junk")
    spy = _OpenSpy(monkeypatch)
    m = ModelDir.open(d)
    m.fingerprint(full=True)
    assert m.read("u8").shape == (5,)
    assert spy.touched == []


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "no \\*.safetensors weights"),
        (lambda d: d.write_text("x"), "is a file"),
        (lambda d: (d.mkdir(), (d / "adapter_model.safetensors").write_bytes(b"x")), "PEFT adapter"),
    ],
    ids=["missing", "empty", "file", "adapter"],
)
def test_unusable_dirs_give_one_clear_line(tmp_path, setup, pattern):
    d = tmp_path / "m"
    setup(d)
    with pytest.raises(MergeplanError, match=pattern) as ei:
        ModelDir.open(d)
    assert str(d) in str(ei.value) and "\n" not in str(ei.value)


def test_missing_shard_named_by_index(tmp_path):
    d = write_sharded(tmp_path / "m", mixed_tensors(), n=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MergeplanError, match="model-00002-of-00003.safetensors") as ei:
        ModelDir.open(d)
    assert str(d) in str(ei.value)


def test_empty_or_broken_index(tmp_path):
    d = write_sharded(tmp_path / "m", mixed_tensors(), n=2)
    idx = d / "model.safetensors.index.json"
    idx.write_text('{"metadata": {}, "weight_map": {}}')
    with pytest.raises(MergeplanError, match="maps no tensors"):
        ModelDir.open(d)
    idx.write_text('{"metadata": {}}')
    with pytest.raises(MergeplanError, match="not a valid safetensors index"):
        ModelDir.open(d)
    idx.write_text('{"weight_map": {"a": "../elsewhere.safetensors"}}')
    with pytest.raises(MergeplanError, match="not a plain file name"):
        ModelDir.open(d)


def test_index_pointing_at_wrong_shard(tmp_path):
    d = write_sharded(tmp_path / "m", mixed_tensors(), n=2)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    if idx["weight_map"]["lm_head.weight"] == ModelDir.open(d).info("lm_head.weight").file:
        idx["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(MergeplanError, match="lm_head.weight"):
        ModelDir.open(d)


def test_duplicate_tensor_across_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, d / "x.safetensors")
    save_file({"a": torch.ones(2)}, d / "y.safetensors")
    with pytest.raises(MergeplanError, match="'a' appears in both x.safetensors and y.safetensors"):
        ModelDir.open(d)


def _corrupt_cases():
    def short(p):
        p.write_bytes(b"\x01\x02")

    def huge_len(p):
        p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:])

    def bad_json(p):
        b = bytearray(p.read_bytes())
        b[8] = ord("[")
        p.write_bytes(bytes(b))

    def truncated(p):
        p.write_bytes(p.read_bytes()[:-3])

    def wrong_span(p):
        b = p.read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        hdr = json.loads(b[8:8 + n])
        hdr["a"]["shape"] = [3]
        text = json.dumps(hdr).encode()
        text += b" " * (-len(text) % 8)
        p.write_bytes(struct.pack("<Q", len(text)) + text + b[8 + n:])

    return {"short": short, "huge_len": huge_len, "bad_json": bad_json,
            "truncated": truncated, "wrong_span": wrong_span}


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_corrupt_header_names_the_file(tmp_path, case):
    d = tmp_path / "m"
    d.mkdir()
    p = d / "model.safetensors"
    save_file({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)}, p)
    _corrupt_cases()[case](p)
    with pytest.raises(MergeplanError, match="corrupt safetensors file") as ei:
        ModelDir.open(d)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_aux_files(tmp_path):
    d = write_single(tmp_path / "m", {"a": torch.zeros(1)})
    for f in ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "merges.txt", "README.md",
              "training_args.bin"]:
        (d / f).write_text("x")
    assert ModelDir.open(d).aux_files() == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    ]


# ---- fingerprints --------------------------------------------------------------------


def test_fingerprint_is_plain_sorted_and_hashes_the_bytes(model):
    d, tensors = model
    m = ModelDir.open(d)
    fp = m.fingerprint(full=True)
    assert msgpack.unpackb(msgpack.packb(fp)) == fp
    assert fp == ModelDir.open(d, name="other").fingerprint(full=True)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert [s["file"] for s in fp["shards"]] == files
    for s in fp["shards"]:
        data = (d / s["file"]).read_bytes()
        n = int.from_bytes(data[:8], "little")
        assert s["size"] == len(data)
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        assert s["header_sha256"] == hashlib.sha256(data[:8 + n]).hexdigest()
    assert fp["tensors"] == [
        [k, TORCH_TO_ST[tensors[k].dtype], list(tensors[k].shape)] for k in sorted(tensors)
    ]
    fast = m.fingerprint(full=False)
    assert all(s["sha256"] is None for s in fast["shards"])
    assert fast["tensors"] == fp["tensors"]
    m.check_fingerprint(fp, full=True)
    m.check_fingerprint(fast)


def _flip_one_data_byte(m: ModelDir, name: str) -> Path:
    info = m.info(name)
    p = m.path / info.file
    b = bytearray(p.read_bytes())
    b[info.start] ^= 0x01
    p.write_bytes(bytes(b))
    return p


def test_one_changed_byte_caught_by_full_check_only(tmp_path):
    d = write_sharded(tmp_path / "m", mixed_tensors(), n=2)
    m = ModelDir.open(d)
    fp = m.fingerprint(full=True)
    shard = _flip_one_data_byte(m, "model.norm.weight").name
    m2 = ModelDir.open(d)
    m2.check_fingerprint(fp)  # same sizes, same headers: the fast check cannot see it
    with pytest.raises(InputMismatchError) as ei:
        m2.check_fingerprint(fp, full=True)
    msg = str(ei.value)
    assert shard in msg and str(d.resolve()) in msg and "sha256" in msg
    assert m2.fingerprint(full=True) != fp


def test_header_change_caught_by_fast_check(tmp_path):
    tensors = mixed_tensors()
    d = write_single(tmp_path / "m", tensors)
    fp = ModelDir.open(d).fingerprint(full=False)
    # Same tensors, different metadata: only the header hash can tell.
    save_file(tensors, d / "model.safetensors", metadata={"format": "np"})
    with pytest.raises(InputMismatchError, match="model.safetensors header"):
        ModelDir.open(d).check_fingerprint(fp)


def test_tensor_table_changes_are_named(tmp_path):
    tensors = mixed_tensors()
    d = write_single(tmp_path / "m", tensors)
    fp = ModelDir.open(d).fingerprint(full=False)

    changed = dict(tensors, **{"model.norm.weight": torch.zeros(7, dtype=torch.bfloat16)})
    save_file(changed, d / "model.safetensors")
    with pytest.raises(InputMismatchError, match=r"model.norm.weight .*BF16\[7\].*BF16\[6\]"):
        ModelDir.open(d).check_fingerprint(fp)

    fewer = {k: v for k, v in tensors.items() if k != "i8"}
    save_file(fewer, d / "model.safetensors")
    with pytest.raises(InputMismatchError, match="tensor i8 recorded in the plan is missing"):
        ModelDir.open(d).check_fingerprint(fp)


def test_shard_set_and_size_changes(tmp_path):
    tensors = mixed_tensors()
    d = write_sharded(tmp_path / "m", tensors, n=2, index=False)
    fp = ModelDir.open(d).fingerprint(full=False)
    p = d / "model-00002-of-00002.safetensors"
    pristine = p.read_bytes()
    with open(p, "ab") as f:
        f.write(b"\0" * 8)  # trailing bytes: header and table unchanged
    # Like the safetensors crate, bytes no tensor covers are refused when the file opens.
    with pytest.raises(MergeplanError, match="trailing bytes"):
        ModelDir.open(d)
    p.write_bytes(pristine)
    p.rename(d / "renamed.safetensors")
    with pytest.raises(InputMismatchError, match="shard model-00002-of-00002.safetensors recorded"):
        ModelDir.open(d).check_fingerprint(fp)


def test_full_check_needs_recorded_hashes(tmp_path):
    d = write_single(tmp_path / "m", mixed_tensors())
    m = ModelDir.open(d)
    with pytest.raises(MergeplanError, match="no content hash") as ei:
        m.check_fingerprint(m.fingerprint(full=False), full=True)
    assert not isinstance(ei.value, InputMismatchError)
    with pytest.raises(MergeplanError, match="malformed fingerprint"):
        m.check_fingerprint({"shards": 3})


# ---- dtype names ---------------------------------------------------------------------


def test_dtype_tables_agree_with_torch():
    for st, dt in ST_TO_TORCH.items():
        assert torch.empty(0, dtype=dt).element_size() == ST_ITEMSIZE[st] == itemsize(st)
        assert st_to_torch(st) is dt and TORCH_TO_ST[dt] == st
    for must in ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL",
                 "F8_E4M3", "F8_E5M2"]:
        assert must in ST_TO_TORCH
    assert nbytes("BF16", (3, 5)) == 30 and nbytes("F32", ()) == 4 and nbytes("I8", (0, 9)) == 0
    assert recipe_to_torch("bfloat16") is torch.bfloat16
    assert recipe_to_torch(" Float16") is torch.float16
    assert recipe_to_torch("float32") is torch.float32
    assert torch_to_recipe(torch.float16) == "float16"
    with pytest.raises(MergeplanError, match="unknown dtype 'int4'"):
        recipe_to_torch("int4")
    with pytest.raises(MergeplanError):
        itemsize("F4")


# ---- locate --------------------------------------------------------------------------


def test_resolve_local_paths(tmp_path):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    m = write_single(tmp_path / "models" / "base", {"a": torch.zeros(1)})
    assert locate.resolve_model_path("../models/base", recipe_dir) == m.resolve()
    assert locate.resolve_model_path(str(m), Path("/nonexistent")) == m.resolve()
    with pytest.raises(MergeplanError, match="does not exist"):
        locate.resolve_model_path("./models/nothing-here", recipe_dir)
    with pytest.raises(MergeplanError, match="is a file"):
        locate.resolve_model_path("../models/base/config.json", recipe_dir)


def test_resolve_hub_id_downloads_only_what_merging_needs(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    snap = write_single(tmp_path / "cache" / "snap", {"a": torch.zeros(1)})

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert locate.resolve_model_path("org/tiny-model@v1.0", tmp_path) == snap
    repo, rev, patterns = calls[0]
    assert (repo, rev) == ("org/tiny-model", "v1.0")
    assert "*.safetensors" in patterns and "*.json" in patterns
    for pickle_name in ["pytorch_model.bin", "model.pt", "optimizer.pth", "rng_state.pth"]:
        assert not any(fnmatch.fnmatch(pickle_name, p) for p in patterns)


def test_resolve_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MergeplanError, match="could not be fetched from the Hugging Face Hub") as ei:
        locate.resolve_model_path("org/unknown", tmp_path)
    assert "org/unknown" in str(ei.value) and "\n" not in str(ei.value)


def test_read_into_reads_any_byte_range_of_a_tensor(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    a = torch.arange(300, dtype=torch.float32).reshape(3, 100)
    save_file({"z": torch.ones(5), "a": a}, str(d / "model.safetensors"))
    with ModelDir.open(d) as md:
        buf = torch.empty(40 * 4, dtype=torch.uint8)
        md.read_into("a", 130 * 4, buf)
        assert torch.equal(buf.view(torch.float32), a.reshape(-1)[130:170])
        with pytest.raises(ValueError):
            md.read_into("a", 290 * 4, buf)
