"""YAML loading that remembers where every value came from.

PyYAML's ``safe_load`` throws the line numbers away; error messages that say
``recipe.yaml:7: ...`` need them. This module composes the node tree (which
carries marks) and turns it into ``YNode`` objects: plain values plus 1-based
line numbers for every value and every mapping key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeplan.errors import MergeplanError

__all__ = ["YNode", "compose_located", "key_lines", "where"]


def where(path: str | Path | None, line: int | None) -> str:
    """``file:line`` prefix for messages (``<recipe>`` when parsed from a string)."""
    name = str(path) if path is not None else "<recipe>"
    return f"{name}:{line}" if line else name


@dataclass
class YNode:
    """A YAML value with its source line.

    ``value`` is ``dict[str, YNode]`` for mappings (keys as written in the
    file, never coerced: ``on:`` stays the string ``"on"``), ``list[YNode]``
    for sequences, and a Python scalar otherwise.
    """

    value: Any
    line: int
    kind: str  # "map" | "seq" | "scalar"
    key_lines: dict[str, int] = field(default_factory=dict)

    @property
    def is_map(self) -> bool:
        return self.kind == "map"

    @property
    def is_seq(self) -> bool:
        return self.kind == "seq"

    @property
    def is_scalar(self) -> bool:
        return self.kind == "scalar"

    def plain(self) -> Any:
        """The value with all line information stripped (what ``safe_load`` gives)."""
        if self.kind == "map":
            return {k: v.plain() for k, v in self.value.items()}
        if self.kind == "seq":
            return [v.plain() for v in self.value]
        return self.value


# One constructor instance turns scalar nodes into Python values using the
# tags the composer already resolved (int, float, bool, null, str, ...).
_CONSTRUCTOR = yaml.SafeLoader("")


def _construct_scalar(node: yaml.ScalarNode) -> Any:
    ctor = yaml.SafeLoader.yaml_constructors.get(node.tag)
    if ctor is None:
        # Unknown explicit tags (e.g. !!python/object) are not safe: keep the text.
        return node.value
    return ctor(_CONSTRUCTOR, node)


# A recipe is a few hundred values; aliases can make a short file expand to billions
# ("billion laughs"), or to itself (an alias inside its own anchor).
MAX_VALUES = 100_000
MAX_DEPTH = 64


class _Walk:
    def __init__(self, path: str | Path | None):
        self.path = path
        self.count = 0
        self.open: set[int] = set()  # nodes being converted: their ancestors


def _convert(node: yaml.Node, walk: _Walk) -> YNode:
    line = node.start_mark.line + 1
    walk.count += 1
    if walk.count > MAX_VALUES:
        raise MergeplanError(
            f"{where(walk.path, line)}: the document expands to more than {MAX_VALUES} values "
            "(through YAML aliases?); a recipe needs far fewer: write the values out"
        )
    if id(node) in walk.open:
        raise MergeplanError(
            f"{where(walk.path, line)}: a YAML alias refers to a value that contains it; "
            "remove the recursive '*alias'"
        )
    if not isinstance(node, yaml.ScalarNode):
        if len(walk.open) >= MAX_DEPTH:
            raise MergeplanError(
                f"{where(walk.path, line)}: values are nested more than {MAX_DEPTH} levels deep; "
                "a recipe needs a handful: check the brackets and indentation"
            )
        walk.open.add(id(node))
        try:
            return _convert_collection(node, walk, line)
        finally:
            walk.open.discard(id(node))
    return YNode(_construct_scalar(node), line, "scalar")


def _convert_collection(node: yaml.Node, walk: _Walk, line: int) -> YNode:
    path = walk.path
    if isinstance(node, yaml.MappingNode):
        explicit = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        # Resolves YAML merge keys ("<<: *anchor") the way safe_load does: merged pairs
        # come first, so a key written explicitly overrides a merged one.
        _CONSTRUCTOR.flatten_mapping(node)
        items: dict[str, YNode] = {}
        key_lines: dict[str, int] = {}
        merged: set[str] = set()
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise MergeplanError(
                    f"{where(path, key_line)}: a mapping key must be plain text, not a "
                    "list or mapping; check the indentation"
                )
            key = key_node.value
            if key in items and key not in merged:
                raise MergeplanError(
                    f"{where(path, key_line)}: duplicate key '{key}' (first at line "
                    f"{key_lines[key]}); keep one of them"
                )
            if id(key_node) in explicit:
                merged.discard(key)
            else:
                merged.add(key)
            items[key] = _convert(value_node, walk)
            key_lines[key] = key_line
        return YNode(items, line, "map", key_lines)
    return YNode([_convert(n, walk) for n in node.value], line, "seq")


def compose_located(text: str, path: str | Path | None = None) -> YNode | None:
    """Parse one YAML document into ``YNode``s; ``None`` for an empty document.

    Raises ``MergeplanError`` with ``file:line`` for syntax errors and for
    streams holding more than one document.
    """
    try:
        docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        col = f" (column {mark.column + 1})" if mark is not None else ""
        raise MergeplanError(
            f"{where(path, line)}: YAML syntax error{col}: {problem}; fix the YAML "
            "(check indentation and quoting)"
        ) from None
    except yaml.YAMLError as exc:
        raise MergeplanError(f"{where(path, None)}: YAML error: {exc}") from None
    except RecursionError:
        raise MergeplanError(
            f"{where(path, None)}: values are nested too deeply to read; a recipe needs a handful of "
            "levels: check the brackets and indentation"
        ) from None
    docs = [d for d in docs if d is not None]
    if not docs:
        return None
    if len(docs) > 1:
        second = docs[1].start_mark.line + 1
        raise MergeplanError(
            f"{where(path, second)}: the file holds several YAML documents ('---'); "
            "a recipe describes one merge: split them into separate files"
        )
    return _convert(docs[0], _Walk(path))


def key_lines(root: YNode, values: bool = False) -> dict[tuple[Any, ...], int]:
    """Line of every location in the document: ``()`` for the root, ``("models", 1,
    "parameters", "density")`` for a mapping key (the key's line, or with ``values`` the
    line its value starts on) or a list item."""
    out: dict[tuple[Any, ...], int] = {(): root.line}

    def walk(node: YNode, loc: tuple[Any, ...]) -> None:
        if node.is_map:
            for k, v in node.value.items():
                out[loc + (k,)] = v.line if values else node.key_lines[k]
                walk(v, loc + (k,))
        elif node.is_seq:
            for i, v in enumerate(node.value):
                out[loc + (i,)] = v.line
                walk(v, loc + (i,))

    walk(root, ())
    return out
