"""Dtype names across safetensors headers, torch, and recipes; byte sizes."""

from __future__ import annotations

import math

import torch

from mergeplan.errors import MergeplanError
# The safetensors dtype tables live in stdtypes.py: header parsing needs them without torch.
from mergeplan.io.stdtypes import ST_DTYPE_RANK, ST_ITEMSIZE  # noqa: F401  (re-exported)

_ST_TO_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "C64": "complex64", "F64": "float64", "I64": "int64",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
# Only the dtypes this torch build has (float8 and unsigned wide ints are recent).
ST_TO_TORCH: dict[str, torch.dtype] = {
    st: getattr(torch, tn) for st, tn in _ST_TO_TORCH_NAMES.items() if hasattr(torch, tn)
}
TORCH_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in ST_TO_TORCH.items()}

# Recipe spellings (mergekit's `dtype:` / `out_dtype:`) -> torch dtype.
_RECIPE_TO_TORCH: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_TORCH_TO_RECIPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def st_to_torch(st_dtype: str) -> torch.dtype:
    """torch dtype for a safetensors dtype string ("BF16" -> torch.bfloat16)."""
    try:
        return ST_TO_TORCH[st_dtype]
    except KeyError:
        raise MergeplanError(
            f"safetensors dtype {st_dtype!r} is not supported by mergeplan with torch "
            f"{torch.__version__}; supported: {', '.join(sorted(ST_TO_TORCH))}"
        ) from None


def torch_to_st(dtype: torch.dtype) -> str:
    """safetensors dtype string for a torch dtype (torch.bfloat16 -> "BF16")."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise MergeplanError(f"torch dtype {dtype} cannot be stored in safetensors") from None


def recipe_to_torch(name: str) -> torch.dtype:
    """torch dtype for a recipe dtype name ("bfloat16", "float16", "float32" and short aliases)."""
    try:
        return _RECIPE_TO_TORCH[name.strip().lower()]
    except (KeyError, AttributeError):
        raise MergeplanError(
            f"unknown dtype {name!r} in recipe; use one of bfloat16, float16, float32"
        ) from None


def torch_to_recipe(dtype: torch.dtype) -> str:
    """Canonical recipe name for a floating torch dtype (torch.bfloat16 -> "bfloat16")."""
    try:
        return _TORCH_TO_RECIPE[dtype]
    except KeyError:
        raise MergeplanError(
            f"dtype {dtype} has no recipe name; use bfloat16, float16 or float32"
        ) from None


def itemsize(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    try:
        return ST_ITEMSIZE[st_dtype]
    except KeyError:
        raise MergeplanError(
            f"safetensors dtype {st_dtype!r} is not supported by mergeplan "
            f"(supported: {', '.join(sorted(ST_ITEMSIZE))})"
        ) from None


def nbytes(st_dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of this dtype and shape occupies in a safetensors file."""
    return itemsize(st_dtype) * math.prod(shape)
