"""Held-out data for a search, disjoint from the calibration samples, in two splits.

Per task (a fine-tune's id; its expert is that fine-tune):
  source   `tune.heldout.data` when given, else the task's own `calibration.data` entry
  skip     the calibration's `samples` usable records when the source is calibration's
           (calibration reads the first records of a source, so these never overlap)
  search   the next `heldout.samples` records: what candidates are scored on
  test     the `heldout.test` records after those: scored only for the chosen plan and the
           recipe as written, so the reported result is not the search's own optimism
The plan records every source, skip and count (tune/record.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeplan.errors import MergeplanError


@dataclass
class HeldOutData:
    search: dict[str, Any]  # task -> EvalSet
    test: dict[str, Any]  # task -> EvalSet (empty: no test split)
    base_id: str
    base_path: Path
    experts: dict[str, str | None]  # task -> model id
    expert_paths: dict[str, Path]  # model id -> directory
    sources: dict[str, str]
    skip: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        tasks = ", ".join(f"{t} {len(s.samples)}+{len(self.test[t].samples) if t in self.test else 0}"
                          for t, s in self.search.items())
        return f"samples per task (search+test): {tasks}"

    def record(self) -> dict[str, Any]:
        return {
            t: {"source": self.sources[t], "skip": self.skip[t], "search": len(s.samples),
                "test": len(self.test[t].samples) if t in self.test else 0,
                "search_sha256": s.data.tokens_sha256(),
                "test_sha256": self.test[t].data.tokens_sha256() if t in self.test else ""}
            for t, s in self.search.items()
        }


def load_heldout(recipe, heldout, objective, remap: dict[str, str] | None = None) -> HeldOutData:
    from mergeplan.calibrate.models import load_tokenizer
    from mergeplan.evaluate.data import load_eval_sets
    from mergeplan.evaluate.run import _resolved
    from mergeplan.io.locate import resolve_model_path

    root = recipe.dir
    remap = dict(remap or {})
    if recipe.base_model is None:
        raise MergeplanError("tune needs a base_model: its held-out scores are what a merge's gain is measured from")
    ids = [m.name for m in recipe.models if m.name != recipe.base_model.name]
    paths = {m.name: resolve_model_path(remap.get(m.name, m.ref), root)
             for m in [recipe.base_model, *recipe.models]}
    calib = recipe.calibration_settings
    calib_sources: dict[str, str] = {}
    if calib is not None:
        calib_sources = {i: calib.source_for(i) for i in ids}
    if heldout.data is None:
        sources = {t: s for t, s in calib_sources.items() if s}
        if not sources:
            raise MergeplanError(
                "tune: no held-out data: give tune.heldout.data {task: PATH} (task = a fine-tune's id), "
                "or calibration.data entries per fine-tune to split held-out samples from"
            )
    elif isinstance(heldout.data, str):
        sources = {Path(heldout.data).stem: heldout.data}
    else:
        sources = dict(heldout.data)
    if objective.kind == "loss" and not set(objective.weights) & set(sources):
        raise MergeplanError(f"tune.objective.loss weighs {', '.join(objective.weights)}, but the held-out tasks "
                             f"are {', '.join(sources)}: weigh at least one of them")
    # Calibration read the first `samples` records of every source it names (the base's
    # too): held-out samples of the same file, however its path is spelled, start after them.
    calibrated = set()
    if calib is not None:
        for src in ([calib.data] if isinstance(calib.data, str) else calib.data.values()):
            calibrated.add(_resolved(src, root) or src)
    seq_len = calib.seq_len if calib is not None else 512
    tok_dir = (root / calib.tokenizer) if calib is not None and calib.tokenizer else paths[recipe.base_model.name]
    tokenizer = load_tokenizer(tok_dir)
    skip = {t: (calib.samples if (_resolved(src, root) or src) in calibrated else 0) for t, src in sources.items()}
    # heldout.test: samples in the test split (default: as many as the search split; 0: none)
    n_test = heldout.samples if heldout.test is None else heldout.test
    search, test, notes = {}, {}, []
    for t, src in sources.items():
        search.update(load_eval_sets({t: src}, tokenizer, heldout.samples, seq_len, skip[t], root))
        got = len(search[t].samples)
        if got < heldout.samples:
            notes.append(f"tune: task {t} has only {got} held-out samples after the {skip[t]} calibration used")
        if n_test:
            try:
                test.update(load_eval_sets({t: src}, tokenizer, n_test, seq_len, skip[t] + got, root))
            except MergeplanError:
                notes.append(f"tune: task {t} has no samples left for a test split")
    if test and set(test) != set(search):
        notes.append("tune: the test split is left out: not every task has test samples")
        test = {}
    experts = {t: (t if t in ids else None) for t in sources}
    return HeldOutData(
        search=search, test=test, base_id=recipe.base_model.name, base_path=paths[recipe.base_model.name],
        experts=experts, expert_paths={e: paths[e] for e in experts.values() if e}, sources=sources,
        skip=skip, notes=notes,
    )
