"""Reading plans: decode_plan (strict schema + canonical re-encode check) on a large real-shaped
plan and on 1 MB plans made of many small records.

    python benchmarks/plan_read_bench.py [--repeat 5]

The large plan has Llama-70B shapes: 723 tensors, 3 task models with magnitude masks,
LEWIS-style statistics and float32 AIM scores on every linear layer (about 25 MB).
Prints the median decode time of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from diff_bench import many_tensors, wide_tensor
from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, float32_array
from mergeplan.plan.codec import decode_plan, encode_plan

_SHAPES = {"self_attn.q_proj": (8192, 8192), "self_attn.k_proj": (1024, 8192), "self_attn.v_proj": (1024, 8192),
           "self_attn.o_proj": (8192, 8192), "mlp.gate_proj": (28672, 8192), "mlp.up_proj": (28672, 8192),
           "mlp.down_proj": (8192, 28672)}


def large_plan(tensors: int = 723) -> Plan:
    rng = np.random.default_rng(0)
    tasks = [f"m{i}" for i in range(3)]
    shards = [{"file": f"model-{i:05d}-of-00030.safetensors", "size": 4_900_000_000, "header_sha256": "ab" * 32,
               "sha256": None} for i in range(30)]
    models = [ModelRef(m, "base" if m == "base" else "task", f"./{m}", {"shards": shards, "tensors": []})
              for m in ["base", *tasks]]
    out = [TensorPlan("model.embed_tokens.weight", (128256, 8192), "bfloat16",
                      contributions=[Contribution(m, 1.0) for m in tasks])]
    for layer in range(80):
        for comp, shape in _SHAPES.items():
            contribs = [Contribution(m, 1.0, {"kind": "magnitude", "density": 0.5, "digest": "0" * 32,
                                              "cutoff": [1065353216, 77], "rescale": "inverse"},
                                     {"weight": "recipe", "density": "lewis"}) for m in tasks]
            relax = {"kind": "aim", "omega": 0.4, "axis": 1, "scores": float32_array(rng.random(shape[1]))}
            out.append(TensorPlan(f"model.layers.{layer}.{comp}.weight", shape, "bfloat16",
                                  params={"lambda": 1.0, "normalize": True}, contributions=contribs, relax=relax,
                                  stats={"kept": {m: 0.5 for m in tasks}, "lewis.delta": {m: 0.1 for m in tasks}}))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append(TensorPlan(f"model.layers.{layer}.{norm}.weight", (8192,), "bfloat16",
                                  contributions=[Contribution(m, 1.0) for m in tasks]))
    return Plan("ties", models, out[:tensors])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cases = {"723 tensors, AIM scores": large_plan(), "one tensor, 11k contributions": wide_tensor(11363, 0.0),
             "6.8k small tensors": many_tensors(6849, 0.0)}
    for label, plan in cases.items():
        data = encode_plan(plan)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            decode_plan(data)
            times.append(time.perf_counter() - t0)
        print(f"{label:32s} {len(data) / 1e6:5.1f} MB  decode {statistics.median(times) * 1e3:6.1f} ms "
              f"(median of {args.repeat})")


if __name__ == "__main__":
    main()
