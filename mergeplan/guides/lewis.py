"""LEWIS: layer-wise densities from how much each fine-tune's Wanda scores moved from the base's.

For each Linear of each decoder block (component c of layer l), with x_j its input channel j
on the calibration tokens and W the model's own weight [out, in]:

    score = || |W| * sqrt(mean_tokens x_j^2) ||_F = sqrt(sum_j mean(x_j^2) * sum_o W_oj^2)

Per fine-tune and component, across layers: delta[l] = |score_ft[l] - score_base[l]| divided
by its sum over layers (a component whose scores never moved keeps zeros). Densities:
"minmax" (the authors' code, default) rescales the deltas of all (layer, component) pairs of
one fine-tune to [gamma, epsilon], all-equal deltas giving (gamma + epsilon) / 2; "clip" (the
paper's Algorithm 1) clips them to [gamma, epsilon]. Higher delta -> higher density.
Differences from the reference: no rounding to 5 decimals before the rescale; the token mean
replaces the reference's per-sample sum (a constant factor that the normalisation removes).
Components are the stored tensors' labels (mergeplan/arch.py): a fused projection (qkv,
gate_up) is one component measured as one; routers and each expert's projections
(e3.down) are components of their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergeplan.arch import component_key
from mergeplan.plan.names import parse_name


def wanda_score(col_sq: np.ndarray, mean_sq: np.ndarray) -> float:
    return float(np.sqrt(np.dot(col_sq.astype(np.float64), mean_sq.astype(np.float64))))


def normalised_deltas(score_base: np.ndarray, score_ft: np.ndarray) -> np.ndarray:
    """[L, C] -> [L, C]; NaN marks (layer, component) pairs a model does not have."""
    d = np.abs(score_ft.astype(np.float64) - score_base.astype(np.float64))
    total = np.nansum(d, axis=0, keepdims=True)
    return np.divide(d, total, out=np.where(np.isnan(d), np.nan, 0.0), where=total > 0)


def scale_densities(delta: np.ndarray, gamma: float, epsilon: float, scaling: str) -> np.ndarray:
    if scaling == "clip":
        return np.clip(delta, gamma, epsilon)
    finite = delta[np.isfinite(delta)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi == lo:
        return np.where(np.isfinite(delta), (gamma + epsilon) / 2, np.nan)
    return gamma + (delta - lo) / (hi - lo) * (epsilon - gamma)


def _stem(weight: str) -> str:
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def grid(modules: list[str]) -> tuple[list[int], list[str], dict[str, tuple[int, int]]]:
    """Layers and components of decoder Linear modules, and each module's (row, column)."""
    parsed = {m: parse_name(m + ".weight") for m in modules}
    layers = sorted({p.layer for p in parsed.values() if p.layer is not None})
    comps: list[str] = []
    for p in parsed.values():
        if p.component not in comps:
            comps.append(p.component)
    seen = list(comps)
    comps.sort(key=lambda c: (component_key(c)[:3], seen.index(c)))
    li = {l: i for i, l in enumerate(layers)}
    at = {m: (li[p.layer], comps.index(p.component)) for m, p in parsed.items() if p.layer is not None}
    return layers, comps, at


def decide(
    modules: list[str],
    score_base: dict[str, dict[str, float]],
    score_ft: dict[str, dict[str, float]],
    gamma: float,
    epsilon: float,
    scaling: str,
    stored: set[str],
    tensors: dict[str, str] | None = None,
) -> dict[str, Any]:
    """score_base[model][module] (base on that model's data), score_ft[model][module] -> decisions.

    `tensors` maps a module to its stored weight name where the two differ (renamed or
    per-expert weights; default module + ".weight"). A score that is NaN (a mixture-of-experts
    expert no calibration token reached) gives no density: that tensor keeps the recipe's.
    Returns {"densities", "tensor_stats", "plan_stats"} in GuideDecisions' shapes.
    """
    stem = {m: _stem((tensors or {}).get(m, m + ".weight")) for m in modules}
    layers, comps, at_stem = grid(list(stem.values()))
    at = {m: at_stem[s] for m, s in stem.items() if s in at_stem}
    shape = (len(layers), len(comps))
    densities: dict[str, dict[str, float]] = {}
    tstats: dict[str, dict[str, Any]] = {}
    pstats: dict[str, Any] = {
        "layers": np.asarray(layers, dtype=np.int32) if layers else np.zeros(0, np.int32),
        "components": comps,
        "gamma": gamma,
        "epsilon": epsilon,
        "scaling": scaling,
        "score_base": {},
        "score": {},
        "delta": {},
        "density": {},
    }
    for mid in score_ft:
        base = np.full(shape, np.nan)
        ft = np.full(shape, np.nan)
        for m, (r, c) in at.items():
            base[r, c] = score_base[mid][m]
            ft[r, c] = score_ft[mid][m]
        delta = normalised_deltas(base, ft)
        dens = scale_densities(delta, gamma, epsilon, scaling)
        for name, arr in (("score_base", base), ("score", ft), ("delta", delta), ("density", dens)):
            pstats[name][mid] = arr.astype(np.float32)
        for m, (r, c) in at.items():
            if not np.isfinite(dens[r, c]):
                continue
            for suffix in ("weight", "bias"):
                tensor = f"{stem[m]}.{suffix}"
                if tensor not in stored:
                    continue
                densities.setdefault(tensor, {})[mid] = float(dens[r, c])
                ts = tstats.setdefault(tensor, {})
                ts.setdefault("lewis.score_base", {})[mid] = float(base[r, c])
                ts.setdefault("lewis.score", {})[mid] = float(ft[r, c])
                ts.setdefault("lewis.delta", {})[mid] = float(delta[r, c])
    return {"densities": densities, "tensor_stats": tstats, "plan_stats": pstats}
