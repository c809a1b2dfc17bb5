"""The recipe's `guides:` and `calibration:` sections: options, defaults and their checks.

``mergeplan.guides.options`` and ``mergeplan.calibrate.settings`` re-export these, so the
recipe loader, the guides and the calibration engine validate with the same models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, field_validator, model_validator

from mergeplan.errors import MergeplanError
from mergeplan.recipe.errors import issue
from mergeplan.recipe.fields import Section, boolean, integer, number

__all__ = [
    "AimOptions",
    "CALIBRATION_DEFAULTS",
    "CALIBRATION_DTYPES",
    "CalibrationSettings",
    "GuideOptions",
    "LewisOptions",
    "SensOptions",
    "check_guides",
]


class LewisOptions(Section):
    # The authors' code defaults; the paper's runs use gamma 0.3-0.5, epsilon 0.8-1.0.
    gamma: Annotated[float, number(0.0, 1.0, lo_open=True)] = 0.5
    epsilon: Annotated[float, number(0.0, 1.0, lo_open=True)] = 0.8
    scaling: Literal["minmax", "clip"] = "minmax"  # minmax: authors' code; clip: the paper's Algorithm 1
    wanda_prune: Annotated[bool, boolean()] = False  # the reference prunes each layer before measuring the next
    wanda_sparsity: Annotated[float, number(0.0, 0.99)] = 0.5

    @field_validator("scaling", mode="before")
    @classmethod
    def _scaling(cls, v: Any) -> Any:
        if v not in ("minmax", "clip"):
            raise issue(f"{{here}} must be minmax (the authors' code) or clip (the paper), got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "LewisOptions":
        if self.gamma > self.epsilon:
            raise issue(
                f"{{here}}: gamma ({self.gamma}) must not exceed epsilon ({self.epsilon}); they bound the density",
                "gamma",
            )
        if "wanda_sparsity" in self.model_fields_set and not self.wanda_prune:
            raise issue(
                "{full} has no effect without wanda_prune: true; drop it or enable pruning", "wanda_sparsity"
            )
        return self


class AimOptions(Section):
    omega: Annotated[float, number(0.0, 1.0)] = 0.4


class SensOptions(Section):
    temperature: Annotated[float, number(0.0, float("inf"), lo_open=True)] = 1.0
    per_sample: Annotated[bool, boolean()] = True  # |theta * grad| per sample, then summed (the paper's eq. 1)
    cross_task: Annotated[bool, boolean()] = True  # False: tau uniform (the paper's task-specific-only ablation)


def _switch(v: Any) -> Any:
    """`lewis:` / `lewis: true` -> default options; `lewis: false` -> off."""
    if v is None or v is True:
        return {}
    if v is False:
        return None
    if not isinstance(v, dict) and not isinstance(v, Section):
        raise issue(f"{{here}} must be a mapping of options (or true), got {v!r}")
    return v


class GuideOptions(Section):
    example = "`guides: {aim: {omega: 0.4}}`"
    special_keys = {
        "cabs": "{full}: cabs is a merge method, not a guide: set `merge_method: cabs` with parameters {n, m, order}",
    }

    lewis: Annotated[Optional[LewisOptions], BeforeValidator(_switch)] = None
    aim: Annotated[Optional[AimOptions], BeforeValidator(_switch)] = None
    sens: Annotated[Optional[SensOptions], BeforeValidator(_switch)] = None

    def enabled(self) -> list[str]:
        return [n for n in ("lewis", "aim", "sens") if getattr(self, n) is not None]

    def as_record(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump()


CALIBRATION_DEFAULTS: dict[str, Any] = {
    "samples": 16,
    "seq_len": 512,
    "batch_size": 4,
    "device": "auto",
    "dtype": "auto",
    "tokenizer": None,
}
CALIBRATION_DTYPES = ("auto", "float32", "bfloat16", "float16")
MISSING_DATA = (
    "calibration.data is missing: give a file (text, JSONL, parquet), a datasets directory, "
    "hf:NAME[:split], or a mapping {model_id: source}"
)
_SOURCE = "a path (relative to the recipe) or hf:NAME[:split]"


def _source(v: Any, *at: Any) -> str:
    if not isinstance(v, (str, Path)) or not str(v).strip():
        raise issue(f"{{full}} must be {_SOURCE}, got {v!r}", *at)
    return str(v)


def _data(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, dict):
        return {str(k): _source(s, k) for k, s in v.items()}
    return _source(v)


def _device(v: Any) -> str:
    head, _, idx = v.partition(":") if isinstance(v, str) else ("", "", "")
    if not isinstance(v, str) or not (
        v in ("auto", "cpu", "cuda", "mps") or (head in ("cuda", "mps") and idx.isdigit())
    ):
        raise issue(f"{{here}} must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
    return v


def _dtype(v: Any) -> str:
    if v not in CALIBRATION_DTYPES:
        raise issue(f"{{here}} must be one of {', '.join(CALIBRATION_DTYPES)}, got {v!r}")
    return v


def _tokenizer(v: Any) -> Any:
    if v is not None and (not isinstance(v, (str, Path)) or not str(v)):
        raise issue(f"{{here}} must be a directory path, got {v!r}")
    return str(v) if v else None


class CalibrationSettings(Section):
    """The `calibration:` section. ``data`` is one source for every model, or model id ->
    source; ``None`` only while no guide needs it (``require_data`` says what to add)."""

    example = "`calibration: {data: calib.txt, samples: 64}`"
    data: Annotated[Optional[str | dict[str, str]], BeforeValidator(_data)] = None
    samples: Annotated[int, integer(1)] = CALIBRATION_DEFAULTS["samples"]
    seq_len: Annotated[int, integer(2)] = CALIBRATION_DEFAULTS["seq_len"]
    batch_size: Annotated[int, integer(1)] = CALIBRATION_DEFAULTS["batch_size"]
    device: Annotated[str, BeforeValidator(_device)] = CALIBRATION_DEFAULTS["device"]
    dtype: Annotated[str, BeforeValidator(_dtype)] = CALIBRATION_DEFAULTS["dtype"]
    tokenizer: Annotated[Optional[str], BeforeValidator(_tokenizer)] = None
    # Where relative sources live; set by the caller, never written in the recipe.
    recipe_dir: Path = Field(default=Path("."), exclude=True)

    @property
    def has_data(self) -> bool:
        return self.data not in (None, "", {})

    def source_for(self, model_id: str) -> str | None:
        if isinstance(self.data, str):
            return self.data
        return (self.data or {}).get(model_id)

    def as_record(self) -> dict[str, Any]:
        """What the plan keeps: the settings as written (paths relative to the recipe)."""
        return {
            "data": self.data if isinstance(self.data, str) else dict(sorted(self.data.items())),
            "samples": self.samples,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            **({"tokenizer": self.tokenizer} if self.tokenizer else {}),
        }


# ----------------------------------------------------------------------------- guides x method


class GuideConflict(MergeplanError):
    """A guide that cannot work with the recipe; ``loc`` is the key to blame."""

    def __init__(self, message: str, loc: tuple[Any, ...]):
        super().__init__(message)
        self.loc = loc


NO_CALIBRATION = "guides need calibration data: add a `calibration:` section with `data: PATH` to the recipe"


def _methods() -> tuple[frozenset[str], frozenset[str]]:
    """(methods with a sparsifying mask, methods that add task vectors to a base), by the registry."""
    from mergeplan.methods.registry import METHODS

    masked = frozenset(n for n, s in METHODS.items() if s.mask_kind is not None)
    deltas = frozenset(n for n, s in METHODS.items() if s.needs_base)
    return masked, deltas


def check_guides(opts: GuideOptions, settings: CalibrationSettings | None, merge_method: str) -> list[str]:
    """Check the enabled guides against the merge method and the calibration data before any
    heavy work. Returns notes for the plan; raises ``GuideConflict`` for combinations that make
    no sense."""
    on = opts.enabled()
    if not on:
        return []
    if settings is None:
        raise GuideConflict(NO_CALIBRATION, ("guides",))
    if not settings.has_data:
        raise GuideConflict(MISSING_DATA, ("calibration",))
    density_methods, task_vector_methods = _methods()
    notes: list[str] = []
    if opts.lewis and merge_method not in density_methods:
        raise GuideConflict(
            f"guides.lewis sets per-layer densities, but merge_method {merge_method} sparsifies nothing; "
            f"use one of {', '.join(sorted(density_methods))} or drop lewis",
            ("guides", "lewis"),
        )
    if opts.sens and merge_method not in task_vector_methods:
        raise GuideConflict(
            f"guides.sens scales each fine-tune's task vector, but merge_method {merge_method} does not "
            f"add task vectors; use task_arithmetic, ties or dare_* (or another of "
            f"{', '.join(sorted(task_vector_methods))}) or drop sens",
            ("guides", "sens"),
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
        raise GuideConflict(
            f"guides.aim relaxes the merged delta from the base, but merge_method {merge_method} has no "
            "base model; use a task-vector method (task_arithmetic, ties, ...) or drop aim",
            ("guides", "aim"),
        )
    if opts.aim:
        notes.append(f"aim: the merged delta is relaxed per input channel with omega={opts.aim.omega}")
    return notes
