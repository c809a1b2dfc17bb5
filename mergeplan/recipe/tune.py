"""The recipe's `tune:` section: what to search (space), how to judge (objective, held-out
data), how long (budget) and how (strategy, shared study).

The section is validated twice: on its own by pydantic (shapes, ranges, budget), then
against the recipe by ``check_tune`` (every path in ``space`` names a real method
parameter, model or guide option, and every value it can take passes the recipe schema).
``apply_assignment`` builds one candidate's recipe through the same validation.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Discriminator, Tag, model_validator

from mergeplan.errors import MergeplanError
from mergeplan.recipe.errors import issue, key_path, nearest_line
from mergeplan.recipe.fields import Section, Text, integer
from mergeplan.recipe.vocab import KINDS, METHOD_NAMES, rules, suggest, type_name
from mergeplan.yamlpos import where

if TYPE_CHECKING:
    from mergeplan.recipe.model import Recipe

__all__ = [
    "Dimension",
    "HeldOut",
    "Objective",
    "Range",
    "STRATEGIES",
    "TuneSpec",
    "apply_assignment",
    "check_tune",
    "parse_duration",
]

STRATEGIES = ("grid", "random", "tpe")
_UNITS = {"s": 1, "m": 60, "h": 3600}


MAX_GRID_POINTS = 10_000  # points of one stepped range


def parse_duration(v: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"5m"``, ``"1h30m"``."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or v <= 0:
            raise ValueError(v)
        return float(v)
    if not isinstance(v, str) or not re.fullmatch(r"\s*(\d+(\.\d+)?\s*[smh]\s*)+", v):
        raise ValueError(v)
    total = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)\s*([smh])", v))
    if not math.isfinite(total) or total <= 0:
        raise ValueError(v)
    return total


def _duration(v: Any) -> Any:
    if v is None:
        return None
    try:
        return parse_duration(v)
    except ValueError:
        raise issue(f"{{here}} must be a positive duration such as 300, '90s', '5m' or '1h30m', got {v!r}") from None


def _source(v: Any, *at: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise issue(f"{{full}} must be a path (relative to the recipe) or hf:NAME[:split], got {v!r}", *at)
    return v


def _heldout_data(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, dict):
        if not v:
            raise issue("{here} is an empty mapping; give {task: source} or drop it to split off calibration data")
        return {str(k): _source(s, k) for k, s in v.items()}
    return _source(v)


class HeldOut(Section):
    """Held-out evaluation data, disjoint from the calibration samples (tune/split.py):
    `samples` per task score the candidates, the `test` samples after them score only the
    chosen plan and the recipe as written (default: as many as `samples`; 0: no test split)."""

    example = "`heldout: {samples: 16, test: 16}`"
    # task (model id) -> source, or one source; None: split off the calibration sources
    data: Annotated[Optional[Union[str, dict[str, str]]], BeforeValidator(_heldout_data)] = None
    samples: Annotated[int, integer(1)] = 16  # per task, for the search
    test: Annotated[Optional[int], integer(0)] = None  # per task, for the final check


def _weights(v: Any) -> Any:
    if not isinstance(v, dict) or not v:
        raise issue(f"{{here}} must be a mapping of task weights such as {{math: 1.0, code: 2.0}}, not {type_name(v)}")
    for k, w in v.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise issue(f"{{full}} must be a positive number, got {w!r}", k)
    return {str(k): float(w) for k, w in v.items()}


class Objective(Section):
    """``recovered_gain`` (mean over tasks, higher is better) or ``{loss: {task: weight}}``
    (weighted per-task held-out loss, lower is better)."""

    example = "`objective: recovered_gain` or `objective: {loss: {math: 1.0}}`"
    loss: Annotated[Optional[dict[str, float]], BeforeValidator(_weights)] = None

    @model_validator(mode="before")
    @classmethod
    def _named(cls, v: Any) -> Any:
        if v is None or v == "recovered_gain":
            return {}
        if isinstance(v, str):
            raise issue(
                f"{{here}} '{v}' is not known{suggest(v, ('recovered_gain', 'loss'))}; "
                "use recovered_gain or {loss: {task: weight}}"
            )
        return v

    @property
    def kind(self) -> str:
        """"recovered_gain" or "loss"."""
        return "loss" if self.loss is not None else "recovered_gain"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "recovered_gain"


class Range(Section):
    """A numeric range: ``{low, high}``, ``{low, high, step}`` or ``{low, high, log: true}``."""

    example = "`{low: 0.2, high: 0.8}`"
    low: float
    high: float
    step: Optional[float] = None
    log: bool = False

    @classmethod
    def check_keys(cls, v: dict[str, Any]) -> None:
        super().check_keys(v)
        for key in ("low", "high"):
            if key not in v:
                raise issue(f"{{here}} is missing '{key}'; a range is {{low: A, high: B}}")
        for key in ("low", "high", "step"):
            x = v.get(key)
            if (x is not None or key != "step") and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
                raise issue(f"{{full}} must be a number, got {x!r}", key)
        if "log" in v and not isinstance(v["log"], bool):
            raise issue(f"{{full}} must be true or false, got {v['log']!r}", "log")

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise issue(f"{{here}}: low ({self.low:g}) must be below high ({self.high:g})", "low")
        if self.step is not None and self.step <= 0:
            raise issue(f"{{full}} must be positive, got {self.step:g}", "step")
        if self.step is not None and self.log:
            raise issue("{here}: give step or log: true, not both", "log")
        if self.log and self.low <= 0:
            raise issue(f"{{here}}: a log range needs low above 0, got {self.low:g}", "low")
        if self.step is not None and (self.high - self.low) / self.step > MAX_GRID_POINTS:
            # Each point is a merge to score; a tiny step would also build the grid in memory.
            raise issue(f"{{full}} makes more than {MAX_GRID_POINTS} points between low and high; "
                        "use a larger step", "step")
        return self

    def grid(self) -> tuple[float, ...] | None:
        """The values a grid search visits (None without a step)."""
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return tuple(round(self.low + i * self.step, 12) for i in range(n + 1))


def _dimension(v: Any) -> Any:
    if isinstance(v, list):
        if not v:
            raise issue("{here} is an empty list; give at least one value to try")
        for i, x in enumerate(v):
            if isinstance(x, (dict, list)):
                raise issue(f"{{full}} must be a single value (a list is the choices), not {type_name(x)}", i)
        return tuple(v)
    if isinstance(v, dict):
        return v
    raise issue(
        f"{{here}} must be a list of choices (e.g. [ties, dare_ties]) or a range {{low: A, high: B}}, "
        f"not {type_name(v)}"
    )


def _choice_or_range(v: Any) -> str:
    return "space-range" if isinstance(v, (dict, Range)) else "space-choices"


# Tags name the union's members in error locations; errors.py leaves them out.
Choice = Annotated[
    Union[Annotated[tuple[Any, ...], Tag("space-choices")], Annotated[Range, Tag("space-range")]],
    Discriminator(_choice_or_range),
]


def _space(v: Any) -> Any:
    if not isinstance(v, dict) or not v:
        raise issue(
            "{here} must be a non-empty mapping of what to search, e.g. "
            "`parameters.density: {low: 0.2, high: 0.8}`"
        )
    return v


class TuneSpec(Section):
    """The `tune:` section. At least one of ``candidates`` and ``time`` bounds the search."""

    example = "`tune: {candidates: 16, space: {...}}`"
    strategy: Literal["grid", "random", "tpe"] = "random"
    candidates: Annotated[Optional[int], integer(1, optional=True)] = None
    time: Annotated[Optional[float], BeforeValidator(_duration)] = None  # seconds
    seed: Annotated[int, integer(0)] = 0
    objective: Objective = Objective()
    heldout: HeldOut = HeldOut()
    storage: Optional[Text] = None  # an Optuna storage URL shared by several workers
    study: Optional[Text] = None
    space: Annotated[dict[str, Annotated[Choice, BeforeValidator(_dimension)]], BeforeValidator(_space)]

    @model_validator(mode="before")
    @classmethod
    def _strategy(cls, v: Any) -> Any:
        if isinstance(v, dict) and "strategy" in v and v["strategy"] not in STRATEGIES:
            s = v["strategy"]
            raise issue(
                f"{{full}} '{s}' is not known{suggest(str(s), STRATEGIES)}; use grid, random or tpe",
                "strategy",
            )
        if isinstance(v, dict) and "space" not in v:
            raise issue("{here} is missing 'space:' (what to search, e.g. `parameters.density: {low: 0.2, high: 0.8}`)")
        return v

    @model_validator(mode="after")
    def _budget(self) -> "TuneSpec":
        # A grid is its own budget (every point once); random and TPE draw without end.
        if self.candidates is None and self.time is None and self.strategy != "grid":
            raise issue("{here} needs a budget: add `candidates: N`, `time: 5m`, or both "
                        "(only strategy grid may go without one)")
        if self.storage is not None and "://" not in self.storage:
            raise issue(
                f"{{full}} must be a database URL such as sqlite:///study.db or "
                f"postgresql://user@host/db, got {self.storage!r}",
                "storage",
            )
        if self.strategy == "grid":
            for path, dim in self.space.items():
                if isinstance(dim, Range) and dim.step is None:
                    raise issue(
                        f"{{here}}.space.{path}: grid search needs finite choices; give a list or {{low, high, step}}",
                        "space", path,
                    )
        return self

    def dimensions(self) -> list[Dimension]:
        """The space as the search engine reads it, in the order written."""
        return [_as_dimension(p, d) for p, d in self.space.items()]


@dataclass(frozen=True)
class Dimension:
    """One searched value. ``kind``: "categorical" (``choices``), "float" or "int" (``low``,
    ``high``, optional ``step``, ``log``)."""

    path: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def grid(self) -> tuple[Any, ...] | None:
        if self.kind == "categorical":
            return self.choices
        if self.step is None:
            return None
        values = Range(low=self.low, high=self.high, step=self.step).grid()
        return tuple(int(round(v)) for v in values) if self.kind == "int" else values


def split_path(path: str) -> tuple[str, str | None, str | None]:
    """A space path as (section, owner, name): ``("merge_method", None, None)``,
    ``("parameters", None, NAME)``, ``("models", ID, NAME)`` (``models.ID.NAME`` or
    ``models.ID.parameters.NAME``; ``ID`` may contain dots, as in ``llama-3.1``) and
    ``("guides", GUIDE, OPTION)``; ``("", None, None)`` for anything else."""
    head, _, rest = path.partition(".")
    if path == "merge_method":
        return "merge_method", None, None
    if head == "parameters" and rest and "." not in rest:
        return "parameters", None, rest
    if head == "models" and "." in rest:
        owner, _, name = rest.rpartition(".")
        if owner.endswith(".parameters"):
            owner = owner[: -len(".parameters")]
        return ("models", owner, name) if owner and name else ("", None, None)
    if head == "guides" and rest.count(".") == 1:
        guide, _, option = rest.partition(".")
        return "guides", guide, option
    return "", None, None


def _param_name(path: str) -> str | None:
    section, _, name = split_path(path)
    return name if section in ("parameters", "models") else None


def _as_dimension(path: str, dim: Choice) -> Dimension:
    if isinstance(dim, tuple):
        return Dimension(path, "categorical", choices=dim)
    name = _param_name(path)
    kind = "int" if name is not None and KINDS.get(name) == "int" else "float"
    return Dimension(path, kind, low=dim.low, high=dim.high, step=dim.step, log=dim.log)


# ----------------------------------------------------------------------------- against the recipe


def _set(data: dict[str, Any], path: str, value: Any, recipe: Recipe) -> None:
    """Write one assignment into the plain recipe mapping (raises ValueError(reason))."""
    section, owner, name = split_path(path)
    if section == "merge_method":
        data["merge_method"] = value
    elif section == "parameters":
        block = data.get("parameters")
        data["parameters"] = {**(block if isinstance(block, dict) else {}), name: value}
    elif section == "models":
        spec = next((m for m in recipe.models if m.name == owner), None)
        if spec is None or spec.index is None:
            ids = [m.name for m in recipe.models if m.index is not None]
            if recipe.base_model is not None and owner == recipe.base_model.name:
                raise ValueError(
                    f"'{owner}' is the base model, which takes no per-model parameters; tune the "
                    f"fine-tunes ({', '.join(ids)}) or a top-level parameters.{name}"
                )
            raise ValueError(f"no model '{owner}'{suggest(owner, ids)}; models: {', '.join(ids)}")
        entry = dict(data["models"][spec.index])
        entry["parameters"] = {**(entry.get("parameters") or {}), name: value}
        data["models"][spec.index] = entry
    elif section == "guides":
        guides = data.get("guides")
        guides = dict(guides) if isinstance(guides, dict) else {}
        opts = guides.get(owner)
        guides[owner] = {**(opts if isinstance(opts, dict) else {}), name: value}
        data["guides"] = guides
    else:
        raise ValueError(
            "not a searchable path; use merge_method, parameters.NAME, models.ID.NAME or guides.GUIDE.OPTION"
        )


def _base_data(recipe: Recipe) -> tuple[dict[str, Any], Any]:
    from mergeplan.yamlpos import compose_located

    root = compose_located(recipe.text, recipe.path)
    data = copy.deepcopy(root.plain()) if root is not None else {}
    data.pop("tune", None)
    return data, root


def apply_assignment(recipe: Recipe, assignment: dict[str, Any]) -> Recipe:
    """One candidate's recipe: ``assignment`` maps space paths to values (``{"parameters.density":
    0.4, "models.math.weight": 0.8, "merge_method": "dare_ties"}``).

    The result went through the whole recipe schema and checks, so a value no merge could use
    fails here with a one-line ``MergeplanError``. It has no ``tune`` section (a candidate is a
    plain recipe) and records the assignment in ``Recipe.assignment``; ``text`` stays the
    recipe as written.
    """
    from mergeplan.recipe.load import recipe_from_data

    data, root = _base_data(recipe)
    # a candidate's recipe keeps its assignment: applying more builds on it
    assignment = {**(recipe.assignment or {}), **assignment}
    for path, value in assignment.items():
        try:
            _set(data, path, value, recipe)
        except ValueError as exc:
            raise MergeplanError(f"{where(recipe.path, recipe.locations.get('tune.space.' + path))}: "
                                 f"tune.space.{path}: {exc}") from None
    out = recipe_from_data(data, recipe.text, recipe.path, root)
    out.assignment = dict(assignment)
    return out


# Parameters a search cannot vary: ignored (int8_mask) or a list of model names (order).
_NOT_SEARCHABLE = frozenset({"int8_mask", "order"})


def _known_paths(recipe: Recipe, methods: tuple[str, ...]) -> list[str]:
    names = sorted({p for m in methods for p in set(rules()[m].global_params) | set(rules()[m].model_params)})
    out = ["merge_method"] + [f"parameters.{n}" for n in names if n not in _NOT_SEARCHABLE]
    per_model = sorted({p for m in methods for p in rules()[m].model_params} - _NOT_SEARCHABLE)
    out += [f"models.{m.name}.{p}" for m in recipe.models if m.index is not None for p in per_model]
    for g in recipe.guide_options.enabled() if recipe.guide_options else []:
        opts = getattr(recipe.guide_options, g)
        out += [f"guides.{g}.{o}" for o in type(opts).model_fields]
    return out


def check_tune(recipe: Recipe, lines: dict[tuple[Any, ...], int]) -> None:
    """Check ``recipe.tune`` against the recipe: every path names something the recipe has,
    every value a candidate can take loads, and the tasks exist. Raises MergeplanError."""
    spec = recipe.tune
    assert spec is not None

    def fail(loc: tuple[Any, ...], msg: str) -> MergeplanError:
        return MergeplanError(f"{where(recipe.path, nearest_line(loc, lines))}: {msg}")

    methods = (recipe.merge_method,)
    if "merge_method" in spec.space:
        dim = spec.space["merge_method"]
        if not isinstance(dim, tuple):
            raise fail(("tune", "space", "merge_method"), "tune.space.merge_method must be a list of methods, e.g. [ties, dare_ties]")
        for i, m in enumerate(dim):
            if m not in METHOD_NAMES:
                raise fail(
                    ("tune", "space", "merge_method", i),
                    f"tune.space.merge_method: unknown method {m!r}{suggest(str(m), METHOD_NAMES)}; known: {', '.join(METHOD_NAMES)}",
                )
        methods = tuple(dim)
    known = _known_paths(recipe, methods)
    guide_names = ("lewis", "aim", "sens")
    for path, dim in spec.space.items():
        loc = ("tune", "space", path)
        section, owner, _ = split_path(path)
        if path not in known and not _same_model_path(path, known):
            hint = suggest(path, known)
            why = ""
            if section == "guides" and owner in guide_names and (
                recipe.guide_options is None or getattr(recipe.guide_options, owner) is None
            ):
                why = f"; guide {owner} is not enabled: add `guides: {{{owner}: {{}}}}` to tune its options"
            elif section == "models" and recipe.base_model is not None and owner == recipe.base_model.name:
                why = f"; '{owner}' is the base model, which takes no per-model parameters"
            raise fail(loc, f"tune.space.{path} names nothing the recipe can vary{hint}{why}; searchable: {', '.join(known)}")
        _check_not_shadowed(recipe, path, fail)
        if isinstance(dim, Range):
            name = _param_name(path)
            kind = KINDS.get(name or "", "float") if section != "guides" else "float"
            if kind not in ("float", "int") or path == "merge_method":
                raise fail(loc, f"tune.space.{path} takes {kind} values: give a list of choices, not a range")
            probes = [("low", dim.low), ("high", dim.high)]
        else:
            probes = [(i, v) for i, v in enumerate(dim)]
        for at, value in probes:
            if isinstance(dim, Range) and _param_name(path) and KINDS.get(_param_name(path)) == "int":
                value = int(value) if float(value).is_integer() else value
            try:
                apply_assignment(recipe, {path: value})
            except MergeplanError as exc:
                # the message names where the bad value would land; say where it came from
                reason = str(exc).split(": ", 1)[-1]
                what = f"value {value!r}" if not isinstance(at, str) else f"{at} {value!r}"
                raise fail(loc + (at,), f"tune.space.{path}: {what} cannot be used: {reason}") from None
    _check_tasks(recipe, spec, fail)


def _same_model_path(path: str, known: list[str]) -> bool:
    """``models.ID.parameters.NAME`` is the long form of ``models.ID.NAME``."""
    section, owner, name = split_path(path)
    return section == "models" and f"models.{owner}.{name}" in known


def _check_not_shadowed(recipe: Recipe, path: str, fail: Any) -> None:
    """A top-level value every model overrides everywhere would be searched for nothing."""
    section, _, name = split_path(path)
    if section != "parameters":
        return
    if name not in rules()[recipe.merge_method].model_params:
        return
    own = [m.parameters.get(name) for m in recipe.models]
    if own and all(pv is not None and not pv.is_conditional for pv in own):
        lines = ", ".join(str(pv.line) for pv in own)
        raise fail(
            ("tune", "space", path),
            f"tune.space.{path} would change nothing: every model sets its own {name} (lines {lines}), "
            f"which wins over the top level; search models.ID.{name} instead, or drop the per-model values",
        )


def _check_tasks(recipe: Recipe, spec: TuneSpec, fail: Any) -> None:
    tasks = [m.name for m in recipe.models if m is not recipe.base_model]
    sources: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(spec.heldout.data, dict):
        sources += [(("tune", "heldout", "data", k), k) for k in spec.heldout.data]
    if spec.objective.loss is not None:
        sources += [(("tune", "objective", "loss", k), k) for k in spec.objective.loss]
    for loc, task in sources:
        if task not in tasks:
            raise fail(loc, f"{key_path(loc)}: unknown task '{task}'{suggest(task, tasks)}; tasks are the fine-tunes: {', '.join(tasks)}")
    cal = recipe.calibration_settings
    if spec.heldout.data is None and (cal is None or not cal.has_data):
        raise fail(
            ("tune",),
            "tune needs held-out data: give tune.heldout.data {task: source}, or calibration.data to split it off",
        )
