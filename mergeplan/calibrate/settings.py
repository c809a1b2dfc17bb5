"""The recipe's `calibration:` section: parsed, checked, with defaults filled in."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mergeplan.errors import MergeplanError

DEFAULTS: dict[str, Any] = {
    "samples": 16,
    "seq_len": 512,
    "batch_size": 4,
    "device": "auto",
    "dtype": "auto",
    "tokenizer": None,
}
KEYS = ("data", *DEFAULTS)
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CalibrationSettings:
    # "shared" data as one source string, or per model id -> source string
    data: str | dict[str, str]
    samples: int
    seq_len: int
    batch_size: int
    device: str
    dtype: str
    tokenizer: str | None
    recipe_dir: Path = field(default=Path("."))

    def source_for(self, model_id: str) -> str | None:
        if isinstance(self.data, str):
            return self.data
        return self.data.get(model_id)

    def as_record(self) -> dict[str, Any]:
        """What the plan keeps: the settings as written (paths relative to the recipe)."""
        return {
            "data": self.data if isinstance(self.data, str) else dict(sorted(self.data.items())),
            "samples": self.samples,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            **({"tokenizer": self.tokenizer} if self.tokenizer else {}),
        }


def unknown_key_error(section: str, key: Any, known: tuple[str, ...] | list[str]) -> MergeplanError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return MergeplanError(
        f"{section}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}"
    )


def _int(section: str, key: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MergeplanError(f"{section}.{key} must be an integer >= {lo}, got {value!r}")
    return value


def _source(section: str, value: Any) -> str:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise MergeplanError(
            f"{section} must be a path (relative to the recipe) or hf:NAME[:split], got {value!r}"
        )
    return str(value)


def parse_calibration(raw: Mapping[str, Any] | None, recipe_dir: Path | str = ".") -> CalibrationSettings:
    """Check the `calibration:` mapping; every problem names the key and what to write instead."""
    if raw is None:
        raise MergeplanError(
            "guides need calibration data: add a `calibration:` section with `data: PATH` to the recipe"
        )
    if not isinstance(raw, Mapping):
        raise MergeplanError(f"calibration: must be a mapping of settings, got {type(raw).__name__}")
    for k in raw:
        if k not in KEYS:
            raise unknown_key_error("calibration", k, KEYS)
    if "data" not in raw or raw["data"] in (None, "", {}):
        raise MergeplanError(
            "calibration.data is missing: give a file (text, JSONL, parquet), a datasets directory, "
            "hf:NAME[:split], or a mapping {model_id: source}"
        )
    data_raw = raw["data"]
    if isinstance(data_raw, Mapping):
        data: str | dict[str, str] = {
            str(k): _source(f"calibration.data.{k}", v) for k, v in data_raw.items()
        }
    else:
        data = _source("calibration.data", data_raw)
    vals = {**DEFAULTS, **{k: v for k, v in raw.items() if k != "data"}}
    samples = _int("calibration", "samples", vals["samples"], 1)
    seq_len = _int("calibration", "seq_len", vals["seq_len"], 2)
    batch_size = _int("calibration", "batch_size", vals["batch_size"], 1)
    device = vals["device"]
    if not isinstance(device, str) or not _device_ok(device):
        raise MergeplanError(
            f"calibration.device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"
        )
    dtype = vals["dtype"]
    if dtype not in DTYPES:
        raise MergeplanError(f"calibration.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tok = vals["tokenizer"]
    if tok is not None and (not isinstance(tok, (str, Path)) or not str(tok)):
        raise MergeplanError(f"calibration.tokenizer must be a directory path, got {tok!r}")
    return CalibrationSettings(
        data=data,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        tokenizer=str(tok) if tok else None,
        recipe_dir=Path(recipe_dir),
    )


def _device_ok(s: str) -> bool:
    if s in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, idx = s.partition(":")
    return head in ("cuda", "mps") and idx.isdigit()
