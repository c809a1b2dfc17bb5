"""Calibration engine: data loading, model passes with hooks, plain statistics (no merge logic)."""
