"""Cross-task logit distances with one model resident at a time.

Sens-Merging's g_ij compares model i's logits with expert j's on task j's text. Since two
models are never loaded together, whichever of the pair runs first writes its logits (float32,
non-padding positions only) to a memory-mapped file in a temporary directory; the second
streams against it batch by batch and the file is dropped once no later model needs it.
float32 on disk because the distance is a difference of nearly equal logits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


class LogitStore:
    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mergeplan-logits-")
        self._files: dict[tuple[str, str], tuple[Path, tuple[int, int]]] = {}
        self._open: dict[tuple[str, str], np.memmap] = {}
        self.bytes_peak = 0
        self._made = 0

    def create(self, key: tuple[str, str], rows: int, vocab: int) -> None:
        self._made += 1
        path = Path(self._dir.name) / f"{self._made}.f32"
        self._open[key] = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, vocab))
        self._files[key] = (path, (rows, vocab))
        self.bytes_peak = max(self.bytes_peak, sum(r * v * 4 for _, (r, v) in self._files.values()))

    def write(self, key: tuple[str, str], start: int, rows: torch.Tensor) -> None:
        self._open[key][start : start + rows.shape[0]] = rows.detach().to("cpu", torch.float32).numpy()

    def finish(self, key: tuple[str, str]) -> None:
        m = self._open.pop(key)
        m.flush()
        del m

    def read(self, key: tuple[str, str], start: int, stop: int) -> np.ndarray:
        path, shape = self._files[key]
        return np.array(np.memmap(path, dtype=np.float32, mode="r", shape=shape)[start:stop])

    def has(self, key: tuple[str, str]) -> bool:
        return key in self._files

    def drop(self, key: tuple[str, str]) -> None:
        self._open.pop(key, None)
        path, _ = self._files.pop(key)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        self._open.clear()
        self._files.clear()
        self._dir.cleanup()


def distance_sum(current: torch.Tensor, stored: np.ndarray) -> float:
    """Sum over rows (tokens) of the L2 distance between two logit rows (float32; no float64 on MPS)."""
    ref = torch.from_numpy(stored).to(current.device)
    return float(torch.linalg.vector_norm(current.float() - ref, ord=2, dim=-1).sum())
