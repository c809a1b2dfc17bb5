"""decide(): calibration statistics + guide options -> GuideDecisions. Pure: no model
pass, no file or device access, so one calibration serves any number of option sets.

    stats = mergeplan.calibrate.run.calibrate(options_or_candidates, settings, base, models, recipe_dir)
    dec = decide(stats, options, base_id, ids)

For options whose measurement needs the statistics cover (calibrate/request.py), the
decisions equal those of a fresh calibration with exactly those options, bit for bit,
the calibration record included, except its timings, which are the calibration's own,
and a `calibrated_for` entry when the statistics were gathered for more than the
options use. Options the statistics do not cover are an error naming what is missing.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mergeplan.calibrate.activations import ActivationStats
from mergeplan.calibrate.request import Request
from mergeplan.calibrate.stats import CalibStats
from mergeplan.errors import MergeplanError
from mergeplan.guides import aim as aim_math
from mergeplan.guides import lewis as lewis_math
from mergeplan.guides import sens as sens_math
from mergeplan.guides.base import GuideDecisions
from mergeplan.guides.needs import assign_sources, loads_base, loads_finetunes
from mergeplan.guides.options import GuideOptions


def check_compatible(stats: CalibStats, options: GuideOptions, base_id: str, ids: Sequence[str]) -> None:
    """MergeplanError unless `stats` can serve `options` for these models."""
    if base_id != stats.base_id or list(ids) != list(stats.ids):
        raise MergeplanError(
            f"the calibration statistics are for base {stats.base_id!r} and fine-tunes {', '.join(stats.ids)}, "
            f"not base {base_id!r} and {', '.join(ids)}; calibrate these models"
        )
    need = Request.of(options)
    if not stats.request.covers(need):
        raise MergeplanError(
            f"the calibration statistics were gathered for {stats.request.describe()}, but these guide options "
            f"need {need.describe()}; calibrate again for them (or for all candidates at once)"
        )


def decide(stats: CalibStats, options: GuideOptions, base_id: str, ids: Sequence[str]) -> GuideDecisions:
    """Per-tensor densities (LEWIS), relaxation (AIM) and coefficients (Sens) from statistics."""
    if not options.enabled():
        return GuideDecisions()
    check_compatible(stats, options, base_id, ids)
    ids = list(ids)
    o = options
    sources = assign_sources(stats.settings, base_id, ids, o)
    needed = list(dict.fromkeys([*sources.per_model.values(), *(sources.aim if o.aim else [])]))
    aim_srcs = sources.aim if o.aim else []
    lewis_srcs = list(dict.fromkeys(sources.per_model.values())) if o.lewis else []
    # Notes in the order a fresh calibration makes them: data, model structure, guides, passes.
    notes = list(sources.notes)
    for src in needed:
        notes.extend(stats.dataset_notes[src])
    if o.aim:
        notes.extend(stats.aim_site_notes)
    if o.sens:
        notes.extend(stats.tie_notes)
    dec = GuideDecisions()

    def merge_stats(ts: dict[str, dict[str, Any]]) -> None:
        for t, v in ts.items():
            dec.tensor_stats.setdefault(t, {}).update(v)

    base_sq: list[ActivationStats] = []
    ft_used: list[ActivationStats] = []
    passes: dict[tuple[str, str], ActivationStats] = {}  # (model, data) -> the statistics used
    if o.lewis:
        lw = o.lewis
        variant = lw.wanda_sparsity if lw.wanda_prune else None
        ft_kind = ("wanda", variant) if lw.wanda_prune else (("sens", o.sens.per_sample) if o.sens else "act")
        mods = list(stats.lin_tensors)  # LEWIS's linear modules, in model order
        score_base, score_ft = {}, {}
        for mid in ids:
            src = sources.per_model[mid]
            bst, bcs = stats.base_sq[(variant, src)], stats.base_col_sq[(variant, src)]
            fst = stats.finetune[(ft_kind, mid)]
            # NaN: an expert no token of this data reached (no density; the recipe's stays)
            score_base[mid] = {n: lewis_math.wanda_score(bcs[n], bst.mean("sq", n)) if bst.has(n) else np.nan
                               for n in mods}
            score_ft[mid] = {n: lewis_math.wanda_score(fst.col_sq[n], fst.mean("sq", n)) if fst.has(n) else np.nan
                             for n in mods}
            ft_used.append(fst)
            passes[(base_id, src)] = bst
            passes[(mid, src)] = fst
        r = lewis_math.decide(mods, score_base, score_ft, lw.gamma, lw.epsilon, lw.scaling, stats.stored,
                              stats.lin_tensors)
        dec.densities = r["densities"]
        merge_stats(r["tensor_stats"])
        dec.plan_stats["lewis"] = r["plan_stats"]
        vals = [v for per in r["densities"].values() for v in per.values()]
        dec.guides["lewis"] = {
            **o.as_record("lewis"),
            "summary": f"densities {min(vals):.3f}..{max(vals):.3f} on {len(r['densities'])} tensors "
            f"x {len(ids)} fine-tunes" if vals else "no decoder linear layers found",
        }
        order = lewis_srcs if lw.wanda_prune else [s for s in dict.fromkeys(aim_srcs + lewis_srcs) if s in lewis_srcs]
        base_sq = [stats.base_sq[(variant, s)] for s in order]
    base_abs: list[ActivationStats] = []
    if o.aim:
        base_abs = [stats.base_abs[s] for s in dict.fromkeys(aim_srcs)]
        pooled: ActivationStats | None = None
        for st in base_abs:
            pooled = st if pooled is None else pooled.add(st)
        mean_abs = {n: pooled.mean("abs", n) for n in stats.aim_sites if pooled.has(n)}
        for s_, st in zip(dict.fromkeys(aim_srcs), base_abs):
            passes.setdefault((base_id, s_), st)
        r = aim_math.decide(stats.aim_sites, mean_abs, o.aim.omega)
        dec.relax = r["relax"]
        merge_stats(r["tensor_stats"])
        dec.plan_stats["aim"] = r["plan_stats"]
        notes.extend(r["notes"])
        mf = r["plan_stats"]["mean_factor"]
        dec.guides["aim"] = {
            **o.as_record("aim"),
            "summary": f"{len(r['relax'])} tensors relaxed; mean factor {float(mf.mean()):.3f}"
            if mf.size else "nothing relaxed",
        }
    if o.sens:
        p = o.sens.per_sample
        groups = sens_math.group_order(set(stats.tensor_groups.values()))
        S = np.zeros((len(ids), len(groups)))
        col = {g: j for j, g in enumerate(groups)}
        for i, mid in enumerate(ids):
            for name, v in stats.sens_S[(p, mid)].items():
                g = stats.param_groups.get(name)
                if g is not None:
                    S[i, col[g]] += v
        g = stats.logit_g[p] if o.sens.cross_task else None
        r = sens_math.decide(ids, groups, S, g, o.sens.temperature, stats.tensor_groups)
        dec.weights = r["weights"]
        merge_stats(r["tensor_stats"])
        dec.plan_stats["sens"] = r["plan_stats"]
        coefs = np.stack([r["plan_stats"]["coefficient"][m] for m in ids])
        dec.guides["sens"] = {
            **o.as_record("sens"),
            "summary": f"coefficients K*sigma {coefs.min():.3f}..{coefs.max():.3f} over {len(groups)} groups; "
            + "tau " + ", ".join(f"{m}={r['plan_stats']['tau'][m]:.3f}" for m in ids),
        }
    for st in [*base_abs, *base_sq, *ft_used]:
        notes.extend(st.notes)
    dec.calibration = _record(stats, o, sources, needed, notes)
    if stats.expert_tensors:
        dec.calibration["expert_tokens"] = _expert_tokens(stats, passes)
    return dec


def _expert_tokens(stats: CalibStats, passes: dict[tuple[str, str], ActivationStats]) -> dict[str, dict[str, int]]:
    """Tokens routed to each expert's weight, per "<model> on <data>" pass (0: none reached it)."""
    return {
        f"{mid} on {stats.dataset_keys.get(src, src)}": {
            t: int(st.count.get(n, 0)) for n, t in stats.expert_tensors.items() if n in st.count
        }
        for (mid, src), st in passes.items()
    }


def _record(stats: CalibStats, o: GuideOptions, sources, needed: list[str], notes: list[str]) -> dict[str, Any]:
    """The plan's calibration record, as a fresh calibration for `o` writes it."""
    loaded = ([stats.base_id] if loads_base(o) else []) + (stats.ids if loads_finetunes(o) else [])
    rec = {
        **stats.settings.as_record(),
        "resolved_device": stats.resolved_device,
        "placement": {m: v for m, v in stats.placement.items() if m in loaded},
        "compute_dtype": {m: v for m, v in stats.dtypes.items() if m in loaded},
        "data_for": dict(sources.per_model),
        "aim_data": list(sources.aim) if o.aim else [],
        "datasets": {src: stats.datasets[src] for src in needed},
        "timings_s": {m: v for m, v in stats.timings.items() if m in loaded},
        "notes": list(dict.fromkeys(notes)),
    }
    if o.sens and o.sens.cross_task:
        rec["logit_store_peak_bytes"] = stats.logit_peak[o.sens.per_sample]
    if stats.request != Request.of(o):
        rec["calibrated_for"] = stats.request.describe()
    return rec
