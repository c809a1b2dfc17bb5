"""Scores from per-sample results, and paired bootstrap confidence intervals.

    recovered_gain(base_loss, merged_loss, expert_loss) = (base - merged) / (base - expert)
        1: the merge is as good as the task's expert; 0: no better than the base.
    mean_gain(base, merged, experts)            mean over tasks that have an expert (and a gain)
    bootstrap_ci(statistic, sizes, n_boot, level, seed) -> Interval

A statistic is a function of resampling indices: statistic(None) is the point estimate
on the samples as they are; statistic(idx), with idx = {task: int array [n_boot, n_task]},
returns n_boot values, each computed on one resample of every task's samples (with
replacement, each task resampled on its own). The same indices serve every model, so
a difference of two merges is bootstrapped paired, sample for sample:

    ci = bootstrap_ci(lambda idx: mean_gain(base, a, ex, idx) - mean_gain(base, b, ex, idx), sizes)

Percentile intervals; numpy only; the seed fixes the draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from mergeplan.evaluate.score import SampleScores

Indices = Mapping[str, np.ndarray]  # task -> [n_boot, n_samples] resampling indices


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def task_loss(s: SampleScores, idx: np.ndarray | None = None):
    """Token-weighted mean loss: a float, or one value per resample row of `idx`."""
    if idx is None:
        return s.loss
    return s.loss_sum[idx].sum(axis=1) / np.maximum(s.tokens[idx].sum(axis=1), 1)


def recovered_gain(base_loss, merged_loss, expert_loss):
    """(base - merged) / (base - expert); NaN where the expert is no better than the base
    on its own task (no gain to recover). Works elementwise on arrays."""
    base, merged, expert = (np.asarray(x, dtype=np.float64) for x in (base_loss, merged_loss, expert_loss))
    span = base - expert
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(span > 0, (base - merged) / np.where(span > 0, span, 1.0), np.nan)
    return float(g) if g.ndim == 0 else g


def task_gain(base: SampleScores, merged: SampleScores, expert: SampleScores, idx: np.ndarray | None = None):
    return recovered_gain(task_loss(base, idx), task_loss(merged, idx), task_loss(expert, idx))


def mean_gain(
    base: Mapping[str, SampleScores],
    merged: Mapping[str, SampleScores],
    experts: Mapping[str, SampleScores | None],
    idx: Indices | None = None,
):
    """Mean recovered gain over the tasks with an expert. A task whose expert is no better
    than the base on its own samples (in this resample) has no gain and is left out; NaN
    when no task has one."""
    gains = [task_gain(base[t], merged[t], e, None if idx is None else idx[t])
             for t, e in experts.items() if e is not None]
    if not gains:
        return float("nan")
    stacked = np.stack([np.asarray(g, dtype=np.float64) for g in gains])
    n = np.isfinite(stacked).sum(axis=0)
    total = np.where(np.isfinite(stacked), stacked, 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def resample(sizes: Mapping[str, int], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Bootstrap indices per task, drawn from one seeded generator in task order."""
    rng = np.random.default_rng(seed)
    return {t: rng.integers(0, n, size=(n_boot, n)) for t, n in sizes.items()}


def bootstrap_ci(
    statistic: Callable[[Indices | None], float | np.ndarray],
    sizes: Mapping[str, int],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of `statistic` over `n_boot` resamples of every task's samples.
    Resamples whose value is NaN (a gain with no span) are left out."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("bootstrap needs 0 < level < 1 and n_boot >= 1")
    est = float(statistic(None))
    vals = np.asarray(statistic(resample(sizes, n_boot, seed)), dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return Interval(est, float("nan"), float("nan"), level)
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(est, float(lo), float(hi), level)


def sizes_of(scores: Mapping[str, SampleScores]) -> dict[str, int]:
    return {t: int(s.tokens.size) for t, s in scores.items()}


def within_noise(iv: Interval, higher_is_better: bool = True) -> bool:
    """Whether the interval of a difference (winner - other) fails to clear zero in the
    better direction; an interval bootstrap could not compute (NaN) is noise too."""
    if not (np.isfinite(iv.low) and np.isfinite(iv.high)):
        return True
    return iv.low <= 0 if higher_is_better else iv.high >= 0
