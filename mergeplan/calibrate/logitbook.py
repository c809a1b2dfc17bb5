"""Cross-task logit distances for Sens-Merging, with one fine-tune resident at a time.

g_ij compares fine-tunes i and j on task j's data. Each model's logits on a data set are
either compared at once with those of models run before it (read back from the LogitStore)
or kept on disk for models run after it; a stored block is dropped as soon as its last
partner has been compared. `matrix()` gives g as mean distance per token.
"""

from __future__ import annotations

import numpy as np
import torch

from mergeplan.calibrate.data import CalibSet
from mergeplan.calibrate.logits import LogitStore, distance_sum


class LogitBook:
    """Which logits to keep on disk and which distances to accumulate, for g_ij on task j's data."""

    def __init__(self, ids: list[str], src: dict[str, str], sets: dict[str, CalibSet], width: int | None = None):
        self.ids, self.src, self.sets = ids, src, sets
        self.width = width  # the base's vocabulary: fine-tunes that added tokens are compared on it
        self.store = LogitStore()
        self.dsum: dict[tuple[str, str, str], float] = {}  # (model a, model b, data) with a < b by order
        self.rank = {m: i for i, m in enumerate(ids)}
        self.remaining: dict[tuple[str, str], set[str]] = {}

    def datasets_for(self, m: str) -> list[str]:
        return list(dict.fromkeys([self.src[m]] + [self.src[o] for o in self.ids if o != m]))

    def partners(self, m: str, d: str) -> list[str]:
        return [o for o in self.ids if o != m and (self.src[o] == d or self.src[m] == d)]

    def sink(self, m: str, d: str):
        """A LogitSink for model m's logits on data d: compare with earlier partners, store for later ones."""
        earlier = [o for o in self.partners(m, d) if self.rank[o] < self.rank[m]]
        later = {o for o in self.partners(m, d) if self.rank[o] > self.rank[m]}
        cs = self.sets[d]
        key = (m, d)
        state = {"row": 0}

        def take(_b: int, logits: torch.Tensor) -> None:
            if self.width is not None:
                logits = logits[:, : self.width]
            n = logits.shape[0]
            start = state["row"]
            if later and not self.store.has(key):
                self.store.create(key, cs.tokens, logits.shape[-1])
            for o in earlier:
                k = (o, m, d) if self.rank[o] < self.rank[m] else (m, o, d)
                self.dsum[k] = self.dsum.get(k, 0.0) + distance_sum(logits, self.store.read((o, d), start, start + n))
            if later:
                self.store.write(key, start, logits)
            state["row"] = start + n

        def done() -> None:
            if later:
                self.store.finish(key)
                self.remaining[key] = later
            for o in earlier:
                left = self.remaining.get((o, d))
                if left is not None:
                    left.discard(m)
                    if not left:
                        self.store.drop((o, d))
                        del self.remaining[(o, d)]

        return take, done

    def matrix(self) -> np.ndarray:
        K = len(self.ids)
        g = np.zeros((K, K))
        for i, a in enumerate(self.ids):
            for j, b in enumerate(self.ids):
                if i == j:
                    continue
                d = self.src[b]
                k = (a, b, d) if self.rank[a] < self.rank[b] else (b, a, d)
                g[i, j] = self.dsum[k] / self.sets[d].tokens
        return g
