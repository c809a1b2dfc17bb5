"""Is each input model still on this machine, unchanged? One status line per model.

Runs in a worker thread (reads shard headers); never downloads: a model that is not a
local directory is reported as missing, with where it was looked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mergeplan.errors import InputMismatchError, MergeplanError
from mergeplan.plan.model import ModelRef, Plan
from mergeplan.plan.model import model_search_dirs

FOUND, CHANGED, MISSING, UNKNOWN = "found", "changed", "missing", "not checked"

ModelChecker = Callable[[ModelRef], str]


def local_dir(ref: ModelRef, bases: list[Path]) -> Path | None:
    """The model's directory here: the recorded path, relative ones tried against each base
    in turn (the same order apply uses), or None."""
    p = Path(ref.path).expanduser()
    if p.is_absolute():
        return p if p.is_dir() else None
    for b in bases:
        if (b / p).is_dir():
            return b / p
    return None


def make_checker(plan: Plan, plan_path: str | None) -> ModelChecker:
    bases = model_search_dirs(plan, plan_path)

    def check(ref: ModelRef) -> str:
        try:  # the model reader is optional for reviewing a plan
            from mergeplan.io.modeldir import ModelDir
        except ImportError as e:
            return f"{UNKNOWN} ({e})"
        path = local_dir(ref, bases)
        if path is None:
            return f"{MISSING} (no directory {ref.path})"
        try:
            with ModelDir.open(path, name=ref.id) as md:
                md.check_fingerprint(ref.fingerprint, full=False)
        except InputMismatchError as e:
            return f"{CHANGED}: {e}"
        except MergeplanError as e:
            return f"{MISSING}: {e}"
        except OSError as e:
            return f"{MISSING}: {e.strerror or e}"
        return FOUND

    return check
