"""Calibration engine: data loading, model passes with hooks, plain statistics (no merge logic).

`calibrate` (run.py) is the one entry point; it returns a `CalibStats` (stats.py). Import
them from their modules: guide options import calibrate.settings without torch.
"""
