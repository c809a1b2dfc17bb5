"""Which models each guide calibrates, and which calibration data each of those models needs.

    lewis: the base on each fine-tune's data and each fine-tune on its own data (x^2, Wanda)
    aim:   the base only, on the base's data (|x|); without a base entry, on the fine-tunes'
           data pooled (docs/guides.md)
    sens:  each fine-tune: gradients on its own data, logits on the other tasks' data

run.py loads a model only when a guide here needs its statistics: an AIM-only recipe never
opens a fine-tune for calibration, and a guide missing data for a model it measures is a
one-line error that names the guide, the model and the entry to add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergeplan.calibrate.settings import CalibrationSettings
from mergeplan.errors import MergeplanError
from mergeplan.guides.options import GuideOptions

BASE_GUIDES = ("lewis", "aim")  # guides that measure the base
FINETUNE_GUIDES = ("lewis", "sens")  # guides that measure every fine-tune on its own data


def _on(opts: GuideOptions, names: tuple[str, ...]) -> list[str]:
    return [g for g in names if getattr(opts, g)]


def loads_base(opts: GuideOptions) -> bool:
    return bool(_on(opts, BASE_GUIDES))


def loads_finetunes(opts: GuideOptions) -> bool:
    return bool(_on(opts, FINETUNE_GUIDES))


@dataclass
class Sources:
    per_model: dict[str, str]  # fine-tune id -> its task data (LEWIS, Sens); empty when neither runs
    aim: list[str]  # data AIM pools over the base
    notes: list[str] = field(default_factory=list)


def assign_sources(s: CalibrationSettings, base_id: str, ids: list[str], opts: GuideOptions) -> Sources:
    """The data each measured model reads; MergeplanError when a guide's model has none."""
    task_guides = _on(opts, FINETUNE_GUIDES)
    if isinstance(s.data, str):
        return Sources({i: s.data for i in ids} if task_guides else {}, [s.data])
    known = [base_id, *ids]
    for k in s.data:
        if k not in known:
            raise MergeplanError(
                f"calibration.data names {k!r}, which is not a model of this recipe; models: {', '.join(known)}"
            )
    per: dict[str, str] = {}
    if task_guides:
        for i in ids:
            if i not in s.data:
                who = " and ".join(f"guides.{g}" for g in task_guides)
                raise MergeplanError(
                    f"{who} measures fine-tune {i!r} on its own task data, but calibration.data has no entry "
                    f"for fine-tune {i!r}; add `{i}: PATH` under calibration.data (or give one data path for all)"
                )
            per[i] = s.data[i]
    notes: list[str] = []
    aim: list[str] = []
    if base_id in s.data:
        aim = [s.data[base_id]]
    elif opts.aim:
        # Pool whatever fine-tune data the recipe names, whether or not another guide uses it.
        aim = list(dict.fromkeys(s.data[i] for i in ids if i in s.data))
        if not aim:
            raise MergeplanError(
                f"guides.aim measures the base model {base_id!r}, but calibration.data has no entry for it; "
                f"add `{base_id}: PATH` under calibration.data (the base's data)"
            )
        notes.append("aim: no base entry in calibration.data; pooled the fine-tunes' data over the base")
    return Sources(per, aim, notes)
