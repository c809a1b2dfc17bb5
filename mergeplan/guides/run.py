"""run_guides: calibrate the models the guides need, one resident at a time, and decide.

Order of work (each model loaded once; twice for the base only when LEWIS's Wanda pruning
must see several data sets, because pruning changes the weights):
  base:        forward passes over the AIM data (|x|) and each fine-tune's data (x^2, LEWIS)
  fine-tune i: over its own data: x^2 (LEWIS), forward+backward per sample (Sens), logits;
               over the other tasks' data: logits only (Sens cross-task distances)
A model no enabled guide measures is never loaded (needs.py): AIM alone runs the base only,
Sens alone the fine-tunes only. Then the pure guide math (lewis.py, aim.py, sens.py) turns
the statistics into decisions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mergeplan.calibrate.activations import ActivationStats, column_sq_norms
from mergeplan.calibrate.data import CalibSet, load_calib_set
from mergeplan.calibrate.layerwise import layerwise_wanda
from mergeplan.calibrate.logits import LogitStore, distance_sum
from mergeplan.calibrate.models import (
    base_vocab_size,
    check_vocabulary,
    compute_dtype,
    input_device,
    load_model,
    load_tokenizer,
    release,
    resolve_device,
)
from mergeplan.calibrate.modules import (
    Site,
    check_names,
    decoder_layers,
    linear_sites,
    site_module,
    site_modules,
    stored_tensor_names,
    weighted_sites,
)
from mergeplan.calibrate.passes import activation_pass, logits_pass, sensitivity_pass
from mergeplan.calibrate.progress import CalibProgress
from mergeplan.calibrate.settings import CalibrationSettings, parse_calibration
from mergeplan.errors import MergeplanError
from mergeplan.guides import aim as aim_math
from mergeplan.guides import lewis as lewis_math
from mergeplan.guides import sens as sens_math
from mergeplan.guides.base import GuideDecisions, ModelInput
from mergeplan.guides.needs import Sources, assign_sources, loads_finetunes
from mergeplan.guides.options import GuideOptions, parse_guides


class _LogitBook:
    """Which logits to keep on disk and which distances to accumulate, for g_ij on task j's data."""

    def __init__(self, ids: list[str], src: dict[str, str], sets: dict[str, CalibSet], width: int | None = None):
        self.ids, self.src, self.sets = ids, src, sets
        self.width = width  # the base's vocabulary: fine-tunes that added tokens are compared on it
        self.store = LogitStore()
        self.dsum: dict[tuple[str, str, str], float] = {}  # (model a, model b, data) with a < b by order
        self.rank = {m: i for i, m in enumerate(ids)}
        self.remaining: dict[tuple[str, str], set[str]] = {}

    def datasets_for(self, m: str) -> list[str]:
        return list(dict.fromkeys([self.src[m]] + [self.src[o] for o in self.ids if o != m]))

    def partners(self, m: str, d: str) -> list[str]:
        return [o for o in self.ids if o != m and (self.src[o] == d or self.src[m] == d)]

    def sink(self, m: str, d: str):
        """A LogitSink for model m's logits on data d: compare with earlier partners, store for later ones."""
        earlier = [o for o in self.partners(m, d) if self.rank[o] < self.rank[m]]
        later = {o for o in self.partners(m, d) if self.rank[o] > self.rank[m]}
        cs = self.sets[d]
        offsets = np.cumsum([0] + [len(s) for s in cs.samples])
        starts: list[int] = []
        key = (m, d)
        state = {"row": 0}

        def take(_b: int, logits: torch.Tensor) -> None:
            if self.width is not None:
                logits = logits[:, : self.width]
            n = logits.shape[0]
            start = state["row"]
            if later and not self.store.has(key):
                self.store.create(key, int(offsets[-1]), logits.shape[-1])
            for o in earlier:
                k = (o, m, d) if self.rank[o] < self.rank[m] else (m, o, d)
                self.dsum[k] = self.dsum.get(k, 0.0) + distance_sum(logits, self.store.read((o, d), start, start + n))
            if later:
                self.store.write(key, start, logits)
            state["row"] = start + n
            starts.append(start)

        def done() -> None:
            if later:
                self.store.finish(key)
                self.remaining[key] = later
            for o in earlier:
                left = self.remaining.get((o, d))
                if left is not None:
                    left.discard(m)
                    if not left:
                        self.store.drop((o, d))
                        del self.remaining[(o, d)]

        return take, done

    def matrix(self) -> np.ndarray:
        K = len(self.ids)
        g = np.zeros((K, K))
        for i, a in enumerate(self.ids):
            for j, b in enumerate(self.ids):
                if i == j:
                    continue
                d = self.src[b]
                k = (a, b, d) if self.rank[a] < self.rank[b] else (b, a, d)
                g[i, j] = self.dsum[k] / self.sets[d].tokens
        return g


def _weights_of(model: torch.nn.Module, sites: Mapping[str, Site]) -> dict[str, torch.nn.Module]:
    return site_modules(model, sites)


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
    opts = parse_guides(guides)
    if not opts.enabled():
        return GuideDecisions()
    recipe_dir = Path(recipe_dir)
    settings = parse_calibration(calibration, recipe_dir)
    models = list(models)
    ids = [m.id for m in models]
    if not models:
        raise MergeplanError("guides need at least one fine-tune besides the base model")
    if len(set(ids)) != len(ids) or base.id in ids:
        raise MergeplanError(f"model ids must be distinct (base {base.id!r}, fine-tunes {ids})")
    if opts.sens and len(models) < 2:
        raise MergeplanError(
            "guides.sens balances fine-tunes against each other and needs at least two; "
            "drop sens for a single fine-tune"
        )
    sources = assign_sources(settings, base.id, ids, opts)
    # Only models some guide measures are loaded (needs.py): AIM alone runs the base only.
    measured = models if loads_finetunes(opts) else []
    dev = resolve_device(device if device and device != "auto" else settings.device)
    tok_dir = (recipe_dir / settings.tokenizer) if settings.tokenizer else Path(base.path)
    tokenizer = load_tokenizer(tok_dir)
    vocab = tokenizer.get_vocab()
    vsize = base_vocab_size(base.path)
    if vsize is not None and len(tokenizer) > vsize:
        raise MergeplanError(
            f"the tokenizer in {tok_dir} has {len(tokenizer)} tokens but the base model only {vsize}; "
            "use the base model's own tokenizer"
        )
    # Every fine-tune, run or not: these read config and tokenizer files, not weights, and a
    # merge needs one vocabulary even when AIM alone calibrates.
    for m in models:
        check_vocabulary(m.id, Path(m.path), vsize, vocab)

    needed = list(dict.fromkeys([*sources.per_model.values(), *(sources.aim if opts.aim else [])]))
    sets = {src: load_calib_set(src, recipe_dir, tokenizer, settings.samples, settings.seq_len) for src in needed}
    stored = stored_tensor_names(base.path)
    notes = list(sources.notes)
    for cs in sets.values():
        notes.extend(cs.notes)

    run = _Run(opts, settings, sources, sets, stored, dev, notes)
    run.vocab_size = vsize
    with CalibProgress(quiet) as progress:
        run.progress = progress
        run.base_phase(base)
        try:
            for m in measured:
                run.finetune_phase(m, ids)
        finally:
            if run.book is not None:
                run.book.store.close()
    return run.decide(base, ids)


class _Run:
    def __init__(self, opts, settings, sources, sets, stored, dev, notes):
        self.opts: GuideOptions = opts
        self.settings: CalibrationSettings = settings
        self.sources: Sources = sources
        self.sets: dict[str, CalibSet] = sets
        self.stored: set[str] = stored
        self.dev: torch.device = dev
        self.notes: list[str] = notes
        self.progress: CalibProgress | None = None
        self.timings: dict[str, float] = {}
        self.placement: dict[str, str] = {}
        self.dtypes: dict[str, str] = {}
        self.base_abs: dict[str, ActivationStats] = {}  # data -> base statistics for AIM
        self.base_sq: dict[str, ActivationStats] = {}  # data -> base statistics for LEWIS
        self.base_col_sq: dict[str, dict[str, np.ndarray]] = {}  # data -> module -> col_sq
        self.lin: dict[str, Site] = {}
        self.aim_sites: dict[str, tuple[str, int, int]] = {}
        self.ft_stats: dict[str, ActivationStats] = {}
        self.sens_S: dict[str, dict[str, float]] = {}
        self.tensor_groups: dict[str, str] = {}
        self.param_groups: dict[str, str] = {}
        self.expert_tensors: dict[str, str] = {}  # expert site -> stored weight (MoE models)
        self.book: _LogitBook | None = None
        self.vocab_size: int | None = None

    # -- helpers -------------------------------------------------------------------------
    def _load(self, m: ModelInput) -> torch.nn.Module:
        dtype = compute_dtype(self.settings.dtype, self.dev, Path(m.path))
        model, placement = load_model(Path(m.path), self.dev, dtype)
        self.placement[m.id] = placement
        self.dtypes[m.id] = str(dtype).replace("torch.", "")
        return model

    def _batches(self, src: str, size: int | None = None):
        return self.sets[src].batches(size or self.settings.batch_size)

    def _task(self, desc: str, total: int):
        return self.progress.task(desc, total)

    # -- base ----------------------------------------------------------------------------
    def base_phase(self, base: ModelInput) -> None:
        o = self.opts
        lewis_srcs = list(dict.fromkeys(self.sources.per_model.values())) if o.lewis else []
        aim_srcs = self.sources.aim if o.aim else []
        if not (lewis_srcs or aim_srcs):
            return
        t0 = time.perf_counter()
        model = self._load(base)
        dev = input_device(model)
        try:
            sites: dict[str, Site] = {}
            if o.lewis:
                self.lin = linear_sites(model, self.stored)
                sites.update(self.lin)
            if o.aim:
                wsites, wnotes = weighted_sites(model, self.stored)
                self.notes.extend(wnotes)
                sites.update(wsites)
                self.aim_sites = {
                    n: (s.tensor, s.axis, site_module(model, s).weight.shape[s.axis]) for n, s in wsites.items()
                }
            check_names(sites, self.stored, Path(base.path))
            self.expert_tensors = {n: s.tensor for n, s in sites.items() if s.expert is not None}
            prune = bool(o.lewis and o.lewis.wanda_prune)
            for src in dict.fromkeys(aim_srcs + lewis_srcs):
                kinds = tuple(k for k, on in (("abs", src in aim_srcs), ("sq", src in lewis_srcs and not prune)) if on)
                if not kinds:
                    continue
                mods = _weights_of(model, sites if "abs" in kinds else self.lin)
                batches = self._batches(src)
                with self._task(f"{base.id} (base) · {self.sets[src].key}", len(batches)) as adv:
                    st = activation_pass(model, mods, kinds, batches, dev, base.id, adv)
                if "abs" in kinds:
                    self.base_abs[src] = st
                if "sq" in kinds:
                    self.base_sq[src] = st
            if o.lewis:
                col_sq = {n: column_sq_norms(site_module(model, s).weight, s.axis) for n, s in self.lin.items()}
                for src in lewis_srcs:
                    self.base_col_sq[src] = col_sq
            if prune:
                for k, src in enumerate(lewis_srcs):
                    if k:  # the previous pass pruned the weights: start again from the stored ones
                        model = None
                        release(self.dev)
                        model = self._load(base)
                    st = self._wanda(model, src, base.id)
                    self.base_sq[src] = st
                    self.base_col_sq[src] = st.col_sq
        finally:
            model = None
            release(self.dev)
        self.timings[base.id] = round(time.perf_counter() - t0, 3)

    def _wanda(self, model, src: str, label: str) -> ActivationStats:
        batches = self._batches(src)
        with self._task(f"{label} · wanda blocks · {self.sets[src].key}", len(decoder_layers(model)[1])) as adv:
            return layerwise_wanda(
                model, self.lin, batches, input_device(model), self.opts.lewis.wanda_sparsity, label, adv
            )

    def _groups(self, model: torch.nn.Module, S: dict[str, float]) -> dict[str, str]:
        """Stored tensor -> Sens layer group; a tied head joins the embeddings' group. Also sets
        param_groups (loaded parameter -> group), which may differ from the stored names
        (GPT-NeoX's head, transformers 5's fused experts: see mergeplan/arch.py)."""
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        self.param_groups = {p: sens_math.group_of(p, tied) for p in S}
        present = set(self.param_groups.values())
        groups = {t: g for t in self.stored if (g := sens_math.group_of(t, tied)) in present}
        if tied:
            self.notes.append("sens: the head is tied to the embeddings; both are in the 'embed' group")
            head_name = next((n for n, mod in model.named_modules() if mod is head), None)
            if head_name and f"{head_name}.weight" in self.stored:
                groups[f"{head_name}.weight"] = "embed"
        return groups

    # -- fine-tunes ----------------------------------------------------------------------
    def finetune_phase(self, m: ModelInput, ids: list[str]) -> None:
        o = self.opts
        cross = bool(o.sens and o.sens.cross_task)
        if cross and self.book is None:
            self.book = _LogitBook(ids, self.sources.per_model, self.sets, self.vocab_size)
        t0 = time.perf_counter()
        model = self._load(m)
        dev = input_device(model)
        try:
            own = self.sources.per_model[m.id]
            prune = bool(o.lewis and o.lewis.wanda_prune)
            lin = _weights_of(model, self.lin) if (o.lewis and not prune) else None
            if o.lewis:
                col_sq = {n: column_sq_norms(site_module(model, s).weight, s.axis) for n, s in self.lin.items()}
            sinks = {}
            if cross:
                sinks = {d: self.book.sink(m.id, d) for d in self.book.datasets_for(m.id)}
            own_sink = sinks[own][0] if own in sinks else None
            if o.sens:
                batches = self._batches(own, 1 if o.sens.per_sample else None)
                with self._task(f"{m.id} · gradients · {self.sets[own].key}", len(batches)) as adv:
                    S, st = sensitivity_pass(model, batches, dev, m.id, lin, ("sq",), own_sink, adv)
                self.sens_S[m.id] = S
                if not self.tensor_groups:
                    self.tensor_groups = self._groups(model, S)
            elif lin is not None:
                batches = self._batches(own)
                with self._task(f"{m.id} · {self.sets[own].key}", len(batches)) as adv:
                    st = activation_pass(model, lin, ("sq",), batches, dev, m.id, adv)
            else:
                st = None
            if own in sinks:
                sinks[own][1]()
            for d, (take, done) in sinks.items():
                if d == own:
                    continue
                batches = self._batches(d)
                with self._task(f"{m.id} · logits · {self.sets[d].key}", len(batches)) as adv:
                    logits_pass(model, batches, dev, take, m.id, adv)
                done()
            if prune:
                st = self._wanda(model, own, m.id)
                col_sq = st.col_sq
            if o.lewis:
                st.col_sq = col_sq
                self.ft_stats[m.id] = st
        finally:
            model = None
            release(self.dev)
        self.timings[m.id] = round(time.perf_counter() - t0, 3)

    def _expert_tokens(self, base_id: str) -> dict[str, dict[str, int]]:
        """Tokens routed to each expert's weight, per "<model> on <data>" pass (0: none reached it)."""
        passes = {(base_id, src): st for src, st in [*self.base_abs.items(), *self.base_sq.items()]}
        passes.update({(mid, self.sources.per_model[mid]): st for mid, st in self.ft_stats.items()})
        return {
            f"{mid} on {self.sets[src].key}": {t: int(st.count.get(n, 0)) for n, t in self.expert_tensors.items()
                                               if n in st.count}
            for (mid, src), st in passes.items()
        }

    # -- decisions -----------------------------------------------------------------------
    def decide(self, base: ModelInput, ids: list[str]) -> GuideDecisions:
        o = self.opts
        dec = GuideDecisions()

        def merge_stats(ts: dict[str, dict[str, Any]]) -> None:
            for t, v in ts.items():
                dec.tensor_stats.setdefault(t, {}).update(v)

        if o.lewis:
            mods = list(self.lin)
            score_base = {}
            score_ft = {}
            for mid in ids:
                src = self.sources.per_model[mid]
                bst, bcs = self.base_sq[src], self.base_col_sq[src]
                fst = self.ft_stats[mid]
                # NaN: an expert no token of this data reached (no density; the recipe's stays)
                score_base[mid] = {n: lewis_math.wanda_score(bcs[n], bst.mean("sq", n)) if bst.has(n) else np.nan
                                   for n in mods}
                score_ft[mid] = {n: lewis_math.wanda_score(fst.col_sq[n], fst.mean("sq", n)) if fst.has(n) else np.nan
                                 for n in mods}
            lw = o.lewis
            r = lewis_math.decide(mods, score_base, score_ft, lw.gamma, lw.epsilon, lw.scaling, self.stored,
                                  {n: s.tensor for n, s in self.lin.items()})
            dec.densities = r["densities"]
            merge_stats(r["tensor_stats"])
            dec.plan_stats["lewis"] = r["plan_stats"]
            vals = [v for per in r["densities"].values() for v in per.values()]
            dec.guides["lewis"] = {
                **o.as_record("lewis"),
                "summary": f"densities {min(vals):.3f}..{max(vals):.3f} on {len(r['densities'])} tensors "
                f"x {len(ids)} fine-tunes" if vals else "no decoder linear layers found",
            }
        if o.aim:
            pooled: ActivationStats | None = None
            for src in self.sources.aim:
                st = self.base_abs[src]
                pooled = st if pooled is None else pooled.add(st)
            mean_abs = {n: pooled.mean("abs", n) for n in self.aim_sites if pooled.has(n)}
            r = aim_math.decide(self.aim_sites, mean_abs, o.aim.omega)
            dec.relax = r["relax"]
            merge_stats(r["tensor_stats"])
            dec.plan_stats["aim"] = r["plan_stats"]
            self.notes.extend(r["notes"])
            mf = r["plan_stats"]["mean_factor"]
            dec.guides["aim"] = {
                **o.as_record("aim"),
                "summary": f"{len(r['relax'])} tensors relaxed; mean factor {float(mf.mean()):.3f}"
                if mf.size else "nothing relaxed",
            }
        if o.sens:
            groups = sens_math.group_order(set(self.tensor_groups.values()))
            S = np.zeros((len(ids), len(groups)))
            col = {g: j for j, g in enumerate(groups)}
            for i, mid in enumerate(ids):
                for p, v in self.sens_S[mid].items():
                    g = self.param_groups.get(p)
                    if g is not None:
                        S[i, col[g]] += v
            g = self.book.matrix() if self.book is not None else None
            r = sens_math.decide(ids, groups, S, g, o.sens.temperature, self.tensor_groups)
            dec.weights = r["weights"]
            merge_stats(r["tensor_stats"])
            dec.plan_stats["sens"] = r["plan_stats"]
            coefs = np.stack([r["plan_stats"]["coefficient"][m] for m in ids])
            dec.guides["sens"] = {
                **o.as_record("sens"),
                "summary": f"coefficients K*sigma {coefs.min():.3f}..{coefs.max():.3f} over {len(groups)} groups; "
                + "tau " + ", ".join(f"{m}={r['plan_stats']['tau'][m]:.3f}" for m in ids),
            }
        for st in [*self.base_abs.values(), *self.base_sq.values(), *self.ft_stats.values()]:
            self.notes.extend(st.notes)
        dec.calibration = {
            **self.settings.as_record(),
            "resolved_device": str(self.dev),
            "placement": self.placement,
            "compute_dtype": self.dtypes,
            "data_for": dict(self.sources.per_model),
            "aim_data": list(self.sources.aim) if self.opts.aim else [],
            "datasets": {src: cs.record() for src, cs in self.sets.items()},
            "timings_s": self.timings,
            "notes": list(dict.fromkeys(self.notes)),
        }
        if self.book is not None:
            dec.calibration["logit_store_peak_bytes"] = self.book.store.bytes_peak
        if self.expert_tensors:
            dec.calibration["expert_tokens"] = self._expert_tokens(base.id)
        return dec


