"""Where the next candidate comes from: grid, seeded random, or an Optuna study (TPE, or any
strategy when the study is shared through a database by several workers).

An asker hands out (handle, assignment) pairs and is told each candidate's objective value.
Grid and random need nothing beyond numpy; Optuna is the optional `tune` extra, imported
only when a study is asked for.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from mergeplan.errors import MergeplanError
from mergeplan.tune.space import cast, grid, grid_size, random_draws, values


class IterAsker:
    """Grid or random: a local, deterministic sequence of at most `budget` candidates."""

    def __init__(self, it: Iterator[dict[str, Any]], budget: int | None):
        self._it = it
        self._left = budget

    def ask(self) -> tuple[Any, dict[str, Any]] | None:
        if self._left is not None and self._left <= 0:
            return None
        a = next(self._it, None)
        if a is None:
            return None
        if self._left is not None:
            self._left -= 1
        return None, a

    def tell(self, handle: Any, value: float | None, attrs: dict[str, Any]) -> None:
        pass

    def fail(self, handle: Any) -> None:
        pass


def require_optuna(spec) -> None:
    """Before any calibration: TPE or a shared study needs Optuna. Checked when a search
    starts, not when a recipe loads, so `--no-tune` and `pick` work without it."""
    if spec.strategy == "tpe" or spec.storage:
        _optuna()


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MergeplanError(
            "tune.strategy tpe and tune.storage need Optuna: pip install 'mergeplan[tune]' "
            "(or use strategy grid or random without storage)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


_RACES = ("IntegrityError", "already exists", "database is locked")


class StudyAsker:
    """An Optuna study, local (in memory) or shared through `storage` (sqlite:///x.db on one
    machine; postgresql://... across machines). With a shared study the candidate budget
    counts every worker's trials, so N workers together evaluate about `budget` candidates."""

    def __init__(self, dims: list, strategy: str, seed: int, direction: str,
                 storage: str | None, study: str | None, budget: int | None):
        optuna = _optuna()
        self._optuna = optuna
        self.dims = dims
        self.budget = budget
        if strategy == "grid":  # every worker stops once the study has visited the whole grid
            size = grid_size(dims)
            self.budget = size if budget is None else min(budget, size)
        if strategy == "tpe":
            sampler = optuna.samplers.TPESampler(seed=seed)
        elif strategy == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            sampler = optuna.samplers.GridSampler({d.path: list(values(d)) for d in dims}, seed=seed)
        self._dist = {d.path: self._distribution(d) for d in dims}
        # Workers started together race to create the database's tables and the study: the
        # loser sees an integrity error, "table ... already exists" (SQLite, seen in CI-like
        # runs) or a locked database, and succeeds on a retry once the tables exist.
        for attempt in range(5):
            try:
                self.study = optuna.create_study(
                    storage=storage, study_name=study, sampler=sampler, direction=direction,
                    load_if_exists=True,
                )
                break
            except Exception as e:  # bad URL, unreachable database, a study made for the other direction
                if attempt < 4 and any(r in f"{type(e).__name__} {e}" for r in _RACES):
                    time.sleep(0.2 * (attempt + 1))
                    continue
                first = str(e).splitlines()[0] if str(e) else ""
                raise MergeplanError(f"tune.storage {storage!r}: cannot open the study ({type(e).__name__}: {first})") from None

    def _distribution(self, d):
        dist = self._optuna.distributions
        finite = values(d)
        if finite is not None:
            # Stepped ranges are offered as their grid points, so every worker and the plan
            # name exactly the values a grid would.
            return dist.CategoricalDistribution(list(finite))
        if d.kind == "int":
            return dist.IntDistribution(int(d.low), int(d.high), log=d.log)
        return dist.FloatDistribution(float(d.low), float(d.high), log=d.log)

    def _counted(self) -> int:
        # Failed candidates spend the budget too, or a space where they fail never ends.
        ts = self._optuna.trial.TrialState
        return len(self.study.get_trials(deepcopy=False, states=(ts.COMPLETE, ts.RUNNING, ts.FAIL)))

    def ask(self) -> tuple[Any, dict[str, Any]] | None:
        if self.budget is not None and self._counted() >= self.budget:
            return None
        trial = self.study.ask(self._dist)
        return trial, {d.path: cast(d, trial.params[d.path]) for d in self.dims}

    def tell(self, handle: Any, value: float | None, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            handle.set_user_attr(k, v)
        try:
            self.study.tell(handle, value)
        except RuntimeError as e:
            # Optuna's GridSampler calls study.stop() once the grid is covered, which only an
            # optimize() loop may do; the trial is stored before that (optuna's _tell), and
            # the grid-size budget ends this worker's asking.
            if "Study.stop" not in str(e):
                raise

    def fail(self, handle: Any) -> None:
        self.study.tell(handle, state=self._optuna.trial.TrialState.FAIL)

    def running(self) -> int:
        """Trials some worker is still scoring (this one has none left when it asks)."""
        return len(self.study.get_trials(deepcopy=False, states=(self._optuna.trial.TrialState.RUNNING,)))

    def finished(self) -> list[dict[str, Any]]:
        """Every worker's completed trials: assignment, value and the attrs each worker set."""
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(self._optuna.trial.TrialState.COMPLETE,)):
            params = {d.path: cast(d, t.params[d.path]) for d in self.dims if d.path in t.params}
            out.append({"number": t.number, "assignment": params, "value": t.value, "attrs": dict(t.user_attrs)})
        return out


def make_asker(dims: list, strategy: str, seed: int, direction: str, storage: str | None = None,
               study: str | None = None, budget: int | None = None):
    if strategy == "tpe" or storage:
        return StudyAsker(dims, strategy, seed, direction, storage, study or "mergeplan", budget)
    if strategy == "grid":
        return IterAsker(grid(dims), budget)
    if strategy == "random":
        return IterAsker(random_draws(dims, seed), budget)
    raise MergeplanError(f"tune.strategy {strategy!r}: use grid, random or tpe")
