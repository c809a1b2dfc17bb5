"""What a recipe may say: method names, each method's parameters and their value kinds.

Parameter names and defaults come from ``mergeplan.methods.registry`` (imported late: the
registry's kernels pull in torch, which reading YAML does not need). mergekit's rule is
kept: a per-model parameter may also be given in the top-level ``parameters:`` block, which
then acts as the fallback for every model; a global parameter is only read from the top
level.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["METHOD_NAMES", "REQUIRED", "method_parameters"]

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

# mergekit 0.1.5's parameter names per method (merge_methods/linear.py and
# generalized_task_arithmetic.py). A name mergekit accepts but the mergeplan method does
# not use (density with task_arithmetic) is accepted and dropped with a note, so mergekit
# configs still load.
_MK_GTA = frozenset({"int8_mask", "normalize", "rescale", "lambda", "weight", "density"})
MERGEKIT_PARAMS: dict[str, frozenset[str]] = {
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
RECIPE_LEVEL = ("max_shard_size",)

# Value kinds per parameter name. Float parameters interpolate along gradients;
# everything else steps (mergekit: numbers interpolate, bools and strings select).
KINDS: dict[str, str] = {
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
LITERAL = frozenset({"order", "max_shard_size"})

SIZE_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip
BOOL_TEXT = {
    "true": True, "yes": True, "on": True, "y": True, "t": True, "1": True,
    "false": False, "no": False, "off": False, "n": False, "f": False, "0": False,
}  # fmt: skip


@dataclass(frozen=True)
class MethodRules:
    needs_base: bool
    global_params: dict[str, Any]  # name -> default
    model_params: dict[str, Any]  # name -> default (REQUIRED: must be given)


@functools.cache
def rules() -> dict[str, MethodRules]:
    """Parameter names and defaults per method, from the methods registry."""
    from mergeplan.methods import registry

    def conv(params: Any) -> dict[str, Any]:
        return {k: (REQUIRED if v is registry.REQUIRED else v) for k, v in params.items()}

    return {
        name: MethodRules(spec.needs_base, conv(spec.global_params), conv(spec.model_params))
        for name, spec in registry.METHODS.items()
    }


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    from mergeplan.methods import registry

    # "none" is recipe sugar for `rescale: false` (see load.rescale_none)
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
    r = rules()[method]
    return dict(r.global_params), dict(r.model_params)


def accepted_parameters(method: str) -> tuple[frozenset[str], frozenset[str]]:
    """(names the method takes, names mergekit accepts for it that mergeplan ignores)."""
    r = rules()[method]
    takes = frozenset(r.model_params) | frozenset(r.global_params)
    return takes, MERGEKIT_PARAMS.get(method, frozenset()) - takes


def suggest(key: str, pool: Any) -> str:
    close = difflib.get_close_matches(str(key), list(pool), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def type_name(v: Any) -> str:
    """How a YAML value reads in a message: "a mapping", "text", "an integer", ..."""
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "text"}.get(type(v), type(v).__name__)


class LeafError(ValueError):
    """A parameter leaf is wrong; the message has a ``{ctx}`` slot for where it is."""


def _must_be(want: str, v: Any) -> LeafError:
    shown = f" {v!r}" if v is not None else ""
    return LeafError(f"{{ctx}} must be {want}, not {type_name(v)}{shown}")


def range_problem(name: str, value: Any) -> str | None:
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


def coerce_leaf(name: str, v: Any) -> Any:
    """Check and coerce one scalar the way mergekit's pydantic types accept it."""
    kind = KINDS[name]
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise _must_be("a number", v)
        if isinstance(v, str):
            # YAML 1.1 reads `1e-3` (no dot) as text; mergekit accepts it as a number.
            try:
                v = float(v.strip())
            except ValueError:
                raise _must_be("a number", v) from None
        v = float(v)
        if not math.isfinite(v):
            raise _must_be("a finite number", v)
    elif kind == "bool":
        if isinstance(v, bool):
            pass
        elif isinstance(v, (int, float)) and v in (0, 1):
            v = bool(v)
        elif isinstance(v, str) and v.strip().lower() in BOOL_TEXT:
            v = BOOL_TEXT[v.strip().lower()]
        else:
            raise _must_be("true or false", v)
    elif kind == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if type(v) is not int:
            raise _must_be("an integer", v)
    elif kind == "choice":
        options = choices()[name]
        if v not in options:
            hint = suggest(v, options) if isinstance(v, str) else ""
            raise LeafError(f"{{ctx}} {v!r} is not one of {', '.join(options)}{hint}")
    elif kind == "size":
        v = byte_size(v)
    problem = range_problem(name, v)
    if problem:
        raise LeafError(f"{{ctx}} is {problem}")
    return v


def byte_size(v: Any) -> int:
    if type(v) is int and 0 < v < 2**63:
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", v)
        if m and m.group(2).lower() in SIZE_UNITS:
            x = float(m.group(1)) * SIZE_UNITS[m.group(2).lower()]
            # 2**63 - 1: the plan stores it as a signed 64-bit integer; '9999...9GB' is inf
            if math.isfinite(x) and 0 < x < 2**63:
                return int(x)
    raise LeafError(f"{{ctx}} must be a positive byte count such as 5000000000, '5GB' or '4GiB', not {v!r}")
