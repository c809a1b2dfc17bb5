"""AIM: relax the merged delta per input channel by how active that channel is in the base.

For every weighted module except embeddings, s_j = mean over calibration tokens of |x_j|
(x: the module's input, base model only). a = s / max(s); the merged delta is scaled by
f = 1 - a * (1 - omega) along the input axis (columns of a Linear [out, in], elements of a
norm weight), so W = W0 + f * delta_merged. Channels the base relies on most keep the
fraction omega of their change; idle channels keep all of it. Biases and embeddings are
untouched; a head tied to the embeddings is one stored tensor and is left alone too. A
module no calibration token reached (an expert the router never chose) is not relaxed (noted).
The reference sums per-batch means in bf16; this accumulates token sums in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def channel_scores(mean_abs: np.ndarray) -> np.ndarray:
    """a = s / max(s) in float32; an all-zero input gives zeros (factor 1: nothing to relax)."""
    s = mean_abs.astype(np.float64)
    top = s.max() if s.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros(s.shape, np.float32)
    return (s / top).astype(np.float32)


def factors(scores: np.ndarray, omega: float) -> np.ndarray:
    return (1.0 - scores.astype(np.float64) * (1.0 - omega)).astype(np.float32)


def decide(
    sites: dict[str, tuple[str, int, int]],
    mean_abs: dict[str, np.ndarray],
    omega: float,
) -> dict[str, Any]:
    """sites: module -> (tensor name, axis, weight length along axis); mean_abs: module -> s.

    Returns {"relax", "tensor_stats", "plan_stats", "notes"}.
    """
    relax: dict[str, dict[str, Any]] = {}
    tstats: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    names, mean_f, min_f = [], [], []
    for module, (tensor, axis, length) in sites.items():
        if module not in mean_abs:
            notes.append(f"aim: no calibration token reached {module} (an expert the router never chose); not relaxed")
            continue
        s = mean_abs[module]
        if s.shape[0] != length:
            notes.append(f"aim: {module} sees {s.shape[0]} input channels but its weight has {length}; not relaxed")
            continue
        a = channel_scores(s)
        f = factors(a, omega)
        relax[tensor] = {"kind": "aim", "omega": float(omega), "axis": int(axis), "scores": a}
        tstats[tensor] = {"aim.mean_factor": float(f.mean()), "aim.min_factor": float(f.min())}
        names.append(tensor)
        mean_f.append(f.mean())
        min_f.append(f.min())
    pstats = {
        "omega": float(omega),
        "tensors": names,
        "mean_factor": np.asarray(mean_f, np.float32),
        "min_factor": np.asarray(min_f, np.float32),
    }
    return {"relax": relax, "tensor_stats": tstats, "plan_stats": pstats, "notes": notes}
