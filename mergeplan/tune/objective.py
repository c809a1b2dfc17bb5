"""What a search maximises, and whether its winner's margin is more than noise. Pure numpy.

Scores arrive per task as per-sample sums (negative log-likelihood summed over a sample's
scored tokens, and the token count), so a task's loss is the token-weighted mean over its
samples, the same number `mergeplan eval` prints, and a bootstrap can resample samples.

- recovered_gain (default, higher is better): mean over tasks that have an expert of
  (base_loss - merged_loss) / (base_loss - expert_loss); 1 means the merge matches the
  fine-tune trained for the task, 0 means no better than the base.
- loss: weighted mean of per-task losses (lower is better); weights from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

# A task whose expert barely beats the base (|base - expert| below this, in nats) would
# divide by ~0: its gain is noise, so the objective leaves it out and says so.
MIN_GAP = 1e-3


@dataclass(frozen=True)
class TaskSamples:
    """One model on one task: per-sample NLL sums and scored-token counts."""

    nll: np.ndarray  # float64 [samples]
    tokens: np.ndarray  # int64 [samples]

    def loss(self, idx: np.ndarray | None = None) -> float:
        nll, tok = (self.nll, self.tokens) if idx is None else (self.nll[idx], self.tokens[idx])
        return float(nll.sum() / max(int(tok.sum()), 1))


@dataclass(frozen=True)
class Objective:
    kind: str = "recovered_gain"
    weights: Mapping[str, float] = field(default_factory=dict)  # kind == "loss"

    @property
    def direction(self) -> str:
        return "maximize" if self.kind == "recovered_gain" else "minimize"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def gain_tasks(self, base: Mapping[str, float], experts: Mapping[str, float | None]) -> list[str]:
        return [t for t, e in experts.items() if e is not None and t in base and abs(base[t] - e) >= MIN_GAP]

    def value(self, merged: Mapping[str, float], base: Mapping[str, float], experts: Mapping[str, float | None]) -> float:
        """The objective from per-task losses (merged model, base model, each task's expert)."""
        if self.kind == "recovered_gain":
            tasks = self.gain_tasks(base, experts)
            if not tasks:
                raise ValueError("recovered_gain needs a task whose expert differs from the base")
            return float(np.mean([(base[t] - merged[t]) / (base[t] - experts[t]) for t in tasks]))
        w = {t: float(self.weights.get(t, 1.0 if not self.weights else 0.0)) for t in merged}
        total = sum(w.values())
        if total <= 0:
            raise ValueError("the loss objective's weights name no evaluated task")
        return float(sum(w[t] * merged[t] for t in merged) / total)

    def of_samples(self, merged: Mapping[str, TaskSamples], base: Mapping[str, TaskSamples],
                   experts: Mapping[str, TaskSamples | None], idx: Mapping[str, np.ndarray] | None = None) -> float:
        pick = (lambda t: None) if idx is None else (lambda t: idx[t])
        return self.value(
            {t: s.loss(pick(t)) for t, s in merged.items()},
            {t: s.loss(pick(t)) for t, s in base.items()},
            {t: (None if s is None else s.loss(pick(t))) for t, s in experts.items()},
        )


def margin_interval(objective: Objective, a: Mapping[str, TaskSamples], b: Mapping[str, TaskSamples],
                    base: Mapping[str, TaskSamples], experts: Mapping[str, TaskSamples | None],
                    rounds: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Paired bootstrap over held-out samples of objective(a) - objective(b): the point value
    and a percentile interval. Both candidates (and the base and experts the gain divides
    by) are scored on the same resampled samples, so shared sample difficulty cancels."""
    rng = np.random.default_rng(np.random.PCG64(seed))
    point = objective.of_samples(a, base, experts) - objective.of_samples(b, base, experts)
    n = {t: len(s.nll) for t, s in a.items()}
    diffs = np.empty(rounds)
    for r in range(rounds):
        idx = {t: rng.integers(0, k, size=k) for t, k in n.items()}
        diffs[r] = objective.of_samples(a, base, experts, idx) - objective.of_samples(b, base, experts, idx)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


def within_noise(objective: Objective, interval: tuple[float, float, float]) -> bool:
    """True when the bootstrap interval of (winner - other) does not clear zero in the
    objective's better direction."""
    _, lo, hi = interval
    return lo <= 0 if objective.direction == "maximize" else hi >= 0
