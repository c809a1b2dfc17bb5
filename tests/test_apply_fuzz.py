"""Mutated, re-signed plans through `apply` on real (tiny) inputs.

Each plan is either refused with one MergeplanError line, leaving nothing behind, or
applied to a complete output; no other exception, no file outside OUT_DIR, no work folder
left. Plans that decode and pass the checks reach the merge itself, so this also covers
what the plan checks let through (weights, densities, masks, AIM vectors, shapes).
"""

from __future__ import annotations

import json
import random
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeplan.apply import ApplyOptions, apply_plan
from mergeplan.errors import MergeplanError
from mergeplan.planner import PlanOptions, build_plan
from mergeplan.plan.codec import decode_plan, encode_plan
from mergeplan.recipe import load_recipe
from plan_mutate import mutate_plan

PLANS_PER_CHUNK = 120
CHUNKS = 3

SHAPES = {
    "model.embed_tokens.weight": (32, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 16),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.norm.weight": (8,),
}


def _model(d: Path, seed: int, base: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {k: (base[k].float() if base else torch.zeros(s)) + 0.1 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}
    d.mkdir(parents=True)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (d / "tokenizer_config.json").write_text("{}")
    return t


@pytest.fixture(scope="module")
def seed_plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-apply")
    base = _model(root / "base", 0)
    for i, name in enumerate(("math", "code")):
        _model(root / name, i + 1, base)
    plans = []
    for method, params in (("ties", "weight: 1.0, density: 0.5"), ("dare_ties", "weight: 0.7, density: 0.6"),
                           ("della", "weight: 0.5, density: 0.5, epsilon: 0.1"), ("task_arithmetic", "weight: 0.5")):
        r = root / f"{method}.yaml"
        r.write_text(f"merge_method: {method}\nbase_model: base\nmodels:\n"
                     f"  - model: math\n    parameters: {{{params}}}\n  - model: code\n    parameters: {{{params}}}\n")
        plans.append(encode_plan(build_plan(load_recipe(r), PlanOptions(quiet=True))))
    return root, plans


BIG = (1 << 40, -1, 0, 1 << 62)


def semantic_mutation(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A well-typed plan that decodes, with hostile values where apply reads them: the
    decoder cannot refuse these, so apply's own checks and the merge meet them."""
    p = decode_plan(data)
    t = rng.choice(p.tensors)
    c = rng.choice(t.contributions) if t.contributions else None
    choice = rng.randrange(14)
    if choice == 0:
        t.shape = tuple(rng.choice((1, 3, 8, 16, 32, 1 << 20)) for _ in range(rng.randrange(0, 4)))
    elif choice == 1 and c:
        c.weight = rng.choice((0.0, -1.0, 1e30, -1e30, 1e-45, float("nan"), float("inf")))
    elif choice == 2 and c and c.mask:
        c.mask["density"] = rng.choice((0.0, 1e-9, 0.999999, 1.0, 1.5, -0.1))
    elif choice == 3 and c and c.mask:
        c.mask["cutoff"] = [rng.choice(BIG + (5,)), rng.choice(BIG + (3,))]
    elif choice == 4 and c and c.mask:
        c.mask["kind"] = rng.choice(("magnitude", "bernoulli", "breadcrumbs", "della", "nm", "x"))
    elif choice == 5 and c and c.mask:
        c.mask["bits"] = bytes(rng.randrange(0, 40))
    elif choice == 6:
        t.relax = {"kind": "aim", "omega": rng.choice((0.0, 0.5, 1.0, 2.0)), "axis": rng.choice((0, 1, -1, 5)),
                   "scores": __import__("numpy").ones(rng.choice((8, 16, 32, 7)), dtype="float32")}
    elif choice == 7:
        t.dtype = rng.choice(("float32", "float16", "bfloat16", "int8", "bool", "float64"))
    elif choice == 8:
        t.op, t.source = "copy", rng.choice([m.id for m in p.models])
    elif choice == 9:
        p.aux_files = rng.sample(["config.json", "tokenizer_config.json", "config.json", "vocab.json"], rng.randrange(1, 4))
    elif choice == 10:
        p.max_shard_size = rng.choice((1, 0, -5, "1KB", "lots", 1 << 60))
    elif choice == 11:
        t.params = {**t.params, rng.choice(("lambda", "normalize", "consensus_method", "rescale")):
                    rng.choice((0.0, -2.0, float("nan"), True, "sum", "count", None, "x"))}
    elif choice == 12:
        p.models[rng.randrange(len(p.models))].path = rng.choice(("/", "..", "/dev", "../../etc", "base"))
    elif choice == 13 and c:
        c.model = rng.choice([m.id for m in p.models] + ["ghost"])
    from mergeplan.plan.codec import encode_plan as enc

    try:
        return enc(p), f"semantic:{choice}"
    except Exception:  # the encoder refuses some (e.g. a value it cannot store): try another
        return semantic_mutation(data, rng)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutated_plans_through_apply(seed_plans, chunk):
    root, plans = seed_plans
    before = _files(root)
    rng = random.Random(5000 + chunk)
    outcomes: dict[str, int] = {}
    for i in range(PLANS_PER_CHUNK):
        if i % 2:
            data, kind = mutate_plan(plans[i % len(plans)], rng)
        else:
            data, kind = semantic_mutation(plans[i % len(plans)], rng)
        out = root / "out"
        try:
            plan = decode_plan(data)
            apply_plan(plan, out, ApplyOptions(threads=1 + i % 2))
            outcome = "applied"
            assert (out / "mergeplan.json").is_file() and list(out.glob("*.safetensors"))
        except MergeplanError as e:
            outcome = "refused"
            assert "\n" not in str(e).strip(), str(e)
            assert not out.exists(), kind
        except BaseException as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"plan {i} ({kind}): {type(e).__name__}: {e}\n{traceback.format_exc()}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(out, ignore_errors=True)
        assert _files(root) == before, (i, kind, _files(root) ^ before)
    # the mutations must reach apply's own checks and the merge, not only the decoder
    assert outcomes.get("applied", 0) > 5, outcomes
