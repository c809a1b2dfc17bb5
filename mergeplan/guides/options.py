"""The recipe's `guides:` section: per-guide options, defaults, and which combinations make sense."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from mergeplan.calibrate.settings import parse_calibration, unknown_key_error
from mergeplan.errors import MergeplanError


def _methods() -> tuple[frozenset[str], frozenset[str]]:
    """(methods with a sparsifying mask, methods that add task vectors to a base), by the registry."""
    from mergeplan.methods.registry import METHODS

    masked = frozenset(n for n, s in METHODS.items() if s.mask_kind is not None)
    deltas = frozenset(n for n, s in METHODS.items() if s.needs_base)
    return masked, deltas


@dataclass(frozen=True)
class LewisOptions:
    # The authors' code defaults; the paper's runs use gamma 0.3-0.5, epsilon 0.8-1.0.
    gamma: float = 0.5
    epsilon: float = 0.8
    scaling: str = "minmax"  # "minmax" (authors' code) | "clip" (paper's Algorithm 1)
    wanda_prune: bool = False  # the reference prunes each layer before measuring the next
    wanda_sparsity: float = 0.5


@dataclass(frozen=True)
class AimOptions:
    omega: float = 0.4


@dataclass(frozen=True)
class SensOptions:
    temperature: float = 1.0
    per_sample: bool = True  # |theta * grad| per sample, then summed (the paper's eq. 1)
    cross_task: bool = True  # False: tau uniform (the paper's task-specific-only ablation)


@dataclass(frozen=True)
class GuideOptions:
    lewis: LewisOptions | None = None
    aim: AimOptions | None = None
    sens: SensOptions | None = None

    def enabled(self) -> list[str]:
        return [n for n in ("lewis", "aim", "sens") if getattr(self, n) is not None]

    def as_record(self, name: str) -> dict[str, Any]:
        return asdict(getattr(self, name))


_CLASSES = {"lewis": LewisOptions, "aim": AimOptions, "sens": SensOptions}
_NOT_GUIDES = {
    "cabs": "cabs is a merge method, not a guide: set `merge_method: cabs` with parameters {n, m, order}",
}


def _number(where: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MergeplanError(f"{where} must be a number, got {v!r}")
    v = float(v)
    bad = v < lo or v > hi or (lo_open and v == lo) or v != v
    if bad:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise MergeplanError(f"{where} must be in {rng}, got {v!r}")
    return v


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise MergeplanError(f"{where} must be true or false, got {v!r}")
    return v


def _guide(name: str, raw: Any) -> Any:
    cls = _CLASSES[name]
    if raw is None or raw is True:
        return cls()
    if raw is False:
        return None
    if not isinstance(raw, Mapping):
        raise MergeplanError(f"guides.{name} must be a mapping of options (or true), got {raw!r}")
    known = tuple(cls.__dataclass_fields__)
    for k in raw:
        if k not in known:
            raise unknown_key_error(f"guides.{name}", k, known)
    where = f"guides.{name}"
    vals = dict(raw)
    if name == "lewis":
        o = LewisOptions(
            gamma=_number(f"{where}.gamma", vals.get("gamma", 0.5), 0.0, 1.0, lo_open=True),
            epsilon=_number(f"{where}.epsilon", vals.get("epsilon", 0.8), 0.0, 1.0, lo_open=True),
            scaling=vals.get("scaling", "minmax"),
            wanda_prune=_bool(f"{where}.wanda_prune", vals.get("wanda_prune", False)),
            wanda_sparsity=_number(f"{where}.wanda_sparsity", vals.get("wanda_sparsity", 0.5), 0.0, 0.99),
        )
        if o.scaling not in ("minmax", "clip"):
            raise MergeplanError(
                f"{where}.scaling must be minmax (the authors' code) or clip (the paper), got {o.scaling!r}"
            )
        if o.gamma > o.epsilon:
            raise MergeplanError(
                f"{where}: gamma ({o.gamma}) must not exceed epsilon ({o.epsilon}); they bound the density"
            )
        if "wanda_sparsity" in vals and not o.wanda_prune:
            raise MergeplanError(
                f"{where}.wanda_sparsity has no effect without wanda_prune: true; drop it or enable pruning"
            )
        return o
    if name == "aim":
        return AimOptions(omega=_number(f"{where}.omega", vals.get("omega", 0.4), 0.0, 1.0))
    t = _number(f"{where}.temperature", vals.get("temperature", 1.0), 0.0, float("inf"), lo_open=True)
    return SensOptions(
        temperature=t,
        per_sample=_bool(f"{where}.per_sample", vals.get("per_sample", True)),
        cross_task=_bool(f"{where}.cross_task", vals.get("cross_task", True)),
    )


def parse_guides(raw: Mapping[str, Any] | None) -> GuideOptions:
    if raw is None:
        return GuideOptions()
    if not isinstance(raw, Mapping):
        raise MergeplanError(f"guides: must be a mapping such as {{lewis: {{...}}, aim: {{omega: 0.4}}}}, got {raw!r}")
    for k in raw:
        if k in _NOT_GUIDES:
            raise MergeplanError(f"guides.{k}: {_NOT_GUIDES[k]}")
        if k not in _CLASSES:
            raise unknown_key_error("guides", k, tuple(_CLASSES))
    return GuideOptions(**{k: _guide(k, v) for k, v in raw.items()})


def validate_guides(
    guides: Mapping[str, Any] | None, calibration: Mapping[str, Any] | None, merge_method: str
) -> list[str]:
    """Check guides + calibration against the merge method before any heavy work.

    Returns notes for the plan; raises MergeplanError for combinations that make no sense.
    """
    opts = parse_guides(guides)
    on = opts.enabled()
    notes: list[str] = []
    if not on:
        if calibration:
            notes.append("calibration: is set but no guide uses it; it was ignored")
        return notes
    settings = parse_calibration(calibration)
    density_methods, task_vector_methods = _methods()
    if opts.lewis and merge_method not in density_methods:
        raise MergeplanError(
            f"guides.lewis sets per-layer densities, but merge_method {merge_method} sparsifies nothing; "
            f"use one of {', '.join(sorted(density_methods))} or drop lewis"
        )
    if opts.sens and merge_method not in task_vector_methods:
        raise MergeplanError(
            f"guides.sens scales each fine-tune's task vector, but merge_method {merge_method} does not "
            f"add task vectors; use task_arithmetic, ties or dare_* (or another of "
            f"{', '.join(sorted(task_vector_methods))}) or drop sens"
        )
    if opts.lewis:
        notes.append(
            "lewis: densities of decoder linear layers come from calibration and replace the recipe's density there"
        )
        if merge_method == "cabs":
            notes.append("lewis with cabs: each layer's density sets the kept fraction of its n:m groups")
    if opts.sens:
        notes.append("sens: per-layer-group coefficients K*sigma multiply the recipe weights")
        if isinstance(settings.data, str):
            notes.append(
                "sens with one shared calibration set: sensitivities and cross-task logit distances "
                "are all measured on the same text; give per-model data for task-specific scaling"
            )
    if opts.aim and merge_method not in task_vector_methods:
        raise MergeplanError(
            f"guides.aim relaxes the merged delta from the base, but merge_method {merge_method} has no "
            "base model; use a task-vector method (task_arithmetic, ties, ...) or drop aim"
        )
    if opts.aim:
        notes.append(f"aim: the merged delta is relaxed per input channel with omega={opts.aim.omega}")
    return notes
