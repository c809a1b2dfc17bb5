"""Bootstrap intervals and recovered gain, against independent computations on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergeplan.evaluate.score import SampleScores
from mergeplan.evaluate.stats import (
    bootstrap_ci,
    mean_gain,
    recovered_gain,
    resample,
    task_loss,
)


def _scores(loss_per_sample: np.ndarray, tokens: np.ndarray | None = None) -> SampleScores:
    tokens = np.ones(loss_per_sample.size, dtype=np.int64) if tokens is None else tokens
    return SampleScores(loss_per_sample * tokens, np.zeros(tokens.size, dtype=np.int64), tokens)


def test_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, 400)
    s = {"t": _scores(x)}
    ci = bootstrap_ci(lambda idx: task_loss(s["t"], None if idx is None else idx["t"]), {"t": 400}, n_boot=4000)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.estimate == pytest.approx(x.mean(), rel=1e-12)
    assert ci.low == pytest.approx(x.mean() - half, abs=0.12 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.12 * half)


def test_paired_difference_uses_the_same_samples_for_both():
    rng = np.random.default_rng(2)
    common = rng.normal(4.0, 2.0, 300)  # per-sample difficulty shared by both models
    d = rng.normal(0.05, 0.1, 300)
    a, b = _scores(common + d), _scores(common)
    ci = bootstrap_ci(lambda idx: task_loss(a, None if idx is None else idx["t"])
                      - task_loss(b, None if idx is None else idx["t"]), {"t": 300}, n_boot=4000)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    assert ci.estimate == pytest.approx(d.mean(), abs=1e-12)
    assert ci.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert ci.high == pytest.approx(d.mean() + half, abs=0.15 * half)
    unpaired = 1.959964 * math.sqrt((common + d).var(ddof=1) / 300 + common.var(ddof=1) / 300)
    assert ci.high - ci.low < 0.2 * 2 * unpaired  # pairing removes the shared difficulty
    assert ci.contains(0.05) and not ci.contains(0.0)


def test_vectorised_mean_gain_equals_a_loop_over_resamples():
    rng = np.random.default_rng(3)
    sizes = {"a": 7, "b": 5}
    tok = {t: rng.integers(1, 30, n) for t, n in sizes.items()}
    per = {name: {t: _scores(rng.normal(mu, 0.3, n), tok[t]) for t, n in sizes.items()}
           for name, mu in (("base", 5.0), ("merged", 4.0), ("ea", 3.0), ("eb", 3.5))}
    experts = {"a": per["ea"]["a"], "b": per["eb"]["b"]}
    idx = resample(sizes, 50, seed=9)
    got = mean_gain(per["base"], per["merged"], experts, idx)
    for r in range(50):
        gains = []
        for t in sizes:
            def loss(s: SampleScores) -> float:
                rows = idx[t][r]
                return sum(float(s.loss_sum[i]) for i in rows) / sum(int(s.tokens[i]) for i in rows)
            b, m, e = loss(per["base"][t]), loss(per["merged"][t]), loss(experts[t])
            gains.append((b - m) / (b - e))
        assert got[r] == pytest.approx(sum(gains) / len(gains), rel=1e-12)


def test_recovered_gain_and_tasks_without_a_gain():
    assert recovered_gain(5.0, 4.0, 3.0) == pytest.approx(0.5)
    assert recovered_gain(5.0, 3.0, 3.0) == pytest.approx(1.0)
    assert math.isnan(recovered_gain(3.0, 2.0, 3.5))  # the expert is worse than the base: nothing to recover
    base = {"x": _scores(np.array([5.0, 5.0])), "y": _scores(np.array([3.0, 3.0]))}
    merged = {"x": _scores(np.array([4.0, 4.0])), "y": _scores(np.array([2.0, 2.0]))}
    experts = {"x": _scores(np.array([3.0, 3.0])), "y": _scores(np.array([3.5, 3.5]))}
    assert mean_gain(base, merged, experts) == pytest.approx(0.5)  # y has no gain and is left out
    assert math.isnan(mean_gain(base, merged, {"x": None, "y": None}))


def test_same_seed_same_interval():
    rng = np.random.default_rng(4)
    s = _scores(rng.normal(1.0, 1.0, 50))

    def stat(idx):
        return task_loss(s, None if idx is None else idx["t"])

    a, b = bootstrap_ci(stat, {"t": 50}, seed=7), bootstrap_ci(stat, {"t": 50}, seed=7)
    c = bootstrap_ci(stat, {"t": 50}, seed=8)
    assert a == b and (a.low, a.high) != (c.low, c.high)
