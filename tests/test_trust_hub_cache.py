"""Models from the Hugging Face cache: the plan records the repo and the exact commit, the
shards' sha256 comes free from the blob names, and a receiver without the planner's path
gets exactly that commit from the cache. Built as a local cache folder, offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cli_helpers import run_cli, write_recipe
from mergeplan.plan.codec import read_plan

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(src: Path, cache: Path, repo: str) -> Path:
    """Lay a model directory out as huggingface_hub does: blobs named by sha256 (LFS) or
    git sha1 (small files), snapshot files as relative links to them."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    blobs, snap = root / "blobs", root / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (blobs / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    return snap


@pytest.fixture
def hub(tiny_family_bf16, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    snaps = {n: as_hub_cache(d, cache, f"tiny/{n}") for n, d in
             [("base", tiny_family_bf16.base), ("math", tiny_family_bf16.finetunes["math"]),
              ("code", tiny_family_bf16.finetunes["code"])]}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snaps


def test_plan_records_repo_commit_and_free_shard_hashes(hub, tmp_path, capsys, monkeypatch):
    r = write_recipe(tmp_path / "r.yaml", """
        merge_method: ties
        base_model: tiny/base
        models:
          - model: tiny/math
            parameters: {weight: 1.0, density: 0.5}
          - model: tiny/code
            parameters: {weight: 1.0, density: 0.5}
    """)
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan", "-q")
    assert code == 0, err
    plan = read_plan(tmp_path / "p.plan")
    for m in plan.models:
        assert m.hub == {"repo": f"tiny/{m.id}", "revision": COMMIT}
        for s in m.fingerprint["shards"]:
            real = (hub[m.id] / s["file"]).resolve()
            assert s["sha256"] == real.name == hashlib.sha256(real.read_bytes()).hexdigest()

    # A receiver in another directory, where "tiny/base" is no local path: the plan's
    # commit is taken from the cache; the full check costs nothing extra to record.
    elsewhere = tmp_path / "receiver"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "p.plan", elsewhere / "p.plan")
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "apply", "p.plan", "out", "-q", "--full-verify")
    assert code == 0, err
    prov = json.loads((elsewhere / "out" / "mergeplan.json").read_text())
    assert {m["id"]: m["hub"]["revision"] for m in prov["models"]} == {"base": COMMIT, "math": COMMIT, "code": COMMIT}
    # config.json came from the base's blob through its snapshot link, and was checked
    assert (elsewhere / "out" / "config.json").read_bytes() == (hub["base"] / "config.json").read_bytes()


def test_a_snapshot_link_leading_outside_the_repo_is_refused(hub, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    cfg = hub["base"] / "config.json"
    cfg.unlink()
    cfg.symlink_to(secret)
    r = write_recipe(tmp_path / "r.yaml", """
        merge_method: task_arithmetic
        base_model: tiny/base
        models:
          - model: tiny/math
            parameters: {weight: 0.5}
    """)
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan", "-q")
    assert code != 0 and "outside the model directory" in err
