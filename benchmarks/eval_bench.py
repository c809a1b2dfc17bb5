"""Evaluating the sample family: samples/evaluate.py before and after it used mergeplan.evaluate,
and `mergeplan eval`, each timed from process start.

    python benchmarks/eval_bench.py [--family samples/family] [--merged samples/out/ties]
                                    [--plan samples/out/ties.plan] [--load N] [--repeats 1]

Variants (each its own process, run in this order, best of --repeats):
  before   the previous samples/evaluate.py, reproduced here: from_pretrained per model
           and tiny_family.eval_loss with torch's default thread count
  after    samples/evaluate.py FAMILY MERGED (mergeplan.evaluate, --threads 1)
  eval     mergeplan eval PLAN --data (4 tasks) --seq-len 128 --threads 1 --json: base,
           3 fine-tunes and the plan merged in memory, with gains and bootstrap
--load N starts N busy processes for the duration (a loaded machine: on 2 cores, every
core already taken). Prints wall seconds and the ratio to `before`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BEFORE = '''
import sys
from pathlib import Path
import torch
sys.path.insert(0, {samples!r})
from tiny_family import MAX_RECORDS, TASKS, data_paths, eval_loss, read_records, record_text
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
family = Path(sys.argv[1])
texts = {{t: [record_text(r) for r in read_records(p)][:MAX_RECORDS] for t, p in data_paths(family).items()}}
models = {{n: family / n for n in ("base", "math", "code", "legal") if (family / n).is_dir()}}
models.update({{Path(m).name: Path(m) for m in sys.argv[2:]}})
print("loss".ljust(16) + "".join(f"{{t:>9}}" for t in TASKS))
for name, directory in models.items():
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    print(name[:15].ljust(16) + "".join(f"{{eval_loss(model, tok, texts[t]):>9.3f}}" for t in TASKS))
'''


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return dt, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="samples/family")
    ap.add_argument("--merged", default="samples/out/ties")
    ap.add_argument("--plan", default="samples/out/ties.plan")
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    fam = Path(a.family)
    for p in (fam / "base", Path(a.merged), Path(a.plan)):
        if not p.exists():
            sys.exit(f"{p} not found: run `bash samples/demo.sh` first (or pass --family/--merged/--plan)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    data = ",".join(f"{t}={fam / 'data' / f}" for t, f in (("general", "general.txt"), ("math", "math.jsonl"),
                                                         ("code", "code.jsonl"), ("legal", "legal.jsonl")))
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "evaluate_before.py"
        before.write_text(BEFORE.format(samples=str(ROOT / "samples")))
        variants = {
            "before": [sys.executable, str(before), str(fam), a.merged],
            "after": [sys.executable, "samples/evaluate.py", str(fam), a.merged, "--threads", "1", "-q"],
            "eval": [sys.executable, "-m", "mergeplan.cli", "eval", a.plan, "--data", data, "--seq-len", "128",
                     "--threads", "1", "--json"],
        }
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
        try:
            times = {}
            for name, cmd in variants.items():
                times[name] = min(_run(cmd, env)[0] for _ in range(max(1, a.repeats)))
        finally:
            for p in busy:
                p.kill()
                p.wait()
    print(f"evaluate the sample family ({os.cpu_count()} cores, {a.load} busy processes beside)")
    for name, dt in times.items():
        print(f"  {name:<7} {dt:7.1f} s   {times['before'] / dt:5.2f}x vs before")


if __name__ == "__main__":
    main()
