"""parse_recipe / load_recipe: YAML with line numbers -> the pydantic schema -> ``Recipe``.

The schema checks every value; this module assembles what needs several values at once
(model ids, where the base model goes, which parameters are dropped with a note), then
runs the whole-recipe checks. Every problem is one ``MergeplanError`` line naming the file
and line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergeplan.errors import MergeplanError
from mergeplan.recipe.checks import check_recipe
from mergeplan.recipe.errors import key_path, nearest_line, to_mergeplan_error
from mergeplan.recipe.model import ModelSpec, Recipe
from mergeplan.recipe.resolve import Conditional, ParamValue
from mergeplan.recipe.schema import RecipeSchema, Setting
from mergeplan.recipe.sections import GuideConflict, check_guides
from mergeplan.recipe.vocab import RECIPE_LEVEL, accepted_parameters, rules, suggest
from mergeplan.yamlpos import YNode, compose_located, key_lines, where

__all__ = ["load_recipe", "parse_recipe", "recipe_from_data"]

Loc = tuple[Any, ...]


def parse_recipe(text: str, path: str | Path | None = None) -> Recipe:
    """Parse recipe YAML text; ``path`` only labels messages and ``Recipe.path``."""
    p = Path(path) if path is not None else None
    root = compose_located(text, p)
    if root is None:
        raise MergeplanError(f"{where(p, None)}: the recipe is empty; see docs/recipe.md for an example")
    return recipe_from_data(root.plain(), text, p, root)


def load_recipe(path: str | Path) -> Recipe:
    """Read and parse a recipe file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeplanError(f"{p}: recipe file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeplanError(f"{p}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, p)


def recipe_from_data(data: Any, text: str, path: Path | None, root: YNode | None = None) -> Recipe:
    """Validate a plain recipe mapping (``root`` gives lines; without it messages name the
    key path only) and build the ``Recipe``."""
    keys = key_lines(root) if root is not None else {}
    values = key_lines(root, values=True) if root is not None else {}
    try:
        doc = RecipeSchema.model_validate(data)
    except ValidationError as exc:
        raise to_mergeplan_error(exc, path, keys) from None
    return _Assembler(doc, data, text, path, keys, values).build()


def _default_name(ref: str) -> str:
    return os.path.basename(os.path.normpath(ref)) or ref


def _same_ref(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


class _Assembler:
    def __init__(self, doc: RecipeSchema, data: dict[str, Any], text: str, path: Path | None,
                 keys: dict[Loc, int], values: dict[Loc, int]):
        self.doc, self.data, self.text, self.path = doc, data, text, path
        self.keys, self.values = keys, values
        self.method = doc.merge_method
        self.rules = rules()[self.method]
        self.notes: list[str] = []
        self.recipe_level: dict[str, Any] = {}

    def line(self, loc: Loc, value: bool = False) -> int | None:
        return nearest_line(loc, self.values if value else self.keys)

    def fail(self, loc: Loc | int | None, msg: str, value: bool = False) -> MergeplanError:
        line = loc if isinstance(loc, int) or loc is None else self.line(loc, value)
        return MergeplanError(f"{where(self.path, line)}: {msg}")

    def note(self, line: int | None, msg: str) -> None:
        self.notes.append(f"{where(self.path, line)}: {msg}")

    # -- assembly, in the order mergekit configs were always read -------------------------

    def build(self) -> Recipe:
        doc = self.doc
        base = None
        if doc.base_model is not None:
            base = (doc.base_model.ref, doc.base_model.name, self.line(("base_model",), value=True))
        self.explicit_names = [e.name is not None for e in doc.models]
        models = [
            ModelSpec(
                e.name or _default_name(e.model.ref),
                e.model.ref,
                self.params(doc.settings(i), ("models", i, "parameters"), per_model=True),
                self.line(("models", i)),
                index=i,
            )
            for i, e in enumerate(doc.models)
        ]
        parameters = self.params(doc.settings(()), ("parameters",), per_model=False)
        models, base_spec = self.place_base(base, models)
        self.rescale_none(parameters)
        self.check_calibration_names(base_spec, models)
        self.check_guides()
        guides = self.data.get("guides") or {}
        recipe = Recipe(
            path=self.path,
            text=self.text,
            merge_method=self.method,
            base_model=base_spec,
            models=models,
            parameters=parameters,
            dtype=doc.dtype,
            out_dtype=doc.out_dtype,
            tokenizer_source=doc.tokenizer_choice,
            seed=doc.seed,
            guides={k: ({} if v is None else v) for k, v in guides.items()},
            calibration=dict(self.data.get("calibration") or {}),
            notes=self.notes,
            name=doc.name,
            max_shard_size=self.recipe_level.get("max_shard_size"),
            locations={key_path(loc): line for loc, line in self.keys.items() if loc},
            tune=doc.tune,
            guide_options=doc.guides,
            calibration_settings=doc.calibration,
        )
        check_recipe(recipe, self.line(("models",)))
        if doc.tune is not None:
            from mergeplan.recipe.tune import check_tune

            check_tune(recipe, self.keys)
        return recipe

    def params(self, settings: dict[str, Setting], at: Loc, per_model: bool) -> dict[str, ParamValue]:
        takes, mergekit_only = accepted_parameters(self.method)
        out: dict[str, ParamValue] = {}
        ctx = key_path(at)
        for key, st in settings.items():
            line = self.line(at + (key,))
            pv = self.param_value(st, at + (key,))
            if key == "int8_mask":
                self.note(
                    line,
                    "int8_mask is ignored: in mergekit it only stores the sign mask as int8 "
                    "to save memory and does not change the result",
                )
            elif key in mergekit_only:
                self.note(
                    line,
                    f"'{key}' has no effect with {self.method} and is ignored, as in mergekit "
                    f"(it takes {', '.join(sorted(takes - {'int8_mask'}))})",
                )
            elif key in RECIPE_LEVEL:
                self.recipe_level[key] = pv.setting
            elif per_model and key not in self.rules.model_params:
                self.note(
                    line,
                    f"'{key}' in {ctx} is ignored: it applies to the whole merge, and mergekit "
                    "reads it only from the top-level 'parameters:'; move it there",
                )
            else:
                out[key] = pv
        return out

    def param_value(self, st: Setting, loc: Loc) -> ParamValue:
        line = self.line(loc)
        if st.shape == "literal":
            return ParamValue(st.value, line, literal=True)
        if st.shape == "filters":
            conds = tuple(
                Conditional(flt, value, self.line(loc if st.single else loc + (i,), value=True))
                for i, (flt, value) in enumerate(st.value)
            )
            return ParamValue(conds, line)
        return ParamValue(st.value, line)

    def place_base(
        self, base: tuple[str, str | None, int | None] | None, models: list[ModelSpec]
    ) -> tuple[list[ModelSpec], ModelSpec | None]:
        """Separate the base model from the inputs the way mergekit does, and check ids."""
        for j, mj in enumerate(models):
            for i in range(j):
                if _same_ref(models[i].ref, mj.ref):
                    raise self.fail(
                        mj.line,
                        f"models[{j}] is the same model as models[{i}] ('{mj.ref}'); list each model once",
                    )
        if base is None:
            self.check_unique_names(None, models)
            return models, None
        base_ref, base_name, base_line = base
        index = next((i for i, m in enumerate(models) if _same_ref(m.ref, base_ref)), None)
        if self.method == "linear":
            # linear ignores the base role, but mergekit still feeds base_model in as
            # one more input (weighted by the top-level weight).
            if index is None:
                spec = ModelSpec(base_name or _default_name(base_ref), base_ref, {}, base_line)
                models = models + [spec]
                self.note(
                    base_line,
                    "linear has no base role: base_model is merged as one more input, as "
                    "mergekit does (it takes the top-level weight); remove base_model to "
                    "average only the listed models",
                )
            else:
                spec = models[index]
                if base_name is not None and not self.explicit_names[index]:
                    spec.name = base_name
            self.check_unique_names(None, models)  # the base is one of `models` now
            return models, spec
        if index is None:
            spec = ModelSpec(base_name or _default_name(base_ref), base_ref, {}, base_line)
        else:
            entry = models[index]
            name = entry.name if self.explicit_names[index] else (base_name or entry.name)
            spec = ModelSpec(name, base_ref, {}, base_line)
            if entry.parameters:
                self.note(
                    entry.line,
                    f"models[{index}] is the base model: its parameters "
                    f"({', '.join(entry.parameters)}) are ignored, as in mergekit",
                )
            models = models[:index] + models[index + 1 :]
            if not models:
                raise self.fail(
                    entry.line,
                    "only the base model is listed under 'models:'; add the fine-tuned models to merge into it",
                )
        self.check_unique_names(spec, models)
        return models, spec

    def check_unique_names(self, base: ModelSpec | None, models: list[ModelSpec]) -> None:
        seen: dict[str, ModelSpec] = {}
        for spec in ([base] if base is not None else []) + models:
            if spec.name in seen:
                first = seen[spec.name]
                raise self.fail(
                    spec.line,
                    f"model name '{spec.name}' is used twice (also line {first.line}; names "
                    "default to the directory's basename); give one of them `name: OTHER`",
                )
            seen[spec.name] = spec

    def rescale_none(self, parameters: dict[str, ParamValue]) -> None:
        """``rescale_mode: none`` means mergekit's ``rescale: false``; store it that way."""
        mode = parameters.get("rescale_mode")
        if mode is None or "none" not in set(mode.leaves()):
            return
        if not mode.is_scalar:
            raise self.fail(
                mode.line,
                "rescale_mode 'none' cannot vary by filter or layer; use filters on `rescale: false` instead",
            )
        rescale = parameters.get("rescale")
        if rescale is not None and True in set(rescale.leaves()):
            raise self.fail(mode.line, f"rescale_mode: none contradicts rescale: true (line {rescale.line}); keep one")
        parameters["rescale"] = ParamValue(False, mode.line)
        del parameters["rescale_mode"]

    def check_calibration_names(self, base: ModelSpec | None, models: list[ModelSpec]) -> None:
        cal = self.doc.calibration
        if cal is None or not isinstance(cal.data, dict):
            return
        names = [m.name for m in ([base] if base else []) + models]
        for mname in cal.data:
            if mname not in names:
                raise self.fail(
                    ("calibration", "data", mname),
                    f"calibration.data names unknown model '{mname}'{suggest(mname, names)}; "
                    f"models: {', '.join(names)}",
                )

    def check_guides(self) -> None:
        """Guides that make no sense with the method (or lack data) fail here, with a line,
        before anything is opened; the planner adds the notes when it plans."""
        try:
            check_guides(self.doc.guides, self.doc.calibration, self.method)
        except GuideConflict as exc:
            raise self.fail(exc.loc, str(exc)) from None
