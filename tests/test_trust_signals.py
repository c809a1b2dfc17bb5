"""Signals during apply: Ctrl-C, SIGTERM and SIGHUP end a run the same way (nothing left
behind, non-zero exit unless the output had already landed complete), and the next apply
removes what a SIGKILLed run left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import family_recipe, run_cli
from test_bad_input import copy_family


@pytest.fixture
def planned(tiny_family_bf16, tmp_path, capsys):
    fam = copy_family(tiny_family_bf16, tmp_path / "fam")
    r = family_recipe(tmp_path / "r.yaml", "ties", fam["base"],
                      {fam["math"]: "weight: 1.0, density: 0.5", fam["code"]: "weight: 1.0, density: 0.5"})
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "p.plan", "-q")
    assert code == 0, err
    return tmp_path / "p.plan"


def _start(plan: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, MERGEPLAN_DEBUG_TENSOR_DELAY="0.05")  # each tensor waits: time to signal mid-run
    return subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "apply", str(plan), str(out), "-q", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _work_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".mergeplan-" in p.name]


def _wait_for_work_dir(proc: subprocess.Popen, parent: Path, timeout: float = 60) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if _work_dirs(parent):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_run_leaves_nothing_and_fails(planned, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(planned, out)
    assert _wait_for_work_dir(proc, tmp_path), proc.communicate()
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    assert not out.exists() and _work_dirs(tmp_path) == []
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8, 1.5, 2.5])
def test_early_or_late_signal_is_never_lost(planned, tmp_path, delay):
    """Whenever it arrives: rc 0 with a complete output, or rc != 0 and nothing at all."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "apply", str(planned), str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        assert (out / "mergeplan.json").is_file() and list(out.glob("*.safetensors")), err
    else:
        assert not out.exists(), err
    assert _work_dirs(tmp_path) == []


def test_sigkill_leftovers_are_removed_by_the_next_apply(planned, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start(planned, out)
    assert _wait_for_work_dir(proc, tmp_path), proc.communicate()
    time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=60)
    left = _work_dirs(tmp_path)
    assert left and not out.exists()
    code, _, err = run_cli(capsys, "apply", planned, out)
    assert code == 0, err
    assert "removed" in err and left[0].name in err
    assert _work_dirs(tmp_path) == [] and (out / "mergeplan.json").is_file()
