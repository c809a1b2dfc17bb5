"""Per-(seed, tensor, model) random streams.

A random mask must not depend on which tensors were processed before it, on thread
counts or on the device, so each one gets its own generator seeded from a hash of its
key. CPU and CUDA generators produce different streams for the same seed, so draws are
always made on the CPU and then moved to the device.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, tensor_name: str, model_id: str) -> int:
    """63-bit seed from sha256 of the key; fields are length-prefixed so no two keys collide
    by concatenation (("a", "bc") vs ("ab", "c"))."""
    h = hashlib.sha256()
    for field in (str(int(seed)), tensor_name, model_id):
        data = field.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return int.from_bytes(h.digest()[:8], "big") & ((1 << 63) - 1)


def generator_for(
    seed: int, tensor_name: str, model_id: str, device: torch.device | str | None = None
) -> torch.Generator:
    """A fresh CPU generator for this key.

    `device` names where the caller will use the draws; the generator itself stays on the
    CPU on purpose (see `uniform`), so the same key gives the same numbers everywhere.
    """
    del device  # accepted so call sites read the same on every device
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, tensor_name, model_id))
    return g


def uniform(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    tensor_name: str,
    model_id: str,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """float32 uniforms in [0, 1) for this key: drawn on the CPU, then moved to `device`."""
    g = generator_for(seed, tensor_name, model_id, device)
    u = torch.rand(tuple(shape), generator=g, dtype=torch.float32, device="cpu")
    return u if device is None else u.to(device)
