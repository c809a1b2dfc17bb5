"""Guides: calibration-driven decisions (LEWIS densities, AIM relaxation, Sens coefficients).

run_guides is imported on first use so that importing the options (validate_guides) does not
pull in torch and transformers.
"""

from typing import Any

from mergeplan.guides.base import GuideDecisions, ModelInput
from mergeplan.guides.options import parse_guides, validate_guides

__all__ = ["GuideDecisions", "ModelInput", "parse_guides", "run_guides", "validate_guides"]


def __getattr__(name: str) -> Any:
    if name == "run_guides":
        from mergeplan.guides.run import run_guides

        return run_guides
    raise AttributeError(name)
