"""Time the review TUI on a 70B-class plan: open-to-first-paint, grid scrolling, view switches.

    python benchmarks/tui_bench.py [--layers 80] [--models 3] [--size 120x40]

Builds the plan with the plan API (80 layers x 7 linear + 2 norms, 3 task models, AIM
scores of 8192 / 28672 floats, LEWIS-like densities and statistics, Sens per-layer stats),
writes it to a temp file, then drives the app headless with Pilot. Figures go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, float32_array, read_plan, write_plan

HIDDEN, INTER, KV, VOCAB = 8192, 28672, 1024, 128256
LINEAR = {  # name: (out, in), Llama-3-70B shapes
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def big_plan(layers: int, models: list[str]) -> Plan:
    rng = np.random.default_rng(0)
    refs = [ModelRef("base", "base", "./base")] + [ModelRef(m, "task", f"./{m}") for m in models]
    tensors = [TensorPlan("model.embed_tokens.weight", (VOCAB, HIDDEN), "bfloat16", op="copy", source="base")]
    for layer in range(layers):
        for comp, shape in LINEAR.items():
            contribs = [
                Contribution(m, 1.0, {"kind": "magnitude", "density": float(rng.uniform(0.3, 0.9)),
                                      "digest": f"{rng.integers(1 << 62):016x}" * 4},
                             {"weight": "sens", "density": "lewis"})
                for m in models
            ]
            tensors.append(TensorPlan(
                f"model.layers.{layer}.{comp}.weight", shape, "bfloat16", params={"lambda": 1.0},
                contributions=contribs,
                relax={"kind": "aim", "omega": 0.4, "axis": 1, "scores": float32_array(rng.random(shape[1]))},
                stats={"lewis.delta": {m: float(rng.random() / layers) for m in models}},
            ))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors.append(TensorPlan(
                f"model.layers.{layer}.{norm}.weight", (HIDDEN,), "bfloat16", params={"lambda": 1.0},
                contributions=[Contribution(m, 1.0) for m in models],
                relax={"kind": "aim", "omega": 0.4, "axis": 0, "scores": float32_array(rng.random(HIDDEN))},
            ))
    tensors.append(TensorPlan("model.norm.weight", (HIDDEN,), "bfloat16", params={"lambda": 1.0},
                              contributions=[Contribution(m, 1.0) for m in models]))
    tensors.append(TensorPlan("lm_head.weight", (VOCAB, HIDDEN), "bfloat16", params={"lambda": 1.0},
                              contributions=[Contribution(m, 1.0) for m in models]))
    groups = layers + 3
    return Plan(
        method="ties", models=refs, tensors=tensors, params={"normalize": True}, seed=1,
        guides={"lewis": {"gamma": 0.3, "epsilon": 0.9}, "aim": {"omega": 0.4}, "sens": {"T": 3.0}},
        calibration={"samples": 64, "seq_len": 512},
        stats={"sens": {"alpha": {m: float32_array(rng.random(groups)) for m in models},
                        "tau": {m: float(rng.random()) for m in models},
                        "sigma": {m: float32_array(rng.random(groups)) for m in models}}},
        created="2026-01-01T00:00:00+00:00", mergeplan_version="bench",
    )


async def drive(path: str, size: tuple[int, int]) -> dict[str, float]:
    from mergeplan_tui.app import make_app
    from mergeplan_tui.widgets.plangrid import PlanGrid

    out: dict[str, float] = {}
    painted: list[float] = []
    render_line = PlanGrid.render_line

    def spy(self, y):  # first grid line rendered with rows in it = first paint of the grid
        if not painted and self._cells:
            painted.append(time.perf_counter())
        return render_line(self, y)

    PlanGrid.render_line = spy
    t0 = time.perf_counter()
    app = make_app(path, model_checker=lambda m: "found")
    out["make_app (read + editor), wall"] = time.perf_counter() - t0
    async with app.run_test(size=size) as pilot:
        while not painted:
            await asyncio.sleep(0.001)
        out["open to first paint of the grid, wall"] = painted[0] - t0
        PlanGrid.render_line = render_line
        await app.workers.wait_for_complete()
        await pilot.pause()

        async def keys(*ks: str) -> tuple[list[float], list[float]]:
            """Wall and CPU time per key, each until the app is idle again (Pilot adds ~fixed waits to wall)."""
            walls, cpus = [], []
            for k in ks:
                t, c = time.perf_counter(), time.process_time()
                await pilot.press(k)
                await pilot.pause()
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            return walls, cpus

        def record(label: str, res: tuple[list[float], list[float]], agg=statistics.median) -> None:
            out[f"{label}, wall"] = agg(res[0])
            out[f"{label}, cpu"] = agg(res[1])

        base = await keys(*["question_mark", "escape"] * 5)
        record("baseline: open+close help (Pilot overhead)", base)
        record("cursor down, median per key", await keys(*["down"] * 100))
        record("page down/up, median per key", await keys(*["pagedown"] * 10, *["pageup"] * 10))
        record("cursor right (h-scroll), median per key", await keys(*["right"] * 40))
        record("switch shown quantity (v), median", await keys(*["v"] * 7))
        record("open tensor detail (enter)", await keys("enter"))
        await keys("escape")
        record("open edit dialog (e)", await keys("e"))
        app.screen.query_one("#layers").value = "10-20"
        app.screen.query_one("#components").value = "mlp"
        app.screen.query_one("#models").value = ""
        app.screen.query_one("#value").value = "0.5"
        await pilot.pause()
        record("apply range edit (L10-20 mlp x 3 models)", await keys("enter"))
        record("undo", await keys("u"))
        record("redo", await keys("r"))
        record("diff screen (d)", await keys("d"))
        record("overview screen (o)", await keys("o"))
        record("save (atomic write)", await keys("s"))
        await app.workers.wait_for_complete()
    out["edited values saved"] = float(sum(len(e["changes"]) for e in read_plan(path).edit_log))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--size", default="120x40")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    models = ["math", "code", "chat", "tool", "law"][: args.models]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.plan")
        t = time.perf_counter()
        plan = big_plan(args.layers, models)
        write_plan(plan, path)
        print(f"plan: {len(plan.tensors)} tensors, {args.layers} layers, {len(models)} task models, "
              f"{os.path.getsize(path) / 1e6:.1f} MB ({time.perf_counter() - t:.2f} s to build and write)")
        del plan
        t = time.perf_counter()
        read_plan(path)
        print(f"{'read_plan alone':52s} {time.perf_counter() - t:8.3f} s")
        for k, v in asyncio.run(drive(path, (w, h))).items():
            print(f"{k:52s} {v:8.3f} s" if not k.startswith("edited") else f"{k:52s} {int(v):8d}")
    print(f"python {sys.version.split()[0]}, terminal {w}x{h}")


if __name__ == "__main__":
    main()
