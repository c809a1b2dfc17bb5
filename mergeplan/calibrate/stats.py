"""CalibStats: everything the guide decisions need from calibration, and nothing else.

Produced by calibrate.run.calibrate (model passes), consumed by guides.decide.decide (pure
math). Which statistics it holds depends on `request` (calibrate/request.py): statistics
gathered for a set of guide options serve every option set whose request they cover, so
one calibration can serve many decisions (different omega, gamma/epsilon, temperature,
guides switched off, or a union of candidates' requests).

Keys: `src` is a calibration source string as written in the recipe; LEWIS variants are
None (plain x^2 statistics) or a Wanda sparsity; fine-tune statistics are keyed by
(how the pass ran, model id) with "act" (alone, batched), ("sens", per_sample) (inside
Sens's gradient pass) or ("wanda", sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergeplan.calibrate.activations import ActivationStats
from mergeplan.calibrate.request import Request
from mergeplan.calibrate.settings import CalibrationSettings


@dataclass
class CalibStats:
    request: Request  # what was measured
    settings: CalibrationSettings  # the recipe's calibration section, parsed
    base_id: str
    ids: list[str]  # fine-tune ids, in recipe order (Sens's matrices follow it)
    paths: dict[str, str]  # model id -> directory calibrated (base and fine-tunes)
    per_model: dict[str, str]  # fine-tune id -> its own data source (LEWIS, Sens)
    resolved_device: str = "cpu"
    # data: source -> CalibSet.record() and that set's notes, in load order
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_notes: dict[str, list[str]] = field(default_factory=dict)
    dataset_keys: dict[str, str] = field(default_factory=dict)  # source -> its short label
    stored: set[str] = field(default_factory=set)  # tensor names stored in the base's files
    # structure of the base model
    aim_sites: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # module -> (tensor, axis, length)
    aim_site_notes: list[str] = field(default_factory=list)
    tensor_groups: dict[str, str] = field(default_factory=dict)  # stored tensor -> Sens layer group
    param_groups: dict[str, str] = field(default_factory=dict)  # loaded parameter -> Sens layer group
    lin_tensors: dict[str, str] = field(default_factory=dict)  # LEWIS module -> stored weight, in model order
    expert_tensors: dict[str, str] = field(default_factory=dict)  # MoE expert site -> stored weight
    vocab_size: int | None = None  # the base's; logits are compared on it (fine-tunes may add tokens)
    tie_notes: list[str] = field(default_factory=list)
    # statistics
    base_abs: dict[str, ActivationStats] = field(default_factory=dict)  # src -> base |x| (AIM)
    base_sq: dict[tuple, ActivationStats] = field(default_factory=dict)  # (variant, src) -> base x^2
    base_col_sq: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict)  # (variant, src) -> module -> col_sq
    finetune: dict[tuple, ActivationStats] = field(default_factory=dict)  # (pass kind, id) -> x^2 (LEWIS)
    sens_S: dict[tuple, dict[str, float]] = field(default_factory=dict)  # (per_sample, id) -> param -> S
    logit_g: dict[bool, np.ndarray] = field(default_factory=dict)  # per_sample -> g [K, K] (ids order)
    logit_peak: dict[bool, int] = field(default_factory=dict)  # per_sample -> logit store peak bytes
    # how it ran
    timings: dict[str, float] = field(default_factory=dict)  # model id -> seconds (all its passes)
    placement: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
