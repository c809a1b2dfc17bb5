"""A plan merged in memory, and a model made of it, with no output directory.

    tensors = merge_in_memory(plan, threads=2)           # name -> CPU tensor, plan dtype
    model = load_merged(plan, tensors)                    # the base's architecture, float32

merge_in_memory is apply's engine (apply.merge_in_memory): the same plan checks, input
fingerprint and per-byte digest checks, and the same merge, with finished tensors kept
in a dict instead of written to shards, so the tensors are bit for bit those apply
writes. The merge runs on the CPU, as `apply` does by default. load_merged builds the
model from the config of the model whose files apply copies (the base) and loads the
tensors with load_state_dict (strict: only a weight tied to a loaded one may be absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mergeplan.errors import MergeplanError
from mergeplan.plan.model import Plan


def merge_in_memory(
    plan: Plan,
    threads: int = 1,
    remap: dict[str, str] | None = None,
    plan_path: str | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Merge `plan` as `mergeplan apply` does, into memory. `remap`: model id -> path (as
    --model); `progress(done, total, bytes read)` after each tensor; `device`: the compute
    device, as `apply --device` (the CPU default is what apply writes by default)."""
    from mergeplan.apply import ApplyOptions
    from mergeplan.apply import merge_in_memory as _merge

    opts = ApplyOptions(threads=max(1, threads), remap=dict(remap or {}), plan_path=plan_path,
                        progress=progress, note=note, device=torch.device(device))
    return _merge(plan, opts)


def config_dir(plan: Plan, remap: dict[str, str] | None = None, plan_path: str | None = None) -> Path:
    """Directory of the model whose config and tokenizer the merged output gets (the base)."""
    from mergeplan.apply import model_paths

    return model_paths(plan, dict(remap or {}), plan_path)[plan.aux_source.id]


def load_merged(
    plan: Plan,
    tensors: dict[str, torch.Tensor],
    model_dir: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    remap: dict[str, str] | None = None,
    plan_path: str | None = None,
) -> torch.nn.Module:
    """The merged model in eval mode on `device`: AutoModelForCausalLM from the config in
    `model_dir` (default: the plan's base), weights from `tensors` converted to `dtype`.
    `tensors` is emptied as they are loaded, so one copy of the weights stays resident."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    where = Path(model_dir) if model_dir is not None else config_dir(plan, remap, plan_path)
    try:
        config = AutoConfig.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise MergeplanError(f"cannot read the model config in {where}: {e}") from None
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for name in list(tensors):
        state[name] = tensors.pop(name).to(dtype).contiguous()
    # assign: the module takes these tensors as its weights instead of copying them, so
    # the merged weights are in memory once (the uninitialised ones are never touched).
    try:
        res = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that differ from the config's
        first = str(e).strip().splitlines()[-1].strip()
        raise MergeplanError(f"the merged weights do not fit {type(model).__name__} from {where}/config.json "
                             f"({first}); the plan's models do not match that config") from None
    model.tie_weights()
    loaded = {id(p) for n, p in model.named_parameters() if n in state}
    missing = [k for k in res.missing_keys if not _tied_to_loaded(model, k, loaded)]
    if res.unexpected_keys or missing:
        what = (f"tensor {res.unexpected_keys[0]!r} that the architecture lacks" if res.unexpected_keys
                else f"no tensor {missing[0]!r}")
        raise MergeplanError(f"the merged weights do not fit {type(model).__name__} from {where}/config.json: "
                             f"they have {what}; the plan's models do not match that config")
    del state
    return model.to(device).eval()


def _tied_to_loaded(model: torch.nn.Module, name: str, loaded: set[int]) -> bool:
    try:
        return id(model.get_parameter(name)) in loaded
    except AttributeError:
        # a buffer the checkpoint need not hold (rotary frequencies are recomputed)
        return name not in dict(model.named_parameters())
