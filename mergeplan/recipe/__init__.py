"""Recipe loading: a mergekit-compatible YAML subset plus mergeplan's own sections.

A mergekit 0.1.5 config for linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*
loads unchanged; mergeplan adds ``cabs``, ``seed``, ``guides:``, ``calibration:``,
``tune:``, a per-model ``name:`` and a few global parameters. One pydantic schema
(``schema.py``, ``sections.py``, ``tune.py``) validates the whole document; every problem
is a one-line ``MergeplanError`` naming the file and line. See docs/recipe.md.

Modules: ``schema`` (the document), ``sections`` (guides, calibration), ``tune`` (the tune
section and candidate recipes), ``vocab`` (methods and their parameters), ``resolve``
(values per tensor), ``model`` (``Recipe``), ``load`` (parse/load), ``checks`` (whole-recipe
checks), ``errors`` (pydantic errors -> file:line).
"""

from mergeplan.recipe.load import load_recipe, parse_recipe, recipe_from_data
from mergeplan.recipe.model import ModelSpec, Recipe
from mergeplan.recipe.resolve import Conditional, ParamValue, layer_fraction, resolve
from mergeplan.recipe.schema import TOKENIZER_SOURCES, RecipeSchema
from mergeplan.recipe.sections import AimOptions, CalibrationSettings, GuideOptions, LewisOptions, SensOptions
from mergeplan.recipe.tune import Dimension, HeldOut, Objective, Range, TuneSpec, apply_assignment
from mergeplan.recipe.vocab import METHOD_NAMES, REQUIRED, method_parameters

__all__ = [
    "AimOptions",
    "CalibrationSettings",
    "Conditional",
    "Dimension",
    "GuideOptions",
    "HeldOut",
    "LewisOptions",
    "METHOD_NAMES",
    "ModelSpec",
    "Objective",
    "ParamValue",
    "REQUIRED",
    "Range",
    "Recipe",
    "RecipeSchema",
    "SensOptions",
    "TOKENIZER_SOURCES",
    "TuneSpec",
    "apply_assignment",
    "layer_fraction",
    "load_recipe",
    "method_parameters",
    "parse_recipe",
    "recipe_from_data",
    "resolve",
]
