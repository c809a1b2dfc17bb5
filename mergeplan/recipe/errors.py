"""pydantic validation errors -> one ``MergeplanError`` line naming the file and line.

Validators report a problem with ``issue(message, *at)``: ``at`` points below the value the
validator sees (the unknown key of a mapping, the anchor of a gradient), so the line is the
exact one. Two slots in the message are filled here, because a validator does not know
where its value sits: ``{here}`` (the value's key path, e.g. ``models[1].parameters``) and
``{full}`` (``{here}`` plus ``at``). Errors pydantic raises itself (a wrong type, a missing
field) get ``<key path>: <pydantic's message>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from mergeplan.errors import MergeplanError
from mergeplan.yamlpos import where

__all__ = ["issue", "key_path", "to_mergeplan_error"]

Loc = tuple[Any, ...]


def issue(message: str, *at: Any) -> PydanticCustomError:
    """The error a validator raises; ``at`` is the location below the validated value."""
    return PydanticCustomError("recipe", "{message}", {"message": message, "at": tuple(at)})


def key_path(loc: Sequence[Any]) -> str:
    """``("models", 1, "parameters", "density")`` -> ``models[1].parameters.density``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _clean(loc: Sequence[Any]) -> Loc:
    # pydantic inserts names of union members and function validators into locations;
    # they are not keys of the document.
    return tuple(p for p in loc if isinstance(p, int) or not (p.startswith("function-") or p in _TAGS))


_TAGS = frozenset({"ref-text", "ref-mapping", "space-choices", "space-range", "str", "int", "float", "bool", "dict[str,str]"})


def nearest_line(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of ``loc``, or of its nearest ancestor the document has."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _message(err: Mapping[str, Any], loc: Loc, full: Loc) -> str:
    here_s = key_path(loc) or "the recipe"
    if err["type"] == "recipe":
        return err["ctx"]["message"].replace("{here}", here_s).replace("{full}", key_path(full) or "the recipe")
    msg = err["msg"]
    if err["type"] == "missing":
        parent, key = key_path(loc[:-1]) or "the recipe", loc[-1]
        return f"{parent} is missing '{key}'; add it (see docs/recipe.md)"
    if err["type"] == "extra_forbidden":
        parent, key = key_path(loc[:-1]) or "the recipe", loc[-1]
        return f"unknown key '{key}' in {parent}; remove it (see docs/recipe.md for the keys)"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{here_s}: {msg[0].lower() + msg[1:]}, got {shown}"


def to_mergeplan_error(
    exc: ValidationError,
    path: str | Path | None = None,
    lines: Mapping[Loc, int] | None = None,
    prefix: Loc = (),
    with_line: bool = True,
) -> MergeplanError:
    """The first problem (in document order) as one line: ``file:line: message``.

    ``prefix`` is prepended to locations (``("guides",)`` when a section is validated on
    its own). Without ``with_line`` (a section given as a plain mapping, not a file) the
    message stands alone.
    """
    lines = lines or {}
    found = []
    for i, err in enumerate(exc.errors(include_url=False)):
        loc = prefix + _clean(err["loc"])
        at = tuple(err.get("ctx", {}).get("at", ())) if err["type"] == "recipe" else ()
        full = loc + at
        line = nearest_line(full, lines)
        found.append((line if line is not None else 0, i, _message(err, loc, full), line))
    _, _, msg, line = min(found)
    if not with_line:
        return MergeplanError(msg)
    return MergeplanError(f"{where(path, line)}: {msg}")
