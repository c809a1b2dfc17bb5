"""The plan's `tuning` record: plain values, so the choice is reviewable (`show`, the TUI)
and reproducible (every candidate's assignment applied to the recipe gives its plan)."""

from __future__ import annotations

from typing import Any


def task_summary(scores) -> dict[str, dict[str, float]]:
    """Per-task loss and accuracy of SampleScores, as the record keeps them."""
    return {t: {"loss": round(s.loss, 6), "accuracy": round(s.accuracy, 6)} for t, s in scores.items()}


def tuning_record(spec, objective, candidates, chosen, data, base_scores, expert_scores, test, search_margin,
                  calib_seconds: float, interrupted: bool) -> dict[str, Any]:
    tasks = task_summary

    return {
        "objective": {"kind": objective.kind, "direction": objective.direction,
                      "weights": dict(objective.weights), "describe": objective.describe()},
        "strategy": spec.strategy,
        "seed": int(spec.seed),
        "budget": {"candidates": spec.candidates, "time": spec.time},
        "storage": bool(spec.storage),
        "split": data.record(),
        "experts": {t: e for t, e in data.experts.items()},
        "baselines": {
            "base": tasks(base_scores["search"]),
            "experts": {t: (None if s is None else task_summary({t: s})[t]) for t, s in expert_scores["search"].items()},
        },
        "chosen": chosen.id,
        "candidates": [
            {"id": c.id, "assignment": dict(c.assignment), "score": c.score, "tasks": tasks(c.scores),
             "seconds": c.seconds, "worker": c.worker, **({"error": c.error} if c.error else {})}
            for c in candidates
        ],
        "search_margin": search_margin,
        "test": test,
        "calibration_seconds": round(calib_seconds, 3),
        "interrupted": interrupted,
        "notes": list(data.notes),
    }
