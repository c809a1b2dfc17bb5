"""Building blocks of the recipe schema: the strict section base class and field types
whose messages say what to write instead."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from mergeplan.recipe.errors import issue
from mergeplan.recipe.vocab import suggest, type_name

__all__ = ["Section", "Text", "number", "integer", "boolean"]


class Section(BaseModel):
    """A mapping in the recipe: frozen, and an unknown key is refused with a suggestion.

    ``example`` shows the shape when the value is not a mapping; ``special_keys`` maps keys
    that have a specific refusal (an unsupported mergekit feature) to its message.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    example: ClassVar[str] = ""
    special_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def input_keys(cls) -> tuple[str, ...]:
        return tuple(n for n, f in cls.model_fields.items() if not f.exclude)

    @classmethod
    def not_a_mapping(cls, data: Any) -> str:
        shape = f" ({cls.example})" if cls.example else ""
        return f"{{here}} must be a mapping{shape}, not {type_name(data)}"

    @classmethod
    def check_keys(cls, data: dict[str, Any]) -> None:
        allowed = cls.input_keys()
        for key in data:
            if key in cls.special_keys:
                raise issue(cls.special_keys[key], key)
            if key not in allowed:
                raise issue(
                    f"unknown key '{key}' in {{here}}{suggest(key, allowed)}; allowed: {', '.join(allowed)}",
                    key,
                )

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise issue(cls.not_a_mapping(data))
        cls.check_keys(data)
        return data


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise issue(f"{{here}} must be non-empty text, not {type_name(v)}")
    return v


Text = Annotated[str, BeforeValidator(_text)]


def number(lo: float, hi: float, lo_open: bool = False) -> BeforeValidator:
    """A float in [lo, hi] (or (lo, hi]); booleans and text are refused, not coerced."""

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise issue(f"{{here}} must be a number, got {v!r}")
        v = float(v)
        if v < lo or v > hi or (lo_open and v == lo) or v != v:
            rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise issue(f"{{here}} must be in {rng}, got {v!r}")
        return v

    return BeforeValidator(check)


def integer(lo: int, optional: bool = False) -> BeforeValidator:
    def check(v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise issue(f"{{here}} must be an integer >= {lo}, got {v!r}")
        return v

    return BeforeValidator(check)


def boolean() -> BeforeValidator:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise issue(f"{{here}} must be true or false, got {v!r}")
        return v

    return BeforeValidator(check)
