"""Plan and apply time and peak RSS for every method on apply_bench's family.

    python benchmarks/methods_bench.py [--root /tmp/mergeplan-bench] [--scale 1] [--threads 2]
                                       [--methods ties,dare_ties,...]

Same family and child-process measurement as benchmarks/apply_bench.py (built there, reused
here). Per method: `mergeplan plan` then `mergeplan apply`, each in a fresh process, the
same run; the copy floor first as the baseline. Masks that need the whole tensor at once (l1
rescale; explicit mask bits) take the whole-tensor path in both phases; the table says
which path each took (della streams in whole rows, CABS in whole m-groups). Prints a markdown table. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply_bench import MODELS, ensure_family, input_bytes, mergeplan_cmd, run_child  # noqa: E402

# method -> (per-model parameters, global parameters, whole-tensor masks?)
METHODS = {
    "linear": ("weight: 0.3", "", False),
    "task_arithmetic": ("weight: 0.3", "", False),
    "ties": ("weight: 1.0, density: 0.5", "parameters: {normalize: true}", False),
    "dare_linear": ("weight: 0.3, density: 0.5", "", False),
    "dare_ties": ("weight: 1.0, density: 0.5", "", False),
    "breadcrumbs_ties": ("weight: 1.0, density: 0.5, gamma: 0.01", "", False),
    "della": ("weight: 1.0, density: 0.5, epsilon: 0.1", "", False),
    "cabs": ("weight: 1.0, n: 8", "parameters: {m: 16}", False),
    "ties_l1": ("weight: 1.0, density: 0.5", "parameters: {rescale: true, rescale_mode: l1}", True),
}


def recipe(fam: Path, method: str) -> str:
    params, extra, _ = METHODS[method]
    real = "ties" if method == "ties_l1" else method
    lines = [f"merge_method: {real}"]
    if real != "linear":
        lines.append(f"base_model: {fam / 'base'}")
    lines.append("models:")
    for m in MODELS[1:]:
        lines += [f"  - model: {fam / m}", f"    parameters: {{{params}}}"]
    if extra:
        lines.append(extra)
    lines += ["dtype: bfloat16", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/mergeplan-bench")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    root = Path(a.root)
    fam = ensure_family(root, a.scale)
    work = root / f"methods-scale{a.scale}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"inputs: 4 models, {input_bytes(fam) / 1e9:.2f} GB; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
    bench = Path(__file__).resolve().parent / "apply_bench.py"
    subprocess.run([sys.executable, str(bench), "--_copy", str(fam), str(work / "warm")], check=True)
    shutil.rmtree(work / "warm")
    copy = run_child([sys.executable, str(bench), "--_copy", str(fam), str(work / "copy")], "copy floor")
    shutil.rmtree(work / "copy")
    rows = []
    for method in a.methods.split(","):
        (work / f"{method}.yaml").write_text(recipe(fam, method))
        plan = run_child(mergeplan_cmd("plan", str(work / f"{method}.yaml"), "-o", str(work / f"{method}.plan"),
                                       "--threads", str(a.threads), "-q"), f"plan {method}")
        out = work / f"out-{method}"
        app = run_child(mergeplan_cmd("apply", str(work / f"{method}.plan"), str(out), "--threads", str(a.threads), "-q"),
                        f"apply {method}")
        shutil.rmtree(out)
        rows.append((method, plan, app))
    print()
    print(f"Copy floor {copy['wall_s']:.1f} s, {copy['rss'] / 2**30:.2f} GiB; --threads {a.threads}; "
          f"load at the end {os.getloadavg()[0]:.1f}.")
    print()
    print("| method | masks | plan s | plan GiB | apply s | apply GiB | plan / apply | (plan + apply) / copy floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method, p, ap_ in rows:
        whole = "whole tensor" if METHODS[method][2] else "streamed"
        print(f"| {method} | {whole} | {p['wall_s']:.1f} | {p['rss'] / 2**30:.2f} | {ap_['wall_s']:.1f} | "
              f"{ap_['rss'] / 2**30:.2f} | {p['wall_s'] / ap_['wall_s']:.2f} | "
              f"{(p['wall_s'] + ap_['wall_s']) / copy['wall_s']:.1f}x |")


if __name__ == "__main__":
    main()
