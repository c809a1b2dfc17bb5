"""What a calibration measures, as a plain set of passes, derived from guide options.

The guide options split into two kinds:
  measurement options  change what the model passes compute:  lewis.wanda_prune,
                       lewis.wanda_sparsity, sens.per_sample, and which guides are on
  decision options     only change the math on the statistics: lewis.gamma/epsilon/scaling,
                       aim.omega, sens.temperature, sens.cross_task (off: the logit
                       distances are simply not used)
`Request.of(options)` keeps only the first kind. Statistics gathered for a request serve
every option set whose request is contained in it (`covers`): decide() on them gives
bit for bit what a fresh calibration for those options would give. LEWIS's fine-tune
statistics depend on how the fine-tune pass ran (alone, or inside Sens's gradient pass
with batches of one sample), so each way is its own entry and a union of requests may
run more than one pass over a fine-tune's data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

from mergeplan.guides.options import GuideOptions


# Guide options that change what the model passes compute (the rest change only the math).
MEASURED_OPTIONS = frozenset({("lewis", "wanda_prune"), ("lewis", "wanda_sparsity"), ("sens", "per_sample")})


@dataclass(frozen=True)
class Request:
    base_abs: bool = False  # AIM: |x| of the base on the AIM data
    # LEWIS variants measured on the base (per fine-tune data): None = plain x^2
    # statistics, a float = Wanda-pruned layer by layer at that sparsity
    base_lewis: frozenset = frozenset()
    ft_act: bool = False  # LEWIS without Sens: x^2 of each fine-tune on its own data, batched
    ft_wanda: frozenset = frozenset()  # LEWIS with pruning: sparsities measured on each fine-tune
    sens: frozenset = frozenset()  # Sens gradient passes: per_sample values
    sens_sq: frozenset = frozenset()  # per_sample values whose gradient pass also gathers x^2 (LEWIS)
    cross: frozenset = frozenset()  # per_sample values whose logit distances are measured

    @staticmethod
    def of(options: GuideOptions | Iterable[GuideOptions]) -> "Request":
        """The passes one option set needs, or the union over several (candidates of a search)."""
        if not isinstance(options, GuideOptions):
            out = Request()
            for o in options:
                out = out | Request.of(o)
            return out
        lw, sn = options.lewis, options.sens
        variant = (lw.wanda_sparsity if lw.wanda_prune else None) if lw else None
        plain_lewis = lw is not None and not lw.wanda_prune
        return Request(
            base_abs=options.aim is not None,
            base_lewis=frozenset([variant]) if lw else frozenset(),
            ft_act=plain_lewis and sn is None,
            ft_wanda=frozenset([variant]) if lw and lw.wanda_prune else frozenset(),
            sens=frozenset([sn.per_sample]) if sn else frozenset(),
            sens_sq=frozenset([sn.per_sample]) if sn and plain_lewis else frozenset(),
            cross=frozenset([sn.per_sample]) if sn and sn.cross_task else frozenset(),
        )

    def __or__(self, other: "Request") -> "Request":
        return Request(**{f.name: _join(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def covers(self, other: "Request") -> bool:
        """True when statistics gathered for self hold everything `other` needs."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, bool):
                if theirs and not mine:
                    return False
            elif not theirs <= mine:
                return False
        return True

    @property
    def lewis(self) -> bool:
        return bool(self.base_lewis)

    @property
    def finetunes(self) -> bool:
        return bool(self.ft_act or self.ft_wanda or self.sens)

    def describe(self) -> str:
        """One line for messages: what these statistics were gathered for."""
        parts = []
        if self.base_abs:
            parts.append("aim")
        for v in sorted(self.base_lewis, key=lambda x: -1.0 if x is None else x):
            parts.append("lewis" if v is None else f"lewis (wanda_prune, sparsity {v})")
        for p in sorted(self.sens):
            parts.append(f"sens (per_sample {str(p).lower()}{', cross_task' if p in self.cross else ''})")
        if self.ft_act and self.sens:
            parts.append("lewis without sens")
        return ", ".join(parts) or "no guide"


def _join(a, b):
    return (a or b) if isinstance(a, bool) else a | b


def union_options(options: Iterable[GuideOptions]) -> GuideOptions:
    """A GuideOptions with every guide some option set enables (which data each model needs)."""
    opts = list(options)
    pick = {n: next((getattr(o, n) for o in opts if getattr(o, n) is not None), None) for n in ("lewis", "aim", "sens")}
    # Absent guides are left out, not passed as None: the schema reads `lewis: null` in a
    # recipe as "lewis with its defaults".
    return GuideOptions(**{n: o for n, o in pick.items() if o is not None})
