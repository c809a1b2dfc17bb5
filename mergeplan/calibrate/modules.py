"""Which modules each guide measures, and the tensor names they map to on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mergeplan import arch
from mergeplan.calibrate.experts import PROJS, ExpertInputs, is_fused_experts, num_experts
from mergeplan.errors import MergeplanError
from mergeplan.plan.names import parse_name


@dataclass(frozen=True)
class Site:
    """A weighted module: its name, the stored weight tensor, and the axis of input channels.

    For one expert of a fused mixture-of-experts module, `module` is a name of its own
    ("<experts module>.<e>.<gate|up|down>", no such submodule exists) and `expert` holds
    (experts module, expert index, projection); site_module() resolves both kinds.
    """

    module: str
    tensor: str  # the weight's name in the safetensors files (arch.py maps renamed ones)
    axis: int  # axis of the stored weight along which input channels run
    kind: str  # "linear" | "norm"
    expert: tuple[str, int, str] | None = None


def _is_conv1d(mod: torch.nn.Module) -> bool:
    # GPT-2 style Conv1D stores the weight [in, out].
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_router(mod: torch.nn.Module) -> bool:
    # transformers 5 MoE routers (MixtralTopKRouter, Qwen2MoeTopKRouter, ...) are not nn.Linear
    # but hold one [experts, hidden] weight applied as x @ W^T: merged and measured as a Linear.
    w = getattr(mod, "_parameters", {}).get("weight")
    return w is not None and w.dim() == 2 and type(mod).__name__.endswith("Router")


def _stored(param: str, stored: set[str] | None) -> str:
    if not stored:
        return param
    return arch.stored_name(param, stored) or param


def _expert_sites(name: str, mod: torch.nn.Module, stored: set[str] | None) -> dict[str, Site]:
    out = {}
    for e in range(num_experts(mod)):
        for proj in PROJS:
            tensor = arch.expert_tensor(name, e, proj, stored or set()) or f"{name}.{e}.{proj}_proj.weight"
            key = f"{name}.{e}.{proj}"
            out[key] = Site(key, tensor, 1, "linear", (name, e, proj))
    return out


def site_module(model: torch.nn.Module, site: Site) -> Any:
    """The module to hook and whose .weight is the site's weight (an ExpertInputs for an expert)."""
    if site.expert is not None:
        owner, index, proj = site.expert
        return ExpertInputs(model.get_submodule(owner), index, proj)
    return model.get_submodule(site.module)


def site_modules(model: torch.nn.Module, sites: Mapping[str, Site]) -> dict[str, Any]:
    return {n: site_module(model, s) for n, s in sites.items()}


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


def linear_sites(model: torch.nn.Module, stored: set[str] | None = None) -> dict[str, Site]:
    """Linear layers inside the decoder blocks (LEWIS's q, k, v, o, gate, up, down; fused
    projections such as qkv and gate_up as one; routers; each expert's gate, up and down).

    `stored`: the stored tensor names, to name the weights of renamed and per-expert modules.
    """
    prefix, _ = decoder_layers(model)
    out = {}
    for name, mod in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        if isinstance(mod, torch.nn.Linear) or _is_conv1d(mod) or _is_router(mod):
            out[name] = Site(name, _stored(f"{name}.weight", stored), 0 if _is_conv1d(mod) else 1, "linear")
        elif is_fused_experts(mod):
            out.update(_expert_sites(name, mod, stored))
    return out


def weighted_sites(model: torch.nn.Module, stored: set[str] | None = None) -> tuple[dict[str, Site], list[str]]:
    """Every module with its own weight except embeddings (AIM), and notes on what was left out.

    A head tied to the input embeddings shares their stored tensor, which AIM never relaxes,
    so the head is left out too (once: the tied tensor is one stored tensor).
    """
    emb = model.get_input_embeddings()
    emb_w = emb.weight if emb is not None else None
    out: dict[str, Site] = {}
    notes: list[str] = []
    for name, mod in model.named_modules():
        if is_fused_experts(mod):
            out.update(_expert_sites(name, mod, stored))
            continue
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if w is None or isinstance(mod, torch.nn.Embedding):
            continue
        if emb_w is not None and (w is emb_w or w.data_ptr() == emb_w.data_ptr()):
            notes.append(f"aim: {name} is tied to the input embeddings; embeddings are not relaxed")
            continue
        tensor = _stored(f"{name}.weight", stored)
        if isinstance(mod, torch.nn.Linear) or _is_router(mod):
            out[name] = Site(name, tensor, 1, "linear")
        elif _is_conv1d(mod):
            out[name] = Site(name, tensor, 0, "linear")
        elif w.dim() == 1:
            out[name] = Site(name, tensor, 0, "norm")
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
            f"({len(missing)} such); this architecture renames weights on load in a way mergeplan/arch.py does not "
            "know, so guides cannot place their decisions (merge without guides, or report the architecture)"
        )
