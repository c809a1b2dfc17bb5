"""Mask specs and merge-method vocabulary without torch: what a plan may say.

Kept apart from the kernels so that reading, checking and showing a plan (`show`,
`validate`, `diff`, the review TUI) never imports torch.
"""

from __future__ import annotations

from typing import Any

from mergeplan.errors import MergeplanError

KINDS = ("magnitude", "bernoulli", "breadcrumbs", "della", "nm")
RESCALES = ("inverse", "l1", "none")
CONSENSUS = ("sum", "count")
_MAX_M = 1 << 24  # keeps the n:m tie-break keys inside int64
# Recipe and plan spellings of the floating dtypes (io.tensors maps them to torch; a test
# checks the two lists agree).
FLOAT_DTYPE_NAMES = ("bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")


def check_spec(spec: dict, where: str) -> None:
    """Raise MergeplanError naming `where` unless spec is a valid mask spec."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise MergeplanError(
            f"unknown mask kind {kind!r} for {where}; use one of {', '.join(KINDS)}"
        )
    # Other keys are annotations the plan keeps beside the spec (digest, kept, ...): ignored.
    if spec.get("rescale", "none") not in RESCALES:
        raise MergeplanError(
            f"rescale {spec['rescale']!r} for {where} is not one of {', '.join(RESCALES)}"
        )
    if kind == "nm":
        n, m = spec.get("n"), spec.get("m")
        if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and 1 <= m <= _MAX_M):
            raise MergeplanError(
                f"n:m = {n}:{m} for {where} is invalid; "
                f"need integers 0 <= n <= m, 1 <= m <= {_MAX_M}"
            )
        return  # n and m decide; an nm spec's density is informational (n / m)
    density = spec.get("density")
    if not _is_fraction(density):
        raise MergeplanError(f"density {density!r} for {where} must be a number in [0, 1]")
    if kind == "breadcrumbs" and not _is_fraction(spec.get("gamma")):
        raise MergeplanError(f"gamma {spec.get('gamma')!r} for {where} must be a number in [0, 1]")
    if kind == "della" and density < 1.0:
        eps = spec.get("epsilon")
        if not _is_fraction(eps) or not (0.0 <= density - eps and density + eps <= 1.0):
            raise MergeplanError(
                f"epsilon {eps!r} with density {density} for {where}: keep probabilities "
                "density +/- epsilon must stay in [0, 1]; lower epsilon"
            )


def _is_fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
