"""Calibration cost: hook overhead against a bare forward pass, peak memory, plan time.

    python benchmarks/calib_bench.py [--device auto] [--hidden 512] [--layers 6] [--samples 16]
                                     [--seq-len 256] [--batch-size 4] [--repeats 3] [--plan]
                                     [--moe EXPERTS]

--moe E measures a Mixtral of E experts (top 2) instead of a Llama: the hooks then take every
expert's routed rows and recompute its down projection's input (calibrate/experts.py).

1. Hook overhead: the same batches through the same model, (a) bare forward, (b) with the
   activation hooks of AIM (|x| on every weighted module), (c) LEWIS (x^2 on decoder
   linears), (d) both. Best of --repeats wall times; the target is (b..d) / (a) <= 1.15.
   Also the share of a hooked run spent inside hook code (timed within that run), and the
   ratio it implies, 1 / (1 - share): steadier than the wall ratio on a shared machine.
2. Peak host RSS (and peak device memory on CUDA).
3. --plan: run_guides end to end (LEWIS + AIM + Sens) on a random base + 3 fine-tunes of the
   chosen size written to a temp dir, timed per model; prints the plan time and an estimate
   for other sizes from the measured forward throughput.
Random weights and token ids: timing does not depend on what the text says.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergeplan.calibrate.data import CalibSet  # noqa: E402
from mergeplan.calibrate.models import resolve_device  # noqa: E402
from mergeplan.calibrate.modules import linear_sites, site_modules, weighted_sites  # noqa: E402
from mergeplan.calibrate.passes import activation_pass  # noqa: E402


def _config(a):
    from transformers import LlamaConfig, MixtralConfig

    if a.moe:
        return MixtralConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 8 * 8,
            num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
            num_key_value_heads=max(1, a.hidden // 256), max_position_embeddings=max(2048, a.seq_len),
            num_local_experts=a.moe, num_experts_per_tok=2, tie_word_embeddings=False,
        )
    return LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 8 * 8,
        num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
        num_key_value_heads=max(1, a.hidden // 256), max_position_embeddings=max(2048, a.seq_len),
        tie_word_embeddings=False,
    )


def _calib(a, seed=0) -> CalibSet:
    g = torch.Generator().manual_seed(seed)
    # lengths vary so batches carry padding, as real documents do
    lens = torch.randint(a.seq_len * 3 // 4, a.seq_len + 1, (a.samples,), generator=g).tolist()
    samples = [torch.randint(4, a.vocab, (n,), generator=g).tolist() for n in lens]
    return CalibSet("random", "random", "bench", samples, 0, a.seq_len, a.samples, "-")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def _bare(model, batches, dev):
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))


def _best(fn, dev, repeats):
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return min(times)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _HookClock:
    """Wall time spent inside the collector's hook work (reductions, accumulation, NaN checks).

    On a shared machine the wall-time ratio of two runs is noisy; the share of a hooked run
    spent in hook code is measured within one run, so it is the steadier overhead figure.
    """

    def __init__(self, dev):
        from mergeplan.calibrate import activations as A

        self.A, self.dev, self.spent, self.depth = A, dev, 0.0, 0
        C = A.ActivationCollector
        self._orig = (C._add, C.end_batch, C._expert_hook)

    def __enter__(self):
        add, end, expert_hook = self._orig
        clock = self

        def timed(fn):
            def inner(*args, **kw):
                clock.depth += 1
                if clock.depth == 1:  # an expert hook's own _add calls are inside its time
                    _sync(clock.dev)
                    t = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    if clock.depth == 1:
                        _sync(clock.dev)
                        clock.spent += time.perf_counter() - t
                    clock.depth -= 1

            return inner

        C = self.A.ActivationCollector
        C._add = timed(add)
        C.end_batch = timed(end)
        # the MoE experts hook routes rows and recomputes the down projection's input
        C._expert_hook = lambda col, owner, names: timed(expert_hook(col, owner, names))
        return self

    def __exit__(self, *exc):
        C = self.A.ActivationCollector
        C._add, C.end_batch, C._expert_hook = self._orig


def overhead(a, dev) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(a)).to(dev).eval()
    model.config.use_cache = False
    cs = _calib(a)
    batches = cs.batches(a.batch_size)
    mods_all = site_modules(model, weighted_sites(model)[0])
    mods_lin = site_modules(model, linear_sites(model))
    hooked = {
        "aim": (mods_all, ("abs",)),
        "lewis": (mods_lin, ("sq",)),
        "aim+lewis": ({**mods_all, **mods_lin}, ("abs", "sq")),
    }
    runs = {"bare": lambda: _bare(model, batches, dev)}
    for k, (mods, kinds) in hooked.items():
        runs[k] = lambda mods=mods, kinds=kinds: activation_pass(model, mods, kinds, batches, dev, "bench")
    runs["bare"]()  # warm-up: allocator, kernels, thread pools
    res: dict[str, float] = {}
    # interleave repeats so a noisy neighbour hurts every variant alike
    for _ in range(a.repeats):
        for name, fn in runs.items():
            res[name] = min(res.get(name, float("inf")), _best(fn, dev, 1))
    share: dict[str, float] = {}
    for k in hooked:
        best = 1.0
        for _ in range(a.repeats):
            with _HookClock(dev) as clock:
                wall = _best(runs[k], dev, 1)
            best = min(best, clock.spent / wall)
        share[k] = best
    out = {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokens": cs.tokens,
        "bare_s": round(res["bare"], 4),
        "tokens_per_s": round(cs.tokens / res["bare"]),
    }
    for k in hooked:
        out[f"{k}_s"] = round(res[k], 4)
        out[f"{k}_wall_ratio"] = round(res[k] / res["bare"], 3)
        out[f"{k}_hook_share"] = round(share[k], 4)
        out[f"{k}_ratio_from_share"] = round(1 / (1 - share[k]), 3)
    if dev.type == "cuda":
        out["device_peak_MiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def plan_time(a, dev) -> dict:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mergeplan.guides import ModelInput, run_guides

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vocab = {f"w{i}": i for i in range(a.vocab)}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0", eos_token="w2")
        torch.manual_seed(0)
        base = LlamaForCausalLM(_config(a))
        base.save_pretrained(root / "base")
        tok.save_pretrained(root / "base")
        sd = base.state_dict()
        data = {}
        for k, task in enumerate(("math", "code", "legal")):
            ft = LlamaForCausalLM(_config(a))
            ft.load_state_dict({n: v + 0.01 * torch.randn_like(v) for n, v in sd.items()})
            ft.save_pretrained(root / task)
            cs = _calib(a, seed=k + 1)
            data[task] = root / f"{task}.jsonl"
            data[task].write_text("".join(json.dumps({"text": " ".join(f"w{t}" for t in s)}) + "\n" for s in cs.samples))
        del base, ft, sd
        cal = {"data": {t: str(p) for t, p in data.items()}, "samples": a.samples, "seq_len": a.seq_len,
               "batch_size": a.batch_size, "device": str(dev)}
        out = {}
        for name, guides in (("lewis+aim", {"lewis": {}, "aim": {}}), ("lewis+aim+sens", {"lewis": {}, "aim": {}, "sens": {}})):
            t = time.perf_counter()
            dec = run_guides(guides, cal, ModelInput("base", root / "base"),
                             [ModelInput(m, root / m) for m in data], root, quiet=True)
            out[f"{name}_s"] = round(time.perf_counter() - t, 2)
            out[f"{name}_per_model_s"] = dec.calibration["timings_s"]
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--plan", action="store_true", help="also time run_guides end to end")
    p.add_argument("--moe", type=int, default=0, help="a Mixtral with this many experts (top 2) instead of a Llama")
    a = p.parse_args()
    if a.moe and a.plan:
        p.error("--plan times a Llama family only")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    print(f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__}")
    o = overhead(a, dev)
    for k, v in o.items():
        print(f"  {k:18s} {v}")
    for how in ("wall_ratio", "ratio_from_share"):
        worst = max(o[f"{k}_{how}"] for k in ("aim", "lewis", "aim+lewis"))
        verdict = "OK" if worst <= 1.15 else "OVER"
        print(f"hook overhead, worst {how.replace('_', ' ')}: {worst:.3f}  (target <= 1.15: {verdict})")
    if a.plan:
        pt = plan_time(a, dev)
        for k, v in pt.items():
            print(f"  {k:28s} {v}")
        # Passes: base 1 per data set; each fine-tune 1 forward+backward per sample (Sens,
        # ~3x a forward) plus 1 forward per other task's data; at the measured throughput:
        fwd = o["tokens"] / o["tokens_per_s"]
        print(f"  estimate per forward pass over the data: {fwd:.2f} s (scale by params and tokens for other sizes)")
    print(f"peak host RSS: {_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
