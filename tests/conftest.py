"""Shared fixtures: tiny Llama families built once per test session (random weights, ~1 s each).

`tiny_family` / `tiny_family_bf16` return a `TinyFamily` (samples/tiny_family.py):
  .root, .base, .finetunes["math" | "code" | "legal"], .data["general" | "math" | "code" |
  "legal"], .models (base + fine-tunes), .model(name), .seed, .dtype.
The directories are shared by the whole session: copy them before changing anything.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _load_builder() -> ModuleType:
    # samples/ is a folder of scripts, not a package. Loading the one file by path keeps
    # samples/ off sys.path, where a script name could shadow a real module; registering it
    # as "tiny_family" lets tests and samples/evaluate.py share one module object.
    name = "tiny_family"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SAMPLES / "tiny_family.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name while executing
    spec.loader.exec_module(module)
    return module


tiny_family_builder = _load_builder()


@pytest.fixture(scope="session")
def family_builder() -> ModuleType:
    """The samples/tiny_family.py module (build_family, FAMILY_MODELS, data_paths, ...)."""
    return tiny_family_builder


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Random float32 family, seed 0: fine-tunes are base + structured random task vectors."""
    return tiny_family_builder.build_family(tmp_path_factory.mktemp("tiny_family"), steps=0, seed=0)


@pytest.fixture(scope="session")
def tiny_family_bf16(tmp_path_factory):
    """The same family (same seed) with every tensor saved in bfloat16."""
    return tiny_family_builder.build_family(
        tmp_path_factory.mktemp("tiny_family_bf16"), steps=0, seed=0, dtype=torch.bfloat16
    )
