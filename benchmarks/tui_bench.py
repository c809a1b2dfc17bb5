"""Time `mergeplan review` as a user sees it: from process start, in a real pty, model check on.

    python benchmarks/tui_bench.py [--size 80x24] [--layers 80] [--models 3] [--runs 3] [--keys 30]

Builds a 70B-shaped plan with the plan API (80 layers x 7 linear + 2 norms, 3 task models,
AIM scores of 8192 / 28672 floats, LEWIS-like densities and statistics, Sens per-layer
stats: 723 tensors, ~30 MB), next to small real model directories whose fingerprints the
plan records, so the review's background check of the inputs opens and compares them (the
check a user gets; nothing is stubbed). Then runs `python -m mergeplan.cli ...` in a pty
of the given size (pexpect) and reads the terminal's byte stream:

- `--version`: the floor every command pays (interpreter + CLI start); the baseline;
- `show PLAN` (output to the pty) until exit;
- `review PLAN`: until the grid's row labels are painted; then cursor keys (each until
  the status line names the new cell), a horizontal scroll, a quantity switch, detail,
  diff and overview screens; then `q` until the process has exited.

Every figure is wall time from the moment the keys (or the command) were sent; medians
over --runs fresh processes, and the ratio to the `--version` baseline of the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pexpect

from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, float32_array, read_plan, write_plan

HIDDEN, INTER, KV, VOCAB = 8192, 28672, 1024, 128256
LINEAR = {  # name: (out, in), Llama-3-70B shapes
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
ROOT = Path(__file__).resolve().parent.parent


def big_plan(layers: int, models: list[str], fingerprints: dict[str, dict] | None = None) -> Plan:
    rng = np.random.default_rng(0)
    fps = fingerprints or {}
    refs = [ModelRef("base", "base", "base", fps.get("base", {}))]
    refs += [ModelRef(m, "task", m, fps.get(m, {})) for m in models]
    tensors = [TensorPlan("model.embed_tokens.weight", (VOCAB, HIDDEN), "bfloat16", op="copy", source="base")]
    for layer in range(layers):
        for comp, shape in LINEAR.items():
            contribs = [
                Contribution(m, 1.0, {"kind": "magnitude", "density": float(rng.uniform(0.3, 0.9)),
                                      "digest": f"{rng.integers(1 << 62):016x}" * 2},
                             {"weight": "sens", "density": "lewis"})
                for m in models
            ]
            tensors.append(TensorPlan(
                f"model.layers.{layer}.{comp}.weight", shape, "bfloat16", params={"lambda": 1.0},
                contributions=contribs,
                relax={"kind": "aim", "omega": 0.4, "axis": 1, "scores": float32_array(rng.random(shape[1]))},
                stats={"lewis.delta": {m: float(rng.random() / layers) for m in models}},
            ))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors.append(TensorPlan(
                f"model.layers.{layer}.{norm}.weight", (HIDDEN,), "bfloat16", params={"lambda": 1.0},
                contributions=[Contribution(m, 1.0) for m in models],
                relax={"kind": "aim", "omega": 0.4, "axis": 0, "scores": float32_array(rng.random(HIDDEN))},
            ))
    tensors.append(TensorPlan("model.norm.weight", (HIDDEN,), "bfloat16", params={"lambda": 1.0},
                              contributions=[Contribution(m, 1.0) for m in models]))
    tensors.append(TensorPlan("lm_head.weight", (VOCAB, HIDDEN), "bfloat16", params={"lambda": 1.0},
                              contributions=[Contribution(m, 1.0) for m in models]))
    groups = layers + 3
    return Plan(
        method="ties", models=refs, tensors=tensors, params={"normalize": True}, seed=1,
        guides={"lewis": {"gamma": 0.3, "epsilon": 0.9}, "aim": {"omega": 0.4}, "sens": {"T": 3.0}},
        calibration={"samples": 64, "seq_len": 512},
        stats={"sens": {"alpha": {m: float32_array(rng.random(groups)) for m in models},
                        "tau": {m: float(rng.random()) for m in models},
                        "sigma": {m: float32_array(rng.random(groups)) for m in models}}},
        created="2026-01-01T00:00:00+00:00", mergeplan_version="bench",
    )


def model_dirs(root: Path, ids: list[str]) -> dict[str, dict]:
    """Small real safetensors model directories; returns their fingerprints (recorded in the plan)."""
    from safetensors.numpy import save_file

    from mergeplan.io.modeldir import ModelDir  # this process may import torch; the measured ones are fresh

    fps = {}
    for i, mid in enumerate(ids):
        d = root / mid
        d.mkdir()
        rng = np.random.default_rng(i)
        save_file({f"model.layers.{k}.mlp.down_proj.weight": rng.random((64, 64), dtype=np.float32)
                   for k in range(4)}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        with ModelDir.open(d, name=mid) as md:
            fps[mid] = md.fingerprint()
    return fps


# CSI / OSC / two-byte escape sequences: cursor moves and colours between the visible characters.
_ESC = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_PARTIAL = re.compile(rb"\x1b[^a-zA-Z~\x07]*$")


class Term:
    """A command in a pty; `until(pattern)` reads the terminal stream (escape sequences
    removed, so text drawn cell by cell in several colours still reads as text) to a match."""

    def __init__(self, args: list[str], size: tuple[int, int], cwd: Path):
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(size[0]), "LINES": str(size[1]),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.t0 = time.perf_counter()
        self.child = pexpect.spawn(sys.executable, ["-m", "mergeplan.cli", *args], cwd=str(cwd), env=env,
                                   dimensions=(size[1], size[0]), timeout=60)
        self.child.delaybeforesend = None  # pexpect sleeps 50 ms before each send by default
        self.raw = b""
        self.text = b""

    def until(self, pattern: bytes, timeout: float = 60) -> float:
        t = time.perf_counter()
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text)
            if m:
                self.text = self.text[m.end():]
                return time.perf_counter() - t
            if time.perf_counter() - t > timeout:
                raise TimeoutError(f"no {pattern!r} on the terminal; last text: {self.text[-400:]!r}")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=1)
            except pexpect.TIMEOUT:
                continue
            cut = _PARTIAL.search(self.raw)
            keep = self.raw[cut.start():] if cut else b""
            done = self.raw[: cut.start()] if cut else self.raw
            self.text = (self.text + _ESC.sub(b"", done))[-200000:]
            self.raw = keep

    def key(self, k: str, pattern: bytes) -> float:
        self.text = b""
        t = time.perf_counter()
        self.child.send(k)
        self.until(pattern)
        return time.perf_counter() - t

    def cpu(self) -> float:
        """CPU seconds (user + system) the command has used so far: a figure that a busy
        machine does not inflate the way it inflates wall time."""
        fields = Path(f"/proc/{self.child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def exit_time(self) -> float:
        t = time.perf_counter()
        self.child.expect(pexpect.EOF)
        self.child.wait()
        return time.perf_counter() - t


DOWN, RIGHT = "\x1b[B", "\x1b[C"


def run_once(plan: Path, size: tuple[int, int], keys: int, cwd: Path) -> dict[str, float | list[float]]:
    out: dict[str, float | list[float]] = {}
    v = Term(["--version"], size, cwd)
    v.exit_time()
    out["--version (baseline: interpreter + CLI)"] = time.perf_counter() - v.t0
    s = Term(["show", str(plan)], size, cwd)
    s.exit_time()
    out["show PLAN, start to exit"] = time.perf_counter() - s.t0
    r = Term(["review", str(plan)], size, cwd)
    # A grid row: its label ("L5" padded to the label width) right before a cell.
    r.until(rb"L5 {2,}")
    out["review: start to grid painted"] = time.perf_counter() - r.t0
    out["review: CPU used until the grid is painted"] = r.cpu()
    # The status line names the cursor cell as "L<layer> <component> [<model>]".
    r.until(rb"L0 q \[")
    out["review: start to status line"] = time.perf_counter() - r.t0
    c = r.cpu()
    out["cursor down, per key"] = [r.key(DOWN, rb"L%d q \[" % (i + 1)) for i in range(keys)]
    out["cursor down, CPU per key (mean)"] = (r.cpu() - c) / keys
    # Columns: every component for the first model, then the next model's: 16 steps right
    # from "q [math]" scroll the grid sideways at 80 columns and land on "post_norm [code]".
    comps = ["embed", "input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down", "norm", "lm_head"]
    models = [b"math", b"code", b"chat"]
    right = []
    for i in range(1, 17):
        col = 2 + i
        right.append(r.key(RIGHT, rb"L%d %s \[%s\]" % (keys, comps[col % 12].encode(), models[col // 12])))
    out["cursor right, per key"] = right
    out["switch quantity (v)"] = r.key("v", rb"weight")
    out["open tensor detail (enter)"] = r.key("\r", rb"Per model")
    r.key("\x1b", rb"L%d" % keys)
    out["diff screen (d)"] = r.key("d", rb"differences")
    out["overview screen (o)"] = r.key("o", rb"on this machine")
    r.key("g", rb"L%d" % keys)
    r.child.send("q")
    out["quit (q) to process exit"] = r.exit_time()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--size", default="80x24")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keys", type=int, default=30)
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    models = ["math", "code", "chat", "tool", "law"][: args.models]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        t = time.perf_counter()
        fps = model_dirs(root, ["base", *models])
        plan = big_plan(args.layers, models, fps)
        path = root / "big.plan"
        write_plan(plan, path)
        print(f"plan: {len(plan.tensors)} tensors, {args.layers} layers, {len(models)} task models, "
              f"{path.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - t:.2f} s to build and write); "
              f"model check on ({len(fps)} model directories)")
        del plan
        t = time.perf_counter()
        read_plan(path)
        print(f"{'read_plan alone (in this process)':44s} {time.perf_counter() - t:7.3f} s")
        runs = [run_once(path, size, args.keys, root) for _ in range(args.runs)]
    base = statistics.median(r["--version (baseline: interpreter + CLI)"] for r in runs)
    for k in runs[0]:
        vals = [r[k] for r in runs]
        if "CPU" in k:
            print(f"{k:44s} {statistics.median(vals) * (1e3 if 'key' in k else 1):7.3f} "
                  f"{'ms' if 'key' in k else 's '}  (runs {', '.join(f'{v:.3f}' for v in vals)})")
        elif isinstance(vals[0], list):
            flat = [x for v in vals for x in v]
            med, worst = statistics.median(flat), max(flat)
            print(f"{k:44s} {med * 1e3:7.1f} ms median, {worst * 1e3:6.1f} ms max over {len(flat)} keys")
        else:
            med = statistics.median(vals)
            print(f"{k:44s} {med:7.3f} s  ({med / base:4.1f}x --version; runs {', '.join(f'{v:.2f}' for v in vals)})")
    print(f"python {sys.version.split()[0]}, pty {size[0]}x{size[1]}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
