"""The recipe's `calibration:` section: parsed, checked, with defaults filled in.

The model is the recipe schema's (``mergeplan.recipe.sections.CalibrationSettings``); this
module validates a `calibration:` mapping given on its own (messages name the key path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from mergeplan.errors import MergeplanError
from mergeplan.recipe.errors import to_mergeplan_error
from mergeplan.recipe.sections import MISSING_DATA, NO_CALIBRATION, CalibrationSettings

__all__ = ["CalibrationSettings", "parse_calibration"]


def parse_calibration(
    raw: Mapping[str, Any] | CalibrationSettings | None, recipe_dir: Path | str = "."
) -> CalibrationSettings:
    """Check the `calibration:` mapping; every problem names the key and what to write instead."""
    if raw is None:
        raise MergeplanError(NO_CALIBRATION)
    try:
        settings = (
            raw if isinstance(raw, CalibrationSettings)
            else CalibrationSettings.model_validate(dict(raw) if isinstance(raw, Mapping) else raw)
        )
    except ValidationError as exc:
        raise to_mergeplan_error(exc, prefix=("calibration",), with_line=False) from None
    if not settings.has_data:
        raise MergeplanError(MISSING_DATA)
    return settings.model_copy(update={"recipe_dir": Path(recipe_dir)})
