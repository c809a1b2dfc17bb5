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


def make_full_plan() -> Plan:
    """A small plan with every part of the format set (fingerprints, explicit mask bits,
    n:m masks with a CABS order, AIM, Sens statistics, an edit log): the seed for fuzzing."""
    plan = make_plan(layers=2)
    for m in plan.models:
        m.fingerprint = {
            "shards": [{"file": "model.safetensors", "size": 123456, "header_sha256": "ab" * 32, "sha256": "cd" * 32}],
            "tensors": [[t.name, "BF16", list(t.shape)] for t in plan.tensors[:3]],
        }
    q = plan.tensors[1]
    q.contributions[0].mask = {"kind": "magnitude", "density": 0.5, "digest": None, "rescale": "none",
                               "bits": bytes(range(256)) * (q.shape[0] * q.shape[1] // 8 // 256)}
    q.contributions[1].mask = {"kind": "magnitude", "density": 0.3, "digest": "ab" * 16, "cutoff": [1065353216, 77],
                               "rescale": "inverse"}
    k = plan.tensors[2]
    k.params["cabs_order"] = [1, 0]
    for c in k.contributions:
        c.mask = {"kind": "nm", "n": 2, "m": 4, "density": 0.5, "rescale": "none", "digest": "0" * 32}
    k.stats["kept"] = {"math": 0.5, "code": 0.5}
    k.stats["overlap"] = 0.0
    plan.aux_files = ["config.json", "tokenizer.json"]
    plan.notes = ["int8_mask is accepted for mergekit recipes and ignored"]
    plan.guides = {"aim": {"omega": 0.4, "summary": "14 tensors relaxed"}}
    plan.calibration = {"samples": 8, "seq_len": 64, "device": "cpu", "data": {"math": "sha256:" + "0" * 64}}
    plan.stats = {"sens": {"groups": ["q", "k"], "sigma": {"math": float32_array([0.1, 0.2]),
                                                            "code": float32_array([0.3, 0.4])}}}
    plan.edit_log = [{"time": "2026-01-02T00:00:00+00:00", "tool": "review",
                      "changes": [[k.name, "math", "density", 0.5, 0.75]]}]
    plan.aux_model = "base"
    # What a `tune:` search records (mergeplan/tune/record.py), so fuzzing reaches its readers.
    tasks = {"math": {"loss": 2.5, "accuracy": 0.3}, "code": {"loss": 3.0, "accuracy": 0.2}}
    plan.tuning = {
        "objective": {"kind": "recovered_gain", "direction": "maximize", "weights": {},
                      "describe": "mean recovered gain (higher is better)"},
        "strategy": "random", "seed": 0, "budget": {"candidates": 2, "time": None}, "storage": False,
        "split": {"math": {"source": "m.jsonl", "skip": 8, "search": 4, "test": 4,
                           "search_sha256": "0" * 64, "test_sha256": "1" * 64}},
        "experts": {"math": "math", "code": "code"},
        "baselines": {"base": {"math": {"loss": 3.0, "accuracy": 0.1}, "code": {"loss": 3.5, "accuracy": 0.1}},
                      "experts": {"math": {"loss": 2.0, "accuracy": 0.4}, "code": {"loss": 2.5, "accuracy": 0.3}}},
        "chosen": 1,
        "candidates": [
            {"id": 0, "assignment": {}, "score": 0.4, "tasks": tasks, "seconds": 1.0, "worker": "local"},
            {"id": 1, "assignment": {"guides.aim.omega": 0.3, "merge_method": "dare_ties"}, "score": 0.5,
             "tasks": tasks, "seconds": 1.0, "worker": "local"},
            {"id": 2, "assignment": {"parameters.density": 2.0}, "score": None, "tasks": {},
             "seconds": 0.1, "worker": "local", "error": "density must be in (0, 1]"},
        ],
        "search_margin": {"estimate": 0.1, "low": 0.05, "high": 0.15, "level": 0.95, "within_noise": False},
        "test": {"chosen": 0.48, "recipe": 0.39, "margin": {"estimate": 0.09, "low": -0.01, "high": 0.2, "level": 0.95},
                 "within_noise": True},
        "calibration_seconds": 2.0, "interrupted": False, "notes": [],
    }
    return plan
