"""Calibration engine: data loading, model passes with hooks, plain statistics (no merge logic).

`calibrate` (run.py) is the one entry point; it returns a `CalibStats` (stats.py). Both are
imported on first use: guide options import calibrate.settings without torch.
"""

from typing import Any

__all__ = ["CalibStats", "Request", "calibrate"]


def __getattr__(name: str) -> Any:
    if name == "calibrate":
        from mergeplan.calibrate.run import calibrate

        return calibrate
    if name == "CalibStats":
        from mergeplan.calibrate.stats import CalibStats

        return CalibStats
    if name == "Request":
        from mergeplan.calibrate.request import Request

        return Request
    raise AttributeError(name)
