"""The recipe's `guides:` section: per-guide options, defaults, and which combinations make sense.

The option models are the recipe schema's (``mergeplan.recipe.sections``); this module
validates a `guides:` mapping given on its own (messages then name the key path, not a line).
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from mergeplan.calibrate.settings import parse_calibration
from mergeplan.recipe.errors import to_mergeplan_error
from mergeplan.recipe.sections import AimOptions, GuideOptions, LewisOptions, SensOptions, check_guides

__all__ = ["AimOptions", "GuideOptions", "LewisOptions", "SensOptions", "parse_guides", "validate_guides"]


def parse_guides(raw: Mapping[str, Any] | GuideOptions | None) -> GuideOptions:
    if raw is None:
        return GuideOptions()
    if isinstance(raw, GuideOptions):
        return raw
    try:
        return GuideOptions.model_validate(dict(raw) if isinstance(raw, Mapping) else raw)
    except ValidationError as exc:
        raise to_mergeplan_error(exc, prefix=("guides",), with_line=False) from None


def validate_guides(
    guides: Mapping[str, Any] | None, calibration: Mapping[str, Any] | None, merge_method: str
) -> list[str]:
    """Check guides + calibration against the merge method before any heavy work.

    Returns notes for the plan; raises MergeplanError for combinations that make no sense.
    """
    opts = parse_guides(guides)
    if not opts.enabled():
        return ["calibration: is set but no guide uses it; it was ignored"] if calibration else []
    return check_guides(opts, parse_calibration(calibration), merge_method)
