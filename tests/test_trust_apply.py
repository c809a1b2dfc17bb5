"""A received plan is untrusted and inputs change: apply proves it merged exactly the inputs
the plan was made from, or writes nothing (issue: shared plans are untrusted input)."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import threading
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, family_recipe, run_cli
from mergeplan.apply import ApplyOptions, apply_plan
from mergeplan.errors import InputMismatchError, MergeplanError
from mergeplan.plan.codec import read_plan, write_plan
from test_bad_input import copy_family, leftovers, shard_of


@pytest.fixture
def fam(tiny_family_bf16, tmp_path):
    return copy_family(tiny_family_bf16, tmp_path / "fam")


def make_plan(capsys, tmp_path, fam, method="ties", params="weight: 1.0, density: 0.5", name="p.plan") -> Path:
    r = family_recipe(tmp_path / f"{name}.yaml", method, fam["base"],
                      {fam["math"]: params, fam["code"]: params})
    code, out, err = run_cli(capsys, "plan", r, "-o", tmp_path / name, "-q")
    assert code == 0, err
    return tmp_path / name


def resign(plan_file: Path, fn) -> Path:
    """Change a decoded plan and write it back with a valid digest, as a hostile sender can."""
    p = read_plan(plan_file)
    fn(p)
    write_plan(p, plan_file)
    return plan_file


def nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert leftovers(out.parent) == []


# ---- paths from a plan or an input ----------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped.txt", "../p.plan", "/etc/passwd", "../../dev/zero", "x/../../y",
                                  "README.md", "model.safetensors"])
def test_aux_files_outside_the_allow_list_are_refused(fam, tmp_path, capsys, name):
    plan = resign(make_plan(capsys, tmp_path, fam), lambda p: p.aux_files.append(name))
    out = tmp_path / "sub" / "out"
    code, _, err = run_cli(capsys, "apply", plan, out, "-q")
    assert_one_line_error(code, err)
    nothing_written(tmp_path, out)
    assert not (tmp_path / "escaped.txt").exists()


def test_symlinked_config_pointing_outside_is_never_copied(fam, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    plan = make_plan(capsys, tmp_path, fam)
    # after planning, the base's config becomes a link out of the directory
    (fam["base"] / "config.json").unlink()
    (fam["base"] / "config.json").symlink_to(secret)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", plan, out, "-q")
    assert_one_line_error(code, err, "outside the model directory")
    nothing_written(tmp_path, out)
    # and at plan time the same link is refused, naming the file
    code, _, err = run_cli(capsys, "plan", tmp_path / "p.plan.yaml", "-o", tmp_path / "q.plan", "-q")
    assert_one_line_error(code, err, "config.json", "outside the model directory")


def test_a_fifo_shard_is_refused_without_hanging(fam, tmp_path, capsys):
    plan = make_plan(capsys, tmp_path, fam)
    shard = shard_of(fam["math"], "model.norm.weight")
    shard.unlink()
    os.mkfifo(shard)
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    assert_one_line_error(code, err, "not a regular file")


# ---- changed inputs -----------------------------------------------------------------------------


def _flip(path: Path, rng: random.Random) -> None:
    b = bytearray(path.read_bytes())
    n = int.from_bytes(b[:8], "little")
    i = rng.randrange(8 + n, len(b))  # data region only: the header check cannot see it
    b[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("method,params", [("ties", "weight: 1.0, density: 0.5"),
                                           ("dare_ties", "weight: 1.0, density: 0.5"),
                                           ("task_arithmetic", "weight: 0.5")])
def test_any_flipped_data_byte_is_caught_by_default_apply_and_validate(fam, tmp_path, capsys, method, params):
    plan = make_plan(capsys, tmp_path, fam, method, params)
    rng = random.Random(7)
    shards = sorted(fam["code"].glob("*.safetensors")) + sorted(fam["base"].glob("*.safetensors"))
    for trial in range(6):
        shard = shards[trial % len(shards)]
        pristine = shard.read_bytes()
        _flip(shard, rng)
        out = tmp_path / f"out{trial}"
        code, _, err = run_cli(capsys, "apply", plan, out, "-q")
        assert_one_line_error(code, err, "differs from the bytes the plan was made from")
        nothing_written(tmp_path, out)
        code, _, err = run_cli(capsys, "validate", plan, "--inputs")
        assert_one_line_error(code, err, "differs")
        shard.write_bytes(pristine)
    code, _, err = run_cli(capsys, "validate", plan, "--inputs")
    assert code == 0, err


def test_retrained_fine_tune_with_the_same_shapes_is_caught(fam, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    plan = make_plan(capsys, tmp_path, fam)
    for shard in fam["math"].glob("*.safetensors"):
        t = load_file(str(shard))
        g = torch.Generator().manual_seed(3)
        t = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in t.items()}
        save_file(t, str(shard), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    assert_one_line_error(code, err, "model math", "differs")
    nothing_written(tmp_path, tmp_path / "out")


def test_changed_copied_file_is_caught(fam, tmp_path, capsys):
    plan = make_plan(capsys, tmp_path, fam)
    cfg = fam["base"] / "config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "extra": 1}', 1))
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    assert_one_line_error(code, err, "config.json", "differs")
    nothing_written(tmp_path, tmp_path / "out")
    code, _, err = run_cli(capsys, "validate", plan, "--inputs")
    assert_one_line_error(code, err, "config.json")


def test_a_copied_file_without_a_recorded_digest_is_refused_by_apply_and_validate(fam, tmp_path, capsys):
    """A re-signed plan that drops a copied file's record: apply and validate --inputs
    refuse it alike (one rule, validate.aux_records)."""
    def drop(p):
        m = p.aux_source
        m.fingerprint["files"] = [f for f in m.fingerprint["files"] if f["file"] != "config.json"]

    plan = resign(make_plan(capsys, tmp_path, fam), drop)
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    assert_one_line_error(code, err, "config.json", "records no digest")
    nothing_written(tmp_path, tmp_path / "out")
    code, _, err = run_cli(capsys, "validate", plan, "--inputs")
    assert_one_line_error(code, err, "config.json", "records no digest")


# ---- apply runs the plan checks first -------------------------------------------------------


def _nan_weight(p):
    p.tensors[3].contributions[0].weight = float("nan")


def _density_zero(p):
    next(c for _, c in p.iter_contributions() if c.mask).mask["density"] = 0.0


def _dup_ids(p):
    p.models[2].id = p.models[1].id


def _unknown_method(p):
    p.method = "ties\nPlan digest: `sha256:forged`"


def _huge_shape(p):
    t = next(t for t in p.tensors if t.name.endswith("down_proj.weight"))
    t.shape = (1 << 20, 1 << 12)


def _other_shape(p):
    t = next(t for t in p.tensors if t.name.endswith("down_proj.weight"))
    t.shape = (t.shape[1], t.shape[0])


@pytest.mark.parametrize("damage,needle", [(_nan_weight, "not finite"), (_density_zero, "density"),
                                           (_dup_ids, "duplicate"), (_unknown_method, "method"),
                                           (_huge_shape, "down_proj"), (_other_shape, "down_proj")])
def test_apply_refuses_what_validate_refuses_before_reading(fam, tmp_path, capsys, monkeypatch, damage, needle):
    plan = resign(make_plan(capsys, tmp_path, fam), damage)
    from mergeplan.io import writer

    monkeypatch.setattr(writer, "ShardWriter", None)  # any output allocation would crash loudly
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    assert_one_line_error(code, err, needle)
    nothing_written(tmp_path, tmp_path / "out")


# ---- OUT_DIR ------------------------------------------------------------------------------------


def test_two_concurrent_applies_one_wins(fam, tmp_path, capsys):
    plan = read_plan(make_plan(capsys, tmp_path, fam))
    out = tmp_path / "out"
    results: list[object] = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            apply_plan(plan, out, ApplyOptions(threads=1))
            results.append("ok")
        except MergeplanError as e:
            results.append(str(e))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1, results
    loser = next(r for r in results if r != "ok")
    assert "another mergeplan apply" in loser or "already exists" in loser
    assert (out / "mergeplan.json").is_file() and leftovers(tmp_path) == []


def test_out_dir_created_during_the_run_is_not_replaced(fam, tmp_path, capsys):
    plan = read_plan(make_plan(capsys, tmp_path, fam))
    out = tmp_path / "out"

    def progress(done, total, _bytes):
        if done == 1:
            out.mkdir()  # e.g. another tool, or a user
            (out / "mine.txt").write_text("keep")

    with pytest.raises(MergeplanError, match="appeared while merging"):
        apply_plan(plan, out, ApplyOptions(progress=progress))
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert leftovers(tmp_path) == ["out"] or leftovers(tmp_path) == []


def test_force_never_replaces_the_plans_directory_or_a_foreign_one(fam, tmp_path, capsys):
    plans = tmp_path / "plans"
    plans.mkdir()
    plan = shutil.copy(make_plan(capsys, tmp_path, fam), plans / "merge.plan")
    (plans / "notes.txt").write_text("mine")
    (plans / "mergeplan.json").write_text("{}")  # even when it looks like an output
    before = sorted(p.name for p in plans.iterdir())
    code, _, err = run_cli(capsys, "apply", plan, plans, "--force", "-q")
    assert_one_line_error(code, err, "holds the plan file")
    assert sorted(p.name for p in plans.iterdir()) == before
    code, _, err = run_cli(capsys, "apply", plan, fam["base"], "--force", "-q")
    assert_one_line_error(code, err, "overlaps input model")


def test_stale_work_dirs_of_a_killed_run_are_removed(fam, tmp_path, capsys):
    plan = make_plan(capsys, tmp_path, fam)
    stale = tmp_path / ".out.mergeplan-dead1234"
    stale.mkdir()
    (stale / ".mergeplan-partial").touch()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    foreign = tmp_path / ".out.mergeplan-notours"
    foreign.mkdir()  # no marker: not ours to delete
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out")
    assert code == 0, err
    assert "removed" in err and ".out.mergeplan-dead1234" in err
    assert not stale.exists() and foreign.exists()


def test_outputs_follow_the_umask(fam, tmp_path, capsys):
    plan = make_plan(capsys, tmp_path, fam)
    old = os.umask(0o002)
    try:
        code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    finally:
        os.umask(old)
    assert code == 0, err
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o664, f.name


def test_plan_refuses_to_overwrite_without_force(fam, tmp_path, capsys):
    plan = make_plan(capsys, tmp_path, fam)
    edited = plan.read_bytes()
    code, _, err = run_cli(capsys, "plan", tmp_path / "p.plan.yaml", "-o", plan, "-q")
    assert_one_line_error(code, err, "already exists", "--force")
    assert plan.read_bytes() == edited
    code, _, err = run_cli(capsys, "plan", tmp_path / "p.plan.yaml", "-o", plan, "-q", "--force")
    assert code == 0, err


# ---- identity and provenance --------------------------------------------------------------------


def test_decision_digest_is_stable_across_replans_and_named_in_the_output(fam, tmp_path, capsys):
    r = family_recipe(tmp_path / "r.yaml", "ties", fam["base"],
                      {fam["math"]: "weight: 1.0, density: 0.5", fam["code"]: "weight: 1.0, density: 0.5"})
    digests = []
    for name in ("a.plan", "b.plan"):
        code, out, err = run_cli(capsys, "plan", r, "-o", tmp_path / name, "-q")
        assert code == 0, err
        digests.append(out.strip())
    assert digests[0] == digests[1] and digests[0].startswith("sha256:")
    code, out, _ = run_cli(capsys, "diff", tmp_path / "a.plan", tmp_path / "b.plan")
    assert code == 0
    code, out, _ = run_cli(capsys, "show", tmp_path / "b.plan", "--json")
    assert json.loads(out)["decision_digest"] == digests[0]
    # a hand edit changes it; the file digests already differ (created time)
    from mergeplan.plan.edit import PlanEditor

    p = read_plan(tmp_path / "b.plan")
    ed = PlanEditor(p)
    ed.set([("model.layers.0.mlp.down_proj.weight", "math")], "density", 0.25)
    from mergeplan.plan.identity import decision_digest

    assert decision_digest(ed.plan) != digests[0]
    # a copy of the inputs elsewhere (other paths as typed) still gives the same digest
    moved = copy_family(type("F", (), {"base": fam["base"], "finetunes": {k: fam[k] for k in ("math", "code", "legal")}}),
                        tmp_path / "elsewhere")
    r2 = family_recipe(tmp_path / "r2.yaml", "ties", moved["base"],
                       {moved["math"]: "weight: 1.0, density: 0.5", moved["code"]: "weight: 1.0, density: 0.5"})
    code, out, err = run_cli(capsys, "plan", r2, "-o", tmp_path / "c.plan", "-q")
    assert code == 0, err
    # the recipe text names other paths, so only that part differs: decisions and inputs are equal
    from mergeplan.plan.codec import canonical_bytes
    from mergeplan.plan.identity import decision_record

    a, c = decision_record(read_plan(tmp_path / "a.plan")), decision_record(read_plan(tmp_path / "c.plan"))
    assert a["recipe_text"] != c["recipe_text"]
    a.pop("recipe_text"), c.pop("recipe_text")
    assert canonical_bytes(a) == canonical_bytes(c)

    code, _, err = run_cli(capsys, "apply", tmp_path / "a.plan", tmp_path / "out", "-q")
    assert code == 0, err
    prov = json.loads((tmp_path / "out" / "mergeplan.json").read_text())
    assert prov["decision_digest"] == digests[0]
    assert prov["edits"]["edited"] is False
    card = (tmp_path / "out" / "README.md").read_text()
    assert digests[0] in card and "Edited by hand after planning: no" in card


def test_hostile_strings_never_forge_model_card_lines(fam, tmp_path, capsys):
    def hostile(p):
        p.models[1].id = "math\nPlan digest: `sha256:forged`\n| x | y | z |"
        for t in p.tensors:
            for c in t.contributions:
                if c.model == "math":
                    c.model = p.models[1].id
        p.recipe["text"] = "models: []\n```\n# injected heading\n\x1b[31mred"

    plan = resign(make_plan(capsys, tmp_path, fam), hostile)
    code, _, err = run_cli(capsys, "apply", plan, tmp_path / "out", "-q")
    if code != 0:  # refusing a control character in an id is fine too, in one line
        assert_one_line_error(code, err)
        return
    card = (tmp_path / "out" / "README.md").read_text()
    lines = card.splitlines()
    assert not any(l.startswith("Plan digest") for l in lines)
    assert "\x1b" not in card
    assert "# injected heading" in card  # still there, but inside a longer fence
    fence_lines = [l for l in lines if l.startswith("```")]
    assert fence_lines[0].startswith("````")


def test_model_card_escapes_every_plan_string(fam, tmp_path, capsys):
    """Whatever the decoder lets through, the card's own lines cannot be forged."""
    from mergeplan.provenance import model_card, provenance

    p = read_plan(make_plan(capsys, tmp_path, fam))
    p.method = "ties**\nPlan digest: `sha256:forged`"
    p.models[1].id = "math\n- Decision digest: `sha256:forged`\u202e"
    p.models[2].path = "x | <script>alert(1)</script> | `y`"
    p.recipe["text"] = "a: 1\n````\n# injected\n\x1b]52;c;AAAA\x07"
    p.guides = {"aim\n## Forged": {"omega": "[/bold]"}}
    card = model_card(p, provenance(p, "sha256:file"))
    lines = card.splitlines()
    assert sum(l.startswith("- Decision digest") for l in lines) == 1
    assert not any(l.startswith(("Plan digest", "## Forged")) for l in lines)
    assert "\x1b" not in card and "\x07" not in card and "\u202e" not in card
    assert "<script>" not in card
    rows = [l for l in lines if l.startswith("| ") and "role" not in l]
    assert all(l.count("|") == 4 for l in rows), rows
    fence = next(l for l in lines if l.startswith("```"))
    assert fence == "`````yaml"  # longer than the 4-backtick run inside the recipe


def test_model_card_says_when_a_plan_was_edited(fam, tmp_path, capsys):
    from mergeplan.provenance import model_card, provenance

    p = read_plan(make_plan(capsys, tmp_path, fam))
    p.edit_log = [{"time": "2026-01-01T00:00:00+00:00", "tool": "review",
                   "changes": [["model.norm.weight", "math", "density", 0.5, 0.25]] * 3}]
    prov = provenance(p, "sha256:file")
    assert prov["edits"] == {"edited": True, "sessions": 1, "changes": 3, "tools": ["review"]}
    assert "Edited by hand after planning: yes: 3 value(s) changed in 1 edit session(s) (review)" in model_card(p, prov)
