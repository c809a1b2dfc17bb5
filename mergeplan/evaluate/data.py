"""Held-out evaluation sets: the sources calibration understands, tokenised the same way.

    spec = parse_data_spec(["math=data/math.jsonl,code=data/code.jsonl", "legal=legal.jsonl"])
    sets = load_eval_sets(spec, tokenizer, samples=64, seq_len=128, skip=16)

A task is NAME=SOURCE (SOURCE: a .txt/.jsonl/.parquet file, a `datasets` directory or
hf:NAME[:split], as for `calibration.data`); a bare SOURCE is named after its file stem.
`skip` passes over the first `skip` usable records, the ones a calibration with
`samples: skip` on the same source read, so held-out samples never overlap them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from mergeplan.calibrate.data import CalibSet, load_calib_set
from mergeplan.errors import MergeplanError


@dataclass
class EvalSet:
    """One task's held-out samples (token id lists) and where they came from."""

    name: str
    data: CalibSet
    skip: int

    @property
    def source(self) -> str:
        return self.data.source

    @property
    def samples(self) -> list[list[int]]:
        return self.data.samples

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask), right-padded per batch, in sample order."""
        return self.data.batches(batch_size)

    def record(self) -> dict[str, Any]:
        return {**self.data.record(), "skip": self.skip, "notes": list(self.data.notes)}


def texts_set(name: str, texts: Iterable[str], tokenizer: Any, seq_len: int, source: str = "") -> EvalSet:
    """An EvalSet of texts already read (one sample each), tokenised as calibration does;
    texts shorter than two tokens predict nothing and are left out."""
    import hashlib

    from mergeplan.calibrate.data import pad_id_of

    h = hashlib.sha256()
    samples, read = [], 0
    for t in texts:
        read += 1
        ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 2:
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
            samples.append(list(ids))
    if not samples:
        raise MergeplanError(f"task {name}: no text of two tokens or more to evaluate on")
    data = CalibSet(name, source or name, "texts", samples, pad_id_of(tokenizer), seq_len, read, h.hexdigest())
    return EvalSet(name, data, 0)


def parse_data_spec(items: Iterable[str]) -> dict[str, str]:
    """`--data` values (NAME=SOURCE, comma-separated or repeated) -> task name -> source."""
    spec: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, source = part.partition("=")
            if not sep:
                name, source = Path(part).stem, part
            name, source = name.strip(), source.strip()
            if not name or not source:
                raise MergeplanError(f"--data {part!r}: expected NAME=PATH, e.g. --data math=data/math.jsonl")
            if name in spec and spec[name] != source:
                raise MergeplanError(f"--data names task {name!r} twice ({spec[name]} and {source}); "
                                     "give each task one source")
            spec[name] = source
    if not spec:
        raise MergeplanError("no evaluation data: give --data NAME=PATH (one per task)")
    return spec


def load_eval_sets(
    spec: dict[str, str], tokenizer: Any, samples: int, seq_len: int, skip: int = 0, base_dir: Path | None = None
) -> dict[str, EvalSet]:
    """Task name -> EvalSet of up to `samples` records after the first `skip` usable ones.
    Relative paths are read from `base_dir` (default: the current directory)."""
    if samples < 1 or seq_len < 2 or skip < 0:
        raise MergeplanError(f"evaluation needs samples >= 1, seq_len >= 2 and skip >= 0 "
                             f"(got {samples}, {seq_len}, {skip})")
    root = Path(base_dir) if base_dir is not None else Path.cwd()
    out = {}
    for name, src in spec.items():
        try:
            out[name] = EvalSet(name, load_calib_set(src, root, tokenizer, samples, seq_len, skip=skip), skip)
        except MergeplanError as e:  # the loader speaks of calibration; here it is --data
            msg = str(e).replace("fix calibration.data", "fix --data").replace("calibration data", "evaluation data")
            raise MergeplanError(f"task {name}: {msg}") from None
    return out
