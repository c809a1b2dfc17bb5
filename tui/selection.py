"""Parse the edit screen's selection fields ("10-20,25", "mlp", "math,code") into the
arguments PlanEditor.select takes. Errors are MergeplanError with a one-line message that
the edit screen shows inline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergeplan.arch import component_groups, short_label
from mergeplan.errors import MergeplanError

# Group names a user can type instead of listing components: mergeplan.arch knows which
# labels (fused projections, routers, experts, Gemma's extra norms) belong to which.
GROUPS = ("attn", "mlp", "norms", "experts")
_ALL = {"", "*", "all"}
_SPLIT = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class Selection:
    layers: frozenset[int] | None  # None: every tensor, in blocks or not
    components: frozenset[str] | None
    pattern: str | None
    models: tuple[str, ...] | None


def _items(text: str) -> list[str]:
    return [x for x in _SPLIT.split(text.strip()) if x]


def parse_layers(text: str, n_layers: int) -> frozenset[int] | None:
    """'10-20, 25' -> {10..20, 25}; empty, '*' or 'all' -> None (no layer filter)."""
    if text.strip().lower() in _ALL:
        return None
    out: set[int] = set()
    for item in _items(text):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise MergeplanError(f"layers: {item!r} is not a layer or range; write e.g. 10-20,25")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        a, b = min(a, b), max(a, b)
        if b >= n_layers:
            raise MergeplanError(f"layers: {b} is past the last layer ({n_layers - 1})")
        out.update(range(a, b + 1))
    return frozenset(out)


def parse_components(text: str, known: list[str]) -> frozenset[str] | None:
    """'q,k' or 'mlp' (gate, up, down) -> labels; empty -> None (no component filter)."""
    if text.strip().lower() in _ALL:
        return None
    out: set[str] = set()
    # The grid's column labels (in_n, post, ...) name their component where only one has it.
    shorts = [short_label(c) for c in known]
    shown = {s: c for s, c in zip(shorts, known) if shorts.count(s) == 1}
    for item in _items(text):
        if item in GROUPS:
            out.update(component_groups(known)[item])
        elif item in known:
            out.add(item)
        elif item in shown:
            out.add(shown[item])
        else:
            raise MergeplanError(
                f"components: unknown {item!r}; use {', '.join(known)} or a group ({', '.join(GROUPS)})"
            )
    return frozenset(out)


def parse_models(text: str, known: list[str]) -> tuple[str, ...] | None:
    """'math,code' -> those task models; empty -> None (all task models)."""
    if text.strip().lower() in _ALL:
        return None
    out = []
    for item in _items(text):
        if item not in known:
            raise MergeplanError(f"models: unknown {item!r}; task models are {', '.join(known)}")
        if item not in out:
            out.append(item)
    return tuple(out)


def parse_selection(layers: str, components: str, pattern: str, models: str, *, n_layers: int,
                    known_components: list[str], known_models: list[str]) -> Selection:
    return Selection(
        parse_layers(layers, n_layers),
        parse_components(components, known_components),
        pattern.strip() or None,
        parse_models(models, known_models),
    )


def format_layers(layers: list[int]) -> str:
    """{10,11,12,20} -> '10-12,20' (the inverse of parse_layers, for prefilling)."""
    out = []
    for x in sorted(set(layers)):
        if out and out[-1][1] == x - 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
