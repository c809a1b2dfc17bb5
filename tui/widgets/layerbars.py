"""One sparkline per model across the decoder layers, with the peak layer named."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline

from ..richtext import content, fit


def peak(series: list[float]) -> tuple[int, float] | None:
    """(layer index, value) of the largest finite value; the first one on ties."""
    best = None
    for i, v in enumerate(series):
        if math.isfinite(v) and (best is None or v > best[1]):
            best = (i, v)
    return best


class LayerBars(Vertical):
    """Rows of `name  sparkline  peak Lnn value`; `update_series` replaces them all."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._series: list[tuple[str, list[float], list[int]]] = []

    def compose(self) -> ComposeResult:
        yield from self._rows()

    def _rows(self):
        for name, data, layers in self._series:
            finite = [v for v in data if math.isfinite(v)]
            floor = min(finite) if finite else 0.0
            # Sparkline needs numbers everywhere; a layer with no value draws as the minimum.
            clean = [v if math.isfinite(v) else floor for v in data] or [0.0]
            p = peak(data)
            tail = f"peak L{layers[p[0]]} {p[1]:.3g}" if p else "no values"
            yield Horizontal(
                Label(content(fit(name, 10)), classes="bars-name"),  # a model id: literal, never markup
                Sparkline(clean, summary_function=max, classes="bars-line"),
                Label(tail, classes="bars-peak"),
                classes="bars-row",
            )

    async def update_series(self, series: list[tuple[str, list[float], list[int]]]) -> None:
        self._series = series
        await self.remove_children()
        await self.mount_all(list(self._rows()))
