"""Per-sample next-token loss and token accuracy of one resident model on held-out sets.

    scores = score_model(model, sets, device=torch.device("cpu"), batch_size=8)
    scores["math"].loss        # mean cross-entropy over every predicted (non-pad) token
    scores["math"].loss_sum    # per sample: summed cross-entropy (float64)

Each sample predicts tokens 2..n from their prefixes; padding is never predicted nor
counted. Task scores are token-weighted (sum of losses / sum of tokens), the same as
one cross-entropy over all the task's tokens; per-sample sums let stats.py resample
samples. The forward runs in float32 (the model as loaded); losses are summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mergeplan.errors import MergeplanError
from mergeplan.evaluate.data import EvalSet


@dataclass
class SampleScores:
    """One model on one task, per sample."""

    loss_sum: np.ndarray  # float64 [samples]: summed next-token cross-entropy
    correct: np.ndarray  # int64 [samples]: predicted tokens whose argmax is the target
    tokens: np.ndarray  # int64 [samples]: predicted tokens

    @property
    def loss(self) -> float:
        return float(self.loss_sum.sum() / max(int(self.tokens.sum()), 1))

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / max(int(self.tokens.sum()), 1))

    def as_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "tokens": int(self.tokens.sum()),
                "samples": int(self.tokens.size)}


def score_batch(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """(loss sum, correct, tokens) per row of one batch."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    ce = torch.where(valid, ce, torch.zeros_like(ce)).double()
    hit = (logits.argmax(-1) == target) & valid
    return ce.sum(1), hit.sum(1), valid.sum(1)


@torch.no_grad()
def score_model(
    model: torch.nn.Module,
    sets: dict[str, EvalSet],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    advance: Callable[[str], None] | None = None,
) -> dict[str, SampleScores]:
    """Task name -> SampleScores of `model` (already on `device`, in eval mode) on each set.
    `advance(task)` is called after every batch (progress)."""
    device = torch.device(device)
    out: dict[str, SampleScores] = {}
    for name, es in sets.items():
        loss, correct, tokens = [], [], []
        for ids, mask in es.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            l, c, t = score_batch(logits, ids, mask)
            if not bool(torch.isfinite(l).all()):
                raise MergeplanError(f"the model's loss on task {name} is not finite (NaN/inf); "
                                     "its weights overflow or hold NaN")
            loss.append(l.cpu().numpy())
            correct.append(c.cpu().numpy())
            tokens.append(t.cpu().numpy())
            if advance:
                advance(name)
        out[name] = SampleScores(np.concatenate(loss).astype(np.float64), np.concatenate(correct).astype(np.int64),
                                 np.concatenate(tokens).astype(np.int64))
    return out
