"""`diff`, `show` and `review` as a user at an 80-column terminal (or a pipe) meets them:
the diff summary fits the width it is given, `show` never prints a statistic an edit made
stale, -h and flags work on every command, and the review's check of the inputs reads
shard headers without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from cli_helpers import run_cli
from mergeplan.plan import PlanEditor, write_plan
from plan_factory import make_plan

COMMANDS = ("plan", "apply", "show", "validate", "diff", "review")


def _edited_pair(tmp_path):
    a, b = tmp_path / "a.plan", tmp_path / "b.plan"
    plan = make_plan(layers=6)
    for t in plan.tensors:  # what the planner records: kept fractions and the masks' overlap
        if t.contributions and t.contributions[0].mask:
            t.stats.update({"kept": {c.model: c.density for c in t.contributions}, "overlap": 0.125})
    write_plan(plan, a)
    ed = PlanEditor(plan)
    ed.scale(ed.select(layers=range(0, 4), field="density", vectors=False), "density", 0.5)
    ed.set(ed.select(layers=[5], field="weight"), "weight", 0.75)
    ed.save(str(b))
    return a, b


def _diff(a, b, *args, env_columns=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    if env_columns:
        env["COLUMNS"] = str(env_columns)
    r = subprocess.run([sys.executable, "-m", "mergeplan.cli", "diff", str(a), str(b), *args],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    return r.stdout


def test_diff_summary_fits_the_pipe_width_and_names_layers_and_fields(tmp_path):
    a, b = _edited_pair(tmp_path)
    for columns, width in ((None, 80), (60, 60), (120, 120)):
        out = _diff(a, b, env_columns=columns)
        lines = out.splitlines()
        assert max(len(line) for line in lines[1:]) <= width, (columns, out)
        # layers 0-3 had 7 projections x 2 models halved (density) and their digests dropped
        row = next(line for line in lines if line.startswith("L0-3 "))
        assert row.split()[1:] == ["·", *["4"] * (len(row.split()) - 2)]
        dens = next(line for line in lines if line.startswith("density "))
        assert dens.split()[1:3] == ["56", "28"]  # 28 tensors x 2 models
        assert "model.layers" not in out  # the tensor list is behind --tensors
    out = _diff(a, b, "--tensors")
    assert "model.layers.3.mlp.down_proj.weight\n  math  density: " in out
    assert "model.layers.4." not in out
    # Merged layer ranges say their counts are per layer; digests the edit dropped are
    # recomputed by apply, and say so (they read "-" or "none" before).
    out = _diff(a, b, "--tensors")
    assert "changed values per layer and component (L0-3: in each of those layers)" in out
    assert "mask.digest     56      28  8 different -> at apply" in out
    assert "  math  mask.digest: 000000000000 -> at apply" in out


def test_show_marks_stale_kept_and_overlap_at_apply(tmp_path, capsys):
    _, b = _edited_pair(tmp_path)
    code, out, err = run_cli(capsys, "show", b)
    assert code == 0, err
    kept = out[out.index("kept per layer"):]
    assert "at apply" in kept.splitlines()[4]  # layer 0: the masks were edited
    code, out, _ = run_cli(capsys, "show", b, "--json")
    data = json.loads(out)
    layers = {r["layer"]: r for r in data["layers"]}
    assert layers[0]["kept:math"] is None and "kept:math" in layers[0]["at_apply"] and layers[0]["overlap"] is None
    # layer 4 was not edited: the planner's kept fractions hold (mean of the recorded values)
    recorded = [t for t in make_plan(layers=6).tensors if ".layers.4." in t.name and t.contributions[0].mask]
    assert layers[4]["kept:math"] == np.mean([t.contribution("math").density for t in recorded])
    t = next(t for t in data["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    assert t["stats"]["kept"] == {"math": None, "code": None} and t["stats"]["overlap"] is None


def test_every_command_takes_h_and_flags_print_as_flags(capsys):
    from mergeplan.cli import app

    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert set(COMMANDS) <= set(commands) and {"eval", "pick"} <= set(commands)
    for cmd in commands:
        code, out, _ = run_cli(capsys, cmd, "-h")
        assert code == 0 and "Usage" in out and "-h, --help" in out, cmd
        # A boolean option is a flag: no value to type, no --no-X twin (`--force / --no-force`).
        assert "<bool>" not in out and "BOOLEAN" not in out and " / --no-" not in out, (cmd, out)
        # Arguments are named in capitals, as the README writes them (it printed {out_dir}).
        usage = out.split("Usage:", 1)[1].splitlines()[0]
        args = usage.split("[OPTIONS]", 1)[1]
        assert args == args.upper(), (cmd, usage)
    code, out, _ = run_cli(capsys, "show", "-h")
    assert "--json " in out and "--tensors " in out


PROBE = """
import sys
from mergeplan_tui.fingerprint import make_checker
from mergeplan.plan.codec import read_plan
plan = read_plan(sys.argv[1])
print(make_checker(plan, sys.argv[1])(plan.models[0]))
print(",".join(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules))
"""


def test_review_model_check_reads_headers_without_torch(tmp_path):
    from safetensors.numpy import save_file

    from mergeplan.io.modeldir import ModelDir

    d = tmp_path / "base"
    d.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": np.ones((4, 4), dtype=np.float32)}, str(d / "model.safetensors"))
    plan = make_plan(layers=1)
    with ModelDir.open(d, name="base") as md:
        plan.models[0].fingerprint = md.fingerprint()
    write_plan(plan, tmp_path / "p.plan")
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "p.plan")], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 0, r.stderr
    status, heavy = r.stdout.split("\n")[:2]
    assert status == "found" and heavy == "", r.stdout


def test_show_prints_the_digest_read_with_the_plan(tmp_path, capsys):
    from mergeplan.plan.codec import plan_digest, read_plan_with_digest

    a, _ = _edited_pair(tmp_path)
    plan, digest = read_plan_with_digest(a)
    assert digest == plan_digest(plan)  # checked while decoding: no need to re-encode
    code, out, _ = run_cli(capsys, "show", a, "--json")
    assert json.loads(out)["digest"] == digest


def test_show_prints_a_deep_models_layers_as_plain_columns_with_every_value(tmp_path, capsys):
    """Over 200 cells a per-layer table is aligned plain text (Rich takes ~0.1 ms a cell:
    50 ms of a 70B plan's `show`); a shallow model keeps the boxed table. Both carry the
    layer summary's values, every layer on its own line."""
    from mergeplan.report import layer_summary

    for layers, boxed in ((4, True), (80, False)):
        path = tmp_path / f"p{layers}.plan"
        plan = make_plan(layers=layers, models=("math", "code"))
        write_plan(plan, path)
        code, out, _ = run_cli(capsys, "show", path)
        part = out[out.index("density per layer"):out.index("weight per layer")].splitlines()
        assert code == 0 and ("┃ layer" in part[2]) == boxed and ("│" in "".join(part)) == boxed
        lines = [ln for ln in part if ln.startswith("│")] if boxed else part[2:]
        body = [ln.replace("│", " ").split() for ln in lines]
        want = [[str(r["layer"]), f"{r['density:math']:.4g}", f"{r['density:code']:.4g}"] for r in layer_summary(plan)]
        assert len(want) == layers + 1  # and the row of tensors outside the layers
        assert body == want
        if not boxed:
            assert part[1].split() == ["layer", "math", "code"]
            assert len({len(ln) for ln in part[2:]}) == 1  # right-aligned columns: equal widths


def test_diff_says_which_part_of_a_models_fingerprint_differs(tmp_path):
    """It printed `fingerprint: differs -> differs`; now one row per differing part, with
    its size and a short hash on each side."""
    a, b = tmp_path / "a.plan", tmp_path / "b.plan"
    pa, pb = make_plan(layers=2), make_plan(layers=2)
    pa.models[1].fingerprint = {"shards": [{"file": "m.safetensors", "size": 10}], "tensor_sha256": b"\1" * 64}
    pb.models[1].fingerprint = {"shards": [{"file": "m.safetensors", "size": 10}], "tensor_sha256": b"\2" * 64}
    write_plan(pa, a)
    write_plan(pb, b)
    out = _diff(a, b)
    line = next(ln for ln in out.splitlines() if "fingerprint" in ln)
    assert line.startswith("model math  fingerprint.tensor_sha256: 64 bytes ") and "differs" not in out
    old, new = line.split(": ", 1)[1].split(" -> ")
    assert old != new and new.startswith("64 bytes ")
    assert "fingerprint.shards" not in out  # the same on both sides
