"""Bad input: one clear line, non-zero exit, nothing half-written, no input touched."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import assert_one_line_error, family_recipe, run_cli, write_recipe


def copy_family(fam, dst: Path) -> dict[str, Path]:
    out = {}
    for name, src in [("base", fam.base), *fam.finetunes.items()]:
        shutil.copytree(src, dst / name)
        out[name] = dst / name
    return out


def ties_recipe(tmp_path: Path, models: dict[str, Path], extra: str = "") -> Path:
    return family_recipe(tmp_path / "r.yaml", "ties", models["base"],
                         {models["math"]: "weight: 1.0, density: 0.5", models["code"]: "weight: 1.0, density: 0.5"},
                         extra)


def shard_of(model_dir: Path, tensor: str) -> Path:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][tensor]


def rewrite_tensor(model_dir: Path, tensor: str, fn) -> None:
    shard = shard_of(model_dir, tensor)
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.fixture
def fam(tiny_family, tmp_path):
    return copy_family(tiny_family, tmp_path / "fam")


def plan_ok(capsys, tmp_path, recipe) -> Path:
    code, _, err = run_cli(capsys, "plan", recipe, "-o", tmp_path / "p.plan", "-q")
    assert code == 0, err
    return tmp_path / "p.plan"


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "mergeplan-" in p.name or p.name.startswith(".out"))


def test_missing_model_dir(fam, tmp_path, capsys):
    shutil.rmtree(fam["code"])
    code, _, err = run_cli(capsys, "plan", ties_recipe(tmp_path, fam), "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, "code")
    assert not (tmp_path / "p.plan").exists()


def test_missing_shard(fam, tmp_path, capsys):
    shard_of(fam["math"], "lm_head.weight").unlink()
    code, _, err = run_cli(capsys, "plan", ties_recipe(tmp_path, fam), "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, "math")


def test_tensor_missing_in_one_model(fam, tmp_path, capsys):
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensor(fam["code"], name, lambda t: t.pop(name))
    idx = fam["code"] / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    del data["weight_map"][name]
    idx.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "plan", ties_recipe(tmp_path, fam), "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, name, "code")


def test_shape_mismatch(fam, tmp_path, capsys):
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_tensor(fam["math"], name, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    code, _, err = run_cli(capsys, "plan", ties_recipe(tmp_path, fam), "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, name, "shape")


def test_dtype_mismatch(fam, tmp_path, capsys):
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_tensor(fam["math"], name, lambda t: t.__setitem__(name, t[name].half()))
    code, _, err = run_cli(capsys, "plan", ties_recipe(tmp_path, fam), "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, name)


def test_pickle_weights_are_refused_never_loaded(fam, tmp_path, capsys, monkeypatch):
    for f in fam["legal"].glob("*.safetensors*"):
        f.unlink()
    (fam["legal"] / "pytorch_model.bin").write_bytes(b"not a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    r = write_recipe(tmp_path / "r.yaml", f"""
        merge_method: task_arithmetic
        base_model: {fam['base']}
        models:
          - model: {fam['legal']}
            parameters: {{weight: 1.0}}
    """)
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, "pytorch_model.bin")


@pytest.mark.parametrize("damage", ["truncate", "newer", "garbage"])
def test_bad_plan_files(fam, tmp_path, capsys, damage):
    plan = plan_ok(capsys, tmp_path, ties_recipe(tmp_path, fam))
    data = plan.read_bytes()
    if damage == "truncate":
        plan.write_bytes(data[: len(data) // 2])
    elif damage == "newer":
        outer = msgpack.unpackb(data)
        outer[1] += 1
        plan.write_bytes(msgpack.packb(outer))
    else:
        plan.write_bytes(b"\x00" * 64)
    for cmd in (["apply", plan, tmp_path / "out"], ["show", plan], ["validate", plan]):
        code, _, err = run_cli(capsys, *cmd)
        assert_one_line_error(code, err, str(plan))
        if damage == "newer":
            assert "newer" in err
    assert not (tmp_path / "out").exists()


def test_density_outside_range(fam, tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yaml", f"""
        merge_method: ties
        base_model: {fam['base']}
        models:
          - model: {fam['math']}
            parameters: {{weight: 1.0, density: 1.5}}
    """)
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, "density")
    assert "r.yaml:" in err


def test_weights_summing_to_zero_with_normalize(fam, tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yaml", f"""
        merge_method: linear
        models:
          - model: {fam['math']}
            parameters: {{weight: 0.5}}
          - model: {fam['code']}
            parameters: {{weight: -0.5}}
        parameters: {{normalize: true}}
    """)
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, "weight")


def test_nan_in_inputs_named(fam, tmp_path, capsys):
    name = "model.layers.1.self_attn.v_proj.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][0, 0] = float("nan")

    rewrite_tensor(fam["code"], name, poison)
    code, _, err = run_cli(capsys, "plan", ties_recipe(tmp_path, fam), "-o", tmp_path / "p.plan")
    assert_one_line_error(code, err, name, "NaN")


def test_changed_inputs_are_caught_before_writing(fam, tmp_path, capsys):
    plan = plan_ok(capsys, tmp_path, ties_recipe(tmp_path, fam))
    name = "model.layers.0.mlp.gate_proj.weight"
    rewrite_tensor(fam["math"], name, lambda t: t.__setitem__(name, t[name] * 1.5))
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "--full-verify")
    assert_one_line_error(code, err, "math")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # validate --inputs --full says the same
    code, _, err = run_cli(capsys, "validate", plan, "--inputs", "--full")
    assert_one_line_error(code, err, "math")


def test_output_exists_needs_force(fam, tmp_path, capsys):
    plan = plan_ok(capsys, tmp_path, ties_recipe(tmp_path, fam))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "apply", plan, out)
    assert_one_line_error(code, err, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only a previous mergeplan output, never a directory of the user's
    code, _, err = run_cli(capsys, "apply", plan, out, "--force", "-q")
    assert_one_line_error(code, err, "not a mergeplan output")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    code, _, err = run_cli(capsys, "apply", plan, out, "-q")
    assert code == 0, err
    (out / "stale.txt").write_text("from the first run")
    code, _, err = run_cli(capsys, "apply", plan, out, "--force", "-q")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_output_inside_an_input_is_refused(fam, tmp_path, capsys):
    plan = plan_ok(capsys, tmp_path, ties_recipe(tmp_path, fam))
    before = sorted(p.name for p in fam["base"].iterdir())
    code, _, err = run_cli(capsys, "apply", plan, fam["base"] / "merged")
    assert_one_line_error(code, err, "overlaps")
    assert sorted(p.name for p in fam["base"].iterdir()) == before


def test_disk_full_during_apply_leaves_nothing(fam, tmp_path, capsys, monkeypatch):
    plan = plan_ok(capsys, tmp_path, ties_recipe(tmp_path, fam))
    import os

    from mergeplan.io import writer

    calls = {"n": 0}
    real = os.pwrite

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out")
    assert_one_line_error(code, err, "disk full")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
