"""Walking the search space of `tune:`: grid enumeration and seeded random draws.

The space itself is the recipe schema's (`TuneSpec.dimensions()`: path, kind categorical /
float / int, choices or low/high/step/log; a grid needs every range stepped, which the
schema checks). Pure: no torch, no I/O. A candidate is an *assignment*, {path: value},
applied to the recipe through the schema (`Recipe.with_assignment`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import numpy as np


def cast(d, x: Any) -> Any:
    if d.kind == "int":
        return int(round(x))
    if d.kind == "float":
        # Rounded so plans and the study carry the value a reader would write: 0.30000000000000004
        # in a plan reads as noise.
        return float(round(float(x), 6))
    return x


def values(d) -> tuple[Any, ...] | None:
    """The finite values of a dimension (choices, or a stepped range); None for a continuum."""
    g = d.grid()
    return None if g is None else tuple(cast(d, v) for v in g)


def draw(d, rng: np.random.Generator) -> Any:
    finite = values(d)
    if finite is not None:
        return finite[int(rng.integers(len(finite)))]
    lo, hi = float(d.low), float(d.high)
    u = float(rng.random())
    x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if d.log else lo + u * (hi - lo)
    return cast(d, x)


def grid(dims: list) -> Iterator[dict[str, Any]]:
    """Every combination, the first dimension slowest (the order the recipe lists them)."""
    for combo in itertools.product(*[values(d) for d in dims]):
        yield {d.path: v for d, v in zip(dims, combo)}


def grid_size(dims: list) -> int | None:
    sizes = [values(d) for d in dims]
    return None if any(s is None for s in sizes) else math.prod(len(s) for s in sizes)


def random_draws(dims: list, seed: int) -> Iterator[dict[str, Any]]:
    """A seeded stream of distinct assignments: a repeat would score the same, so it is
    skipped; the stream ends when a finite space is exhausted."""
    rng = np.random.default_rng(np.random.PCG64(seed))
    seen: set[str] = set()
    total = grid_size(dims)
    misses = 0
    while total is None or len(seen) < total:
        a = {d.path: draw(d, rng) for d in dims}
        key = repr(sorted(a.items()))
        if key in seen:
            misses += 1
            if misses > 1000:
                return
            continue
        misses = 0
        seen.add(key)
        yield a
