"""The data-free merge methods by name, with mergekit 0.1.5's parameters and defaults.

Parameters come at two levels, as in mergekit recipes: global ones (one value per
tensor) and per-model ones (a global value is the default for every model).
`merge_tensor` is the single call apply makes per tensor once masks are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from typing import TYPE_CHECKING

from mergeplan.errors import MergeplanError
from mergeplan.methods.spec import CONSENSUS, check_spec

if TYPE_CHECKING:  # the method table is read without torch (show, validate, diff)
    import torch

    from mergeplan.methods.masks import MaskResult

REQUIRED = object()  # marks a parameter without a default
DEFAULT_RESCALE_MODE = "inverse"  # the DARE paper's 1/p; "l1" is mergekit 0.1.5's
RESCALE_MODES = ("inverse", "l1")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    needs_base: bool
    mask_kind: str | None  # None | "magnitude" | "bernoulli" | "breadcrumbs" | "della" | "nm"
    consensus: str | None  # default sign consensus (None | "sum" | "count")
    normalize: bool  # default of the `normalize` switch
    rescale: bool  # default of mergekit's `rescale` switch
    global_params: Mapping[str, Any]  # name -> default, set once per tensor
    model_params: Mapping[str, Any]  # name -> default (or REQUIRED), set per model
    reference: str = ""

    @property
    def default_rescale(self) -> str:
        """Rescale applied when the recipe says nothing: "none" or DEFAULT_RESCALE_MODE."""
        return DEFAULT_RESCALE_MODE if self.rescale else "none"


def _gta(
    name: str,
    mask_kind: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    reference: str,
) -> MethodSpec:
    """A generalized-task-arithmetic method (mergekit's GeneralizedTaskArithmeticMerge)."""
    global_params: dict[str, Any] = {
        "normalize": normalize,
        "rescale": rescale,
        "lambda": 1.0,
        "int8_mask": False,  # accepted for mergekit recipes; masks are bool here anyway
    }
    if mask_kind is not None:
        global_params["rescale_mode"] = DEFAULT_RESCALE_MODE
    if consensus is not None:
        global_params["consensus_method"] = consensus
    model_params: dict[str, Any] = {"weight": REQUIRED}
    if mask_kind is not None:
        model_params["density"] = 1.0
    if mask_kind == "breadcrumbs":
        model_params["gamma"] = 0.01
    if mask_kind == "della":
        model_params["epsilon"] = 0.15
    return MethodSpec(
        name, True, mask_kind, consensus, normalize, rescale,
        MappingProxyType(global_params), MappingProxyType(model_params), reference,
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear", False, None, None, True, False,
            MappingProxyType({"normalize": True}),
            MappingProxyType({"weight": REQUIRED}),
            "https://arxiv.org/abs/2203.05482",
        ),
        _gta("task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089"),
        _gta("ties", "magnitude", "sum", True, False, "https://arxiv.org/abs/2306.01708"),
        _gta("dare_linear", "bernoulli", None, False, True, "https://arxiv.org/abs/2311.03099"),
        _gta("dare_ties", "bernoulli", "sum", False, True, "https://arxiv.org/abs/2311.03099"),
        _gta("breadcrumbs", "breadcrumbs", None, False, False, "https://arxiv.org/abs/2312.06795"),
        _gta("breadcrumbs_ties", "breadcrumbs", "sum", False, False, "https://arxiv.org/abs/2312.06795"),
        _gta("della", "della", "sum", True, True, "https://arxiv.org/abs/2406.11617"),
        _gta("della_linear", "della", None, False, True, "https://arxiv.org/abs/2406.11617"),
        MethodSpec(
            "cabs", True, "nm", None, False, False,
            # Paper's 7B setting 16:32; `order` lists model indices (None = recipe order).
            MappingProxyType({"lambda": 1.0, "m": 32, "order": None}),
            # The per-model weight is the paper's lambda_i.
            MappingProxyType({"weight": REQUIRED, "n": 16}),
            "https://arxiv.org/abs/2503.01874",
        ),
    )
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeplanError(
            f"unknown merge method {name!r}; mergeplan knows {', '.join(sorted(METHODS))}"
        ) from None


def resolve_params(
    method: str, global_params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check names and values, fill defaults: (global, per model), every name present.

    A per-model name given globally is the default for all models (as in mergekit).
    """
    spec = method_spec(method)
    known = set(spec.global_params) | set(spec.model_params)
    unknown = sorted(set(global_params) - known)
    if unknown:
        raise MergeplanError(
            f"method {method} does not take parameters {unknown}; it takes {sorted(known)}"
        )
    glob = {k: global_params.get(k, d) for k, d in spec.global_params.items()}
    models = []
    for i, given in enumerate(model_params):
        wrong = sorted(set(given) - set(spec.model_params))
        if wrong:
            raise MergeplanError(
                f"model {i} of method {method} sets {wrong}, which are not per-model parameters; "
                f"per model: {sorted(spec.model_params)} (others go under the top-level parameters)"
            )
        resolved = {}
        for k, default in spec.model_params.items():
            value = given.get(k, global_params.get(k, default))
            if value is REQUIRED:
                raise MergeplanError(
                    f"model {i} of method {method} has no {k!r}; set it per model or globally"
                )
            resolved[k] = value
        models.append(resolved)
    _check_values(method, glob, models)
    return glob, models


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_VALUE_CHECKS: dict[str, tuple[Any, str]] = {
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
    "rescale": (lambda v: isinstance(v, bool), "true or false"),
    "int8_mask": (lambda v: isinstance(v, bool), "true or false"),
    "rescale_mode": (lambda v: v in RESCALE_MODES, " or ".join(RESCALE_MODES)),
    "consensus_method": (lambda v: v in CONSENSUS, " or ".join(CONSENSUS)),
    "lambda": (_is_number, "a number"),
    "weight": (_is_number, "a number"),
    "density": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "gamma": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "epsilon": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "m": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "order": (
        lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v)),
        "a list of model indices",
    ),
}


def _check_values(method: str, glob: dict[str, Any], models: list[dict[str, Any]]) -> None:
    for where, values in [("", glob)] + [(f"model {i}: ", m) for i, m in enumerate(models)]:
        for k, v in values.items():
            ok, expected = _VALUE_CHECKS[k]
            if not ok(v):
                raise MergeplanError(f"{method}: {where}{k} must be {expected}, not {v!r}")


def mask_spec(
    method: str, glob: Mapping[str, Any], model: Mapping[str, Any], where: str = ""
) -> dict | None:
    """The mask spec (see masks.py) for one model from resolved parameters; None = keep all.

    Raises MergeplanError (naming `where`) when the values cannot make a mask.
    """
    spec = method_spec(method)
    kind = spec.mask_kind
    if kind is None:
        return None
    if kind == "nm":
        out = {"kind": "nm", "n": model["n"], "m": glob["m"], "density": model["n"] / glob["m"],
               "rescale": "none"}
    elif model["density"] >= 1.0:
        return None  # mergekit leaves the delta untouched, rescale included
    else:
        out = {"kind": kind, "density": float(model["density"]),
               "rescale": glob["rescale_mode"] if glob["rescale"] else "none"}
        if kind == "breadcrumbs":
            out["gamma"] = float(model["gamma"])
        if kind == "della":
            out["epsilon"] = float(model["epsilon"])
    check_spec(out, where or f"method {method}")
    return out


def merge_tensor(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[MaskResult | None] | None,
    params: Mapping[str, Any],
) -> torch.Tensor:
    """Final float32 weights of one tensor: base + merged delta, or the linear combination.

    `params` are the method's global parameters (missing ones take the defaults);
    `masks` come from build_masks over the deltas tensors[i] - base.
    """
    import torch

    from mergeplan.methods.combine import linear, merge_deltas

    spec = method_spec(method)
    normalize = params.get("normalize", spec.normalize)
    if not spec.needs_base:
        if masks is not None and any(m is not None for m in masks):
            raise MergeplanError(f"method {method} does not sparsify; the plan must carry no masks")
        return linear(tensors, weights, normalize)
    if base is None:
        raise MergeplanError(f"method {method} needs a base model; set base_model in the recipe")
    base32 = base.to(torch.float32)
    deltas = [t.to(torch.float32) - base32 for t in tensors]
    merged = merge_deltas(
        deltas,
        weights,
        masks,
        params.get("consensus_method", spec.consensus),
        normalize,
        float(params.get("lambda", 1.0)),
    )
    return base32 + merged
