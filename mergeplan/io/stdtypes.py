"""safetensors dtype names: bytes per element and the safetensors crate's dtype order.

Plain tables, no torch: the header parser (header.py) needs them, and opening a model
directory or checking its fingerprint (the review's background check) reads headers only.
"""

from __future__ import annotations

# Bytes per element for every safetensors dtype we can read or write. The sub-byte
# formats (F4, F6_*) are left out: they cannot be addressed element-wise with a plain
# torch view, and no model family we merge ships them.
ST_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1,
    "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}

# Declaration order of `Dtype` in the safetensors crate (it derives Ord). Its
# serializer lays tensors out by this rank DEScending, then by name (byte order), so
# the writer needs the exact rank to reproduce `save_file` byte for byte.
_ST_ENUM_ORDER = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
    "C64", "F64", "I64", "U64",
]
ST_DTYPE_RANK: dict[str, int] = {name: i for i, name in enumerate(_ST_ENUM_ORDER)}
