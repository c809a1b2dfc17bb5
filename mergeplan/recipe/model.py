"""The loaded recipe: models with their parameter values, and per-tensor resolution with
mergekit's precedence. Built by ``load.py`` from the validated schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeplan.errors import MergeplanError
from mergeplan.recipe.resolve import ParamValue, first_set, layer_fraction
from mergeplan.recipe.vocab import REQUIRED, method_parameters
from mergeplan.yamlpos import where

if TYPE_CHECKING:
    from mergeplan.recipe.sections import CalibrationSettings, GuideOptions
    from mergeplan.recipe.tune import TuneSpec

__all__ = ["ModelSpec", "Recipe"]


@dataclass
class ModelSpec:
    """One input model. ``ref`` is exactly as written (the io layer resolves it
    relative to the recipe's directory); ``name`` is its id in the plan."""

    name: str
    ref: str
    parameters: dict[str, ParamValue]
    line: int
    # position of its entry under `models:` (None: a base model not listed there)
    index: int | None = field(default=None, compare=False, repr=False)


@dataclass
class Recipe:
    path: Path | None
    text: str
    merge_method: str
    base_model: ModelSpec | None
    models: list[ModelSpec]  # the merge inputs; for task-vector methods, without the base
    parameters: dict[str, ParamValue]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    seed: int
    guides: dict[str, dict[str, Any]]
    calibration: dict[str, Any]
    notes: list[str]
    name: str | None = None  # mergekit(-multi)'s output name; informational
    max_shard_size: int | None = None  # bytes per output shard; None: the writer's default
    locations: dict[str, int] = field(default_factory=dict)  # key path -> line

    # The `tune:` section (None when absent): search space, objective, budget.
    tune: TuneSpec | None = None
    # A tuning candidate's values (space path -> value) when built by with_assignment.
    assignment: dict[str, Any] | None = None
    # The validated `guides:` and `calibration:` sections (defaults filled in); ``guides``
    # and ``calibration`` above keep the mappings as written, which the planner records.
    guide_options: GuideOptions | None = field(default=None, compare=False, repr=False)
    calibration_settings: CalibrationSettings | None = field(default=None, compare=False, repr=False)

    def model(self, name: str) -> ModelSpec:
        for spec in self.all_models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def dir(self) -> Path:
        """Where the recipe's relative paths (models, data) are resolved: its directory."""
        return self.path.parent if self.path else Path.cwd()

    @property
    def all_models(self) -> list[ModelSpec]:
        """Base first (when there is one), then the merge inputs, without repeats."""
        out = [self.base_model] if self.base_model is not None else []
        out += [m for m in self.models if m is not self.base_model]
        return out

    @property
    def output_dtype(self) -> str | None:
        """mergekit's rule: ``out_dtype``, else ``dtype``, else None (the inputs' dtype)."""
        return self.out_dtype or self.dtype

    def where(self, key_path: str) -> str:
        """``file:line`` of a key such as ``guides.aim.omega`` or ``models[1].parameters``.

        Guides and calibration use this to report their own validation errors.
        """
        return where(self.path, self.locations.get(key_path))

    def param(
        self,
        name: str,
        *,
        tensor_name: str,
        layer: int | None,
        num_layers: int,
        model: ModelSpec | str | None = None,
    ) -> Any:
        """A parameter's value for one tensor, with mergekit's precedence.

        Per-model value, then the top-level ``parameters:`` value, then the method's
        default. A level whose filters do not match the tensor is skipped. Global
        parameters ignore ``model``. Raises ``MergeplanError`` when a required value
        (``weight``) is set for no level that matches the tensor.
        """
        g_defaults, m_defaults = method_parameters(self.merge_method)
        if name not in g_defaults and name not in m_defaults:
            raise KeyError(f"{self.merge_method} has no parameter {name!r}")
        spec = self.model(model) if isinstance(model, str) else model
        chain: list[ParamValue | None] = []
        if spec is not None and name in m_defaults:
            chain.append(spec.parameters.get(name))
        chain.append(self.parameters.get(name))
        t = layer_fraction(layer, num_layers)
        contains = lambda f: bool(tensor_name) and f in tensor_name  # noqa: E731
        value = first_set(chain, t, contains)
        if value is not None:
            return value
        default = m_defaults.get(name, g_defaults.get(name))
        if default is REQUIRED:
            line = spec.line if spec is not None else None
            who = f" for model '{spec.name}'" if spec is not None else ""
            raise MergeplanError(
                f"{where(self.path, line)}: no '{name}' applies to tensor {tensor_name}"
                f"{who}: its filters match none of its entries; add an entry without "
                f"'filter' (e.g. `- value: 1.0`) as the last one"
            )
        return default

    def tensor_params(
        self, tensor_name: str, layer: int | None, num_layers: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Every parameter resolved for one tensor: (global, per model in ``models`` order).

        The shape ``mergeplan.methods.registry.resolve_params`` takes, defaults filled
        in. CABS ``order`` becomes indices into ``models`` (the recipe names models).
        """
        g_defaults, m_defaults = method_parameters(self.merge_method)
        kw = {"tensor_name": tensor_name, "layer": layer, "num_layers": num_layers}
        glob = {k: self.param(k, **kw) for k in g_defaults}
        if glob.get("order") is not None:
            index = {m.name: i for i, m in enumerate(self.models)}
            glob["order"] = [index[n] for n in glob["order"]]
        per_model = [{k: self.param(k, model=m, **kw) for k in m_defaults} for m in self.models]
        return glob, per_model

    def with_assignment(self, assignment: dict[str, Any]) -> "Recipe":
        """A new recipe with one tuning candidate's values applied (see tune.apply_assignment)."""
        from mergeplan.recipe.tune import apply_assignment

        return apply_assignment(self, assignment)
