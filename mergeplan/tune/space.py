"""The search space of `tune:`: dimensions, grid enumeration and seeded random draws.

Pure: no torch, no I/O. A candidate is an *assignment*, {path: value}, applied to the recipe
through the recipe schema (so every candidate passes the same validation as a hand-written
recipe). Paths are the recipe's own: `parameters.density`, `models.math.weight`,
`guides.aim.omega`, `merge_method`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

# A range without `step` is gridded at this many evenly spaced points (ends included).
GRID_POINTS = 3


@dataclass(frozen=True)
class Dim:
    path: str
    values: tuple[Any, ...] | None = None  # categorical choices, in the recipe's order
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def categorical(self) -> bool:
        return self.values is not None

    def grid(self, points: int = GRID_POINTS) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        lo, hi = float(self.low), float(self.high)
        if self.step:
            n = int(math.floor((hi - lo) / self.step + 1e-9)) + 1
            pts = [lo + i * self.step for i in range(n)]
        elif self.log:
            pts = list(np.geomspace(lo, hi, points))
        else:
            pts = list(np.linspace(lo, hi, points))
        return [self.cast(p) for p in pts]

    def draw(self, rng: np.random.Generator) -> Any:
        if self.values is not None:
            return self.values[int(rng.integers(len(self.values)))]
        lo, hi = float(self.low), float(self.high)
        if self.step:
            return self.grid()[int(rng.integers(len(self.grid())))]
        u = float(rng.random())
        x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if self.log else lo + u * (hi - lo)
        return self.cast(x)

    def cast(self, x: Any) -> Any:
        if self.integer:
            return int(round(x))
        # Rounded so that plans and the study name the same value the recipe would carry:
        # 0.30000000000000004 in a plan reads as noise to a reviewer.
        return float(round(float(x), 6))


def dims_from_space(space: Mapping[str, Any]) -> list[Dim]:
    """The schema-validated `tune.space` as dimensions, in the recipe's order. A value is a
    list of choices, or a range: a mapping or an object with low, high, step, log."""
    dims = []
    for path, spec in space.items():
        if isinstance(spec, (list, tuple)):
            dims.append(Dim(path, values=tuple(spec)))
            continue
        get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None, o=spec: getattr(o, k, d))
        low, high, step = get("low"), get("high"), get("step")
        # Integers stay integers (n, m of n:m masks): the schema keeps what the YAML said.
        integer = all(isinstance(x, int) and not isinstance(x, bool) for x in (low, high)) and (
            step is None or isinstance(step, int))
        if not integer and all(float(x).is_integer() for x in (low, high)) and path.split(".")[-1] in INTEGER_PARAMS:
            integer = True
        dims.append(Dim(path, low=low, high=high, step=step, log=bool(get("log", False)), integer=integer))
    return dims


# Method parameters that only take integers, whatever number type a schema hands over.
INTEGER_PARAMS = frozenset({"n", "m", "seed"})


def grid(dims: list[Dim], points: int = GRID_POINTS) -> Iterator[dict[str, Any]]:
    """Every combination, first dimension slowest (the order a reader expects from the recipe)."""
    axes = [d.grid(points) for d in dims]
    for combo in itertools.product(*axes):
        yield {d.path: v for d, v in zip(dims, combo)}


def grid_size(dims: list[Dim], points: int = GRID_POINTS) -> int:
    return math.prod(len(d.grid(points)) for d in dims)


def random_draws(dims: list[Dim], seed: int) -> Iterator[dict[str, Any]]:
    """An endless seeded stream of assignments; a repeated draw is skipped (it scores the same)."""
    rng = np.random.default_rng(np.random.PCG64(seed))
    seen: set[str] = set()
    misses = 0
    total = grid_size(dims) if all(d.categorical or d.step for d in dims) else None
    while total is None or len(seen) < total:
        a = {d.path: d.draw(rng) for d in dims}
        key = repr(sorted(a.items()))
        if key in seen:
            misses += 1
            if misses > 1000:
                return
            continue
        misses = 0
        seen.add(key)
        yield a
