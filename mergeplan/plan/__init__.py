"""Plan data model, file codec, editing API and diff."""

from .codec import decode_plan, encode_plan, plan_digest, read_plan, write_plan
from .diff import DiffRow, diff_plans
from .edit import Change, PlanEditor
from .model import (
    FORMAT_NAME,
    FORMAT_VERSION,
    OP_COPY,
    OP_MERGE,
    ROLE_BASE,
    ROLE_TASK,
    Contribution,
    ModelRef,
    Plan,
    TensorPlan,
    float32_array,
)
from .names import parse_name

__all__ = [
    "Change", "Contribution", "DiffRow", "FORMAT_NAME", "FORMAT_VERSION", "ModelRef", "OP_COPY",
    "OP_MERGE", "Plan", "PlanEditor", "ROLE_BASE", "ROLE_TASK", "TensorPlan", "decode_plan",
    "diff_plans", "encode_plan", "float32_array", "parse_name", "plan_digest", "read_plan", "write_plan",
]
