"""`mergeplan eval`: score merges (plans merged in memory, or model directories) beside
the base and each fine-tune on held-out tasks, one model resident at a time.

    report = evaluate(["out/ties.plan", "out/dare"], {"math": "data/math.jsonl"}, samples=64, seq_len=128)

Who is who: the base and the fine-tunes are the plans' models (paths resolved as apply
resolves them, --model NAME=PATH first), plus `base` and `models` given explicitly.
The expert of task NAME is the fine-tune whose id is NAME; else the one a plan
calibrated on that very file (its calibration record's data_for); else the task has
no expert and no recovered gain.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeplan.errors import MergeplanError
from mergeplan.evaluate.data import EvalSet, load_eval_sets
from mergeplan.evaluate.score import SampleScores, score_model
from mergeplan.evaluate.stats import Interval, bootstrap_ci, mean_gain, sizes_of, task_gain, within_noise

BASE, FINETUNE, MERGE = "base", "fine-tune", "merge"


@dataclass
class Target:
    """One model to score: a directory, or a plan merged in memory."""

    name: str
    kind: str  # base | fine-tune | merge
    path: Path  # model directory, or the plan file
    plan: Any = None  # Plan for a plan target
    fingerprint: dict | None = None  # a baseline a plan names: what the plan recorded of it


@dataclass
class ModelResult:
    target: Target
    scores: dict[str, SampleScores]
    seconds: float
    gains: dict[str, float] = field(default_factory=dict)  # task -> recovered gain (tasks with an expert)
    mean_gain: float | None = None
    mean_gain_ci: Interval | None = None


@dataclass
class EvalReport:
    tasks: dict[str, EvalSet]
    experts: dict[str, str | None]  # task -> expert model name
    results: list[ModelResult]
    settings: dict[str, Any]
    comparison: dict[str, Any] | None = None  # best merge vs the runner-up, paired bootstrap

    def result(self, name: str) -> ModelResult:
        return next(r for r in self.results if r.target.name == name)


def resolve_targets(
    items: list[str], remap: dict[str, str], base: str | None, baselines: bool
) -> tuple[list[Target], list[Target], Path]:
    """(baselines: base then fine-tunes, merges, the tokenizer's directory)."""
    from mergeplan.apply import model_paths
    from mergeplan.plan.codec import read_plan

    merges: list[Target] = []
    known: dict[str, tuple[str, Path]] = {}  # id -> (role, path)
    recorded: dict[str, dict] = {}  # id -> fingerprint, for baselines a plan names

    def add(mid: str, role: str, path: Path) -> None:
        have = known.get(mid)
        if have is not None and have[1].resolve() != path.resolve():
            raise MergeplanError(f"model {mid!r} is {have[1]} in one input and {path} in another; "
                                 f"name one with --model {mid}=PATH")
        known.setdefault(mid, (role, path))

    if base is not None:
        add(BASE, BASE, Path(base))
    for item in items:
        p = Path(item)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise MergeplanError(f"{p} is a directory without config.json; give a model directory or a plan file")
            merges.append(Target(p.name or str(p), MERGE, p))
        elif p.is_file():
            plan = read_plan(p)
            merges.append(Target(p.stem, MERGE, p, plan))
            for mid, path in model_paths(plan, plan_remap(plan, remap), str(p)).items():
                add(mid, plan.model(mid).role, Path(path))
                recorded.setdefault(mid, plan.model(mid).fingerprint)
        else:
            raise MergeplanError(f"{p} not found; give a model directory or a plan file")
    for mid, path in remap.items():
        if mid not in known:
            add(mid, FINETUNE, Path(path))
    names = [t.name for t in merges]
    for t in merges:
        if names.count(t.name) > 1 or t.name in known:
            t.name = str(t.path)  # two inputs with one name: tell them apart by path
    rows = [Target(m, BASE if role == BASE else FINETUNE, p, fingerprint=recorded.get(m)) for m, (role, p) in known.items()]
    rows.sort(key=lambda t: t.kind != BASE)
    base_dir = next((t.path for t in rows if t.kind == BASE), None)
    if base_dir is None:
        plan_target = next((t for t in merges if t.plan is not None), None)
        base_dir = (known[plan_target.plan.aux_source.id][1] if plan_target else merges[0].path) if merges else None
    if base_dir is None:
        raise MergeplanError("nothing to evaluate: give model directories or plan files")
    return (rows if baselines else []), merges, base_dir


def plan_remap(plan, remap: dict[str, str]) -> dict[str, str]:
    """The --model entries that name this plan's models (others name other inputs)."""
    ids = {m.id for m in plan.models}
    return {k: v for k, v in remap.items() if k in ids}


def find_experts(tasks: dict[str, EvalSet], finetunes: list[str], merges: list[Target], data_root: Path) -> dict:
    """Task -> the fine-tune that is its expert, or None (see the module doc)."""
    out: dict[str, str | None] = {}
    for task, es in tasks.items():
        if task in finetunes:
            out[task] = task
            continue
        out[task] = None
        want = _resolved(es.source, data_root)
        for t in merges:
            cal = t.plan.calibration if t.plan is not None and isinstance(t.plan.calibration, dict) else {}
            # data_for: the data each fine-tune was measured on; data: the recipe's per-model sources
            data_for = {**_mapping(cal.get("data")), **_mapping(cal.get("data_for"))}
            rdir = t.plan.recipe.get("dir") if t.plan is not None and isinstance(t.plan.recipe, dict) else None
            if not isinstance(rdir, str) or want is None:
                continue
            hit = [m for m, src in data_for.items()
                   if isinstance(src, str) and m in finetunes and _resolved(src, Path(rdir)) == want]
            if hit:
                out[task] = hit[0]
                break
    return out


def _mapping(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _resolved(source: str, root: Path) -> Path | None:
    if source.startswith("hf:"):
        return None
    p = Path(source).expanduser()
    try:
        return (p if p.is_absolute() else root / p).resolve()
    except OSError:
        return None


def load_model_dir(path: Path, device: torch.device, fingerprint: dict | None = None) -> torch.nn.Module:
    """A model directory's weights (safetensors only, as apply reads) in float32, eval mode.
    With `fingerprint` (a baseline a plan names: the path came from a received plan), the
    directory is first opened as apply opens inputs (files confined to it) and its shard
    names, sizes, headers and tensor table must be the ones the plan recorded."""
    from transformers import AutoModelForCausalLM

    if fingerprint is not None:
        from mergeplan.io.modeldir import ModelDir

        md = ModelDir.open(path, name=path.name)
        try:
            md.check_fingerprint(fingerprint)
        finally:
            md.close()

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                     use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergeplanError(f"cannot load the model in {path}: {first}") from None
    return model.to(device).eval()


def merged_model(plan, threads: int = 1, device: torch.device | str = "cpu", remap: dict[str, str] | None = None,
                 plan_path: str | None = None, progress=None) -> torch.nn.Module:
    """A plan merged in memory (on the CPU, as apply) and loaded on `device`, ready to score."""
    from mergeplan.evaluate.memory import load_merged, merge_in_memory

    tensors = merge_in_memory(plan, threads=threads, remap=remap, plan_path=plan_path, progress=progress)
    return load_merged(plan, tensors, device=device, remap=remap, plan_path=plan_path)


def score_plan(plan, sets: dict[str, EvalSet], threads: int = 1, device: torch.device | str = "cpu",
               batch_size: int = 8, remap: dict[str, str] | None = None,
               plan_path: str | None = None) -> dict[str, SampleScores]:
    """Merge `plan` in memory, score it on `sets`, free it: what a search calls per candidate."""
    model = merged_model(plan, threads, device, remap, plan_path)
    try:
        return score_model(model, sets, device, batch_size)
    finally:
        del model
        gc.collect()


def evaluate(
    items: list[str],
    data: dict[str, str],
    *,
    remap: dict[str, str] | None = None,
    base: str | None = None,
    baselines: bool = True,
    samples: int = 64,
    seq_len: int = 512,
    skip: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    threads: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    quiet: bool = False,
    data_root: Path | None = None,
    console=None,
) -> EvalReport:
    """Score every target (and, with `baselines`, the base and each fine-tune) on every task."""
    from mergeplan.calibrate.models import load_tokenizer
    from mergeplan.calibrate.progress import CalibProgress
    from mergeplan.devices import pick_device, torch_threads

    _quiet_transformers()
    remap = dict(remap or {})
    dev = pick_device(device)
    rows, merges, tok_dir = resolve_targets(items, remap, base, baselines)
    root = Path(data_root) if data_root is not None else Path.cwd()
    tasks = load_eval_sets(data, load_tokenizer(tok_dir), samples, seq_len, skip, root)
    finetunes = [t.name for t in rows if t.kind == FINETUNE]
    experts = find_experts(tasks, finetunes, merges, root) if rows else {t: None for t in tasks}
    results: list[ModelResult] = []
    with torch_threads(threads):
        with CalibProgress(quiet, console=console, prefix="eval") as progress:
            total = sum(-(-len(es.samples) // batch_size) for es in tasks.values())  # batches per model
            # Merges first: merging a plan reads every input and checks each tensor's digest
            # against the plan, so the baselines a plan names are scored only once their
            # bytes are known to be the plan's (their header-level check cannot tell two
            # fine-tunes of one architecture apart). Reported in the usual order below.
            for t in [*merges, *rows]:
                t0 = time.perf_counter()
                if t.plan is not None:
                    with progress.task(f"{t.name} · merge in memory", len(t.plan.tensors)) as adv:
                        model = merged_model(t.plan, threads=threads, device=dev, remap=plan_remap(t.plan, remap),
                                             plan_path=str(t.path), progress=lambda *_: adv())
                else:
                    model = load_model_dir(t.path, dev, t.fingerprint)
                with progress.task(f"{t.name} · score {len(tasks)} task(s)", total) as adv:
                    scores = score_model(model, tasks, dev, batch_size, advance=lambda _t: adv())
                del model
                gc.collect()
                results.append(ModelResult(t, scores, round(time.perf_counter() - t0, 3)))
    order = {id(t): i for i, t in enumerate([*rows, *merges])}
    results.sort(key=lambda r: order[id(r.target)])
    report = EvalReport(tasks, experts, results, {
        "samples": samples, "seq_len": seq_len, "skip": skip, "batch_size": batch_size, "device": str(dev),
        "threads": threads, "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95},
    })
    add_gains(report, n_boot, seed)
    return report


def add_gains(report: EvalReport, n_boot: int = 1000, seed: int = 0) -> None:
    """Recovered gain per task and its mean (with a bootstrap interval) for every non-base
    model; for two merges or more, the paired difference of the best two."""
    base = next((r for r in report.results if r.target.kind == BASE), None)
    ex = {t: (report.result(e).scores[t] if e else None) for t, e in report.experts.items()}
    if base is None or not any(v is not None for v in ex.values()):
        return
    sizes = sizes_of(base.scores)
    for r in report.results:
        if r is base:
            continue
        r.gains = {t: task_gain(base.scores[t], r.scores[t], e) for t, e in ex.items() if e is not None}
        r.mean_gain = mean_gain(base.scores, r.scores, ex)
        r.mean_gain_ci = bootstrap_ci(lambda idx, r=r: mean_gain(base.scores, r.scores, ex, idx), sizes, n_boot,
                                      seed=seed)
    merges = sorted((r for r in report.results if r.target.kind == MERGE and r.mean_gain == r.mean_gain),
                    key=lambda r: -r.mean_gain)
    if len(merges) >= 2:
        a, b = merges[0], merges[1]
        ci = bootstrap_ci(lambda idx: mean_gain(base.scores, a.scores, ex, idx) - mean_gain(base.scores, b.scores,
                                                                                             ex, idx),
                          sizes, n_boot, seed=seed)
        report.comparison = {"best": a.target.name, "runner_up": b.target.name, "difference": ci,
                             "within_noise": within_noise(ci)}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

