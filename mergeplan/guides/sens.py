"""Sens-Merging: per-layer-group coefficients from gradient sensitivity and cross-task logits.

Groups: each decoder block, the embeddings, the final norm and the head (a tied head is part
of the embeddings' group). For fine-tune i on its own task data:
    S_i^l   = sum over samples, over parameters of group l, of |theta * dL/dtheta|
    alpha_i = S_i / ||S_i||_2                                   (over groups)
    g_ij    = mean over task j's tokens of ||logits_i - logits_j||_2
    tau_i   = sum_{j != i} g_ij, then tau / ||tau||_1           (over models)
    sigma_i^l = softmax_i(tau_i * alpha_i^l / T)
and the merged delta of group l is sum_i K * sigma_i^l * d_i: the coefficient K * sigma_i^l
multiplies model i's recipe weight. tau follows the paper's formula as written (a model far
from the others gets the larger tau). With alpha ~ 1/sqrt(groups) and tau ~ 1/K the softmax
is close to uniform unless T is small; the plan shows the coefficients so users can judge.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergeplan.plan.names import parse_name


def group_of(param: str, tied_head: bool = False) -> str:
    p = parse_name(param)
    if p.layer is not None:
        return f"layers.{p.layer}"
    if p.component in ("embed", "embed_pos"):
        return "embed"
    if p.component == "lm_head":
        return "embed" if tied_head else "lm_head"
    if p.component == "norm":
        return "norm"
    return "other"


def group_order(groups: set[str]) -> list[str]:
    def key(g: str) -> tuple[int, int, str]:
        if g == "embed":
            return (0, 0, g)
        if g.startswith("layers."):
            return (1, int(g.split(".")[1]), g)
        return (2, ["norm", "lm_head", "other"].index(g) if g in ("norm", "lm_head", "other") else 3, g)

    return sorted(groups, key=key)


def alpha(S: np.ndarray) -> np.ndarray:
    """[K, G] sensitivities -> each row divided by its L2 norm (a zero row stays zero)."""
    S = S.astype(np.float64)
    n = np.sqrt((S * S).sum(axis=1, keepdims=True))
    return np.divide(S, n, out=np.zeros_like(S), where=n > 0)


def tau(g: np.ndarray) -> np.ndarray:
    """[K, K] distances g[i, j] (model i vs expert j on task j) -> L1-normalised row sums off the diagonal."""
    g = np.asarray(g, np.float64)
    t = g.sum(axis=1) - np.diag(g)
    s = np.abs(t).sum()
    return t / s if s > 0 else np.full(len(t), 1.0 / len(t))


def sigma(a: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    """softmax over models (axis 0) of tau_i * alpha_i^l / T, per group l."""
    z = t[:, None] * a / temperature
    z = z - z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


def decide(
    models: list[str],
    groups: list[str],
    S: np.ndarray,
    g: np.ndarray | None,
    temperature: float,
    tensor_groups: dict[str, str],
) -> dict[str, Any]:
    """S [K, G] per model and group; g [K, K] or None (cross_task off); tensor_groups: stored tensor -> group.

    Returns {"weights", "tensor_stats", "plan_stats"}.
    """
    K = len(models)
    a = alpha(S)
    t = tau(g) if g is not None else np.full(K, 1.0 / K)
    sg = sigma(a, t, temperature)
    coef = K * sg
    col = {gr: i for i, gr in enumerate(groups)}
    weights: dict[str, dict[str, float]] = {}
    tstats: dict[str, dict[str, Any]] = {}
    for tensor, gr in tensor_groups.items():
        if gr not in col:
            continue
        j = col[gr]
        weights[tensor] = {m: float(coef[i, j]) for i, m in enumerate(models)}
        tstats[tensor] = {
            "sens.group": gr,
            "sens.alpha": {m: float(a[i, j]) for i, m in enumerate(models)},
            "sens.sigma": {m: float(sg[i, j]) for i, m in enumerate(models)},
        }
    pstats = {
        "models": list(models),
        "groups": list(groups),
        "temperature": float(temperature),
        "S": {m: S[i].astype(np.float32) for i, m in enumerate(models)},
        "alpha": {m: a[i].astype(np.float32) for i, m in enumerate(models)},
        "tau": {m: float(t[i]) for i, m in enumerate(models)},
        "sigma": {m: sg[i].astype(np.float32) for i, m in enumerate(models)},
        "coefficient": {m: coef[i].astype(np.float32) for i, m in enumerate(models)},
    }
    if g is not None:
        pstats["g"] = np.asarray(g, np.float32)
    return {"weights": weights, "tensor_stats": tstats, "plan_stats": pstats}
