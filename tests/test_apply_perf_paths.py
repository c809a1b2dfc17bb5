"""The streamed apply path (mergeplan/streamed.py) against the whole-tensor path it replaces.

The promise: same bytes. Checked per tensor with tiny slices (so every slice boundary,
row block and tie case is crossed), for the exact top-k against an independent numpy
argsort, and end to end through `apply_plan` against the whole-tensor path.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mergeplan.apply as apply_mod
from cli_helpers import write_recipe
from mergeplan.apply import ApplyOptions, apply_plan
from mergeplan.schedule import MemoryScheduler as _Scheduler
from mergeplan.errors import InputMismatchError, MergeplanError
from mergeplan.whole import TensorInputs, compute_masks, deltas_of, run_tensor
from mergeplan.methods.masks import mask_digest
from mergeplan.planner import PlanOptions, build_plan
from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan
from mergeplan.recipe import load_recipe
from mergeplan.methods.select import TopK
from mergeplan.slices import MemorySlices
from mergeplan.streamed import run_streamed, streamable

SHAPE = (19, 23)
MODELS = ["base", "m0", "m1", "m2"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As apply runs its workers: intra-op threads only slow these tiny slices down."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    flat = base.view(-1)
    flat[:20] = 0.0
    flat[20:30] = -0.0  # signed zeros in the base reach the output through base + 0
    tensors = []
    for i in range(3):
        t = (base.float() + torch.randn(SHAPE, generator=g) * 0.003).to(torch.bfloat16)
        t.view(-1)[60 + 40 * i:260] = flat[60 + 40 * i:260]  # runs of zero deltas: ties at any density
        tensors.append(t)
    tensors[2].view(-1)[300:340] = (2 * base.float() - tensors[0].float()).to(torch.bfloat16).view(-1)[300:340]
    return base, tensors


def _plan(method, specs, weights, params, relax=None) -> tuple[Plan, TensorPlan]:
    refs = [ModelRef("base", "base", "./base", {})] + [ModelRef(f"m{i}", "task", f"./m{i}", {}) for i in range(3)]
    contribs = [Contribution(f"m{i}", w, None if s is None else dict(s)) for i, (s, w) in enumerate(zip(specs, weights))]
    tp = TensorPlan("model.layers.0.mlp.up_proj.weight", SHAPE, "bfloat16", params=params,
                    contributions=contribs, relax=relax)
    return Plan(method=method, models=refs, tensors=[tp], seed=5), tp


def _record_digests(plan, tp, base, tensors) -> None:
    """What the planner does: compute each mask on the whole tensor, keep its digest."""
    if not any(c.mask for c in tp.contributions):
        return
    for c, m in zip(tp.contributions, compute_masks(plan, tp, deltas_of(TensorInputs(base, tensors)))):
        if c.mask is not None and m is not None:
            c.mask["digest"] = mask_digest(m.mask)


MAG = {"kind": "magnitude", "density": 0.5, "rescale": "none"}
CASES = {
    "ties_negative_weight": ("ties", [MAG] * 3, [1.0, 0.6, -0.3],
                             {"normalize": True, "lambda": 1.0, "consensus_method": "sum"}),
    "ties_inverse_lambda": ("ties", [dict(MAG, density=0.3, rescale="inverse")] * 3, [1.0, 1.0, 0.5],
                            {"normalize": False, "lambda": 0.7, "consensus_method": "sum"}),
    "ties_count": ("ties", [dict(MAG, density=0.9)] * 3, [1.0, 1.0, 1.0],
                   {"normalize": True, "lambda": 1.0, "consensus_method": "count"}),
    "ties_mixed_dense_empty": ("ties", [dict(MAG, density=0.75), None, dict(MAG, density=0.0)], [1.0, 0.6, 0.3],
                               {"normalize": True, "lambda": 1.0, "consensus_method": "sum"}),
    "dare_ties": ("dare_ties", [{"kind": "bernoulli", "density": 0.4, "rescale": "inverse"}] * 3, [1.0, 0.5, 0.5],
                  {"normalize": False, "lambda": 1.0, "consensus_method": "sum"}),
    "breadcrumbs": ("breadcrumbs", [{"kind": "breadcrumbs", "density": 0.6, "gamma": 0.05, "rescale": "none"}] * 3,
                    [1.0, 0.5, 0.5], {"normalize": False, "lambda": 1.0}),
    "task_arithmetic": ("task_arithmetic", [None] * 3, [0.7, 0.5, -0.2], {"normalize": False, "lambda": 0.9}),
    "cabs": ("cabs", [{"kind": "nm", "n": 2, "m": 4, "density": 0.5, "rescale": "none"},
                      {"kind": "nm", "n": 1, "m": 4, "density": 0.25, "rescale": "none"},
                      {"kind": "nm", "n": 3, "m": 4, "density": 0.75, "rescale": "none"}], [1.0, 0.6, 0.4], {}),
    "cabs_ordered_m5": ("cabs", [{"kind": "nm", "n": 2, "m": 5, "density": 0.4, "rescale": "none"}] * 3,
                        [1.0, -0.5, 0.8], {"cabs_order": [2, 0, 1]}),
    "della_inverse": ("della", [{"kind": "della", "density": 0.5, "epsilon": 0.1, "rescale": "inverse"}] * 3,
                      [1.0, 0.5, -0.4], {"normalize": True}),
    "della_linear_none": ("della_linear", [{"kind": "della", "density": 0.6, "epsilon": 0.2, "rescale": "none"},
                                           None, {"kind": "della", "density": 0.3, "epsilon": 0.05, "rescale": "none"}],
                          [0.7, 0.5, 0.2], {}),
    "linear": ("linear", [None] * 3, [0.5, 0.3, 0.2], {"normalize": True}),
}


def _aim(axis: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"kind": "aim", "omega": 0.3, "axis": axis, "scores": torch.rand(SHAPE[axis], generator=g).tolist()}


def _source(base, tensors, stacked: bool):
    if stacked:  # as apply holds mid-size inputs: rows of one buffer
        return MemorySlices.rows(torch.stack([base.reshape(-1)] + [t.reshape(-1) for t in tensors]), MODELS)
    return MemorySlices(base, tensors, MODELS)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [8, 37])
@pytest.mark.parametrize("fused,stacked", [(True, False), (False, False), (True, True)])
def test_streamed_equals_whole_tensor_bytes(case, chunk, fused, stacked):
    base, tensors = _inputs()
    method, specs, weights, params = CASES[case]
    plan, tp = _plan(method, specs, weights, params)
    _record_digests(plan, tp, base, tensors)
    assert streamable(plan, tp)
    want = run_tensor(plan, tp, TensorInputs(base, tensors)).to(torch.bfloat16)
    got = run_streamed(plan, tp, _source(base, tensors, stacked), torch.bfloat16, chunk=chunk, fused=fused)
    assert got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("case", ["ties_negative_weight", "dare_ties", "della_inverse"])
def test_streamed_aim_relaxation_equals_whole_tensor(case, axis):
    base, tensors = _inputs(3)
    method, specs, weights, params = CASES[case]
    plan, tp = _plan(method, specs, weights, params, relax=_aim(axis))
    _record_digests(plan, tp, base, tensors)
    want = run_tensor(plan, tp, TensorInputs(base, tensors)).to(torch.float32)
    got = run_streamed(plan, tp, MemorySlices(base, tensors, MODELS), torch.float32, chunk=30)  # not whole rows
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_streamable_keeps_whole_tensor_masks_on_the_whole_path():
    for spec in (dict(MAG, rescale="l1"), dict(MAG, bits=b"\xff" * 55)):
        plan, tp = _plan("ties", [spec] * 3, [1.0] * 3, {})
        assert not streamable(plan, tp)
    plan, tp = _plan("ties", [MAG] * 3, [1.0] * 3, {})
    assert streamable(plan, tp)


def _numpy_topk(keys: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: stable sort by descending key keeps lower indices first on ties."""
    keep = np.zeros(keys.size, dtype=bool)
    keep[np.argsort(-keys.astype(np.int64), kind="stable")[:k]] = True
    return keep


@pytest.mark.parametrize("keep_limit", [None, 0, 50])  # 0, 50: boundary entries (partly) not kept, a third pass cuts ties
@pytest.mark.parametrize("dist", ["floats", "heavy_ties", "one_bucket"])
def test_topk_counts_match_a_stable_sort(dist, keep_limit):
    rng = np.random.default_rng(7)
    n = 3001
    if dist == "floats":
        keys = np.abs(rng.standard_normal(n).astype(np.float32)).view(np.int32)
    elif dist == "heavy_ties":
        keys = rng.choice(np.array([0, 5, 70000, 70001, 1 << 20], dtype=np.int32), n)
    else:
        keys = (0x3F800000 + rng.integers(0, 50, n)).astype(np.int32)  # one high bucket, many ties
    t = torch.from_numpy(keys)
    for k in (0, 1, 2, n // 3, n // 2, n - 1, n):
        sel = TopK(n, k, keep_limit=keep_limit)
        while not sel.done:
            for start in range(0, n, 256):
                sel.feed(t[start:start + 256], start)
            sel.finish_pass()
        got = np.concatenate([sel.mask(t[s:s + 100], s).numpy() for s in range(0, n, 100)])
        np.testing.assert_array_equal(got, _numpy_topk(keys, k), err_msg=f"{dist} k={k}")


def test_changed_input_fails_the_digest_before_anything_is_returned():
    base, tensors = _inputs()
    method, specs, weights, params = CASES["ties_negative_weight"]
    plan, tp = _plan(method, specs, weights, params)
    _record_digests(plan, tp, base, tensors)
    changed = [tensors[0], tensors[0], tensors[2]]  # m1's weights replaced: another mask
    with pytest.raises(InputMismatchError, match="model m1: the recomputed mask does not match"):
        run_streamed(plan, tp, MemorySlices(base, changed, MODELS), torch.bfloat16, chunk=16)


@pytest.mark.parametrize("case", ["ties_negative_weight", "task_arithmetic"])
def test_non_finite_input_is_named_with_its_count(case):
    base, tensors = _inputs()
    method, specs, weights, params = CASES[case]
    plan, tp = _plan(method, specs, weights, params)
    _record_digests(plan, tp, base, tensors)
    bad = [tensors[0], tensors[1].clone(), tensors[2]]
    bad[1].view(-1)[[5, 300, 431]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.bfloat16)
    with pytest.raises(MergeplanError) as whole:
        from mergeplan.whole import check_finite
        for name, t in zip(MODELS[1:], bad):
            check_finite(t, tp.name, name)
    with pytest.raises(MergeplanError) as streamed:
        run_streamed(plan, tp, MemorySlices(base, bad, MODELS), torch.bfloat16, chunk=16)
    assert str(streamed.value) == str(whole.value)
    assert "model m1" in str(streamed.value) and "3 NaN/Inf" in str(streamed.value)


def test_scheduler_keeps_big_jobs_apart_without_idling_a_worker():
    """Two huge jobs never run together; the second worker takes the small ones meanwhile,
    and a job larger than the whole budget still runs (alone)."""
    sched = _Scheduler([(900, "huge1"), (900, "huge2"), (5000, "giant")] + [(50, f"s{i}") for i in range(6)], 1000)
    running: set[str] = set()
    seen: list[set[str]] = []
    lock = threading.Lock()

    def run(job):
        with lock:
            running.add(job)
            seen.append(set(running))
        time.sleep(0.05 if job.startswith("huge") or job == "giant" else 0.01)
        with lock:
            running.discard(job)

    workers = [threading.Thread(target=sched.work, args=(run,)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    done = set().union(*seen)
    assert done == {"huge1", "huge2", "giant"} | {f"s{i}" for i in range(6)}
    assert not any({"huge1", "huge2"} <= s for s in seen)
    assert all(s == {"giant"} for s in seen if "giant" in s)
    assert any("huge1" in s and len(s) == 2 for s in seen)  # a small job ran beside a huge one
    assert sched.used == 0


def test_scheduler_stops_after_a_failure():
    sched = _Scheduler([(1, i) for i in range(5)], 10)
    ran = []

    def run(job):
        ran.append(job)
        if job == 1:
            raise MergeplanError("boom")

    with pytest.raises(MergeplanError):
        sched.work(run)
    assert ran == [0, 1] and sched.take() is None


def _tree(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


def test_apply_streamed_equals_whole_path_and_threads(tiny_family_bf16, tmp_path, monkeypatch):
    fam = tiny_family_bf16
    r = write_recipe(tmp_path / "ties.yaml", f"""
        merge_method: ties
        base_model: {fam.base}
        models:
          - model: {fam.finetunes['math']}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {fam.finetunes['code']}
            parameters: {{weight: 0.7, density: 0.3}}
          - model: {fam.finetunes['legal']}
            parameters: {{weight: -0.2, density: 0.6}}
        parameters: {{max_shard_size: 200KB}}
    """)
    plan = build_plan(load_recipe(r), PlanOptions(threads=1, quiet=True))
    calls = {"stream": 0}
    real = apply_mod.run_streamed

    def counting(*a, **k):
        calls["stream"] += 1
        return real(*a, **k)

    monkeypatch.setattr(apply_mod, "run_streamed", counting)
    apply_plan(plan, tmp_path / "s1", ApplyOptions(threads=1, chunk=1000))
    apply_plan(plan, tmp_path / "s2", ApplyOptions(threads=2, chunk=777, memory_budget=1))
    assert calls["stream"] == 2 * sum(t.op == "merge" for t in plan.tensors)
    monkeypatch.setattr(apply_mod, "streamable", lambda plan, tp: False)
    apply_plan(plan, tmp_path / "whole", ApplyOptions(threads=1))
    s1, s2, whole = (_tree(tmp_path / n) for n in ("s1", "s2", "whole"))
    assert len(s1) > 1 and s1 == s2 == whole


def test_file_slices_read_ranges_and_name_a_truncated_shard(tmp_path):
    from safetensors.torch import save_file

    from mergeplan.io.modeldir import ModelDir
    from mergeplan.slices import FileSlices

    d = tmp_path / "m"
    d.mkdir()
    a = torch.arange(1000, dtype=torch.float32).to(torch.bfloat16).reshape(10, 100)
    save_file({"a": a, "b": torch.ones(3)}, str(d / "model.safetensors"))
    md = ModelDir.open(d, name="m")
    try:
        src = FileSlices("a", [md], ["m"])
        assert torch.equal(src.read(0, 0, 1000), a.reshape(-1))
        assert torch.equal(src.read(0, 123, 77), a.reshape(-1)[123:200])
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-600])  # cut into tensor "a" (b sits after it)
        with pytest.raises(MergeplanError, match="ended while reading tensor 'a'"):
            src.read(0, 600, 400)
    finally:
        md.close()


def test_malloc_settings_take_on_glibc():
    import platform

    from mergeplan import malloc

    took = malloc.return_large_blocks(arenas=3)
    malloc.trim()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert took
    else:
        assert took is False
