"""One tensor whole, in memory: masks, merge, relaxation.

The path for what cannot be streamed (della and CABS masks, l1 rescale, explicit mask
bits, copies, non-CPU devices) and the reference the streamed path (streamed.py) is
tested against. Shared by the planner (which computes masks to record their digests) and
apply (which recomputes them and checks the digests), so both sides run the same code.
Pure: tensors in, tensors out; reading and writing is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputMismatchError, MergeplanError
from .methods.masks import MaskResult, build_masks, mask_digest, unpack_bits
from .methods.masks import _finish as attach_rescale  # same rescale rule as recomputed masks
from .methods.registry import merge_tensor
from .plan.model import OP_COPY, Plan, TensorPlan


@dataclass
class TensorInputs:
    base: torch.Tensor | None  # the base model's tensor (None for linear without base)
    tensors: list[torch.Tensor]  # one per contribution, in the TensorPlan's order


def check_finite(t: torch.Tensor, tensor: str, model: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise nonfinite_error(tensor, model, int((~torch.isfinite(t)).sum()))


def nonfinite_error(tensor: str, model: str, bad: int) -> MergeplanError:
    return MergeplanError(
        f"model {model}: tensor {tensor} holds {bad} NaN/Inf value(s); fix or replace that model's weights"
    )


def _group(tp: TensorPlan) -> dict | None:
    order = tp.params.get("cabs_order")
    return {"order": list(order)} if order is not None else None


def compute_masks(plan: Plan, tp: TensorPlan, deltas: list[torch.Tensor]) -> list[MaskResult | None]:
    """The masks the plan describes: explicit bits where a user edited them, else recomputed."""
    specs = [c.mask for c in tp.contributions]
    keys = [(plan.seed, tp.name, c.model) for c in tp.contributions]
    recipe_specs = [None if (s is None or "bits" in s) else {k: v for k, v in s.items() if k != "digest"} for s in specs]
    results = build_masks(recipe_specs, deltas, keys, _group(tp)) if any(recipe_specs) else [None] * len(specs)
    out: list[MaskResult | None] = []
    for spec, res, d, key in zip(specs, results, deltas, keys):
        if spec is not None and "bits" in spec:
            mask = unpack_bits(spec["bits"], tuple(d.shape)).to(d.device)
            res = attach_rescale(mask, spec, d, key)
        out.append(res)
    return out


def check_mask_digest(tensor: str, model: str, got: str, want: str | None) -> None:
    """The one mask digest check, for the whole-tensor and the streamed path: a recomputed
    mask must be the one the planner recorded (nothing to check after an edit: want None)."""
    if want and got != want:
        raise InputMismatchError(
            f"tensor {tensor}, model {model}: the recomputed mask does not match the plan's digest; "
            "the inputs differ from those the plan was made from (run `mergeplan validate --inputs`) "
            "or re-plan"
        )


def deltas_of(inputs: TensorInputs) -> list[torch.Tensor]:
    base = inputs.base.float()
    return [t.float() - base for t in inputs.tensors]


def run_tensor(plan: Plan, tp: TensorPlan, inputs: TensorInputs, check_digests: bool = True) -> torch.Tensor:
    """The merged float32 tensor for `tp`. Raises InputMismatchError when a recomputed mask
    differs from the digest the planner recorded (the inputs or the math changed)."""
    if tp.op == OP_COPY:
        return inputs.base.float() if inputs.base is not None else inputs.tensors[0].float()
    masks: list[MaskResult | None] = [None] * len(tp.contributions)
    if any(c.mask is not None for c in tp.contributions):
        masks = compute_masks(plan, tp, deltas_of(inputs))
        if check_digests:
            for c, m in zip(tp.contributions, masks):
                want = c.mask.get("digest") if c.mask else None
                if want and m is not None:
                    check_mask_digest(tp.name, c.model, mask_digest(m.mask), want)
    weights = [c.weight for c in tp.contributions]
    base = inputs.base.float() if inputs.base is not None else None
    merged = merge_tensor(plan.method, base, [t.float() for t in inputs.tensors], weights, masks, tp.params)
    if tp.relax is not None and base is not None:
        merged = relax(base, merged, tp.relax)
    return merged


def aim_factors(relax: dict) -> torch.Tensor:
    scores = torch.as_tensor(relax["scores"], dtype=torch.float32)
    return 1.0 - scores * (1.0 - float(relax["omega"]))


def relax(base: torch.Tensor, merged: torch.Tensor, spec: dict) -> torch.Tensor:
    """AIM: W = W0 + f * (W_merged - W0), f broadcast along the spec's axis."""
    f, axis = relax_factors(spec, tuple(merged.shape))
    return relax_with(base, merged, f.to(merged.device), axis)


def relax_factors(spec: dict, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """(float32 factors, axis) of an AIM spec for a tensor of `shape`; raises if they do not fit."""
    if spec.get("kind") != "aim":
        raise MergeplanError(f"unknown relaxation kind {spec.get('kind')!r} in plan; upgrade mergeplan")
    f = aim_factors(spec)
    axis = int(spec.get("axis", -1)) % len(shape)
    if shape[axis] != f.numel():
        raise MergeplanError(
            f"AIM factors have {f.numel()} entries but the tensor has {shape[axis]} along axis {axis}; "
            "the plan does not fit these inputs"
        )
    return f, axis


def relax_with(base: torch.Tensor, merged: torch.Tensor, f: torch.Tensor, axis: int) -> torch.Tensor:
    """base + (merged - base) * f along `axis`; f may be the slice of the factors that
    covers merged's extent along that axis (the chunked path passes row blocks)."""
    shape = [1] * merged.ndim
    shape[axis] = f.numel()
    return base + (merged - base) * f.view(shape)
