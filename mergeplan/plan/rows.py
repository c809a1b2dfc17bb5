"""What a plan's vocabulary record means (tokenizer_source base/union): `params["vocab"] =
{"source": "base" | "union", "rows": {model: rows it stores}}` on an embedding or head
tensor whose models store different numbers of token rows. Torch-free: `validate` checks
it without inputs, apply and the planner (mergeplan/vocab.py) read rows through it.

The output tensor's rows (its planned shape[0]) follow the source: `base` keeps the
reference model's rows, so every model stores at least that many; `union` keeps the
largest model's rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

SOURCES = ("base", "union")
MAX_ROWS = 2**40


def record_problem(shape: Sequence[int], rec: Any, models: Sequence[str]) -> str | None:
    """Why `rec` is not a vocabulary record this mergeplan writes for a tensor of `shape`
    read from `models`, or None when it is one."""
    ok = (isinstance(rec, dict) and rec.get("source") in SOURCES and isinstance(rec.get("rows"), dict)
          and rec["rows"] and set(rec["rows"]) == set(models) and len(shape) >= 1
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_ROWS for v in rec["rows"].values()))
    if ok:
        out = int(shape[0])
        rows = rec["rows"].values()
        ok = (out == max(rows)) if rec["source"] == "union" else all(r >= out for r in rows)
    if ok:
        return None
    return ("params.vocab is not a vocabulary rule this mergeplan wrote (source, rows per input model)")


def stored_shape(shape: Sequence[int], rec: Mapping[str, Any], model: str) -> tuple[int, ...]:
    """The shape `model` stores for a tensor whose output shape is `shape`."""
    return (int(rec["rows"][model]), *map(int, shape[1:]))
