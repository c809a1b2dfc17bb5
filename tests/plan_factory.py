"""Build small in-memory plans for tests of the plan API, CLI display and TUI."""

from __future__ import annotations

import numpy as np

from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, float32_array

COMPONENTS = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (172, 64), "mlp.up_proj": (172, 64),
    "mlp.down_proj": (64, 172),
}


def make_plan(layers: int = 4, models: tuple[str, ...] = ("math", "code"), aim: bool = True) -> Plan:
    rng = np.random.default_rng(0)
    refs = [ModelRef("base", "base", "./base", {"shards": [], "tensors": []})]
    refs += [ModelRef(m, "task", f"./{m}", {"shards": [], "tensors": []}) for m in models]
    tensors = [TensorPlan("model.embed_tokens.weight", (1024, 64), "bfloat16", op="copy", source="base")]
    for layer in range(layers):
        for comp, shape in COMPONENTS.items():
            name = f"model.layers.{layer}.{comp}.weight"
            contribs = []
            for i, m in enumerate(models):
                d = round(0.3 + 0.5 * ((layer * 7 + i * 3 + len(comp)) % 10) / 10, 3)
                contribs.append(
                    Contribution(m, 1.0, {"kind": "magnitude", "density": d, "digest": f"{layer:02d}{i:02d}" + "0" * 28},
                                 {"weight": "recipe", "density": "lewis"})
                )
            relax = None
            if aim:
                relax = {"kind": "aim", "omega": 0.4, "axis": 1, "scores": float32_array(rng.random(shape[1]))}
            tensors.append(
                TensorPlan(name, shape, "bfloat16", params={"lambda": 1.0, "normalize": True}, contributions=contribs,
                           relax=relax, stats={"lewis.delta": {m: float(rng.random()) for m in models}})
            )
        tensors.append(TensorPlan(f"model.layers.{layer}.input_layernorm.weight", (64,), "bfloat16",
                                  params={"lambda": 1.0}, contributions=[Contribution(m, 1.0) for m in models]))
    tensors.append(TensorPlan("lm_head.weight", (1024, 64), "bfloat16", params={"lambda": 1.0},
                              contributions=[Contribution(m, 1.0) for m in models]))
    return Plan(method="ties", models=refs, tensors=tensors, params={"normalize": True}, seed=7,
                recipe={"path": "recipe.yaml", "text": "merge_method: ties\n"}, mergeplan_version="0.1.0",
                created="2026-01-01T00:00:00+00:00")
