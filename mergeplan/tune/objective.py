"""What a search optimises, and whether its winner's margin is more than noise.

Built on mergeplan.evaluate.stats (per-sample scores, paired bootstrap), so a candidate's
score is the number `mergeplan eval` prints for the same merge and data.

- recovered_gain (default, higher is better): mean over tasks that have an expert of
  (base_loss - merged_loss) / (base_loss - expert_loss).
- loss: weighted mean of per-task losses (lower is better); weights from the recipe, tasks
  it does not name weigh 0 (or 1 each when no weight is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from mergeplan.errors import MergeplanError
from mergeplan.evaluate.score import SampleScores
from mergeplan.evaluate.stats import Indices, Interval, bootstrap_ci, mean_gain, sizes_of, task_loss
from mergeplan.evaluate.stats import within_noise as stats_within_noise

Scores = Mapping[str, SampleScores]


@dataclass(frozen=True)
class Objective:
    kind: str = "recovered_gain"
    weights: Mapping[str, float] = field(default_factory=dict)  # kind == "loss"

    @property
    def direction(self) -> str:
        return "maximize" if self.kind == "recovered_gain" else "minimize"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def describe(self) -> str:
        if self.kind == "recovered_gain":
            return "mean recovered gain (higher is better)"
        w = ", ".join(f"{t} {v:g}" for t, v in self.weights.items()) or "equal weights"
        return f"weighted loss ({w}; lower is better)"

    def value(self, merged: Scores, base: Scores, experts: Mapping[str, SampleScores | None],
              idx: Indices | None = None):
        """The objective of one merge; with bootstrap indices, one value per resample."""
        if self.kind == "recovered_gain":
            return mean_gain(base, merged, experts, idx)
        w = {t: float(self.weights.get(t, 0.0 if self.weights else 1.0)) for t in merged}
        total = sum(w.values())
        if total <= 0:
            raise MergeplanError("tune.objective.loss: its weights name no held-out task; weigh at least one "
                                 f"of {', '.join(merged)}")
        vals = sum(w[t] * np.asarray(task_loss(s, None if idx is None else idx[t]), dtype=np.float64)
                   for t, s in merged.items() if w[t])
        out = vals / total
        return float(out) if np.ndim(out) == 0 else out


def margin(objective: Objective, a: Scores, b: Scores, base: Scores, experts: Mapping[str, SampleScores | None],
           n_boot: int = 1000, seed: int = 0) -> Interval:
    """Paired bootstrap of objective(a) - objective(b) over the held-out samples: both
    merges, the base and the experts are scored on the same resampled samples, so shared
    sample difficulty cancels."""
    return bootstrap_ci(
        lambda idx: objective.value(a, base, experts, idx) - objective.value(b, base, experts, idx),
        sizes_of(a), n_boot=n_boot, seed=seed,
    )


def within_noise(objective: Objective, iv: Interval) -> bool:
    """True when the interval of (winner - other) does not clear zero in the better direction."""
    return stats_within_noise(iv, objective.direction == "maximize")
