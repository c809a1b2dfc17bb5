"""Shard planning and the streaming shard writer, checked against safetensors and huggingface_hub."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from mergeplan.errors import MergeplanError
from mergeplan.io.modeldir import ModelDir
from mergeplan.io.shards import plan_shards
from mergeplan.io.writer import ShardWriter, write_index

ST_NAME = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64", torch.uint16: "U16",
    torch.uint32: "U32", torch.uint64: "U64",
}


def mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    shapes = [(3, 4), (5,), (2, 3, 2), (1,), (7, 1)]
    for i, dt in enumerate(ST_NAME):
        base = torch.randn(*shapes[i % len(shapes)], generator=g) * 4
        if dt == torch.bool:
            t = base > 0
        elif dt.is_floating_point or dt.is_complex:
            t = base.to(dt)
        else:
            t = base.abs().to(torch.int64).to(dt)
        out[f"layer.{i}.{str(dt).split('.')[-1]}"] = t
    # Names that stress ordering and JSON escaping, plus scalar and empty tensors.
    out["Zeta"] = torch.randn(2, generator=g)
    out["alpha"] = torch.randn(2, generator=g)
    out["naïve.wéight"] = torch.randn(3, generator=g).to(torch.bfloat16)
    out['quote"back\\slash\ttab'] = torch.randn(1, generator=g)
    out["scalar"] = torch.tensor(1.25)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    return out


def entries(tensors: dict[str, torch.Tensor]):
    return [(k, ST_NAME[v.dtype], tuple(v.shape)) for k, v in tensors.items()]


def write_all(out: Path, tensors, max_shard_size="5GB", order=None, threads=1):
    layouts = plan_shards(entries(tensors), max_shard_size)
    for lay in layouts:
        names = [t.name for t in lay.tensors]
        if order == "reverse":
            names.reverse()
        elif order == "shuffle":
            random.Random(7).shuffle(names)
        with ShardWriter(out / lay.file, lay) as w:
            if threads > 1:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda n: w.write(n, tensors[n]), names))
            else:
                for n in names:
                    w.write(n, tensors[n])
    write_index(out, layouts)
    return layouts


# ---- byte identity -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_single_shard_is_byte_identical_to_save_file(tmp_path, order):
    tensors = mixed()
    layouts = write_all(tmp_path, tensors, order=order)
    assert [lay.file for lay in layouts] == ["model.safetensors"]
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_header_is_padded_and_metadata_is_exactly_format_pt(tmp_path):
    tensors = mixed(1)
    write_all(tmp_path, tensors)
    data = (tmp_path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0
    with safe_open(tmp_path / "model.safetensors", framework="pt") as sf:
        assert sf.metadata() == {"format": "pt"}
        assert sorted(sf.keys()) == sorted(tensors)


def test_threaded_out_of_order_sharded_writes(tmp_path):
    tensors = mixed(2)
    layouts = write_all(tmp_path, tensors, max_shard_size=48, order="reverse", threads=4)
    assert len(layouts) > 2
    # Every shard equals save_file of exactly its tensors.
    for lay in layouts:
        part = {t.name: tensors[t.name] for t in lay.tensors}
        ref = tmp_path / f"ref-{lay.file}"
        save_file(part, ref, metadata={"format": "pt"})
        assert (tmp_path / lay.file).read_bytes() == ref.read_bytes(), lay.file
        assert (tmp_path / lay.file).stat().st_size == lay.size
    # And the directory reads back through ModelDir (index included).
    m = ModelDir.open(tmp_path)
    assert m.tensor_names() == sorted(tensors)
    for k, v in tensors.items():
        got = m.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_index_json_like_transformers(tmp_path):
    tensors = mixed(3)
    layouts = write_all(tmp_path, tensors, max_shard_size=64)
    text = (tmp_path / "model.safetensors.index.json").read_text()
    expected = {
        "metadata": {
            "total_parameters": sum(v.numel() for v in tensors.values()),
            "total_size": sum(v.numel() * v.element_size() for v in tensors.values()),
        },
        "weight_map": {},
    }
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            expected["weight_map"].update({k: f.name for k in sf.keys()})
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    extra = write_index(tmp_path, layouts, {"mergeplan_plan_digest": "abc"})
    assert json.loads(extra.read_text())["metadata"]["mergeplan_plan_digest"] == "abc"


# ---- shard planning ------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [1, 40, 100, "1KB", "5GB"])
def test_plan_shards_matches_huggingface_hub_torch_split(max_size):
    tensors = mixed(4)
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_size
    )
    layouts = plan_shards(entries(tensors), max_size)
    assert {lay.file: sorted(t.name for t in lay.tensors) for lay in layouts} == {
        f: sorted(names) for f, names in split.filename_to_tensors.items()
    }
    assert [lay.file for lay in layouts] == list(split.filename_to_tensors)


def test_plan_shards_naming_and_oversized_tensor():
    big = ("big", "F32", (100,))  # 400 bytes, over the limit: a shard of its own
    layouts = plan_shards([("a", "F32", (10,)), big, ("b", "F32", (10,))], 100)
    # huggingface_hub flushes an oversized tensor as its own shard at once and keeps
    # filling the open one, so "a" and "b" end up together after it.
    assert [lay.file for lay in layouts] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]
    assert [[t.name for t in lay.tensors] for lay in layouts] == [["big"], ["a", "b"]]
    only = plan_shards([big], "5GB")
    assert [lay.file for lay in only] == ["model.safetensors"]
    slot = only[0].slot("big")
    assert slot.start == len(only[0].header) and slot.end == only[0].size == slot.start + 400


def test_plan_shards_rejects_bad_input():
    with pytest.raises(MergeplanError, match="empty"):
        plan_shards([])
    with pytest.raises(MergeplanError, match="listed twice"):
        plan_shards([("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(MergeplanError, match="max_shard_size"):
        plan_shards([("a", "F32", (1,))], "lots")
    with pytest.raises(MergeplanError, match="not supported"):
        plan_shards([("a", "F4", (2,))])


# ---- writer misuse and failures ------------------------------------------------------


def _one_layout():
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    [lay] = plan_shards(entries(tensors))
    return tensors, lay


def test_close_with_unwritten_tensor_fails(tmp_path):
    tensors, lay = _one_layout()
    w = ShardWriter(tmp_path / lay.file, lay)
    w.write("w", tensors["w"])
    with pytest.raises(MergeplanError, match=r"1 tensor\(s\) unwritten \(first: 'b'\)"):
        w.close()


def test_write_checks_name_dtype_shape_and_duplicates(tmp_path):
    tensors, lay = _one_layout()
    with ShardWriter(tmp_path / lay.file, lay) as w:
        with pytest.raises(MergeplanError, match="does not belong"):
            w.write("zz", tensors["w"])
        with pytest.raises(MergeplanError, match=r"is BF16\[2, 3\], the layout expects F32\[2, 3\]"):
            w.write("w", tensors["w"].bfloat16())
        with pytest.raises(MergeplanError, match="expects F32"):
            w.write("w", tensors["w"].reshape(3, 2))
        w.write("w", tensors["w"].t().contiguous().t())  # non-contiguous input is fine
        w.write("b", tensors["b"])
        with pytest.raises(MergeplanError, match="written twice"):
            w.write("b", tensors["b"])
    with safe_open(tmp_path / lay.file, framework="pt") as sf:
        assert torch.equal(sf.get_tensor("w"), tensors["w"])


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_tensor(tmp_path, monkeypatch):
    tensors, lay = _one_layout()
    w = ShardWriter(tmp_path / lay.file, lay)
    monkeypatch.setattr(os, "pwrite", _enospc)
    with pytest.raises(MergeplanError) as ei:
        w.write("w", tensors["w"])
    msg = str(ei.value)
    assert "disk full" in msg and "24 bytes" in msg and str(tmp_path / lay.file) in msg
    w.abort()
    # The partial file stays; apply writes into a temp dir and deletes it on error.
    assert (tmp_path / lay.file).exists()


@pytest.mark.parametrize("fallocate", ["enospc", "unsupported", "absent"])
def test_disk_full_when_sizing_the_shard(tmp_path, monkeypatch, fallocate):
    tensors, lay = _one_layout()
    if fallocate == "enospc":
        monkeypatch.setattr(os, "posix_fallocate", _enospc)
    else:
        if fallocate == "unsupported":
            def unsupported(*a):
                raise OSError(errno.EOPNOTSUPP, "not supported")
            monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
        else:
            monkeypatch.delattr(os, "posix_fallocate", raising=False)
        monkeypatch.setattr(os, "ftruncate", _enospc)
    with pytest.raises(MergeplanError, match=f"disk full: .* needs {lay.size} bytes in .*{lay.file}"):
        ShardWriter(tmp_path / lay.file, lay)


def test_disk_full_on_the_header(tmp_path, monkeypatch):
    _, lay = _one_layout()
    monkeypatch.setattr(os, "pwrite", _enospc)
    with pytest.raises(MergeplanError, match=f"disk full: the header needs {len(lay.header)} bytes"):
        ShardWriter(tmp_path / lay.file, lay)


def test_ftruncate_fallback_still_byte_identical(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    tensors = mixed(5)
    write_all(tmp_path, tensors, order="shuffle")
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_memory_sink_keeps_copies_and_checks_what_it_is_given():
    from mergeplan.io.writer import MemorySink

    sink = MemorySink([("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))])
    buf = torch.arange(6, dtype=torch.float32)
    sink.write("a", buf.view(2, 3))
    buf.zero_()  # the engine reuses its output buffer for the next tensor
    with pytest.raises(MergeplanError, match="not one of the plan's tensors"):
        sink.write("c", torch.zeros(1))
    with pytest.raises(MergeplanError, match="expects torch.bfloat16"):
        sink.write("b", torch.zeros(4))
    with pytest.raises(MergeplanError, match="merged twice"):
        sink.write("a", torch.zeros(2, 3))
    with pytest.raises(MergeplanError, match="1 tensor\\(s\\) were not merged"):
        sink.close()
    sink.write("b", torch.ones(4, dtype=torch.bfloat16))
    got = sink.close()
    assert list(got) == ["a", "b"] and torch.equal(got["a"], torch.arange(6.0).view(2, 3))
