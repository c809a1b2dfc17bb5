"""Calibration text: read records from files or `datasets`, tokenise, batch with attention masks.

Sources (one string in the recipe):
  *.txt / *.md / *.text   documents separated by blank lines, one sample per document
  *.jsonl / *.json        one JSON object per line: `text`, or `prompt` + `response` joined
  *.parquet               same fields as JSONL (needs pyarrow)
  a directory             a `datasets` save_to_disk directory (needs datasets)
  hf:NAME[:split]         a hub dataset through `datasets` (needs datasets and a network)

Each record is one sample: tokenised with the base tokenizer, truncated to seq_len.
Shorter samples are padded on the right and masked, never counted (the decision for
"sequences shorter than seq_len": pad + note, not an error). Records that tokenise to fewer
than two tokens carry no next-token signal and are skipped with a note.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mergeplan.errors import MergeplanError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class CalibSet:
    """Tokenised samples of one source; what every pass over that source iterates."""

    key: str  # short label used in the plan ("calib.jsonl")
    source: str  # as written in the recipe
    kind: str  # text | jsonl | parquet | datasets | hf
    samples: list[list[int]]
    pad_id: int
    seq_len: int
    records_read: int
    text_sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    @property
    def padded(self) -> int:
        return sum(1 for s in self.samples if len(s) < self.seq_len)

    def tokens_sha256(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            h.update(len(s).to_bytes(4, "little"))
            h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in s))
        return h.hexdigest()

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) per batch, right-padded to the batch's longest sample."""
        out = []
        for i in range(0, len(self.samples), batch_size):
            chunk = self.samples[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[r, : len(s)] = 1
            out.append((ids, mask))
        return out

    def record(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "records_read": self.records_read,
            "samples": len(self.samples),
            "tokens": self.tokens,
            "padded_samples": self.padded,
            "text_sha256": self.text_sha256,
            "tokens_sha256": self.tokens_sha256(),
        }


def _record_text(rec: Any, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise MergeplanError(f"{where}: expected a JSON object with a `text` field, got {type(rec).__name__}")
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return rec["prompt"] + "\n" + rec["response"]
    fields = ", ".join(sorted(map(str, rec))) or "none"
    raise MergeplanError(
        f"{where}: no `text` field and no `prompt` + `response` pair (fields: {fields}); "
        "rename the text field or convert the file"
    )


def _text_docs(path: Path) -> Iterator[tuple[str, str]]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MergeplanError(f"calibration data {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    doc: list[str] = []
    start = 1
    for n, line in enumerate(content.splitlines(), 1):
        if line.strip():
            if not doc:
                start = n
            doc.append(line)
        elif doc:
            yield "\n".join(doc), f"{path}:{start}"
            doc = []
    if doc:
        yield "\n".join(doc), f"{path}:{start}"


def _jsonl_docs(path: Path) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MergeplanError(f"{path}:{n}: not valid JSON ({e.msg}); JSONL needs one object per line") from None
            yield _record_text(rec, f"{path}:{n}"), f"{path}:{n}"


def _need(module: str, what: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MergeplanError(
            f"{what} needs the `{module.split('.')[0]}` package: pip install 'mergeplan[calib]' "
            "or convert the data to JSONL"
        ) from None


def _parquet_docs(path: Path) -> Iterator[tuple[str, str]]:
    pq = _need("pyarrow.parquet", f"parquet calibration data ({path})")
    table = pq.read_table(path)
    for n, rec in enumerate(table.to_pylist()):
        yield _record_text(rec, f"{path} row {n}"), f"{path} row {n}"


def _dataset_docs(ds: Any, where: str) -> Iterator[tuple[str, str]]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take train or the first split
        split = "train" if "train" in ds else sorted(ds.keys())[0]
        ds, where = ds[split], f"{where}[{split}]"
    for n, rec in enumerate(ds):
        yield _record_text(rec, f"{where} row {n}"), f"{where} row {n}"


def _open(source: str, recipe_dir: Path) -> tuple[str, Iterator[tuple[str, str]]]:
    if source.startswith("hf:"):
        datasets = _need("datasets", f"calibration data {source}")
        name, _, split = source[3:].partition(":")
        if not name:
            raise MergeplanError(f"calibration data {source!r}: write hf:NAME or hf:NAME:split")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # network, unknown name, unknown split: all the user's to fix
            raise MergeplanError(f"calibration data {source}: datasets could not load it ({e})") from None
        return "hf", _dataset_docs(ds, source)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = recipe_dir / path
    if not path.exists():
        raise MergeplanError(f"calibration data {source} not found (looked at {path}); fix calibration.data")
    if path.is_dir():
        if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise MergeplanError(
                f"calibration data {path} is a directory but not a `datasets` save_to_disk directory"
            )
        datasets = _need("datasets", f"calibration data {path}")
        return "datasets", _dataset_docs(datasets.load_from_disk(str(path)), str(path))
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text", _text_docs(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl", _jsonl_docs(path)
    if suffix == ".parquet":
        return "parquet", _parquet_docs(path)
    raise MergeplanError(
        f"calibration data {path}: unknown format {suffix or '(no suffix)'}; use .txt, .jsonl, .parquet, "
        "a datasets directory or hf:NAME"
    )


def pad_id_of(tokenizer: Any) -> int:
    # Padding is masked out everywhere, so any valid id will do.
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def load_calib_set(
    source: str, recipe_dir: Path, tokenizer: Any, samples: int, seq_len: int, skip: int = 0
) -> CalibSet:
    """Read up to `samples` usable records of `source` and tokenise them (first records, in order).

    `skip`: pass over the first `skip` usable records first (held-out evaluation skips what
    a calibration with `samples: skip` on the same source read). Usable records are counted
    as calibration counts them: records shorter than two tokens are not counted."""
    kind, docs = _open(source, recipe_dir)
    h = hashlib.sha256()
    out: list[list[int]] = []
    read = skipped = passed = 0
    for text, _where in docs:
        read += 1
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) < 2:
            skipped += 1
            continue
        if passed < skip:
            passed += 1
            continue
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        out.append(list(ids))
        if len(out) >= samples:
            break
    key = source if source.startswith("hf:") else Path(source).name
    cs = CalibSet(key, source, kind, out, pad_id_of(tokenizer), seq_len, read, h.hexdigest())
    if not out:
        if passed:
            raise MergeplanError(f"data {source} has only {passed} usable record(s), all skipped (skip {skip}); "
                                 "lower the skip or give more records")
        why = f"{read} records, all shorter than two tokens" if read else "no records"
        raise MergeplanError(f"calibration data {source} is empty ({why}); give text to calibrate on")
    if skipped:
        cs.notes.append(f"{source}: skipped {skipped} record(s) shorter than two tokens")
    if len(out) < samples:
        cs.notes.append(f"{source}: only {len(out)} of the {samples} requested samples")
    if cs.padded:
        cs.notes.append(
            f"{source}: {cs.padded} of {len(out)} samples are shorter than seq_len={seq_len}; "
            "they are padded and the padding is masked out of every statistic"
        )
    return cs
