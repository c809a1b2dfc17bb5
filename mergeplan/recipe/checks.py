"""Whole-recipe checks that need every value at once: required weights, filter entries that
can never match, linear weights that sum to zero, DELLA's keep probabilities, CABS order
and n:m. Values are piecewise linear (or steps) in the layer fraction, so checking the
gradient anchors and every possible set of matched filters covers every tensor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from mergeplan.errors import MergeplanError
from mergeplan.recipe.model import ModelSpec, Recipe
from mergeplan.recipe.resolve import ParamValue, first_set, has_gradient
from mergeplan.recipe.vocab import REQUIRED, rules, suggest
from mergeplan.yamlpos import where

__all__ = ["check_recipe"]

_MAX_FILTERS_CHECKED = 10


def check_recipe(recipe: Recipe, models_line: int | None) -> None:
    """Raise ``MergeplanError`` (file:line) for a recipe no merge could follow; notes go
    to ``recipe.notes``."""
    c = _Checker(recipe.path, recipe.notes, recipe.merge_method)
    c.check_required(recipe)
    c.check_unreachable_filters(recipe)
    if recipe.merge_method == "linear":
        c.check_linear_weights(recipe, models_line)
    if recipe.merge_method in ("della", "della_linear"):
        c.check_della(recipe)
    if recipe.merge_method == "cabs":
        c.check_cabs(recipe)


class _Checker:
    def __init__(self, path: Path | None, notes: list[str], method: str):
        self.path = path
        self.notes = notes
        self.method = method
        self.rules = rules()[method]

    def fail(self, line: int | None, msg: str) -> MergeplanError:
        return MergeplanError(f"{where(self.path, line)}: {msg}")

    def note(self, line: int | None, msg: str) -> None:
        self.notes.append(f"{where(self.path, line)}: {msg}")

    def check_required(self, recipe: Recipe) -> None:
        for pname, default in self.rules.model_params.items():
            if default is not REQUIRED or pname in recipe.parameters:
                continue
            for spec in recipe.models:
                if pname not in spec.parameters and spec is recipe.base_model:
                    raise self.fail(
                        spec.line,
                        f"linear merges base_model '{spec.name}' as one more input (as "
                        f"mergekit does) but it has no {pname}; remove base_model, list it "
                        f"under models: with a {pname}, or add a top-level "
                        f"`parameters: {{{pname}: ...}}`",
                    )
                if pname not in spec.parameters:
                    raise self.fail(
                        spec.line,
                        f"model '{spec.name}' has no {pname} ({self.method} needs one per "
                        f"model); add `parameters: {{{pname}: 1.0}}` to it, or a top-level "
                        f"`parameters: {{{pname}: ...}}` for all models",
                    )

    def check_unreachable_filters(self, recipe: Recipe) -> None:
        pvs = [(f"parameters.{k}", v) for k, v in recipe.parameters.items()]
        for spec in recipe.models:
            pvs += [(f"{spec.name}.{k}", v) for k, v in spec.parameters.items()]
        for label, pv in pvs:
            if not pv.is_conditional:
                continue
            for i, cond in enumerate(pv.setting[:-1]):
                if cond.filter is None or cond.filter == "*":
                    self.note(
                        pv.setting[i + 1].line,
                        f"{label}: entries after the one without a filter (line {cond.line}) "
                        "are never used: the first matching entry wins; move the default last",
                    )
                    break

    def scenarios(self, pvs: list[ParamValue | None]) -> list[tuple[float, frozenset[str]]] | None:
        """Every distinct situation a tensor can be in for these settings.

        Values are piecewise linear (or steps) in t with breaks at gradient anchors, so
        checking the anchors covers every layer. Filters are substring tests; a set of
        matched filters is possible only if it holds every filter that is a substring of
        one it holds. None when there are too many filters to enumerate.
        """
        filters: set[str] = set()
        ts = {0.0, 1.0}
        for pv in pvs:
            if pv is None or pv.literal:
                continue
            grads = []
            if pv.is_conditional:
                for c in pv.setting:
                    if c.filter not in (None, "*"):
                        filters.add(c.filter)
                    if isinstance(c.value, tuple):
                        grads.append(len(c.value))
            elif pv.is_gradient:
                grads.append(len(pv.setting))
            for n in grads:
                ts.update(k / (n - 1) for k in range(n) if n > 1)
        if len(filters) > _MAX_FILTERS_CHECKED:
            return None
        flist = sorted(filters)
        sets = []
        for mask in range(1 << len(flist)):
            chosen = {f for i, f in enumerate(flist) if mask >> i & 1}
            if all(a in chosen for b in chosen for a in flist if a != b and a in b):
                sets.append(frozenset(chosen))
        return [(t, s) for s in sets for t in sorted(ts)]

    @staticmethod
    def describe(t: float, matched: frozenset[str], any_filters: bool, any_grad: bool) -> str:
        parts = []
        if matched:
            quoted = " and ".join(f"'{f}'" for f in sorted(matched))
            parts.append(f"tensors whose names contain {quoted}")
        elif any_filters:
            parts.append("tensors matching none of the filters")
        else:
            parts.append("all tensors")
        if any_grad:
            parts.append(f"at layer fraction {t:g}")
        return " ".join(parts)

    def check_linear_weights(self, recipe: Recipe, models_line: int | None) -> None:
        chains = [self.chain("weight", m, recipe) for m in recipe.models]
        norm = recipe.parameters.get("normalize")
        pvs = [pv for c in chains for pv in c] + [norm]
        scen = self.scenarios(pvs)
        if scen is None:
            self.note(None, "too many filters to check that the linear weights sum above 0")
            return
        any_filters = any(s for _, s in scen)
        any_grad = any(has_gradient(pv) for pv in pvs)
        for t, matched in scen:
            contains = matched.__contains__
            normalize = self.value_at("normalize", [norm], t, contains)
            if not normalize:
                continue
            weights = [first_set(c, t, contains) for c in chains]
            if any(w is None for w in weights):
                continue  # reported per tensor by Recipe.param
            total = math.fsum(weights)
            if total < 1e-8:
                line = next(
                    (
                        (c[0] or c[1]).line
                        for c, w in zip(chains, weights)
                        if w <= 0 and (c[0] or c[1]) is not None
                    ),
                    models_line,
                )
                raise self.fail(
                    line,
                    f"linear with normalize: true divides by the sum of the weights, which "
                    f"is {total:g} for {self.describe(t, matched, any_filters, any_grad)}; "
                    "make the weights sum to a positive number, or set `normalize: false` "
                    "under parameters to use them as given",
                )

    def check_della(self, recipe: Recipe) -> None:
        for spec in recipe.models:
            dchain = self.chain("density", spec, recipe)
            echain = self.chain("epsilon", spec, recipe)
            scen = self.scenarios(dchain + echain)
            if scen is None:
                continue
            any_filters = any(s for _, s in scen)
            any_grad = any(has_gradient(pv) for pv in dchain + echain)
            for t, matched in scen:
                contains = matched.__contains__
                d = self.value_at("density", dchain, t, contains)
                e = self.value_at("epsilon", echain, t, contains)
                if d >= 1.0:
                    continue  # della passes the tensor through unpruned
                if d - e <= 0 or d + e >= 1:
                    src = next((pv for pv in echain + dchain if pv is not None), None)
                    line = src.line if src is not None else spec.line
                    raise self.fail(
                        line,
                        f"della keeps entries with probabilities from density-epsilon to "
                        f"density+epsilon, which must lie inside (0, 1): model '{spec.name}' "
                        f"has density {d:g}, epsilon {e:g} for "
                        f"{self.describe(t, matched, any_filters, any_grad)}; use epsilon "
                        f"below {min(d, 1 - d):g}",
                    )

    def check_cabs(self, recipe: Recipe) -> None:
        names = [m.name for m in recipe.models]
        order = recipe.parameters.get("order")
        if order is not None:
            given = list(order.setting)
            for n in given:
                if n not in names:
                    raise self.fail(
                        order.line,
                        f"cabs order names unknown model '{n}'{suggest(n, names)}; the "
                        f"models to order are: {', '.join(names)}",
                    )
            if len(set(given)) != len(given) or set(given) != set(names):
                missing = [n for n in names if n not in given]
                dup = sorted({n for n in given if given.count(n) > 1})
                what = f"missing {', '.join(missing)}" if missing else f"repeats {', '.join(dup)}"
                raise self.fail(
                    order.line,
                    f"cabs order must list every merged model once ({what}); models: "
                    f"{', '.join(names)}",
                )
        for spec in recipe.models:
            nchain = self.chain("n", spec, recipe)
            mchain = self.chain("m", spec, recipe)
            for t, matched in self.scenarios(nchain + mchain) or []:
                contains = matched.__contains__
                n = self.value_at("n", nchain, t, contains)
                m = self.value_at("m", mchain, t, contains)
                if n > m:
                    src = next((pv for pv in nchain + mchain if pv is not None), None)
                    raise self.fail(
                        src.line if src is not None else spec.line,
                        f"cabs keeps n of every m entries, so n must not exceed m: model "
                        f"'{spec.name}' has n={n}, m={m}",
                    )

    def chain(self, name: str, spec: ModelSpec, recipe: Recipe) -> list[ParamValue | None]:
        """Where a value for (model, name) may come from, highest precedence first."""
        top = recipe.parameters.get(name)
        return [spec.parameters.get(name), top] if name in self.rules.model_params else [top]

    def value_at(
        self, name: str, chain: list[ParamValue | None], t: float, contains: Callable[[str], bool]
    ) -> Any:
        """The first value set along ``chain`` at (t, matched filters), else the default."""
        v = first_set(chain, t, contains)
        if v is None:
            v = self.rules.model_params.get(name, self.rules.global_params.get(name))
        return v

