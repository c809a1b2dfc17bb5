"""Calibrate once, decide many: candidates of a guided recipe planned from one CalibStats
and scored by merging in memory, against planning each candidate from scratch.

    python benchmarks/decide_many_bench.py [--recipe samples/recipes/guided.yaml] [--family samples/family]
                                           [--omegas 0.2,0.4,0.6,0.8] [--samples 32] [--threads 1]

Prints: one calibration; per candidate (AIM omega varied) the plan from the statistics
and the in-memory merge + scoring on math/code/legal (held-out: the records after the
recipe's calibration samples), with its mean recovered gain; then one candidate planned
from scratch (calibration included) for the ratio. Run in one process after imports.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="samples/recipes/guided.yaml")
    ap.add_argument("--family", default="samples/family")
    ap.add_argument("--omegas", default="0.2,0.4,0.6,0.8")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    from mergeplan.calibrate.models import load_tokenizer
    from mergeplan.evaluate import load_eval_sets, mean_gain, score_model
    from mergeplan.evaluate.run import load_model_dir, score_plan
    from mergeplan.planner import PlanOptions, build_plan, calibrate_recipe
    from mergeplan.recipe import load_recipe

    torch.set_num_threads(a.threads)
    fam = Path(a.family)
    if not (fam / "base").is_dir():
        sys.exit(f"{fam} has no family: run `python samples/tiny_family.py {fam}` first")
    rec = load_recipe(Path(a.recipe))
    opts = PlanOptions(device="cpu", threads=a.threads, quiet=True)
    skip = int(rec.calibration.get("samples", 16))
    spec = {t: str(fam / "data" / f"{t}.jsonl") for t in ("math", "code", "legal")}
    sets = load_eval_sets(spec, load_tokenizer(fam / "base"), samples=a.samples, seq_len=128, skip=skip)
    base = score_model(load_model_dir(fam / "base", "cpu"), sets)
    experts = {t: score_model(load_model_dir(fam / t, "cpu"), {t: sets[t]})[t] for t in spec}

    t0 = time.perf_counter()
    stats = calibrate_recipe(rec, opts)
    calib = time.perf_counter() - t0
    print(f"calibrate once: {calib:.1f} s")
    per = []
    for omega in (float(x) for x in a.omegas.split(",")):
        cand = copy.deepcopy(rec)
        cand.guides = {**rec.guides, "aim": {"omega": omega}}
        t0 = time.perf_counter()
        plan = build_plan(cand, opts, stats=stats)
        t1 = time.perf_counter()
        scores = score_plan(plan, sets, threads=a.threads)
        t2 = time.perf_counter()
        per.append(t2 - t0)
        print(f"  omega {omega:.2f}: plan {t1 - t0:.2f} s, merge in memory + score {t2 - t1:.2f} s, "
              f"mean gain {mean_gain(base, scores, experts):.3f}")
    t0 = time.perf_counter()
    build_plan(rec, opts)
    fresh = time.perf_counter() - t0
    mean = sum(per) / len(per)
    print(f"per candidate from the statistics: {mean:.2f} s (plan + merge + score); "
          f"one plan from scratch: {fresh:.1f} s (without scoring) -> {fresh / mean:.1f}x")


if __name__ == "__main__":
    main()
