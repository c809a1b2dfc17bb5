"""calibrate(): the one entry point of calibration. Model passes in, CalibStats out.

    stats = calibrate(options, settings, base, models, recipe_dir, device="auto", quiet=False)
    decisions = guides.decide.decide(stats, options, base.id, [m.id for m in models])

`options` is one GuideOptions, or several (the candidates of a search): the statistics
then cover every one of them (Request.of takes the union), and decide() on each gives
what a fresh calibration for that option set would give, bit for bit.

Order of work (each model loaded once; again only when Wanda pruning must start from the
stored weights):
  base:        forward passes over the AIM data (|x|) and each fine-tune's data (x^2, LEWIS)
  fine-tune i: over its own data: x^2 (LEWIS), forward+backward per sample (Sens), logits;
               over the other tasks' data: logits only (Sens cross-task distances)
A model no requested statistic needs is never loaded: AIM alone runs the base only, Sens
alone the fine-tunes only (guides/needs.py names which data each model reads).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mergeplan.calibrate.activations import ActivationStats, column_sq_norms
from mergeplan.calibrate.data import CalibSet, load_calib_set
from mergeplan.calibrate.layerwise import layerwise_wanda
from mergeplan.calibrate.logitbook import LogitBook
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
from mergeplan.calibrate.request import Request, union_options
from mergeplan.calibrate.settings import CalibrationSettings
from mergeplan.calibrate.stats import CalibStats
from mergeplan.errors import MergeplanError
from mergeplan.guides import sens as sens_math
from mergeplan.guides.base import ModelInput
from mergeplan.guides.needs import assign_sources
from mergeplan.guides.options import GuideOptions


def calibrate(
    options: GuideOptions | Iterable[GuideOptions],
    settings: CalibrationSettings,
    base: ModelInput,
    models: Sequence[ModelInput],
    recipe_dir: Path,
    device: str = "auto",
    quiet: bool = False,
) -> CalibStats:
    """Run the model passes the guide options need. `device` ("auto" or a torch device
    string) overrides settings.device unless it is "auto". Raises MergeplanError for any
    bad input (data, vocabulary, model structure, non-finite values)."""
    opts = [options] if isinstance(options, GuideOptions) else list(options)
    union = union_options(opts)
    request = Request.of(opts)
    models = list(models)
    ids = [m.id for m in models]
    if not union.enabled():
        raise MergeplanError("calibrate: no guide is enabled, so there is nothing to measure")
    if not models:
        raise MergeplanError("guides need at least one fine-tune besides the base model")
    if len(set(ids)) != len(ids) or base.id in ids:
        raise MergeplanError(f"model ids must be distinct (base {base.id!r}, fine-tunes {ids})")
    if union.sens and len(models) < 2:
        raise MergeplanError(
            "guides.sens balances fine-tunes against each other and needs at least two; "
            "drop sens for a single fine-tune"
        )
    recipe_dir = Path(recipe_dir)
    sources = assign_sources(settings, base.id, ids, union)
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

    needed = list(dict.fromkeys([*sources.per_model.values(), *(sources.aim if union.aim else [])]))
    sets = {src: load_calib_set(src, recipe_dir, tokenizer, settings.samples, settings.seq_len) for src in needed}
    stats = CalibStats(
        vocab_size=vsize,
        request=request, settings=settings, base_id=base.id, ids=ids,
        paths={m.id: str(m.path) for m in [base, *models]}, per_model=dict(sources.per_model),
        resolved_device=str(dev),
        datasets={src: cs.record() for src, cs in sets.items()},
        dataset_notes={src: list(cs.notes) for src, cs in sets.items()},
        dataset_keys={src: cs.key for src, cs in sets.items()},
        stored=stored_tensor_names(base.path),
    )
    run = _Passes(stats, sets, sources.aim if union.aim else [], dev)
    with CalibProgress(quiet) as progress:
        run.progress = progress
        run.base_phase(base)
        try:
            if request.finetunes:
                for m in models:
                    run.finetune_phase(m)
        finally:
            for book in run.books.values():
                book.store.close()
    for p, book in run.books.items():
        stats.logit_g[p] = book.matrix()
        stats.logit_peak[p] = book.store.bytes_peak
    return stats


class _Passes:
    def __init__(self, stats: CalibStats, sets: dict[str, CalibSet], aim_srcs: list[str], dev: torch.device):
        self.stats = stats
        self.req: Request = stats.request
        self.settings: CalibrationSettings = stats.settings
        self.sets = sets
        self.aim_srcs = aim_srcs
        self.dev = dev
        self.progress: CalibProgress | None = None
        self.lin: dict[str, Site] = {}
        self.books: dict[bool, LogitBook] = {}  # per_sample -> its cross-task logit book

    # -- helpers -------------------------------------------------------------------------
    def _load(self, m: ModelInput) -> torch.nn.Module:
        dtype = compute_dtype(self.settings.dtype, self.dev, Path(m.path))
        model, placement = load_model(Path(m.path), self.dev, dtype)
        self.stats.placement[m.id] = placement
        self.stats.dtypes[m.id] = str(dtype).replace("torch.", "")
        return model

    def _batches(self, src: str, size: int | None = None):
        return self.sets[src].batches(size or self.settings.batch_size)

    def _task(self, desc: str, total: int):
        return self.progress.task(desc, total)

    def _wanda(self, model, src: str, label: str, sparsity: float) -> ActivationStats:
        batches = self._batches(src)
        with self._task(f"{label} · wanda blocks · {self.sets[src].key}", len(decoder_layers(model)[1])) as adv:
            return layerwise_wanda(model, self.lin, batches, input_device(model), sparsity, label, adv)

    # -- base ----------------------------------------------------------------------------
    def base_phase(self, base: ModelInput) -> None:
        r, st = self.req, self.stats
        lewis_srcs = list(dict.fromkeys(st.per_model.values())) if r.lewis else []
        aim_srcs = self.aim_srcs if r.base_abs else []
        if not (lewis_srcs or aim_srcs):
            return
        t0 = time.perf_counter()
        model = self._load(base)
        dev = input_device(model)
        try:
            sites: dict[str, Site] = {}
            if r.lewis:
                self.lin = linear_sites(model, st.stored)
                st.lin_tensors = {n: s.tensor for n, s in self.lin.items()}
                sites.update(self.lin)
            if r.base_abs:
                wsites, wnotes = weighted_sites(model, st.stored)
                st.aim_site_notes = list(wnotes)
                sites.update(wsites)
                st.aim_sites = {
                    n: (s.tensor, s.axis, site_module(model, s).weight.shape[s.axis]) for n, s in wsites.items()
                }
            check_names(sites, st.stored, Path(base.path))
            st.expert_tensors = {n: s.tensor for n, s in sites.items() if s.expert is not None}
            plain = None in r.base_lewis
            for src in dict.fromkeys(aim_srcs + lewis_srcs):
                kinds = tuple(k for k, on in (("abs", src in aim_srcs), ("sq", src in lewis_srcs and plain)) if on)
                if not kinds:
                    continue
                mods = site_modules(model, sites if "abs" in kinds else self.lin)
                batches = self._batches(src)
                with self._task(f"{base.id} (base) · {self.sets[src].key}", len(batches)) as adv:
                    got = activation_pass(model, mods, kinds, batches, dev, base.id, adv)
                if "abs" in kinds:
                    st.base_abs[src] = got
                if "sq" in kinds:
                    st.base_sq[(None, src)] = got
            if plain:
                col_sq = {n: column_sq_norms(site_module(model, s).weight, s.axis) for n, s in self.lin.items()}
                for src in lewis_srcs:
                    st.base_col_sq[(None, src)] = col_sq
            first = True
            for sparsity in sorted(v for v in r.base_lewis if v is not None):
                for src in lewis_srcs:
                    if not first:  # the previous pass pruned the weights: start again from the stored ones
                        model = None
                        release(self.dev)
                        model = self._load(base)
                    first = False
                    got = self._wanda(model, src, base.id, sparsity)
                    st.base_sq[(sparsity, src)] = got
                    st.base_col_sq[(sparsity, src)] = got.col_sq
        finally:
            model = None
            release(self.dev)
        st.timings[base.id] = round(time.perf_counter() - t0, 3)

    def _groups(self, model: torch.nn.Module, S: dict[str, float]) -> dict[str, str]:
        """Stored tensor -> Sens layer group; a tied head joins the embeddings' group. Also sets
        param_groups (loaded parameter -> group), which may differ from the stored names
        (GPT-NeoX's head, transformers 5's fused experts: see mergeplan/arch.py)."""
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        stored = self.stats.stored
        self.stats.param_groups = {p: sens_math.group_of(p, tied) for p in S}
        present = set(self.stats.param_groups.values())
        groups = {t: g for t in stored if (g := sens_math.group_of(t, tied)) in present}
        if tied:
            self.stats.tie_notes = ["sens: the head is tied to the embeddings; both are in the 'embed' group"]
            head_name = next((n for n, mod in model.named_modules() if mod is head), None)
            if head_name and f"{head_name}.weight" in stored:
                groups[f"{head_name}.weight"] = "embed"
        return groups

    # -- fine-tunes ----------------------------------------------------------------------
    def finetune_phase(self, m: ModelInput) -> None:
        r, st = self.req, self.stats
        t0 = time.perf_counter()
        model = self._load(m)
        dev = input_device(model)
        try:
            own = st.per_model[m.id]
            col_sq = None
            if r.ft_act or r.sens_sq:
                col_sq = {n: column_sq_norms(site_module(model, s).weight, s.axis) for n, s in self.lin.items()}
            for per_sample in sorted(r.sens):
                self._sens_pass(model, dev, m, own, per_sample, col_sq)
            if r.ft_act:
                batches = self._batches(own)
                with self._task(f"{m.id} · {self.sets[own].key}", len(batches)) as adv:
                    got = activation_pass(model, site_modules(model, self.lin), ("sq",), batches, dev, m.id, adv)
                got.col_sq = col_sq
                st.finetune[("act", m.id)] = got
            for k, sparsity in enumerate(sorted(r.ft_wanda)):
                if k:  # pruned by the previous sparsity: start again from the stored weights
                    model = None
                    release(self.dev)
                    model = self._load(m)
                st.finetune[(("wanda", sparsity), m.id)] = self._wanda(model, own, m.id, sparsity)
        finally:
            model = None
            release(self.dev)
        st.timings[m.id] = round(time.perf_counter() - t0, 3)

    def _sens_pass(self, model, dev, m: ModelInput, own: str, per_sample: bool, col_sq) -> None:
        r, st = self.req, self.stats
        book = None
        if per_sample in r.cross:
            book = self.books.get(per_sample)
            if book is None:
                book = self.books[per_sample] = LogitBook(st.ids, st.per_model, self.sets, st.vocab_size)
        sinks = {d: book.sink(m.id, d) for d in book.datasets_for(m.id)} if book else {}
        own_sink = sinks[own][0] if own in sinks else None
        lin = site_modules(model, self.lin) if per_sample in r.sens_sq else None
        batches = self._batches(own, 1 if per_sample else None)
        with self._task(f"{m.id} · gradients · {self.sets[own].key}", len(batches)) as adv:
            S, got = sensitivity_pass(model, batches, dev, m.id, lin, ("sq",), own_sink, adv)
        st.sens_S[(per_sample, m.id)] = S
        if not st.tensor_groups:
            st.tensor_groups = self._groups(model, S)
        if lin is not None:
            got.col_sq = col_sq
            st.finetune[(("sens", per_sample), m.id)] = got
        if own in sinks:
            sinks[own][1]()
        for d, (take, done) in sinks.items():
            if d == own:
                continue
            batches = self._batches(d)
            with self._task(f"{m.id} · logits · {self.sets[d].key}", len(batches)) as adv:
                logits_pass(model, batches, dev, take, m.id, adv)
            done()

