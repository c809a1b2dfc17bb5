"""run_guides: calibrate, then decide, in one call (for scripts and tests; the planner calls
the two itself, so that it can take statistics a search already gathered).

Calibration (model passes -> CalibStats) is mergeplan/calibrate/run.py; the decisions
(CalibStats + options -> GuideDecisions, pure) are mergeplan/guides/decide.py. A caller
that decides more than once on the same statistics (a search over guide options) calls
the two itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from mergeplan.calibrate.settings import parse_calibration
from mergeplan.guides.base import GuideDecisions, ModelInput
from mergeplan.guides.options import parse_guides


def run_guides(
    guides: Mapping[str, Any] | None,
    calibration: Mapping[str, Any] | None,
    base: ModelInput,
    models: Sequence[ModelInput],
    recipe_dir: Path,
    device: str = "auto",
    quiet: bool = False,
) -> GuideDecisions:
    """Calibrate and decide. `device` ("auto" or a torch device string) overrides calibration.device
    unless it is "auto". Raises MergeplanError for any bad input; returns GuideDecisions."""
    from mergeplan.calibrate.run import calibrate
    from mergeplan.guides.decide import decide

    opts = parse_guides(guides)
    if not opts.enabled():
        return GuideDecisions()
    settings = parse_calibration(calibration, Path(recipe_dir))
    stats = calibrate(opts, settings, base, models, Path(recipe_dir), device=device, quiet=quiet)
    return decide(stats, opts, base.id, [m.id for m in models])
