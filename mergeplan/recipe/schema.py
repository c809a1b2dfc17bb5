"""The recipe schema: pydantic models for the whole document (mergekit 0.1.5's
MergeConfiguration shape plus mergeplan's sections).

Field validators check each value on its own; ``RecipeSchema``'s after-validator checks
what depends on ``merge_method`` (which parameters a method takes, whether it needs a base).
Parameter settings come out as ``Setting`` values without line numbers; ``load.py`` turns
them into ``ParamValue`` objects that remember their lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, BeforeValidator, Discriminator, PrivateAttr, Tag, model_validator

from mergeplan.recipe.errors import issue, key_path
from mergeplan.recipe.fields import Section, Text
from mergeplan.recipe.sections import CalibrationSettings, GuideOptions
from mergeplan.recipe.tune import TuneSpec
from mergeplan.recipe.vocab import (
    DTYPES,
    KINDS,
    LITERAL,
    METHOD_NAMES,
    RECIPE_LEVEL,
    LeafError,
    accepted_parameters,
    coerce_leaf,
    rules,
    suggest,
    type_name,
)
from mergeplan.plan.rows import SOURCES

__all__ = ["ModelEntry", "ModelReference", "RecipeSchema", "Setting", "TOKENIZER_SOURCES"]

TOKENIZER_SOURCES = SOURCES  # the vocabulary rules a plan can record (plan/rows.py)


# ----------------------------------------------------------------------------- models


class ModelPath(Section):
    path: Text
    revision: Optional[Text] = None


def _model_ref(v: Any) -> Any:
    if isinstance(v, str):
        return v if v else _text_error(v)
    if isinstance(v, dict) and "path" not in v and not (set(v) - {"path", "revision"}):
        raise issue("{here} is missing 'path'")
    if not isinstance(v, dict):
        _text_error(v)
    return v


def _path_or_mapping(v: Any) -> str:
    return "ref-text" if isinstance(v, str) else "ref-mapping"


# Tags name the union's members in error locations; errors.py leaves them out.
RefModel = Annotated[
    Union[Annotated[str, Tag("ref-text")], Annotated[ModelPath, Tag("ref-mapping")]],
    Discriminator(_path_or_mapping),
    BeforeValidator(_model_ref),
]


def _text_error(v: Any) -> Any:
    raise issue(f"{{here}} must be non-empty text, not {type_name(v)}")


class ModelReference(Section):
    """mergekit's ModelReference: ``PATH``, ``{model: PATH}``, ``{model: {path, revision}}``."""

    special_keys = {
        "override_architecture": "override_architecture is not supported: mergeplan reads tensors by name",
    }
    model: RefModel
    lora: Any = None
    name: Optional[Text] = None

    @classmethod
    def check_keys(cls, data: dict[str, Any]) -> None:
        super().check_keys(data)
        if data.get("lora") is not None:
            raise issue(
                "LoRA adapters are not supported: merge the adapter into its model first "
                "(e.g. with peft's merge_and_unload) and point to the result",
                "lora",
            )
        if "model" not in data:
            raise issue("{here} is missing 'model: PATH'")

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, v: Any) -> Any:  # runs before the key check of Section
        if isinstance(v, str):
            return {"model": v} if v else _text_error(v)
        if isinstance(v, list):
            raise issue("{here} must be a path (text), not a list")
        if not isinstance(v, (dict, BaseModel)):
            _text_error(v)
        return v

    @property
    def ref(self) -> str:
        """The reference as mergekit spells it: ``path`` or ``path@revision``."""
        if isinstance(self.model, ModelPath):
            return f"{self.model.path}@{self.model.revision}" if self.model.revision else self.model.path
        return self.model


def _entry(v: Any) -> Any:
    if isinstance(v, str):
        raise issue(f"{{here}} must be a mapping: write `- model: {v}`")
    if isinstance(v, dict) and "model" not in v and not (set(v) - {"name", "parameters"}):
        raise issue("{here} is missing 'model: PATH'")
    return v


def _entry_model(v: Any) -> Any:
    """An entry's ``model:`` is a reference without ``name:`` (the entry has its own)."""
    if isinstance(v, dict) and "name" in v:
        raise issue("unknown key 'name' in {here}; put `name:` on the models entry", "name")
    return v


def _params_block(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise issue(f"{{here}} must be a mapping (`weight: 1.0`), not {type_name(v)}")
    return v


ParamBlock = Annotated[dict[str, Any], BeforeValidator(_params_block)]


class ModelEntry(Section):
    example = "`- model: PATH`"
    model: Annotated[ModelReference, BeforeValidator(_entry_model)]
    name: Optional[Text] = None
    parameters: ParamBlock = {}


def _models(v: Any) -> Any:
    if not isinstance(v, list) or not v:
        raise issue("'models' must be a non-empty list of entries like `- model: PATH`")
    return v


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Setting:
    """A validated parameter value, before lines are attached.

    ``shape``: "scalar" (``value`` a leaf), "gradient" (a tuple of leaves), "filters"
    (a tuple of ``(filter, leaf or tuple)`` pairs, one per entry; ``single`` when written
    as one mapping instead of a list) or "literal" (one value for the whole merge).
    """

    shape: str
    value: Any
    single: bool = False


def _leaf(name: str, v: Any, ctx: str, at: tuple[Any, ...]) -> Any:
    if isinstance(v, (dict, list)):
        raise issue(f"{ctx} must be a single value here, not {type_name(v)}", *at)
    try:
        return coerce_leaf(name, v)
    except LeafError as exc:
        raise issue(str(exc).replace("{ctx}", ctx), *at) from None


def _conditional(name: str, v: dict[str, Any], ctx: str, at: tuple[Any, ...]) -> tuple[Any, Any]:
    for key in v:
        if key not in ("filter", "value"):
            raise issue(
                f"unknown key '{key}' in {ctx} entry{suggest(key, ('filter', 'value'))}; allowed: filter, value",
                *at, key,
            )
    if "value" not in v:
        raise issue(f"{ctx} entry has no 'value'; add `value: X`", *at)
    flt = v.get("filter")
    if flt is not None and (not isinstance(flt, str) or not flt):
        raise issue(f"{ctx} filter must be non-empty text, not {type_name(flt)}", *at, "filter")
    value = v["value"]
    if isinstance(value, list) and value and not any(isinstance(x, (dict, list)) for x in value):
        return flt, tuple(_leaf(name, x, ctx, (*at, "value", i)) for i, x in enumerate(value))
    if isinstance(value, (dict, list)):
        raise issue(
            f"{ctx} value must be a number or a list of numbers (a gradient), not {type_name(value)}",
            *at, "value",
        )
    return flt, _leaf(name, value, ctx, (*at, "value"))


def parse_setting(name: str, v: Any, ctx: str, at: tuple[Any, ...]) -> Setting:
    """One parameter value in any of mergekit's shapes; ``at`` is its location."""
    if name in LITERAL:
        if KINDS[name] == "names":
            if not isinstance(v, list) or not v:
                raise issue(f"{ctx} must be a list of model names, e.g. `[math, code]`", *at)
            for i, n in enumerate(v):
                if not isinstance(n, str) or not n:
                    raise issue(f"{ctx} entry must be non-empty text, not {type_name(n)}", *at, i)
            return Setting("literal", tuple(v))
        return Setting("literal", _leaf(name, v, ctx, at))
    if isinstance(v, dict):
        return Setting("filters", (_conditional(name, v, ctx, at),), single=True)
    if not isinstance(v, list):
        return Setting("scalar", _leaf(name, v, ctx, at))
    if not v:
        raise issue(f"{ctx} is an empty list; give a value", *at)
    if not any(isinstance(x, (dict, list)) for x in v):
        return Setting("gradient", tuple(_leaf(name, x, ctx, (*at, i)) for i, x in enumerate(v)))
    if all(isinstance(x, dict) for x in v):
        return Setting("filters", tuple(_conditional(name, x, ctx, (*at, i)) for i, x in enumerate(v)))
    raise issue(
        f"{ctx} mixes plain values and filter entries; use either a list of numbers "
        "(a gradient over layers) or a list of `- filter: TEXT` / `value: X` entries",
        *at,
    )


def parse_block(method: str, block: dict[str, Any], at: tuple[Any, ...], per_model: bool) -> dict[str, Setting]:
    """A `parameters:` mapping checked against what ``method`` takes (mergekit-only names
    and ``int8_mask`` are accepted here; load.py drops them with a note)."""
    takes, mergekit_only = accepted_parameters(method)
    valid = takes | mergekit_only | {"int8_mask"} | set(RECIPE_LEVEL)
    ctx = key_path(at)
    out: dict[str, Setting] = {}
    for key, value in block.items():
        if key not in valid:
            others = [m for m, r in rules().items() if key in r.global_params or key in r.model_params]
            if others:
                raise issue(
                    f"'{key}' in {ctx} is not a parameter of {method} (it belongs to "
                    f"{', '.join(others)}); remove it or change merge_method",
                    *at, key,
                )
            pool = sorted(valid) if suggest(key, sorted(valid)) else list(KINDS)
            listed = sorted(takes - {"int8_mask"}) + list(RECIPE_LEVEL)
            raise issue(
                f"unknown key '{key}' in {ctx}{suggest(key, pool)}; {method} takes {', '.join(listed)}",
                *at, key,
            )
        if per_model and key in RECIPE_LEVEL:
            raise issue(
                f"'{key}' in {ctx} is a setting of the whole output; move it to the top-level 'parameters:'",
                *at, key,
            )
        out[key] = parse_setting(key, value, f"{ctx}.{key}", (*at, key))
    return out


# ----------------------------------------------------------------------------- top level

_UNSUPPORTED_TOP = {
    "slices": "mergeplan merges whole models: layer slices ('slices:') are not supported; "
    "list the models under 'models:'",
    "modules": "per-module configs ('modules:') are not supported; list the models under 'models:'",
    "chat_template": "'chat_template' is not supported: mergeplan keeps the base model's "
    "tokenizer files; edit the output's tokenizer_config.json after apply",
}


def _merge_method(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise issue(f"merge_method must be non-empty text, not {type_name(v)}")
    if v not in METHOD_NAMES:
        raise issue(f"unknown merge_method '{v}'{suggest(v, METHOD_NAMES)}; known: {', '.join(METHOD_NAMES)}")
    return v


def _dtype(v: Any) -> Any:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise issue(f"{{here}} must be non-empty text, not {type_name(v)}")
    bare = v[len("torch.") :] if v.startswith("torch.") else v
    if bare not in DTYPES:
        raise issue(f"{{here}} '{v}' is not supported{suggest(bare, DTYPES)}; use one of {', '.join(DTYPES)}")
    return bare


def _seed(v: Any) -> int:
    if v is None:
        return 0
    if type(v) is not int or not 0 <= v < 2**64:
        raise issue(f"seed must be a non-negative integer below 2**64, got {v!r}")
    return v


def _tokenizer_source(v: Any) -> Any:
    if v is None or v in TOKENIZER_SOURCES:
        return v
    shown = f"'{v}'" if isinstance(v, str) else type_name(v)
    raise issue(
        f"{{here}} {shown} is not supported: use `base` (the base model's tokenizer and vocabulary) "
        "or `union` (every input's tokens; the embeddings are merged over the union), or remove the key"
    )


class TokenizerSection(Section):
    """mergekit's ``tokenizer: {source: ...}``; only ``source`` is supported."""

    example = "`tokenizer: {source: base}`"
    source: Annotated[Optional[str], BeforeValidator(_tokenizer_source)] = None

    @classmethod
    def check_keys(cls, data: dict[str, Any]) -> None:
        for key in data:
            if key != "source":
                raise issue(
                    f"{{here}}.{key} is not supported: mergeplan builds the tokenizer from `source` "
                    "alone; use `tokenizer_source: base` or `union`",
                    key,
                )


def _guides(v: Any) -> Any:
    return {} if v is None else v


class RecipeSchema(Section):
    """The whole recipe document. Field order is the order problems are looked for."""

    example = "merge_method:, models:, ..."
    special_keys = _UNSUPPORTED_TOP
    merge_method: Annotated[str, BeforeValidator(_merge_method)]
    tokenizer_source: Annotated[Optional[str], BeforeValidator(_tokenizer_source)] = None
    tokenizer: Optional[TokenizerSection] = None
    base_model: Optional[ModelReference] = None
    models: Annotated[list[Annotated[ModelEntry, BeforeValidator(_entry)]], BeforeValidator(_models)]
    parameters: ParamBlock = {}
    dtype: Annotated[Optional[str], BeforeValidator(_dtype)] = None
    out_dtype: Annotated[Optional[str], BeforeValidator(_dtype)] = None
    name: Optional[Text] = None
    seed: Annotated[int, BeforeValidator(_seed)] = 0
    guides: Annotated[GuideOptions, BeforeValidator(_guides)] = GuideOptions()
    calibration: Optional[CalibrationSettings] = None
    tune: Optional[TuneSpec] = None

    # Settings per `parameters:` block, filled by the after-validator: () for the top
    # level, i for models[i].
    _settings: dict[Any, dict[str, Setting]] = PrivateAttr(default_factory=dict)

    @classmethod
    def not_a_mapping(cls, data: Any) -> str:
        return f"a recipe must be a YAML mapping (merge_method:, models:, ...), not {type_name(data)}"

    @classmethod
    def check_keys(cls, v: dict[str, Any]) -> None:
        for key in v:
            if key in _UNSUPPORTED_TOP:
                raise issue(_UNSUPPORTED_TOP[key], key)
        super().check_keys(v)
        if "merge_method" not in v:
            raise issue(f"missing 'merge_method'; add e.g. `merge_method: ties` (known: {', '.join(METHOD_NAMES)})")
        if "models" not in v:
            raise issue("missing 'models:'; list the models to merge, e.g. `models: [{model: ./ft}]`")
        if v.get("tokenizer_source") is not None and v.get("tokenizer") is not None:
            raise issue("give either 'tokenizer_source' or 'tokenizer', not both (as in mergekit)", "tokenizer")

    @model_validator(mode="after")
    def _per_method(self) -> "RecipeSchema":
        method = self.merge_method
        if rules()[method].needs_base and self.base_model is None:
            raise issue(
                f"merge_method '{method}' needs a base_model (the model the fine-tunes were trained "
                "from); add `base_model: PATH`",
                "merge_method",
            )
        self._settings[()] = parse_block(method, self.parameters, ("parameters",), per_model=False)
        for i, entry in enumerate(self.models):
            self._settings[i] = parse_block(method, entry.parameters, ("models", i, "parameters"), per_model=True)
        return self

    @property
    def tokenizer_choice(self) -> str | None:
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def settings(self, block: Any) -> dict[str, Setting]:
        return self._settings[block]
