"""Where a guided plan's time goes: calibration (model passes) against the mask pass.

    python benchmarks/guided_plan_bench.py [--sample-family samples/family] [--hidden 768]
                                           [--layers 12] [--vocab 32000] [--threads 2]

Two families, each planned with TIES + LEWIS + AIM (calibration on licence text that
ships with the machine):
  - the sample family (built by samples/demo.sh or samples/tiny_family.py), if present;
  - a random Llama of about 100M parameters (hidden 768, 14 layers, intermediate 2048, the
    sample family's 1,536-token tokenizer) with two fine-tunes (base + noise), written to
    a temp dir.
Run in this process after a warm-up import; prints per family: total plan time, the
calibration time (the plan's own per-model timings), the mask pass (first to last
progress report of the "masks" stage), and the rest (opening inputs, decisions, fingerprints).
Not part of the tests.
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _random_family(root: Path, hidden: int, layers: int, tokenizer_dir: Path) -> dict[str, Path]:
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = {}
    for i, name in enumerate(("base", "ft1", "ft2")):
        model = base
        if i:
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                    p.copy_(q.float() + 0.002 * torch.randn(q.shape, generator=g))
        model.save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, root / name / f)
        out[name] = root / name
    params = sum(p.numel() for p in base.parameters())
    print(f"random Llama: {params / 1e6:.0f}M parameters, bf16, base + 2 fine-tunes in {root}")
    return out


def _calib_text(path: Path) -> Path:
    text = "\n\n".join(Path(p).read_text(errors="replace") for p in sorted(glob.glob("/usr/share/common-licenses/*"))
                       if Path(p).is_file())
    path.write_text(text)
    return path


def _plan(recipe_text: str, where: Path, threads: int) -> dict:
    from mergeplan.planner import PlanOptions, build_plan
    from mergeplan.recipe import load_recipe

    r = where / "guided.yaml"
    r.write_text(recipe_text)
    marks: list[float] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "masks":
            marks.append(time.perf_counter())

    t0 = time.perf_counter()
    plan = build_plan(load_recipe(r), PlanOptions(threads=threads, quiet=True, progress=progress))
    total = time.perf_counter() - t0
    calib = sum(float(v) for v in plan.calibration.get("timings_s", {}).values())
    masks = (marks[-1] - marks[0]) if len(marks) > 1 else 0.0
    return {"total": total, "calibration": calib, "masks": masks, "rest": total - calib - masks,
            "tensors": len(plan.tensors)}


def _recipe(base: Path, fts: list[Path], data: Path, samples: int, seq_len: int) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for f in fts:
        lines += [f"  - model: {f}", "    parameters: {weight: 1.0, density: 0.5}"]
    lines += ["calibration:", f"  data: {data}", f"  samples: {samples}", f"  seq_len: {seq_len}",
              "guides:", "  lewis: {gamma: 0.3, epsilon: 0.8}", "  aim: {omega: 0.4}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample-family", default="samples/family")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch  # noqa: F401 - imports out of the timings

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _calib_text(tmp / "calib.txt")
        fam = Path(a.sample_family).resolve()
        if not (fam / "base" / "config.json").is_file():
            sys.exit(f"{fam}: no sample family; run `bash samples/demo.sh` (or samples/tiny_family.py) first")
        fts = [fam / n for n in ("math", "code", "legal")]
        rows.append(("sample family (base + 3)", _plan(_recipe(fam / "base", fts, data, a.samples, a.seq_len),
                                                      tmp, a.threads)))
        big = _random_family(tmp / "rand", a.hidden, a.layers, fam / "base")
        rows.append(("random Llama ~100M (base + 2)", _plan(_recipe(big["base"], [big["ft1"], big["ft2"]], data,
                                                                     a.samples, a.seq_len), tmp, a.threads)))
    print()
    print(f"TIES + LEWIS + AIM, {a.samples} samples x {a.seq_len} tokens, CPU, --threads {a.threads}")
    print()
    print("| family | plan s | calibration s | mask pass s | rest s | calibration share |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['total']:.1f} | {r['calibration']:.1f} | {r['masks']:.1f} | {r['rest']:.1f} | "
              f"{r['calibration'] / r['total']:.0%} |")


if __name__ == "__main__":
    main()
