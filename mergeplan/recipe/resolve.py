"""Parameter values as written in a recipe, resolved per tensor (mergekit 0.1.5's rules).

Values keep mergekit's three shapes (scalar, gradient list, filter list) as ``ParamValue``
objects; nothing is resolved until a tensor is known, because the value depends on the
tensor's name and layer. Pure: no YAML, no validation, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

__all__ = ["Conditional", "ParamValue", "Scalar", "first_set", "has_gradient", "layer_fraction", "resolve"]

Scalar = Union[float, int, bool, str]


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



def first_set(chain: list[ParamValue | None], t: float, contains: Callable[[str], bool]) -> Any:
    """The first value set along ``chain`` (highest precedence first) at (t, filters), else None."""
    for pv in chain:
        if pv is not None:
            v = pv._at(t, contains)
            if v is not None:
                return v
    return None


def has_gradient(pv: ParamValue | None) -> bool:
    if pv is None or pv.literal:
        return False
    if pv.is_conditional:
        return any(isinstance(c.value, tuple) for c in pv.setting)
    return pv.is_gradient
