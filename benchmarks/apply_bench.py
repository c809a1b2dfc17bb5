"""apply performance on a Llama-shaped family: copy floor, mergeplan plan/apply, mergekit.

    python benchmarks/apply_bench.py [--root /tmp/mergeplan-bench] [--scale 1] [--threads 1,2]
                                     [--mergekit-bin PATH | --no-mergekit] [--runs plan,apply,...]

Builds (once; reused on later runs) base + 3 fine-tunes of ~1.1 GB bf16 each at --scale 1
(hidden 2048, 10 layers, 32k vocab, intermediate 4096, 1 GB shards; random weights, the
fine-tunes are base + small noise), --scale 2 doubles the layers. Then, on the warm page
cache, times in fresh child processes:
  - copy floor: read every tensor of the 4 models through ModelDir, write the base through
    ShardWriter (what any streaming merge has to do at least);
  - `mergeplan plan` (per-tensor sha256 recorded while it reads; and --full-hash, which adds
    whole-shard sha256) and `mergeplan apply`, TIES density 0.5, at each --threads, with
    every input byte checked against the plan's digests as it is read, and the same plan
    without its content digests ("unverified": what apply cost before it checked bytes), run
    alternately; the outputs of all runs must be byte-identical;
  - `mergekit-yaml` 0.1.5 on the same recipe, if found (benchmark only, never a dependency:
    `python -m venv --system-site-packages /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5`).
Peak RSS is each child's own ru_maxrss (os.wait4). This parent never imports torch: on
Linux a child's maxrss starts at the parent's peak, so the parent has to stay small.
Prints a markdown table (ratios against the copy floor and mergekit). Not part of the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, VOCAB, INTERMEDIATE, LAYERS, HEADS = 2048, 32000, 4096, 10, 16
SHARD_BYTES = 1_000_000_000
MODELS = ("base", "ft1", "ft2", "ft3")
FAMILY_VERSION = 1  # bump when the generated weights change


# ---- family ----------------------------------------------------------------------------


def family_spec(scale: int) -> dict:
    return {"version": FAMILY_VERSION, "hidden": HIDDEN, "vocab": VOCAB,
            "intermediate": INTERMEDIATE, "layers": LAYERS * scale, "heads": HEADS,
            "shard_bytes": SHARD_BYTES}


def _tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i = spec["hidden"], spec["intermediate"]
    out = [("model.embed_tokens.weight", (spec["vocab"], h))]
    for layer in range(spec["layers"]):
        p = f"model.layers.{layer}."
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec["vocab"], h))]
    return out


def _generate(root: Path, scale: int) -> None:
    """Child process: write the family under root (one model at a time, one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    spec = family_spec(scale)
    shapes = _tensor_shapes(spec)
    config = LlamaConfig(
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"], vocab_size=spec["vocab"], tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = "bfloat16"
    for m_index, model in enumerate(MODELS):
        d = root / model
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        config.save_pretrained(d)
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in shapes:
            n = 2 * _numel(shape)
            if groups[-1] and size + n > spec["shard_bytes"]:
                groups.append([])
                size = 0
            groups[-1].append((name, shape))
            size += n
        weight_map, total = {}, 0
        for g_index, group in enumerate(groups):
            file = f"model-{g_index + 1:05d}-of-{len(groups):05d}.safetensors"
            part = {}
            for t_index, (name, shape) in enumerate(group):
                seed = hash_seed(name)
                gen = torch.Generator().manual_seed(seed)
                if len(shape) == 1:
                    w = 1.0 + 0.05 * torch.randn(shape, generator=gen)
                else:
                    w = 0.02 * torch.randn(shape, generator=gen)
                if m_index:
                    noise = torch.Generator().manual_seed(seed + 7919 * m_index)
                    w += 0.002 * torch.randn(shape, generator=noise)
                part[name] = w.to(torch.bfloat16)
                weight_map[name] = file
                total += 2 * _numel(shape)
                del w
            save_file(part, str(d / file), metadata={"format": "pt"})
            del part
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        print(f"  wrote {d} ({total / 1e9:.2f} GB, {len(groups)} shards)", flush=True)


def hash_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def ensure_family(root: Path, scale: int) -> Path:
    fam = root / f"scale{scale}"
    marker = fam / "family.json"
    spec = family_spec(scale)
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"reusing family {fam}")
        return fam
    need = 4 * 2 * sum(_numel(s) for _, s in _tensor_shapes(spec))
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if free < 2.5 * need:
        sys.exit(f"{root}: {free / 1e9:.1f} GB free, the family and outputs need about {2.5 * need / 1e9:.1f} GB")
    print(f"building family in {fam} ({need / 1e9:.1f} GB) ...", flush=True)
    fam.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--_gen", str(fam), "--scale", str(scale)], check=True)
    marker.write_text(json.dumps(spec))
    return fam


# ---- children ---------------------------------------------------------------------------


def _copy_floor(fam: Path, out: Path) -> None:
    """Child process: read all 4 models tensor by tensor, write the base's tensors."""
    from mergeplan.io.modeldir import ModelDir
    from mergeplan.io.shards import plan_shards
    from mergeplan.io.writer import ShardWriter, write_index

    dirs = [ModelDir.open(fam / m) for m in MODELS]
    base = dirs[0]
    names = base.tensor_names()
    layouts = plan_shards([(n, base.info(n).dtype, base.info(n).shape) for n in names], 5_000_000_000)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    writers = {lay.file: ShardWriter(out / lay.file, lay) for lay in layouts}
    where = {t.name: lay.file for lay in layouts for t in lay.tensors}
    for n in names:
        t = base.read(n)
        for d in dirs[1:]:
            d.read(n)
        writers[where[n]].write(n, t)
    for w in writers.values():
        w.close()
    write_index(out, layouts)


def _strip_digests(src: Path, dst: Path) -> None:
    """Child process: the plan without content digests (apply then checks headers only)."""
    from mergeplan.plan.codec import read_plan, write_plan

    p = read_plan(src)
    for m in p.models:
        m.fingerprint.pop("tensor_blake3", None)
        m.fingerprint.pop("files", None)
    write_plan(p, dst)


def run_child(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run cmd, return wall seconds and the child's own peak RSS (bytes)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read() if p.stdout else b""
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(out.decode(errors="replace")[-4000:])
        raise SystemExit(f"{label} failed (exit {p.returncode}): {' '.join(cmd)}")
    res = {"label": label, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}
    print(f"  {label:28s} {wall:8.1f} s  cpu {res['cpu_s']:7.1f} s  peak RSS {res['rss'] / 2**30:.2f} GiB "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return res


def mergeplan_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mergeplan.cli import main; main()", *args]


def recipe_text(fam: Path, density: float) -> str:
    lines = ["merge_method: ties", f"base_model: {fam / 'base'}", "models:"]
    for m in MODELS[1:]:
        lines += [f"  - model: {fam / m}", f"    parameters: {{weight: 1.0, density: {density}}}"]
    lines += ["parameters: {normalize: true}", "dtype: bfloat16", ""]
    return "\n".join(lines)


def tree_digest(d: Path) -> str:
    """sha256 over the output's safetensors shards and index (the merged weights)."""
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.suffix == ".safetensors" or p.name.endswith(".index.json"):
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while b := f.read(8 << 20):
                    h.update(b)
    return h.hexdigest()


def input_bytes(fam: Path) -> int:
    return sum(p.stat().st_size for m in MODELS for p in (fam / m).glob("*.safetensors"))


def find_mergekit(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() else None
    found = shutil.which("mergekit-yaml")
    if found:
        return found
    beside = Path(sys.executable).parent / "mergekit-yaml"
    return str(beside) if beside.exists() else None


# ---- main -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/mergeplan-bench")
    ap.add_argument("--scale", type=int, default=1, help="multiply the layer count (2: twice the size)")
    ap.add_argument("--threads", default="1,2", help="comma-separated --threads values for apply")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--mergekit-bin", default=None, help="path to mergekit-yaml (default: on PATH)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--runs", default="copy,plan,apply,mergekit",
                    help="subset of copy,plan,apply,mergekit to run")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--repeat", type=int, default=3, help="apply runs per variant (median reported)")
    ap.add_argument("--_gen", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_copy", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_strip", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._strip:
        _strip_digests(Path(a._strip[0]), Path(a._strip[1]))
        return
    if a._gen:
        _generate(Path(a._gen), a.scale)
        return
    if a._copy:
        _copy_floor(Path(a._copy[0]), Path(a._copy[1]))
        return

    runs = set(a.runs.split(","))
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"disk: {shutil.disk_usage(root).free / 1e9:.0f} GB free in {root}; cpus: {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    fam = ensure_family(root, a.scale)
    work = root / f"work-scale{a.scale}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    nbytes = input_bytes(fam)
    print(f"inputs: 4 models, {nbytes / 1e9:.2f} GB")
    (work / "ties.yaml").write_text(recipe_text(fam, a.density))
    results: dict[str, dict] = {}

    # Warm the page cache (and check the family reads) before anything is timed.
    subprocess.run([sys.executable, __file__, "--_copy", str(fam), str(work / "warm")], check=True)
    shutil.rmtree(work / "warm")
    if "copy" in runs:
        results["copy"] = run_child([sys.executable, __file__, "--_copy", str(fam), str(work / "copy")], "copy floor")
        shutil.rmtree(work / "copy")
    if "plan" in runs:
        results["plan"] = run_child(mergeplan_cmd("plan", str(work / "ties.yaml"), "-o", str(work / "ties.plan"), "-q"),
                                    "mergeplan plan")
    elif "apply" in runs:  # apply needs a plan
        run_child(mergeplan_cmd("plan", str(work / "ties.yaml"), "-o", str(work / "ties.plan"), "-q"),
                  "mergeplan plan")
    if "plan" in runs:
        results["plan_full"] = run_child(
            mergeplan_cmd("plan", str(work / "ties.yaml"), "-o", str(work / "full.plan"), "--full-hash", "-q"),
            "mergeplan plan --full-hash")
    digests = {}
    if "apply" in runs:
        subprocess.run([sys.executable, __file__, "--_strip", str(work / "ties.plan"), str(work / "unverified.plan")],
                       check=True)
        for th in [int(x) for x in a.threads.split(",") if x]:
            runs_of: dict[str, list[dict]] = {f"apply_t{th}_unverified": [], f"apply_t{th}": []}
            # Alternate, so slow drift in the machine's load hits both alike; median of --repeat.
            for rep in range(a.repeat):
                for key, plan_name, label in ((f"apply_t{th}_unverified", "unverified.plan", "unverified"),
                                              (f"apply_t{th}", "ties.plan", "checked")):
                    out = work / f"apply-{key}"
                    runs_of[key].append(run_child(
                        mergeplan_cmd("apply", str(work / plan_name), str(out), "--threads", str(th), "-q"),
                        f"apply --threads {th} {label}"))
                    digests[f"{key}-{rep}"] = tree_digest(out)
                    shutil.rmtree(out)
            for key, rs in runs_of.items():
                med = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
                results[key] = {**med, "cpu_s": sorted(r["cpu_s"] for r in rs)[len(rs) // 2],
                                "rss": max(r["rss"] for r in rs)}
            w = results[f"apply_t{th}"]["wall_s"] / results[f"apply_t{th}_unverified"]["wall_s"]
            c = results[f"apply_t{th}"]["cpu_s"] / results[f"apply_t{th}_unverified"]["cpu_s"]
            print(f"  --threads {th}: checking every input byte costs {100 * (w - 1):+.1f}% wall, "
                  f"{100 * (c - 1):+.1f}% CPU (medians of {a.repeat})")
        same = len(set(digests.values())) <= 1
        print(f"  outputs identical across runs: {same}")
        if not same:
            raise SystemExit(f"outputs differ across thread counts: {digests}")
    mk = None if a.no_mergekit or "mergekit" not in runs else find_mergekit(a.mergekit_bin)
    if "mergekit" in runs and not a.no_mergekit and mk is None:
        print("  mergekit-yaml not found: skipped (see the docstring to install it for comparison)")
    if mk:
        out = work / "mergekit"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        results["mergekit"] = run_child([mk, str(work / "ties.yaml"), str(out), "--no-cuda", "--quiet"],
                                        "mergekit-yaml 0.1.5", env=env)
        shutil.rmtree(out)

    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print()
    print(table(results, nbytes, a.scale, [int(x) for x in a.threads.split(",") if x] if "apply" in runs else []))
    if a.json:
        Path(a.json).write_text(json.dumps({"input_bytes": nbytes, "scale": a.scale, "results": results}, indent=2))


def table(results: dict[str, dict], nbytes: int, scale: int, threads: list[int]) -> str:
    names = {"copy": "copy floor (read 4, write base)", "plan": "mergeplan plan (BLAKE3 while reading)",
             "plan_full": "mergeplan plan --full-hash", "mergekit": "mergekit-yaml 0.1.5 (bf16)"}
    names.update({f"apply_t{t}": f"mergeplan apply --threads {t} (every byte checked)" for t in threads})
    names.update({f"apply_t{t}_unverified": f"apply --threads {t}, plan without digests" for t in threads})
    copy = results.get("copy")
    mk = results.get("mergekit")
    rows = [f"Family: base + 3 fine-tunes, {nbytes / 4e9:.2f} GB bf16 each (scale {scale}); TIES density 0.5.", "",
            "| run | wall s | CPU s | peak RSS GiB | input GB/s | time / copy floor | speed-up vs mergekit | RSS / mergekit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ["copy", "plan", "plan_full"] + [k for t in threads for k in (f"apply_t{t}_unverified", f"apply_t{t}")] + ["mergekit"]:
        r = results.get(key)
        if r is None:
            continue
        wall, rss = r["wall_s"], r["rss"]
        rows.append("| {} | {:.1f} | {:.1f} | {:.2f} | {:.2f} | {} | {} | {} |".format(
            names[key], wall, r.get("cpu_s", float("nan")), rss / 2**30, nbytes / wall / 1e9,
            f"{wall / copy['wall_s']:.1f}x" if copy else "-",
            f"{mk['wall_s'] / wall:.1f}x" if mk else "-",
            f"{rss / mk['rss']:.2f}" if mk else "-"))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
