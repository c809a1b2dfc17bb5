"""Devices, tokenizers and models for calibration: one model resident at a time."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

from mergeplan.devices import pick_device
from mergeplan.errors import MergeplanError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device) -> torch.device:
    """"auto" -> cuda, then mps, then cpu. An explicit device that is not there is an error."""
    if isinstance(spec, torch.device):
        return spec
    return pick_device(spec)


def compute_dtype(choice: str, device: torch.device, path: Path) -> torch.dtype:
    """"auto": float32 on CPU (bf16 matmuls there are slow and coarse), the stored dtype elsewhere."""
    if choice != "auto":
        return _DTYPES[choice]
    if device.type == "cpu":
        return torch.float32
    stored = _config(path).get("torch_dtype") or _config(path).get("dtype")
    return _DTYPES.get(str(stored), torch.float32)


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}  # a list or a number is no config: transformers says so


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError/ValueError/others for a missing tokenizer
        raise MergeplanError(
            f"no usable tokenizer in {path} ({type(e).__name__}); calibration tokenises with the base "
            "model's tokenizer: save one there (tokenizer.save_pretrained) or set calibration.tokenizer: DIR"
        ) from None


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_vocabulary(model_id: str, path: Path, base_vocab_size: int | None, base_vocab: dict[str, int]) -> None:
    """A fine-tune must read token ids the way the base tokenizer writes them: the same
    vocabulary, or one that keeps every base token's id and adds tokens after them (a
    fine-tune that added chat tokens; its extra rows are never fed, and its logits are compared
    with the others' on the base's ids)."""
    size = _config(path).get("vocab_size")
    if isinstance(base_vocab_size, int) and isinstance(size, int) and size < base_vocab_size:
        raise MergeplanError(
            f"fine-tune {model_id!r} has a smaller vocabulary (vocab_size {size} vs the base's "
            f"{base_vocab_size}); calibration feeds every model the base tokenizer's ids, so merge only "
            "models whose vocabulary keeps the base's"
        )
    if has_tokenizer(path):
        vocab = load_tokenizer(path).get_vocab()
        moved = sorted((t, i, vocab.get(t)) for t, i in base_vocab.items() if vocab.get(t) != i)
        if moved:
            t, i, got = moved[0]
            raise MergeplanError(
                f"fine-tune {model_id!r} ships a tokenizer whose vocabulary differs from the base's (token "
                f"{t!r}: id {got} there, {i} in the base; {len(moved)} such); calibration uses the base "
                "tokenizer, so merge only models that keep the base's token ids"
            )


def base_vocab_size(path: Path) -> int | None:
    return _config(path).get("vocab_size")


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """Load a causal LM for calibration; returns (model, placement note).

    On CUDA a model that does not fit the free memory of the device goes through accelerate's
    device_map="auto" (other GPUs, then CPU offload) instead of a home-made splitter.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    placement = str(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        stored = _DTYPES.get(str(_config(path).get("torch_dtype") or _config(path).get("dtype")), torch.float32)
        # Weights at the compute dtype plus room for activations and statistics.
        scale = torch.empty((), dtype=dtype).element_size() / torch.empty((), dtype=stored).element_size()
        need = _weights_bytes(path) * scale * 1.2
        if need > free:
            kwargs["device_map"] = "auto"
            placement = "device_map=auto"
        else:
            kwargs["device_map"] = {"": device}
    from transformers.utils import logging as hf_logging

    # Our own progress display owns stderr; transformers' per-load bars would tear through it.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise MergeplanError(f"could not load {path} as a causal LM for calibration: {type(e).__name__}: {e}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, placement


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def release(device: torch.device) -> None:
    """Return a dropped model's memory before the next one loads (the caller drops its references)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
