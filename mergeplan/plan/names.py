"""Parse Hugging Face tensor names into (layer, component) for grids and per-layer rules."""

from __future__ import annotations

from dataclasses import dataclass

from mergeplan import arch as _arch

# Labels and their order live in mergeplan/arch.py (architecture knowledge in one place).


@dataclass(frozen=True)
class TensorName:
    name: str
    layer: int | None  # decoder block index, None outside the blocks
    component: str  # short label ("q", "down", "embed", ...) or the raw module name
    kind: str  # "weight" | "bias" | other parameter suffix


def parse_name(name: str) -> TensorName:
    parts = name.split(".")
    kind = parts[-1] if len(parts) > 1 else "weight"
    return TensorName(name=name, layer=_arch.layer_of(name), component=_arch.component_of(name), kind=kind)


def num_layers(names) -> int:
    layers = [parse_name(n).layer for n in names]
    present = [x for x in layers if x is not None]
    return (max(present) + 1) if present else 0
