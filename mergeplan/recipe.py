"""Recipe loading: a mergekit-compatible YAML subset plus mergeplan's own sections.

A mergekit 0.1.5 config for linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*
loads unchanged; mergeplan adds ``cabs``, ``seed``, ``guides:``, ``calibration:``, a
per-model ``name:`` and a few global parameters. Every problem is a ``MergeplanError``
that names the file and line. See docs/recipe.md for the user-facing reference.

Parameter values keep mergekit's three shapes (scalar, gradient list, filter list) as
``ParamValue`` objects; nothing is resolved until a tensor is known, because the value
depends on the tensor's name and layer.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from mergeplan.errors import MergeplanError
from mergeplan.yamlpos import YNode, compose_located, where

__all__ = [
    "Conditional",
    "METHOD_NAMES",
    "ModelSpec",
    "ParamValue",
    "Recipe",
    "layer_fraction",
    "load_recipe",
    "method_parameters",
    "parse_recipe",
    "resolve",
]

Scalar = Union[float, int, bool, str]

# --------------------------------------------------------------------------------------
# Which parameters each method takes.
#
# mergekit's rule (kept here): a per-model parameter may also be given in the top-level
# `parameters:` block, which then acts as the fallback for every model; a global
# parameter is only read from the top-level block.
# --------------------------------------------------------------------------------------

REQUIRED: Any = object()  # sentinel default: the recipe must give a value

METHOD_NAMES: tuple[str, ...] = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "cabs",
)

DTYPES = ("float16", "bfloat16", "float32", "float64")
GUIDE_NAMES = ("lewis", "aim", "sens")
CALIBRATION_KEYS = ("data", "samples", "seq_len", "batch_size", "device", "dtype", "tokenizer")

# mergekit 0.1.5's parameter names per method (merge_methods/linear.py and
# generalized_task_arithmetic.py). A name mergekit accepts but the mergeplan method does
# not use (density with task_arithmetic) is accepted and dropped with a note, so mergekit
# configs still load.
_MK_GTA = frozenset({"int8_mask", "normalize", "rescale", "lambda", "weight", "density"})
_MERGEKIT_PARAMS: dict[str, frozenset[str]] = {
    "linear": frozenset({"weight", "normalize"}),
    "task_arithmetic": _MK_GTA,
    "ties": _MK_GTA,
    "dare_linear": _MK_GTA,
    "dare_ties": _MK_GTA,
    "breadcrumbs": _MK_GTA | {"gamma"},
    "breadcrumbs_ties": _MK_GTA | {"gamma"},
    "della": _MK_GTA | {"epsilon"},
    "della_linear": _MK_GTA | {"epsilon"},
}
# Recipe-level settings that live in the top-level `parameters:` block but are not
# merge parameters (they go to Recipe fields, not Recipe.parameters).
_RECIPE_LEVEL = ("max_shard_size",)


@dataclass(frozen=True)
class _MethodRules:
    needs_base: bool
    global_params: dict[str, Any]  # name -> default
    model_params: dict[str, Any]  # name -> default (REQUIRED: must be given)


@functools.cache
def _rules() -> dict[str, _MethodRules]:
    """Parameter names and defaults per method, from the methods registry."""
    # Imported late: the registry pulls in torch, which parsing YAML does not need.
    from mergeplan.methods import registry

    def conv(params: Any) -> dict[str, Any]:
        return {k: (REQUIRED if v is registry.REQUIRED else v) for k, v in params.items()}

    return {
        name: _MethodRules(spec.needs_base, conv(spec.global_params), conv(spec.model_params))
        for name, spec in registry.METHODS.items()
    }


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    from mergeplan.methods import registry

    # "none" is recipe sugar for `rescale: false` (see _Parser.rescale_none)
    return {
        "rescale_mode": tuple(registry.RESCALE_MODES) + ("none",),
        "consensus_method": tuple(registry.CONSENSUS),
    }


def method_parameters(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global parameter defaults, per-model parameter defaults) for a method.

    Taken from ``mergeplan.methods.registry.METHODS``. A default of ``REQUIRED`` means
    the recipe must give the value (per model or as a top-level fallback); ``None``
    means "the method decides" (CABS ``order``: the order of ``models:``).
    """
    rules = _rules()[method]
    return dict(rules.global_params), dict(rules.model_params)


# Value kinds per parameter name. Float parameters interpolate along gradients;
# everything else steps (mergekit: numbers interpolate, bools and strings select).
_KINDS: dict[str, str] = {
    "weight": "float",
    "density": "float",
    "gamma": "float",
    "epsilon": "float",
    "lambda": "float",
    "normalize": "bool",
    "rescale": "bool",
    "int8_mask": "bool",
    "rescale_mode": "choice",
    "consensus_method": "choice",
    "n": "int",
    "m": "int",
    "order": "names",
    "max_shard_size": "size",
}
# Parameters that are one value for the whole merge: no gradients, no filters.
_LITERAL = {"order", "max_shard_size"}


def _range_problem(name: str, value: Any) -> str | None:
    """What is wrong with a leaf value beyond its type (completes "<where> is ..."), or None."""
    if name == "density" and not 0.0 < value <= 1.0:
        return (
            f"{value:g}, outside (0, 1]: density is the fraction of each task vector kept; "
            "use e.g. 0.5 (1 keeps everything)"
        )
    if name == "gamma" and not 0.0 <= value < 1.0:
        return f"{value:g}, outside [0, 1): gamma is the fraction of largest entries dropped"
    if name == "epsilon" and not 0.0 <= value < 1.0:
        return f"{value:g}, outside [0, 1): keep probabilities are density +/- epsilon"
    if name in ("n", "m") and value < 1:
        return f"{value}; it must be a positive integer"
    return None


# --------------------------------------------------------------------------------------
# Parameter values: scalar, gradient, or filtered conditionals.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditional:
    """One entry of a filter list: applies to tensors whose name contains ``filter``.

    ``filter`` None or ``"*"`` matches every tensor (the default entry).
    """

    filter: str | None
    value: Scalar | tuple[Scalar, ...]
    line: int

    def matches(self, tensor_name: str) -> bool:
        return _filter_matches(self.filter, lambda f: bool(tensor_name) and f in tensor_name)


def _filter_matches(flt: str | None, contains: Callable[[str], bool]) -> bool:
    return flt is None or flt == "*" or contains(flt)


def layer_fraction(layer: int | None, num_layers: int) -> float:
    """The gradient position ``t`` mergekit 0.1.5 uses for a tensor.

    Decoder layer ``i`` of ``N``: ``t = i / (N - 1)``, and ``t = 1`` when ``N == 1``.
    Tensors outside the decoder layers (embeddings, final norm, lm_head; ``layer``
    None) are planned by mergekit with ``t = 0``: they take a gradient's FIRST value,
    lm_head included.
    """
    if layer is None:
        return 0.0
    if num_layers < 1 or not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is not in range for {num_layers} layers")
    if num_layers > 1:
        return layer / (num_layers - 1)
    return 1.0


def _at_fraction(value: Scalar | tuple[Scalar, ...], t: float) -> Scalar:
    """A scalar or gradient evaluated at fraction t (mergekit's evaluate_setting)."""
    if not isinstance(value, tuple):
        return value
    n = len(value)
    if all(type(v) is float for v in value):
        # Piecewise-linear over n evenly spaced anchors; same float operations as
        # mergekit so results match bit for bit.
        scaled = t * (n - 1)
        i0 = int(scaled)
        i1 = min(n - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    # bools, strings and integers select a step instead of interpolating
    return value[int(t * (n - 1))]


@dataclass(frozen=True)
class ParamValue:
    """A parameter as written in the recipe, resolvable per tensor.

    ``setting`` is a scalar, a tuple of scalars (a gradient over layers), or a tuple
    of ``Conditional`` (first matching filter wins). ``literal`` values (CABS
    ``order``, ``max_shard_size``) are one value for the whole merge.
    """

    setting: Scalar | tuple[Any, ...]
    line: int
    literal: bool = False

    @property
    def is_conditional(self) -> bool:
        return (
            not self.literal
            and isinstance(self.setting, tuple)
            and bool(self.setting)
            and isinstance(self.setting[0], Conditional)
        )

    @property
    def is_gradient(self) -> bool:
        return not self.literal and isinstance(self.setting, tuple) and not self.is_conditional

    @property
    def is_scalar(self) -> bool:
        return not isinstance(self.setting, tuple)

    def resolve(self, tensor_name: str, layer: int | None, num_layers: int) -> Any:
        """The value for one tensor, or None when no filter entry matches it.

        None means "not set here": the caller falls back to the next level (a model's
        value falls back to the top-level ``parameters:``, then to the method default),
        exactly as mergekit does.
        """
        t = layer_fraction(layer, num_layers)
        return self._at(t, lambda f: bool(tensor_name) and f in tensor_name)

    def _at(self, t: float, contains: Callable[[str], bool]) -> Any:
        if self.literal:
            return list(self.setting) if isinstance(self.setting, tuple) else self.setting
        if self.is_conditional:
            for cond in self.setting:
                if _filter_matches(cond.filter, contains):
                    return _at_fraction(cond.value, t)
            return None
        return _at_fraction(self.setting, t)

    def leaves(self) -> Iterator[Scalar]:
        """Every scalar written in the setting (gradient anchors and filter values)."""
        if self.literal:
            return
        if self.is_conditional:
            for cond in self.setting:
                yield from cond.value if isinstance(cond.value, tuple) else (cond.value,)
        elif isinstance(self.setting, tuple):
            yield from self.setting
        else:
            yield self.setting

    def to_plain(self) -> Any:
        """Back to the YAML shape (for display and provenance)."""
        if self.literal:
            return list(self.setting) if isinstance(self.setting, tuple) else self.setting
        if self.is_conditional:
            out = []
            for c in self.setting:
                v = list(c.value) if isinstance(c.value, tuple) else c.value
                out.append({"value": v} if c.filter is None else {"filter": c.filter, "value": v})
            return out
        if isinstance(self.setting, tuple):
            return list(self.setting)
        return self.setting


def resolve(
    value: ParamValue | Scalar | None, tensor_name: str, layer: int | None, num_layers: int
) -> Any:
    """``value.resolve(...)`` that also passes plain scalars and None through."""
    if isinstance(value, ParamValue):
        return value.resolve(tensor_name, layer, num_layers)
    return value


# --------------------------------------------------------------------------------------
# Recipe data model
# --------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One input model. ``ref`` is exactly as written (the io layer resolves it
    relative to the recipe's directory); ``name`` is its id in the plan."""

    name: str
    ref: str
    parameters: dict[str, ParamValue]
    line: int


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

    def model(self, name: str) -> ModelSpec:
        for spec in self.all_models:
            if spec.name == name:
                return spec
        raise KeyError(name)

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
        value = _first_set(chain, t, contains)
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


def _first_set(chain: list[ParamValue | None], t: float, contains: Callable[[str], bool]) -> Any:
    for pv in chain:
        if pv is not None:
            v = pv._at(t, contains)
            if v is not None:
                return v
    return None


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------

_TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "name",
    "seed",
    "guides",
    "calibration",
)
_UNSUPPORTED_TOP = {
    "slices": "mergeplan merges whole models: layer slices ('slices:') are not supported; "
    "list the models under 'models:'",
    "modules": "per-module configs ('modules:') are not supported; list the models under "
    "'models:'",
    "chat_template": "'chat_template' is not supported: mergeplan keeps the base model's "
    "tokenizer files; edit the output's tokenizer_config.json after apply",
}
_MODEL_KEYS = ("model", "parameters", "name")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_BOOL_TEXT = {
    "true": True, "yes": True, "on": True, "y": True, "t": True, "1": True,
    "false": False, "no": False, "off": False, "n": False, "f": False, "0": False,
}  # fmt: skip
_MAX_FILTERS_CHECKED = 10


def _suggest(key: str, pool: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(pool), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(v: Any) -> str:
    if isinstance(v, YNode):
        if v.is_map:
            return "a mapping"
        if v.is_seq:
            return "a list"
        v = v.value
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "text"}.get(
        type(v), type(v).__name__
    )


def _default_name(ref: str) -> str:
    return os.path.basename(os.path.normpath(ref)) or ref


def _same_ref(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


class _Parser:
    def __init__(self, text: str, path: Path | None, root: YNode):
        self.text = text
        self.path = path
        self.root = root
        self.notes: list[str] = []
        self.method = ""
        self.rules: _MethodRules | None = None
        self.recipe_level: dict[str, Any] = {}

    # -- helpers ------------------------------------------------------------------------

    def fail(self, line: int | None, msg: str) -> MergeplanError:
        return MergeplanError(f"{where(self.path, line)}: {msg}")

    def note(self, line: int | None, msg: str) -> None:
        self.notes.append(f"{where(self.path, line)}: {msg}")

    def check_keys(self, node: YNode, allowed: tuple[str, ...], ctx: str) -> None:
        for key in node.value:
            if key not in allowed:
                raise self.fail(
                    node.key_lines[key],
                    f"unknown key '{key}' in {ctx}{_suggest(key, allowed)}; "
                    f"allowed: {', '.join(allowed)}",
                )

    def expect_map(self, node: YNode, ctx: str, example: str) -> None:
        if not node.is_map:
            raise self.fail(
                node.line, f"{ctx} must be a mapping ({example}), not {_type_name(node)}"
            )

    def text_value(self, node: YNode, ctx: str) -> str:
        if not node.is_scalar or not isinstance(node.value, str) or not node.value:
            raise self.fail(node.line, f"{ctx} must be non-empty text, not {_type_name(node)}")
        return node.value

    # -- top level ----------------------------------------------------------------------

    def parse(self) -> Recipe:
        root = self.root
        if not root.is_map:
            raise self.fail(
                root.line,
                f"a recipe must be a YAML mapping (merge_method:, models:, ...), not "
                f"{_type_name(root)}",
            )
        top = root.value
        for key in top:
            if key in _UNSUPPORTED_TOP:
                raise self.fail(root.key_lines[key], _UNSUPPORTED_TOP[key])
        self.check_keys(root, _TOP_KEYS, "the recipe")

        self.parse_method(root)
        tokenizer_source = self.parse_tokenizer(root)
        base = self.parse_base(root)
        models = self.parse_models(root)
        parameters = self.parse_params(top.get("parameters"), "parameters", per_model=False)
        models = self.place_base(base, models)
        base = self.base_spec
        self.rescale_none(parameters)
        dtype = self.parse_dtype(top.get("dtype"), "dtype")
        out_dtype = self.parse_dtype(top.get("out_dtype"), "out_dtype")
        name = None
        if top.get("name") is not None:
            name = self.text_value(top["name"], "name")
        seed = self.parse_seed(top.get("seed"))
        guides = self.parse_guides(top.get("guides"))
        calibration = self.parse_calibration(top.get("calibration"), base, models)

        recipe = Recipe(
            path=self.path,
            text=self.text,
            merge_method=self.method,
            base_model=base,
            models=models,
            parameters=parameters,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tokenizer_source,
            seed=seed,
            guides=guides,
            calibration=calibration,
            notes=self.notes,
            name=name,
            max_shard_size=self.recipe_level.get("max_shard_size"),
            locations=_key_lines(root),
        )
        self.check_required(recipe, root)
        self.check_unreachable_filters(recipe)
        if self.method == "linear":
            self.check_linear_weights(recipe, root)
        if self.method in ("della", "della_linear"):
            self.check_della(recipe)
        if self.method == "cabs":
            self.check_cabs(recipe, root)
        return recipe

    def parse_method(self, root: YNode) -> None:
        node = root.value.get("merge_method")
        if node is None:
            raise self.fail(
                root.line,
                "missing 'merge_method'; add e.g. `merge_method: ties` (known: "
                f"{', '.join(METHOD_NAMES)})",
            )
        method = self.text_value(node, "merge_method")
        if method not in _rules():
            raise self.fail(
                node.line,
                f"unknown merge_method '{method}'{_suggest(method, METHOD_NAMES)}; "
                f"known: {', '.join(METHOD_NAMES)}",
            )
        self.method = method
        self.method_line = node.line
        self.rules = _rules()[method]

    def parse_tokenizer(self, root: YNode) -> str | None:
        top = root.value
        src_node = top.get("tokenizer_source")
        tok_node = top.get("tokenizer")
        if src_node is not None and tok_node is not None:
            raise self.fail(
                root.key_lines["tokenizer"],
                "give either 'tokenizer_source' or 'tokenizer', not both (as in mergekit)",
            )
        if tok_node is not None:
            self.expect_map(tok_node, "tokenizer", "`tokenizer: {source: base}`")
            for key in tok_node.value:
                if key != "source":
                    raise self.fail(
                        tok_node.key_lines[key],
                        f"tokenizer.{key} is not supported: mergeplan keeps the base model's "
                        "vocabulary; use `tokenizer_source: base`",
                    )
            src_node = tok_node.value.get("source")
            ctx = "tokenizer.source"
        else:
            ctx = "tokenizer_source"
        if src_node is None or (src_node.is_scalar and src_node.value is None):
            return None
        value = src_node.value if src_node.is_scalar else None
        if value not in ("base", "union"):
            shown = f"'{value}'" if isinstance(value, str) else _type_name(src_node)
            raise self.fail(
                src_node.line,
                f"{ctx} {shown} is not supported: use `base` (the base model's vocabulary) or "
                "`union` (every model's added tokens; see docs/recipe.md), or remove the key",
            )
        return value

    def parse_dtype(self, node: YNode | None, ctx: str) -> str | None:
        if node is None or (node.is_scalar and node.value is None):
            return None
        value = self.text_value(node, ctx)
        bare = value[len("torch.") :] if value.startswith("torch.") else value
        if bare not in DTYPES:
            raise self.fail(
                node.line,
                f"{ctx} '{value}' is not supported{_suggest(bare, DTYPES)}; use one of "
                f"{', '.join(DTYPES)}",
            )
        return bare

    def parse_seed(self, node: YNode | None) -> int:
        if node is None:
            return 0
        v = node.value if node.is_scalar else None
        if type(v) is not int or not 0 <= v < 2**64:
            raise self.fail(
                node.line,
                f"seed must be a non-negative integer below 2**64, got {node.plain()!r}",
            )
        return v

    # -- models -------------------------------------------------------------------------

    def parse_ref(self, node: YNode, ctx: str, allow_name: bool) -> tuple[str, str | None]:
        """(ref, name given in the mapping form); accepts mergekit's ModelReference forms."""
        if node.is_scalar:
            return self.text_value(node, ctx), None
        if not node.is_map:
            raise self.fail(node.line, f"{ctx} must be a path (text), not {_type_name(node)}")
        allowed = ("model", "lora", "override_architecture") + (("name",) if allow_name else ())
        self.check_keys(node, allowed, ctx)
        lora = node.value.get("lora")
        if lora is not None and not (lora.is_scalar and lora.value is None):
            raise self.fail(
                node.key_lines["lora"],
                "LoRA adapters are not supported: merge the adapter into its model first "
                "(e.g. with peft's merge_and_unload) and point to the result",
            )
        if "override_architecture" in node.value:
            raise self.fail(
                node.key_lines["override_architecture"],
                "override_architecture is not supported: mergeplan reads tensors by name",
            )
        if "model" not in node.value:
            raise self.fail(node.line, f"{ctx} is missing 'model: PATH'")
        inner = node.value["model"]
        if inner.is_map:
            self.check_keys(inner, ("path", "revision"), f"{ctx}.model")
            if "path" not in inner.value:
                raise self.fail(inner.line, f"{ctx}.model is missing 'path'")
            ref = self.text_value(inner.value["path"], f"{ctx}.model.path")
            rev = inner.value.get("revision")
            if rev is not None and not (rev.is_scalar and rev.value is None):
                # mergekit's string form of the same reference
                ref = f"{ref}@{self.text_value(rev, f'{ctx}.model.revision')}"
        else:
            ref = self.text_value(inner, f"{ctx}.model")
        name = None
        if allow_name and "name" in node.value:
            name = self.text_value(node.value["name"], f"{ctx}.name")
        return ref, name

    def parse_base(self, root: YNode) -> tuple[str, str | None, int] | None:
        node = root.value.get("base_model")
        if node is None or (node.is_scalar and node.value is None):
            if self.rules.needs_base:
                raise self.fail(
                    self.method_line,
                    f"merge_method '{self.method}' needs a base_model (the model the "
                    "fine-tunes were trained from); add `base_model: PATH`",
                )
            return None
        ref, name = self.parse_ref(node, "base_model", allow_name=True)
        return ref, name, node.line

    def parse_models(self, root: YNode) -> list[ModelSpec]:
        node = root.value.get("models")
        if node is None:
            raise self.fail(
                root.line,
                "missing 'models:'; list the models to merge, e.g. `models: [{model: ./ft}]`",
            )
        if not node.is_seq or not node.value:
            raise self.fail(
                node.line,
                "'models' must be a non-empty list of entries like `- model: PATH`",
            )
        out: list[ModelSpec] = []
        self.explicit_names: dict[int, bool] = {}
        for i, entry in enumerate(node.value):
            ctx = f"models[{i}]"
            if entry.is_scalar and isinstance(entry.value, str):
                raise self.fail(
                    entry.line,
                    f"{ctx} must be a mapping: write `- model: {entry.value}`",
                )
            self.expect_map(entry, ctx, "`- model: PATH`")
            self.check_keys(entry, _MODEL_KEYS, ctx)
            if "model" not in entry.value:
                raise self.fail(entry.line, f"{ctx} is missing 'model: PATH'")
            ref, _ = self.parse_ref(entry.value["model"], f"{ctx}.model", allow_name=False)
            name = None
            if "name" in entry.value:
                name = self.text_value(entry.value["name"], f"{ctx}.name")
            self.explicit_names[i] = name is not None
            params = self.parse_params(entry.value.get("parameters"), f"{ctx}.parameters", True)
            out.append(ModelSpec(name or _default_name(ref), ref, params, entry.line))
        self.model_entry_lines = [e.line for e in node.value]
        return out

    def place_base(
        self, base: tuple[str, str | None, int] | None, models: list[ModelSpec]
    ) -> list[ModelSpec]:
        """Separate the base model from the inputs the way mergekit does, and check ids."""
        self.base_spec: ModelSpec | None = None
        for j, mj in enumerate(models):
            for i in range(j):
                if _same_ref(models[i].ref, mj.ref):
                    raise self.fail(
                        mj.line,
                        f"models[{j}] is the same model as models[{i}] ('{mj.ref}'); list "
                        "each model once",
                    )
        if base is None:
            self.check_unique_names(None, models)
            return models
        base_ref, base_name, base_line = base
        index = next((i for i, m in enumerate(models) if _same_ref(m.ref, base_ref)), None)
        if self.method == "linear":
            # linear ignores the base role, but mergekit still feeds base_model in as
            # one more input (weighted by the top-level weight).
            if index is None:
                spec = ModelSpec(base_name or _default_name(base_ref), base_ref, {}, base_line)
                models = models + [spec]
                self.note(
                    base_line,
                    "linear has no base role: base_model is merged as one more input, as "
                    "mergekit does (it takes the top-level weight); remove base_model to "
                    "average only the listed models",
                )
            else:
                spec = models[index]
                if base_name is not None and not self.explicit_names[index]:
                    spec.name = base_name
            self.base_spec = spec
            self.check_unique_names(None, models)  # the base is one of `models` now
            return models
        if index is None:
            spec = ModelSpec(base_name or _default_name(base_ref), base_ref, {}, base_line)
        else:
            entry = models[index]
            name = entry.name if self.explicit_names[index] else (base_name or entry.name)
            spec = ModelSpec(name, base_ref, {}, base_line)
            if entry.parameters:
                self.note(
                    entry.line,
                    f"models[{index}] is the base model: its parameters "
                    f"({', '.join(entry.parameters)}) are ignored, as in mergekit",
                )
            models = models[:index] + models[index + 1 :]
            if not models:
                raise self.fail(
                    entry.line,
                    "only the base model is listed under 'models:'; add the fine-tuned "
                    "models to merge into it",
                )
        self.base_spec = spec
        self.check_unique_names(spec, models)
        return models

    def check_unique_names(self, base: ModelSpec | None, models: list[ModelSpec]) -> None:
        seen: dict[str, ModelSpec] = {}
        for spec in ([base] if base is not None else []) + models:
            if spec.name in seen:
                first = seen[spec.name]
                raise self.fail(
                    spec.line,
                    f"model name '{spec.name}' is used twice (also line {first.line}; names "
                    "default to the directory's basename); give one of them `name: OTHER`",
                )
            seen[spec.name] = spec

    # -- parameters ---------------------------------------------------------------------

    def parse_params(self, node: YNode | None, ctx: str, per_model: bool) -> dict[str, ParamValue]:
        if node is None or (node.is_scalar and node.value is None):
            return {}
        self.expect_map(node, ctx, "`weight: 1.0`")
        rules = self.rules
        takes = set(rules.model_params) | set(rules.global_params)
        mergekit_only = _MERGEKIT_PARAMS.get(self.method, frozenset()) - takes
        valid = takes | mergekit_only | {"int8_mask"} | set(_RECIPE_LEVEL)
        out: dict[str, ParamValue] = {}
        for key, value in node.value.items():
            line = node.key_lines[key]
            if key not in valid:
                others = [
                    m
                    for m, r in _rules().items()
                    if key in r.global_params or key in r.model_params
                ]
                if others:
                    raise self.fail(
                        line,
                        f"'{key}' in {ctx} is not a parameter of {self.method} (it belongs to "
                        f"{', '.join(others)}); remove it or change merge_method",
                    )
                pool = sorted(valid) if _suggest(key, sorted(valid)) else list(_KINDS)
                listed = sorted(takes - {"int8_mask"}) + list(_RECIPE_LEVEL)
                raise self.fail(
                    line,
                    f"unknown key '{key}' in {ctx}{_suggest(key, pool)}; {self.method} takes "
                    f"{', '.join(listed)}",
                )
            if per_model and key in _RECIPE_LEVEL:
                raise self.fail(
                    line,
                    f"'{key}' in {ctx} is a setting of the whole output; move it to the "
                    "top-level 'parameters:'",
                )
            pv = self.parse_setting(key, value, f"{ctx}.{key}", line)
            if key == "int8_mask":
                self.note(
                    line,
                    "int8_mask is ignored: in mergekit it only stores the sign mask as int8 "
                    "to save memory and does not change the result",
                )
            elif key in mergekit_only:
                self.note(
                    line,
                    f"'{key}' has no effect with {self.method} and is ignored, as in mergekit "
                    f"(it takes {', '.join(sorted(takes - {'int8_mask'}))})",
                )
            elif key in _RECIPE_LEVEL:
                self.recipe_level[key] = pv.setting
            elif per_model and key not in rules.model_params:
                self.note(
                    line,
                    f"'{key}' in {ctx} is ignored: it applies to the whole merge, and mergekit "
                    "reads it only from the top-level 'parameters:'; move it there",
                )
            else:
                out[key] = pv
        return out

    def rescale_none(self, parameters: dict[str, ParamValue]) -> None:
        """``rescale_mode: none`` means mergekit's ``rescale: false``; store it that way."""
        mode = parameters.get("rescale_mode")
        if mode is None or "none" not in set(mode.leaves()):
            return
        if not mode.is_scalar:
            raise self.fail(
                mode.line,
                "rescale_mode 'none' cannot vary by filter or layer; use filters on "
                "`rescale: false` instead",
            )
        rescale = parameters.get("rescale")
        if rescale is not None and True in set(rescale.leaves()):
            raise self.fail(
                mode.line,
                f"rescale_mode: none contradicts rescale: true (line {rescale.line}); keep one",
            )
        parameters["rescale"] = ParamValue(False, mode.line)
        del parameters["rescale_mode"]

    def parse_setting(self, name: str, node: YNode, ctx: str, line: int) -> ParamValue:
        """One parameter value; ``line`` (the key's line) labels the whole setting."""
        kind = _KINDS[name]
        if name in _LITERAL:
            if kind == "names":
                if not node.is_seq or not node.value:
                    raise self.fail(
                        node.line,
                        f"{ctx} must be a list of model names, e.g. `[math, code]`",
                    )
                names = tuple(self.text_value(n, f"{ctx} entry") for n in node.value)
                return ParamValue(names, line, literal=True)
            return ParamValue(self.leaf(name, node, ctx), line, literal=True)
        if node.is_scalar:
            return ParamValue(self.leaf(name, node, ctx), line)
        if node.is_map:
            return ParamValue((self.conditional(name, node, ctx),), line)
        items = node.value
        if not items:
            raise self.fail(node.line, f"{ctx} is an empty list; give a value")
        if all(n.is_scalar for n in items):
            return ParamValue(tuple(self.leaf(name, n, ctx) for n in items), line)
        if all(n.is_map for n in items):
            return ParamValue(tuple(self.conditional(name, n, ctx) for n in items), line)
        raise self.fail(
            node.line,
            f"{ctx} mixes plain values and filter entries; use either a list of numbers "
            "(a gradient over layers) or a list of `- filter: TEXT` / `value: X` entries",
        )

    def conditional(self, name: str, node: YNode, ctx: str) -> Conditional:
        self.check_keys(node, ("filter", "value"), f"{ctx} entry")
        if "value" not in node.value:
            raise self.fail(node.line, f"{ctx} entry has no 'value'; add `value: X`")
        flt: str | None = None
        fnode = node.value.get("filter")
        if fnode is not None and not (fnode.is_scalar and fnode.value is None):
            flt = self.text_value(fnode, f"{ctx} filter")
        vnode = node.value["value"]
        if vnode.is_scalar:
            value: Scalar | tuple[Scalar, ...] = self.leaf(name, vnode, ctx)
        elif vnode.is_seq and vnode.value and all(n.is_scalar for n in vnode.value):
            value = tuple(self.leaf(name, n, ctx) for n in vnode.value)
        else:
            raise self.fail(
                vnode.line,
                f"{ctx} value must be a number or a list of numbers (a gradient), not "
                f"{_type_name(vnode)}",
            )
        return Conditional(flt, value, node.line)

    def leaf(self, name: str, node: YNode, ctx: str) -> Scalar:
        """Check and coerce one scalar the way mergekit's pydantic types accept it."""
        kind = _KINDS[name]
        v = node.value
        bad = lambda want: self.fail(  # noqa: E731
            node.line,
            f"{ctx} must be {want}, not {_type_name(v)}" + (f" {v!r}" if v is not None else ""),
        )
        if kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise bad("a number")
            if isinstance(v, str):
                # YAML 1.1 reads `1e-3` (no dot) as text; mergekit accepts it as a number.
                try:
                    v = float(v.strip())
                except ValueError:
                    raise bad("a number") from None
            v = float(v)
            if not math.isfinite(v):
                raise bad("a finite number")
        elif kind == "bool":
            if isinstance(v, bool):
                pass
            elif isinstance(v, (int, float)) and v in (0, 1):
                v = bool(v)
            elif isinstance(v, str) and v.strip().lower() in _BOOL_TEXT:
                v = _BOOL_TEXT[v.strip().lower()]
            else:
                raise bad("true or false")
        elif kind == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if type(v) is not int:
                raise bad("an integer")
        elif kind == "choice":
            choices = _choices()[name]
            if v not in choices:
                hint = _suggest(v, choices) if isinstance(v, str) else ""
                raise self.fail(
                    node.line,
                    f"{ctx} {v!r} is not one of {', '.join(choices)}{hint}",
                )
        elif kind == "size":
            v = self.size(node, ctx)
        problem = _range_problem(name, v)
        if problem:
            raise self.fail(node.line, f"{ctx} is {problem}")
        return v

    def size(self, node: YNode, ctx: str) -> int:
        v = node.value
        if type(v) is int and v > 0:
            return v
        if isinstance(v, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", v)
            if m and m.group(2).lower() in _SIZE_UNITS:
                n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
                if n > 0:
                    return n
        raise self.fail(
            node.line,
            f"{ctx} must be a positive byte count such as 5000000000, '5GB' or '4GiB', "
            f"not {v!r}",
        )

    # -- mergeplan sections -------------------------------------------------------------

    def parse_guides(self, node: YNode | None) -> dict[str, dict[str, Any]]:
        if node is None or (node.is_scalar and node.value is None):
            return {}
        self.expect_map(node, "guides", "`guides: {aim: {omega: 0.4}}`")
        self.check_keys(node, GUIDE_NAMES, "guides")
        out: dict[str, dict[str, Any]] = {}
        for name, params in node.value.items():
            if params.is_scalar and params.value is None:
                out[name] = {}
                continue
            self.expect_map(params, f"guides.{name}", f"`{name}: {{...}}` or `{name}: {{}}`")
            out[name] = params.plain()
        return out

    def parse_calibration(
        self, node: YNode | None, base: ModelSpec | None, models: list[ModelSpec]
    ) -> dict[str, Any]:
        if node is None or (node.is_scalar and node.value is None):
            return {}
        self.expect_map(node, "calibration", "`calibration: {data: calib.txt, samples: 64}`")
        self.check_keys(node, CALIBRATION_KEYS, "calibration")
        out: dict[str, Any] = {}
        names = [m.name for m in ([base] if base else []) + models]
        for key, v in node.value.items():
            ctx = f"calibration.{key}"
            if key == "data":
                if v.is_map:
                    # per-model task data (LEWIS, Sens): model name -> path
                    for mname, p in v.value.items():
                        if mname not in names:
                            raise self.fail(
                                v.key_lines[mname],
                                f"{ctx} names unknown model '{mname}'{_suggest(mname, names)}; "
                                f"models: {', '.join(names)}",
                            )
                        self.text_value(p, f"{ctx}.{mname}")
                    out[key] = v.plain()
                else:
                    out[key] = self.text_value(v, ctx)
            elif key == "device":
                out[key] = self.text_value(v, ctx)
            else:
                if not v.is_scalar or type(v.value) is not int or v.value < 1:
                    raise self.fail(v.line, f"{ctx} must be a positive integer, not {v.plain()!r}")
                out[key] = v.value
        return out

    # -- whole-recipe checks ------------------------------------------------------------

    def check_required(self, recipe: Recipe, root: YNode) -> None:
        for pname, default in self.rules.model_params.items():
            if default is not REQUIRED or pname in recipe.parameters:
                continue
            for spec in recipe.models:
                if pname not in spec.parameters and spec is recipe.base_model:
                    raise self.fail(
                        spec.line,
                        f"linear merges base_model '{spec.name}' as one more input (as "
                        f"mergekit does) but it has no {pname}; remove base_model, list it "
                        f"under models: with a {pname}, or add a top-level "
                        f"`parameters: {{{pname}: ...}}`",
                    )
                if pname not in spec.parameters:
                    raise self.fail(
                        spec.line,
                        f"model '{spec.name}' has no {pname} ({self.method} needs one per "
                        f"model); add `parameters: {{{pname}: 1.0}}` to it, or a top-level "
                        f"`parameters: {{{pname}: ...}}` for all models",
                    )

    def check_unreachable_filters(self, recipe: Recipe) -> None:
        pvs = [(f"parameters.{k}", v) for k, v in recipe.parameters.items()]
        for spec in recipe.models:
            pvs += [(f"{spec.name}.{k}", v) for k, v in spec.parameters.items()]
        for label, pv in pvs:
            if not pv.is_conditional:
                continue
            for i, cond in enumerate(pv.setting[:-1]):
                if cond.filter is None or cond.filter == "*":
                    self.note(
                        pv.setting[i + 1].line,
                        f"{label}: entries after the one without a filter (line {cond.line}) "
                        "are never used: the first matching entry wins; move the default last",
                    )
                    break

    def scenarios(self, pvs: list[ParamValue | None]) -> list[tuple[float, frozenset[str]]] | None:
        """Every distinct situation a tensor can be in for these settings.

        Values are piecewise linear (or steps) in t with breaks at gradient anchors, so
        checking the anchors covers every layer. Filters are substring tests; a set of
        matched filters is possible only if it holds every filter that is a substring of
        one it holds. None when there are too many filters to enumerate.
        """
        filters: set[str] = set()
        ts = {0.0, 1.0}
        for pv in pvs:
            if pv is None or pv.literal:
                continue
            grads = []
            if pv.is_conditional:
                for c in pv.setting:
                    if c.filter not in (None, "*"):
                        filters.add(c.filter)
                    if isinstance(c.value, tuple):
                        grads.append(len(c.value))
            elif pv.is_gradient:
                grads.append(len(pv.setting))
            for n in grads:
                ts.update(k / (n - 1) for k in range(n) if n > 1)
        if len(filters) > _MAX_FILTERS_CHECKED:
            return None
        flist = sorted(filters)
        sets = []
        for mask in range(1 << len(flist)):
            chosen = {f for i, f in enumerate(flist) if mask >> i & 1}
            if all(a in chosen for b in chosen for a in flist if a != b and a in b):
                sets.append(frozenset(chosen))
        return [(t, s) for s in sets for t in sorted(ts)]

    @staticmethod
    def describe(t: float, matched: frozenset[str], any_filters: bool, any_grad: bool) -> str:
        parts = []
        if matched:
            quoted = " and ".join(f"'{f}'" for f in sorted(matched))
            parts.append(f"tensors whose names contain {quoted}")
        elif any_filters:
            parts.append("tensors matching none of the filters")
        else:
            parts.append("all tensors")
        if any_grad:
            parts.append(f"at layer fraction {t:g}")
        return " ".join(parts)

    def check_linear_weights(self, recipe: Recipe, root: YNode) -> None:
        chains = [self.chain("weight", m, recipe) for m in recipe.models]
        norm = recipe.parameters.get("normalize")
        pvs = [pv for c in chains for pv in c] + [norm]
        scen = self.scenarios(pvs)
        if scen is None:
            self.note(None, "too many filters to check that the linear weights sum above 0")
            return
        any_filters = any(s for _, s in scen)
        any_grad = any(_has_gradient(pv) for pv in pvs)
        for t, matched in scen:
            contains = matched.__contains__
            normalize = self.value_at("normalize", [norm], t, contains)
            if not normalize:
                continue
            weights = [_first_set(c, t, contains) for c in chains]
            if any(w is None for w in weights):
                continue  # reported per tensor by Recipe.param
            total = math.fsum(weights)
            if total < 1e-8:
                line = next(
                    (
                        (c[0] or c[1]).line
                        for c, w in zip(chains, weights)
                        if w <= 0 and (c[0] or c[1]) is not None
                    ),
                    root.key_lines["models"],
                )
                raise self.fail(
                    line,
                    f"linear with normalize: true divides by the sum of the weights, which "
                    f"is {total:g} for {self.describe(t, matched, any_filters, any_grad)}; "
                    "make the weights sum to a positive number, or set `normalize: false` "
                    "under parameters to use them as given",
                )

    def check_della(self, recipe: Recipe) -> None:
        for spec in recipe.models:
            dchain = self.chain("density", spec, recipe)
            echain = self.chain("epsilon", spec, recipe)
            scen = self.scenarios(dchain + echain)
            if scen is None:
                continue
            any_filters = any(s for _, s in scen)
            any_grad = any(_has_gradient(pv) for pv in dchain + echain)
            for t, matched in scen:
                contains = matched.__contains__
                d = self.value_at("density", dchain, t, contains)
                e = self.value_at("epsilon", echain, t, contains)
                if d >= 1.0:
                    continue  # della passes the tensor through unpruned
                if d - e <= 0 or d + e >= 1:
                    src = next((pv for pv in echain + dchain if pv is not None), None)
                    line = src.line if src is not None else spec.line
                    raise self.fail(
                        line,
                        f"della keeps entries with probabilities from density-epsilon to "
                        f"density+epsilon, which must lie inside (0, 1): model '{spec.name}' "
                        f"has density {d:g}, epsilon {e:g} for "
                        f"{self.describe(t, matched, any_filters, any_grad)}; use epsilon "
                        f"below {min(d, 1 - d):g}",
                    )

    def check_cabs(self, recipe: Recipe, root: YNode) -> None:
        names = [m.name for m in recipe.models]
        order = recipe.parameters.get("order")
        if order is not None:
            given = list(order.setting)
            for n in given:
                if n not in names:
                    raise self.fail(
                        order.line,
                        f"cabs order names unknown model '{n}'{_suggest(n, names)}; the "
                        f"models to order are: {', '.join(names)}",
                    )
            if len(set(given)) != len(given) or set(given) != set(names):
                missing = [n for n in names if n not in given]
                dup = sorted({n for n in given if given.count(n) > 1})
                what = f"missing {', '.join(missing)}" if missing else f"repeats {', '.join(dup)}"
                raise self.fail(
                    order.line,
                    f"cabs order must list every merged model once ({what}); models: "
                    f"{', '.join(names)}",
                )
        for spec in recipe.models:
            nchain = self.chain("n", spec, recipe)
            mchain = self.chain("m", spec, recipe)
            for t, matched in self.scenarios(nchain + mchain) or []:
                contains = matched.__contains__
                n = self.value_at("n", nchain, t, contains)
                m = self.value_at("m", mchain, t, contains)
                if n > m:
                    src = next((pv for pv in nchain + mchain if pv is not None), None)
                    raise self.fail(
                        src.line if src is not None else spec.line,
                        f"cabs keeps n of every m entries, so n must not exceed m: model "
                        f"'{spec.name}' has n={n}, m={m}",
                    )

    def chain(self, name: str, spec: ModelSpec, recipe: Recipe) -> list[ParamValue | None]:
        """Where a value for (model, name) may come from, highest precedence first."""
        top = recipe.parameters.get(name)
        return [spec.parameters.get(name), top] if name in self.rules.model_params else [top]

    def value_at(
        self, name: str, chain: list[ParamValue | None], t: float, contains: Callable[[str], bool]
    ) -> Any:
        """The first value set along ``chain`` at (t, matched filters), else the default."""
        v = _first_set(chain, t, contains)
        if v is None:
            v = self.rules.model_params.get(name, self.rules.global_params.get(name))
        return v


def _has_gradient(pv: ParamValue | None) -> bool:
    if pv is None or pv.literal:
        return False
    if pv.is_conditional:
        return any(isinstance(c.value, tuple) for c in pv.setting)
    return pv.is_gradient


def _key_lines(root: YNode) -> dict[str, int]:
    """Line of every key path (``models[1].parameters.density``, ``guides.aim.omega``)."""
    out: dict[str, int] = {}

    def walk(node: YNode, prefix: str) -> None:
        if node.is_map:
            for k, v in node.value.items():
                p = f"{prefix}.{k}" if prefix else k
                out[p] = node.key_lines[k]
                walk(v, p)
        elif node.is_seq:
            for i, v in enumerate(node.value):
                p = f"{prefix}[{i}]"
                out[p] = v.line
                walk(v, p)

    walk(root, "")
    return out


def parse_recipe(text: str, path: str | Path | None = None) -> Recipe:
    """Parse recipe YAML text; ``path`` only labels messages and ``Recipe.path``."""
    p = Path(path) if path is not None else None
    root = compose_located(text, p)
    if root is None:
        raise MergeplanError(
            f"{where(p, None)}: the recipe is empty; see docs/recipe.md for an example"
        )
    return _Parser(text, p, root).parse()


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a recipe file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeplanError(f"{p}: recipe file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeplanError(f"{p}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, p)
