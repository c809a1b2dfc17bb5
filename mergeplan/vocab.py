"""Vocabularies that grew: fine-tunes whose embeddings and head have rows beyond the base's.

A fine-tune that added tokens (chat markers, tool tags) stores its embedding matrix and head
with more rows than the base. `tokenizer_source` in the recipe says what the output gets:

* `base`: the base's vocabulary. Every model contributes its rows [0, base rows); a
  fine-tune's extra rows are dropped. The output's config and tokenizer are the base's.
* `union`: every token any input has. The vocabularies must agree on ids (each model's
  tokens sit at the same ids in the largest one, which is then the union); the output has the
  largest model's rows, and its config and tokenizer files come from that model. A row a model
  lacks (the base lacks every added one) is given to that model as a default row, as mergekit's
  PermutedEmbeddings does for `union` (v0.1.4 to 0.1.5): the row of the one model that has the token, or
  the mean of the rows of the models that have it. The merge then runs as usual, so a token
  only one fine-tune added comes out as that fine-tune's row exactly (no model moves it), and
  one several fine-tunes added is merged around their mean.

Anything else (a model with fewer rows than the base, tokens at different ids, a grown
tensor other than the embeddings or head) is a one-line error. The rule is recorded per tensor
in the plan (`params["vocab"] = {"source", "rows": {model: stored rows}}`); the output rows
are the tensor's shape[0]. Only bytes a model stores are hashed; default rows are computed from
the other models' stored rows, which are hashed as theirs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import arch
from .errors import MergeplanError

_ROW_COMPONENTS = ("embed", "lm_head")


def grown_tensors(names: Sequence[str], shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[str]:
    """Tensors whose shapes differ between models in dim 0 only, and that hold token rows
    (embeddings, head). shapes: model -> tensor -> shape."""
    out = []
    for n in names:
        if any(n not in s for s in shapes.values()):
            continue  # missing in a model: the planner's tensor-table check names it
        seen = {tuple(s[n]) for s in shapes.values()}
        if len(seen) > 1 and len({x[1:] for x in seen}) == 1 and len(next(iter(seen))) >= 1 \
                and arch.component_of(n) in _ROW_COMPONENTS:
            out.append(n)
    return out


def _vocab(path: Path) -> dict[str, int] | None:
    from .calibrate.models import has_tokenizer, load_tokenizer

    return load_tokenizer(path).get_vocab() if has_tokenizer(path) else None


def plan_rows(source: str | None, ref_id: str, dirs: Mapping[str, Any], names: Sequence[str],
              ) -> tuple[dict[str, dict[str, Any]], str | None, list[str]]:
    """-> ({tensor: params["vocab"]}, the model to copy config/tokenizer files from when not the
    reference (union), notes). dirs: model id -> ModelDir (reference first: the base, or the
    first model when the method has none). Raises MergeplanError for anything it cannot merge."""
    shapes = {m: {n: tuple(d.info(n).shape) for n in names if n in d} for m, d in dirs.items()}
    grown = grown_tensors(names, shapes)
    if not grown:
        return {}, None, []
    name = grown[0]
    base_rows = shapes[ref_id][name][0]
    rows = {m: shapes[m][name][0] for m in dirs}
    other = next(m for m in dirs if rows[m] != base_rows)
    if source is None:
        raise MergeplanError(
            f"model {other}: tensor {name} has {rows[other]} rows but {ref_id} has {base_rows} (a fine-tune that "
            "added tokens?); set `tokenizer_source: base` (keep the base vocabulary) or `tokenizer_source: union` "
            "(keep every added token) in the recipe"
        )
    small = [m for m in dirs if rows[m] < base_rows]
    if small:
        raise MergeplanError(
            f"model {small[0]}: tensor {name} has {rows[small[0]]} rows, fewer than {ref_id}'s {base_rows}; "
            "mergeplan merges vocabularies that extend the base's, not ones that shrank it"
        )
    for n in grown:  # every grown tensor grows the same way (embeddings and head alike)
        r = {m: shapes[m][n][0] for m in dirs}
        if {m: v - shapes[ref_id][n][0] for m, v in r.items()} != {m: v - base_rows for m, v in rows.items()}:
            raise MergeplanError(f"tensor {n} grows by other row counts than {name} across the models; "
                                 "the embeddings and the head must have one vocabulary")
    vocabs = {m: _vocab(Path(d.path)) for m, d in dirs.items()}
    base_vocab = vocabs[ref_id]
    for m, v in vocabs.items():
        if v is None or base_vocab is None:
            continue
        moved = min((t for t, i in base_vocab.items() if v.get(t) != i), key=base_vocab.get, default=None)
        if moved is not None:
            raise MergeplanError(
                f"model {m}: token {moved!r} has id {v.get(moved)} but {base_vocab[moved]} in {ref_id}; mergeplan merges "
                "vocabularies that keep the base's ids and add tokens after them (re-map the ids first)"
            )
    params = {n: {"source": source, "rows": {m: shapes[m][n][0] for m in dirs}} for n in grown}
    if source == "base":
        note = (f"vocabulary: tokenizer_source base: {', '.join(grown)} keep the base's {base_rows} rows; "
                + ", ".join(f"{m} drops {r - base_rows}" for m, r in rows.items() if r > base_rows))
        return params, None, [note]
    top = max(rows.values())
    union = next(m for m in dirs if rows[m] == top)
    uv = vocabs[union]
    for m, v in vocabs.items():
        if rows[m] > base_rows and v is None:
            raise MergeplanError(f"model {m} has {rows[m] - base_rows} rows beyond the base's but no tokenizer that "
                                 "names their tokens; tokenizer_source: union needs one (or use tokenizer_source: base)")
        if v is None or uv is None:
            continue
        clash = min(((t, i) for t, i in v.items() if i < rows[m] and uv.get(t) != i), key=lambda x: x[1], default=None)
        if clash is not None:
            raise MergeplanError(
                f"model {m}: token {clash[0]!r} has id {clash[1]} but {union} (the largest vocabulary) "
                f"{'has it at ' + str(uv[clash[0]]) if clash[0] in uv else 'lacks it'}; tokenizer_source: union "
                "needs one vocabulary that holds every model's tokens at the same ids (or use tokenizer_source: base)"
            )
    note = (f"vocabulary: tokenizer_source union: {', '.join(grown)} have {top} rows ({top - base_rows} added, "
            f"config and tokenizer from {union}); a model lacking an added row is given the row of the one model "
            "that has it, or the mean of those that do (as mergekit)")
    return params, (union if union != ref_id else None), [note]


# ---- default rows and row views -------------------------------------------------------

RowReader = Callable[[str, int, int], torch.Tensor]  # (model, first row, end row) -> [k, ...] stored dtype


def default_rows(rec: Mapping[str, Any], out_rows: int, read: RowReader) -> tuple[int, torch.Tensor | None]:
    """(first row, [out_rows - first, ...] float32) rows for models that lack them: per row the
    mean of the models that have it (one model: its row exactly). None when no model lacks any."""
    rows = {m: int(r) for m, r in rec["rows"].items()}
    lo = min(min(rows.values()), out_rows)
    if lo >= out_rows:
        return out_rows, None
    total = count = None
    for m, r in rows.items():
        hi = min(r, out_rows)
        if hi <= lo:
            continue
        part = read(m, lo, hi).float()
        if total is None:
            total = torch.zeros((out_rows - lo, *part.shape[1:]), dtype=torch.float64)
            count = torch.zeros(out_rows - lo, dtype=torch.float64)
        total[: hi - lo] += part.double()
        count[: hi - lo] += 1
    if total is None:
        return lo, None
    shape = (-1,) + (1,) * (total.dim() - 1)
    return lo, (total / count.clamp(min=1).reshape(shape)).float()


def whole_view(t: torch.Tensor, model: str, rec: Mapping[str, Any], out_rows: int, lo: int,
               defaults: torch.Tensor | None) -> torch.Tensor:
    """A model's stored tensor as the output's rows: its own rows, then default rows."""
    have = min(int(rec["rows"][model]), out_rows)
    if have == out_rows:
        return t[:out_rows]
    out = torch.empty((out_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:have] = t[:have]
    out[have:] = defaults[have - lo:].to(device=t.device, dtype=t.dtype)
    return out


def dir_reader(dirs: Mapping[str, Any], name: str) -> RowReader:
    """Rows straight from a model's shard (not hashed: each model's own read hashes them)."""
    def read(m: str, r0: int, r1: int) -> torch.Tensor:
        from .io.tensors import st_to_torch

        info = dirs[m].info(name)
        dtype = st_to_torch(info.dtype)
        per_row = math.prod(info.shape[1:]) * torch.empty((), dtype=dtype).element_size()
        buf = torch.empty((r1 - r0) * per_row, dtype=torch.uint8)
        dirs[m].read_into(name, r0 * per_row, buf)
        return buf.view(dtype).reshape(r1 - r0, *info.shape[1:])
    return read


def whole_inputs(tp, dirs: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model -> tensor as the output's rows, for the whole-tensor paths (tp.params["vocab"] set)."""
    rec = tp.params["vocab"]
    lo, d = default_rows(rec, int(tp.shape[0]), dir_reader(dirs, tp.name))
    return {m: whole_view(t, m, rec, int(tp.shape[0]), lo, d) for m, t in tensors.items()}
