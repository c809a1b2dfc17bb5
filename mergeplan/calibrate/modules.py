"""Which modules each guide measures, and the tensor names they map to on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeplan.errors import MergeplanError
from mergeplan.plan.names import parse_name


@dataclass(frozen=True)
class Site:
    """A weighted module: its name, the stored weight tensor, and the axis of input channels."""

    module: str
    tensor: str  # module + ".weight", as stored in the safetensors files
    axis: int  # axis of the weight along which input channels run
    kind: str  # "linear" | "norm"


def _is_conv1d(mod: torch.nn.Module) -> bool:
    # GPT-2 style Conv1D stores the weight [in, out].
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks (the longest list whose items parse as numbered layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and parse_name(f"{name}.0.x").layer == 0:
            if (n is None or len(mod) == n) and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise MergeplanError(
            f"cannot find the decoder layers of {type(model).__name__} (no numbered layer list); "
            "guides support decoder-only transformers such as Llama, Mistral, Qwen"
        )
    return best


def linear_sites(model: torch.nn.Module) -> dict[str, Site]:
    """Linear layers inside the decoder blocks (LEWIS's q, k, v, o, gate, up, down)."""
    prefix, _ = decoder_layers(model)
    out = {}
    for name, mod in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        if isinstance(mod, torch.nn.Linear) or _is_conv1d(mod):
            out[name] = Site(name, f"{name}.weight", 0 if _is_conv1d(mod) else 1, "linear")
    return out


def weighted_sites(model: torch.nn.Module) -> tuple[dict[str, Site], list[str]]:
    """Every module with its own weight except embeddings (AIM), and notes on what was left out.

    A head tied to the input embeddings shares their stored tensor, which AIM never relaxes,
    so the head is left out too.
    """
    emb = model.get_input_embeddings()
    emb_w = emb.weight if emb is not None else None
    out: dict[str, Site] = {}
    notes: list[str] = []
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if w is None or isinstance(mod, torch.nn.Embedding):
            continue
        if emb_w is not None and (w is emb_w or w.data_ptr() == emb_w.data_ptr()):
            notes.append(f"aim: {name} is tied to the input embeddings; embeddings are not relaxed")
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = Site(name, f"{name}.weight", 1, "linear")
        elif _is_conv1d(mod):
            out[name] = Site(name, f"{name}.weight", 0, "linear")
        elif w.dim() == 1:
            out[name] = Site(name, f"{name}.weight", 0, "norm")
        else:
            notes.append(f"aim: {name} ({type(mod).__name__}) has a {w.dim()}-D weight aim does not know; left as is")
    return out, notes


def stored_tensor_names(path: Path) -> set[str]:
    """Tensor names in a model directory's safetensors files (from the index or the headers)."""
    from mergeplan.io.header import read_header

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        names |= set(read_header(f).entries)
    return names


def check_names(sites: dict[str, Site], stored: set[str], model_dir: Path) -> None:
    """Module names must be the stored tensor names; a remapping loader would misplace every decision."""
    missing = sorted(s.tensor for s in sites.values() if s.tensor not in stored)
    if missing and stored:
        raise MergeplanError(
            f"calibration module {missing[0]} has no tensor of that name in {model_dir} "
            f"({len(missing)} such); this architecture renames weights on load, which guides do not support yet"
        )
