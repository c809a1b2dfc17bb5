"""Recipe loading: mergekit configs load unchanged, values resolve per tensor like
mergekit 0.1.5, and every mistake is reported with the file and line."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from mergeplan.errors import MergeplanError
from mergeplan.recipe import (
    METHOD_NAMES,
    ParamValue,
    layer_fraction,
    load_recipe,
    parse_recipe,
    resolve,
)

# mergekit's examples/ties.yml, verbatim.
MERGEKIT_TIES = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

# The dare_ties document of mergekit's docs/multimerge.md, verbatim.
MERGEKIT_DARE = """\
# Final merge (no name)
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
models:
  - model: second-merge
    parameters:
      density: 0.6
      weight: 0.5
  - model: teknium/OpenHermes-2.5-Mistral-7B
    parameters:
      density: 0.8
      weight: 0.5
"""

# mergekit's examples/linear.yml, verbatim.
MERGEKIT_LINEAR = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

MLP = "model.layers.5.mlp.up_proj.weight"
ATTN = "model.layers.5.self_attn.q_proj.weight"


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def error_of(text: str, path: str = "recipe.yaml") -> str:
    with pytest.raises(MergeplanError) as info:
        parse_recipe(y(text), path)
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    return msg


# ------------------------------------------------------------------ mergekit configs


def test_mergekit_ties_example_loads_unchanged():
    r = parse_recipe(MERGEKIT_TIES, "ties.yml")
    assert r.merge_method == "ties"
    assert r.base_model.ref == "TheBloke/Llama-2-13B-fp16"
    assert r.base_model.name == "Llama-2-13B-fp16"
    assert [m.name for m in r.models] == [
        "orca_mini_v3_13b",
        "Platypus2-13B",
        "WizardMath-13B-V1.0",
    ]
    assert [m.ref for m in r.models][0] == "psmathur/orca_mini_v3_13b"
    assert r.dtype == "float16" and r.out_dtype is None and r.output_dtype == "float16"
    assert r.parameters["normalize"].setting is True
    assert "int8_mask" not in r.parameters
    assert any("ties.yml:21:" in n and "int8_mask" in n for n in r.notes)
    assert r.seed == 0 and r.guides == {} and r.calibration == {}
    # the filter entry: mlp tensors 0.5, everything else the filter-less 0
    wiz = r.models[2]
    assert r.param("weight", tensor_name=MLP, layer=5, num_layers=40, model=wiz) == 0.5
    assert r.param("weight", tensor_name=ATTN, layer=5, num_layers=40, model=wiz) == 0.0
    # the density gradient [1, 0.7, 0.1] at the middle layer of 41 -> 0.7
    orca = r.models[0]
    assert r.param("density", tensor_name=MLP, layer=20, num_layers=41, model=orca) == pytest.approx(0.7)
    # method defaults fill what the config leaves out
    assert r.param("lambda", tensor_name=MLP, layer=0, num_layers=40) == 1.0
    assert r.param("rescale", tensor_name=MLP, layer=0, num_layers=40) is False


def test_mergekit_dare_config_loads_unchanged():
    r = parse_recipe(MERGEKIT_DARE, "dare.yml")
    assert r.merge_method == "dare_ties"
    assert [m.name for m in r.models] == ["second-merge", "OpenHermes-2.5-Mistral-7B"]
    assert [m.parameters["density"].setting for m in r.models] == [0.6, 0.8]
    # dare_ties defaults from mergekit 0.1.5: rescale on, normalize off
    assert r.param("rescale", tensor_name=MLP, layer=1, num_layers=4) is True
    assert r.param("normalize", tensor_name=MLP, layer=1, num_layers=4) is False
    assert r.notes == []


def test_mergekit_linear_example_loads_without_base():
    r = parse_recipe(MERGEKIT_LINEAR)
    assert r.base_model is None
    assert [m.parameters["weight"].setting for m in r.models] == [1.0, 0.3, 0.5]
    assert r.param("normalize", tensor_name=MLP, layer=0, num_layers=2) is True


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m not in ("linear", "cabs")])
def test_every_task_vector_method_accepts_weight_and_density(method):
    extra = {"breadcrumbs": "gamma: 0.02", "breadcrumbs_ties": "gamma: 0.02"}.get(method, "")
    if method.startswith("della"):
        extra = "epsilon: 0.1"
    r = parse_recipe(
        y(f"""
        merge_method: {method}
        base_model: ./base
        models:
          - model: ./a
            parameters: {{weight: 0.7, density: 0.5{', ' + extra if extra else ''}}}
        parameters: {{lambda: 1.2}}
        """)
    )
    assert r.models[0].parameters["weight"].setting == 0.7
    assert r.param("lambda", tensor_name=MLP, layer=0, num_layers=2) == 1.2


# ------------------------------------------------------------------ gradients


def _numpy_gradient(anchors, layer, num_layers):
    """Independent re-derivation: np.interp over evenly spaced anchors in [0, 1]."""
    if layer is None:
        t = 0.0
    elif num_layers == 1:
        t = 1.0
    else:
        t = layer / (num_layers - 1)
    xs = np.linspace(0.0, 1.0, len(anchors))
    return float(np.interp(t, xs, np.asarray(anchors, dtype=np.float64)))


@pytest.mark.parametrize("anchors", [[1, 0.7, 0.1], [0, 0.3, 0.7, 1], [0.2, 0.9], [0.5], [1, -1, 1, -1, 2]])
@pytest.mark.parametrize("num_layers", [1, 2, 7, 32])
def test_gradient_interpolates_like_numpy_interp_over_layer_fraction(anchors, num_layers):
    r = parse_recipe(
        y(f"""
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ./a
            parameters:
              weight: {anchors}
        """)
    )
    a = r.models[0]
    for layer in [None, *range(num_layers)]:
        got = r.param("weight", tensor_name=f"model.layers.{layer}.mlp.w", layer=layer, num_layers=num_layers, model=a)
        assert got == pytest.approx(_numpy_gradient(anchors, layer, num_layers), abs=1e-12)


def test_gradient_hand_values_and_non_layer_tensors_take_the_first_value():
    pv = ParamValue((0.0, 0.3, 0.7, 1.0), 1)
    # 7 layers: t = i/6; scaled = t*3 -> layer 1: 0.5 -> halfway between 0 and 0.3
    assert pv.resolve("x", 1, 7) == pytest.approx(0.15)
    assert pv.resolve("x", 3, 7) == pytest.approx(0.5)  # between 0.3 and 0.7
    assert pv.resolve("x", 6, 7) == 1.0
    # embeddings and lm_head alike: mergekit plans them at t = 0
    assert pv.resolve("model.embed_tokens.weight", None, 7) == 0.0
    assert pv.resolve("lm_head.weight", None, 7) == 0.0
    # a single-layer model sits at t = 1 in mergekit
    assert pv.resolve("x", 0, 1) == 1.0
    assert layer_fraction(None, 7) == 0.0 and layer_fraction(3, 7) == 0.5
    with pytest.raises(ValueError):
        layer_fraction(7, 7)


def test_boolean_gradient_steps_instead_of_interpolating():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models: [{model: ./a, parameters: {weight: 1}}]
        parameters:
          normalize: [true, false]
        """)
    )
    # index int(t * (n - 1)): only t == 1 reaches the second entry
    got = [r.param("normalize", tensor_name=MLP, layer=i, num_layers=4) for i in range(4)]
    assert got == [True, True, True, False]


# ------------------------------------------------------------------ filters and precedence


FILTERED = """
merge_method: dare_linear
base_model: ./base
models:
  - model: ./math
    parameters:
      weight: 0.6
      density:
        - filter: self_attn
          value: 0.3
        - filter: q_proj
          value: 0.9
        - filter: mlp
          value: [0.2, 0.8]
  - model: ./code
    parameters:
      weight: 0.4
parameters:
  density: 0.55
"""


def test_first_matching_filter_wins_and_unmatched_falls_back_to_top_level():
    r = parse_recipe(y(FILTERED))
    math_ = r.model("math")
    p = lambda name, layer=5, n=11, m=math_: r.param("density", tensor_name=name, layer=layer, num_layers=n, model=m)  # noqa: E731
    assert p(ATTN) == 0.3  # self_attn listed before q_proj: first match wins
    assert p("model.layers.5.mlp.down_proj.weight") == pytest.approx(0.5)  # gradient inside a filter
    assert p("model.layers.0.mlp.down_proj.weight", layer=0) == pytest.approx(0.2)
    # no entry matches -> the top-level value, as in mergekit
    assert p("model.embed_tokens.weight", layer=None) == 0.55
    # the other model has no density at all -> the top-level value
    assert p(MLP, m=r.model("code")) == 0.55


def test_filter_is_a_substring_test_and_star_matches_everything():
    pv = parse_recipe(
        y("""
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ./a
            parameters:
              weight:
                - filter: layers.1.
                  value: 2
                - filter: "*"
                  value: 1
        """)
    ).models[0].parameters["weight"]
    assert pv.resolve("model.layers.1.mlp.w", 1, 4) == 2.0
    assert pv.resolve("model.layers.11.mlp.w", 1, 4) == 1.0
    assert resolve(pv, "lm_head.weight", None, 4) == 1.0
    assert resolve(0.5, "x", None, 4) == 0.5


def test_weight_may_be_given_once_at_top_level():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models: [{model: ./a}, {model: ./b, parameters: {weight: 2}}]
        parameters: {weight: 0.5, density: 0.5}
        """)
    )
    assert r.param("weight", tensor_name=MLP, layer=0, num_layers=2, model="a") == 0.5
    assert r.param("weight", tensor_name=MLP, layer=0, num_layers=2, model="b") == 2.0


def test_required_weight_with_filters_that_miss_a_tensor_names_the_model_line():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models:
          - model: ./a
            parameters:
              weight: [{filter: mlp, value: 1}]
        """),
        "r.yaml",
    )
    assert r.param("weight", tensor_name=MLP, layer=0, num_layers=2, model="a") == 1.0
    with pytest.raises(MergeplanError, match=r"^r\.yaml:4: no 'weight' applies to tensor lm_head\.weight"):
        r.param("weight", tensor_name="lm_head.weight", layer=None, num_layers=2, model="a")


def test_default_entry_before_others_is_noted_as_shadowing():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models:
          - model: ./a
            parameters:
              weight:
                - value: 1
                - filter: mlp
                  value: 2
        """)
    )
    assert r.param("weight", tensor_name=MLP, layer=0, num_layers=2, model="a") == 1.0
    assert any(":8:" in n and "never used" in n for n in r.notes)


def test_scientific_notation_text_is_a_number():
    # YAML 1.1 reads 1e-3 as text; mergekit accepts it as a number
    r = parse_recipe(
        y("""
        merge_method: task_arithmetic
        base_model: ./base
        models: [{model: ./a, parameters: {weight: 1e-3}}]
        """)
    )
    assert r.models[0].parameters["weight"].setting == 0.001


# ------------------------------------------------------------------ models and mergeplan keys


def test_names_default_to_basename_and_can_be_set():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: {model: ../models/base/}
        models:
          - model: ./runs/math/final
            name: math
            parameters: {weight: 1}
          - model: {model: {path: ./runs/code}}
            parameters: {weight: 1}
        """)
    )
    assert r.base_model.name == "base" and r.base_model.ref == "../models/base/"
    assert [(m.name, m.ref) for m in r.models] == [("math", "./runs/math/final"), ("code", "./runs/code")]
    assert [m.line for m in r.models] == [4, 7]


def test_base_listed_among_models_is_taken_out_and_its_parameters_noted():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models:
          - model: ./base
            name: root
            parameters: {weight: 1}
          - model: ./a
            parameters: {weight: 1}
        """)
    )
    assert r.base_model.name == "root" and [m.name for m in r.models] == ["a"]
    assert any(":4:" in n and "base model" in n and "weight" in n for n in r.notes)


def test_linear_with_base_model_merges_it_as_an_input_like_mergekit():
    r = parse_recipe(
        y("""
        merge_method: linear
        base_model: ./base
        models: [{model: ./a, parameters: {weight: 3}}]
        parameters: {weight: 1}
        """)
    )
    assert [m.name for m in r.models] == ["a", "base"]
    assert r.base_model is r.models[1]
    assert [m.name for m in r.all_models] == ["base", "a"]
    assert any("one more input" in n for n in r.notes)


def test_mergeplan_sections_are_kept():
    r = parse_recipe(
        y("""
        name: my-merge
        merge_method: cabs
        base_model: ./base
        seed: 1234
        tokenizer_source: base
        models:
          - {model: ./m, name: math, parameters: {weight: 1.1}}
          - {model: ./c, name: code, parameters: {weight: 1.0, n: 8}}
        parameters:
          n: 16
          m: 32
          order: [code, math]
          max_shard_size: 2GB
        guides:
          aim: {omega: 0.4}
          lewis:
            gamma: 0.4
            epsilon: 0.9
          sens:
        calibration:
          data: calib.txt
          samples: 64
          seq_len: 256
          batch_size: 4
          device: cpu
        """),
        "r.yaml",
    )
    assert r.name == "my-merge" and r.seed == 1234 and r.tokenizer_source == "base"
    assert r.guides == {"aim": {"omega": 0.4}, "lewis": {"gamma": 0.4, "epsilon": 0.9}, "sens": {}}
    assert r.calibration == {"data": "calib.txt", "samples": 64, "seq_len": 256, "batch_size": 4, "device": "cpu"}
    assert r.param("order", tensor_name=MLP, layer=0, num_layers=2) == ["code", "math"]
    assert r.max_shard_size == 2 * 10**9 and "max_shard_size" not in r.parameters
    assert r.param("n", tensor_name=MLP, layer=0, num_layers=2, model="code") == 8
    assert r.param("n", tensor_name=MLP, layer=0, num_layers=2, model="math") == 16
    assert r.where("guides.lewis.epsilon") == "r.yaml:18"


def test_calibration_data_per_model_and_global_rescale_options():
    r = parse_recipe(
        y("""
        merge_method: dare_ties
        base_model: ./base
        models: [{model: ./a, parameters: {weight: 1, density: 0.3}}]
        parameters: {rescale_mode: inverse, consensus_method: count}
        calibration:
          data: {a: a.jsonl, base: base.txt}
        """)
    )
    assert r.calibration["data"] == {"a": "a.jsonl", "base": "base.txt"}
    assert r.param("rescale_mode", tensor_name=MLP, layer=0, num_layers=2) == "inverse"
    assert r.param("consensus_method", tensor_name=MLP, layer=0, num_layers=2) == "count"


def test_load_recipe_reads_a_file_and_labels_errors_with_its_path(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(MERGEKIT_TIES)
    r = load_recipe(p)
    assert r.path == p and r.text == MERGEKIT_TIES
    p.write_text(MERGEKIT_TIES.replace("density: 0.5", "densty: 0.5"))
    with pytest.raises(MergeplanError, match=rf"^{p}:8: unknown key 'densty'"):
        load_recipe(p)
    with pytest.raises(MergeplanError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ errors name the line


def test_unknown_parameter_names_line_and_suggests():
    msg = error_of(
        """
        merge_method: ties
        base_model: ./base
        models:
          - model: ./a
            parameters: {weight: 1}
          - model: ./b
            parameters:
              weight: 1
              densty: 0.5
        """
    )
    assert msg.startswith(
        "recipe.yaml:9: unknown key 'densty' in models[1].parameters (did you mean 'density'?)"
    )


@pytest.mark.parametrize(
    "text, line, needle",
    [
        # unknown top-level key
        ("merge_method: ties\nbase_model: ./b\nmodel:\n  - model: ./a\n", 3, "unknown key 'model' in the recipe (did you mean 'models'?)"),
        # unknown merge_method lists the known ones
        ("merge_method: tie\nmodels: [{model: ./a}]\n", 1, "unknown merge_method 'tie' (did you mean 'ties'?); known: linear, task_arithmetic"),
        # missing base_model for a task-vector method
        ("models:\n  - {model: ./a, parameters: {weight: 1}}\nmerge_method: dare_ties\n", 3, "needs a base_model"),
        # duplicate model names (same basename)
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - {model: x/a, parameters: {weight: 1}}\n  - {model: y/a, parameters: {weight: 1}}\n", 5, "model name 'a' is used twice (also line 4"),
        # explicit duplicate names
        ("merge_method: linear\nmodels:\n  - {model: ./a, name: m, parameters: {weight: 1}}\n  - {model: ./b, name: m, parameters: {weight: 1}}\n", 4, "'m' is used twice"),
        # the same model twice
        ("merge_method: linear\nmodels:\n  - {model: ./a, parameters: {weight: 1}}\n  - {model: a, parameters: {weight: 1}}\n", 4, "same model as models[0]"),
        # wrong types
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n      weight: heavy\n", 6, "models[0].parameters.weight must be a number, not text 'heavy'"),
        ("merge_method: ties\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\nparameters:\n  normalize: maybe\n", 5, "must be true or false"),
        ("merge_method: ties\nbase_model: ./b\nmodels: {model: ./a}\n", 3, "'models' must be a non-empty list"),
        ("merge_method: ties\nbase_model: [./b]\nmodels: [{model: ./a, parameters: {weight: 1}}]\n", 2, "base_model must be a path"),
        # density outside (0, 1], scalar and gradient anchor
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n      weight: 1\n      density: 0\n", 7, "models[0].parameters.density is 0, outside (0, 1]"),
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n      weight: 1\n      density:\n        - 0.5\n        - 1.5\n", 9, "density is 1.5, outside (0, 1]"),
        ("merge_method: ties\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\nparameters:\n  density:\n    - filter: mlp\n      value: -0.2\n", 7, "parameters.density is -0.2, outside"),
        # missing weight
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters: {density: 0.5}\n", 4, "model 'a' has no weight"),
        # parameter of another method
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters: {weight: 1, gamma: 0.1}\n", 5, "'gamma' in models[0].parameters is not a parameter of ties (it belongs to breadcrumbs, breadcrumbs_ties)"),
        # tokenizer other than base
        ("merge_method: ties\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\ntokenizer_source: model_a\n", 4, "tokenizer_source 'model_a' is not supported: use `base`"),
        ("merge_method: ties\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\ntokenizer:\n  source: base\n  tokens: {}\n", 6, "tokenizer.tokens is not supported"),
        # unsupported mergekit features
        ("merge_method: ties\nslices: []\n", 2, "'slices:') are not supported"),
        ("merge_method: ties\nbase_model: {model: ./b, lora: ./l}\nmodels: [{model: ./a}]\n", 2, "LoRA adapters are not supported"),
        # dtype, seed
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\ndtype: fp16\n", 3, "dtype 'fp16' is not supported"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\nseed: -1\n", 3, "seed must be a non-negative integer"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\nseed: 1.5\n", 3, "seed must be a non-negative integer"),
        # choices
        ("merge_method: dare_ties\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\nparameters:\n  rescale_mode: l2\n", 5, "rescale_mode 'l2' is not one of inverse, l1, none"),
        ("merge_method: dare_linear\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\nparameters:\n  consensus_method: sum\n", 5, "not a parameter of dare_linear"),
        # guides and calibration
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\nguides:\n  aim: {omega: 0.4}\n  lewiss: {}\n", 5, "unknown key 'lewiss' in guides (did you mean 'lewis'?)"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\nguides:\n  aim: 0.4\n", 4, "guides.aim must be a mapping"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\ncalibration:\n  samples: many\n", 4, "calibration.samples must be an integer >= 1, got 'many'"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\ncalibration:\n  sample: 3\n", 4, "did you mean 'samples'?"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\ncalibration:\n  data: {b: x.txt}\n", 4, "unknown model 'b'"),
        # filters
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n      weight:\n        - filter: mlp\n          valu: 1\n", 8, "unknown key 'valu' in models[0].parameters.weight entry (did you mean 'value'?)"),
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n      weight: [1, {filter: mlp, value: 2}]\n", 6, "mixes plain values and filter entries"),
        # YAML structure
        ("merge_method: ties\nmerge_method: linear\n", 2, "duplicate key 'merge_method' (first at line 1)"),
        ("merge_method: ties\nmodels:\n  - model: [a\n", 4, "YAML syntax error"),
        ("merge_method: linear\nmodels: [{model: ./a, parameters: {weight: 1}}]\n---\nmerge_method: ties\n", 4, "several YAML documents"),
        ("- merge_method: ties\n", 1, "must be a YAML mapping"),
    ],
)
def test_errors_name_the_right_line(text, line, needle):
    with pytest.raises(MergeplanError) as info:
        parse_recipe(text, "r.yaml")
    msg = str(info.value)
    assert msg.startswith(f"r.yaml:{line}: "), msg
    assert needle in msg, msg
    assert "\n" not in msg


def test_messages_without_a_path_use_a_placeholder():
    with pytest.raises(MergeplanError, match=r"^<recipe>:1: unknown merge_method"):
        parse_recipe("merge_method: nope\nmodels: [{model: ./a}]\n")
    with pytest.raises(MergeplanError, match="empty"):
        parse_recipe("# nothing\n")


def test_linear_normalize_rejects_weights_summing_to_zero_or_less():
    msg = error_of(
        """
        merge_method: linear
        models:
          - model: ./a
            parameters: {weight: 0.5}
          - model: ./b
            parameters:
              weight: -0.5
        """
    )
    assert msg.startswith("recipe.yaml:7: linear with normalize: true divides by the sum of the weights, which is 0")
    assert "normalize: false" in msg
    # positive sum with a negative weight (extrapolation) is fine, and so is normalize off
    parse_recipe(y("merge_method: linear\nmodels:\n  - {model: ./a, parameters: {weight: 1.5}}\n  - {model: ./b, parameters: {weight: -0.5}}\n"))
    parse_recipe(
        y("merge_method: linear\nmodels:\n  - {model: ./a, parameters: {weight: 1}}\n  - {model: ./b, parameters: {weight: -1}}\nparameters: {normalize: false}\n")
    )


def test_linear_normalize_check_covers_gradients_and_filters():
    # sum is 1 + [0 .. -2]: zero halfway through the layers
    msg = error_of(
        """
        merge_method: linear
        models:
          - model: ./a
            parameters: {weight: 1}
          - model: ./b
            parameters: {weight: [0, -2]}
        """
    )
    # the sum is linear between anchors, so its minimum (-1) sits at the last layer
    assert msg.startswith("recipe.yaml:6:") and "which is -1 for all tensors at layer fraction 1" in msg
    # only mlp tensors go to zero
    msg = error_of(
        """
        merge_method: linear
        models:
          - model: ./a
            parameters: {weight: 1}
          - model: ./b
            parameters:
              weight:
                - filter: mlp
                  value: -1
                - value: 1
        """
    )
    assert msg.startswith("recipe.yaml:7:") and "which is 0 for tensors whose names contain 'mlp'" in msg


def test_della_epsilon_must_keep_probabilities_inside_0_1():
    msg = error_of(
        """
        merge_method: della
        base_model: ./base
        models:
          - model: ./a
            parameters: {weight: 1, density: 0.9}
        """
    )
    # default epsilon 0.15 with density 0.9 puts density+epsilon past 1
    assert msg.startswith("recipe.yaml:5:") and "epsilon 0.15" in msg and "below 0.1" in msg
    parse_recipe(y("merge_method: della\nbase_model: ./b\nmodels:\n  - {model: ./a, parameters: {weight: 1, density: 0.9, epsilon: 0.05}}\n"))
    parse_recipe(y("merge_method: della\nbase_model: ./b\nmodels:\n  - {model: ./a, parameters: {weight: 1, density: 1.0}}\n"))


def test_cabs_order_and_n_m_are_checked():
    base = "merge_method: cabs\nbase_model: ./b\nmodels:\n  - {model: ./m, name: math, parameters: {weight: 1}}\n  - {model: ./c, name: code, parameters: {weight: 1}}\nparameters:\n"
    with pytest.raises(MergeplanError, match=r"^r\.yaml:7: cabs order names unknown model 'maths' \(did you mean 'math'\?\)"):
        parse_recipe(base + "  order: [maths, code]\n", "r.yaml")
    with pytest.raises(MergeplanError, match=r"^r\.yaml:7: cabs order must list every merged model once \(missing math\)"):
        parse_recipe(base + "  order: [code]\n", "r.yaml")
    with pytest.raises(MergeplanError, match=r"^r\.yaml:7: cabs keeps n of every m entries"):
        parse_recipe(base + "  n: 40\n", "r.yaml")
    with pytest.raises(MergeplanError, match=r"^r\.yaml:7: parameters\.order must be a list of model names"):
        parse_recipe(base + "  order: math\n", "r.yaml")


def test_global_parameter_inside_a_model_is_ignored_with_a_note():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models:
          - model: ./a
            parameters: {weight: 1, lambda: 2}
        """)
    )
    assert "lambda" not in r.models[0].parameters
    assert any(":5:" in n and "'lambda'" in n and "ignored" in n for n in r.notes)
    assert r.param("lambda", tensor_name=MLP, layer=0, num_layers=2, model="a") == 1.0


def test_rescale_mode_none_means_rescale_false():
    r = parse_recipe(
        y("""
        merge_method: dare_ties
        base_model: ./base
        models: [{model: ./a, parameters: {weight: 1, density: 0.5}}]
        parameters: {rescale_mode: none}
        """)
    )
    assert "rescale_mode" not in r.parameters
    assert r.param("rescale", tensor_name=MLP, layer=0, num_layers=2) is False
    with pytest.raises(MergeplanError, match=r"^r\.yaml:4: rescale_mode: none contradicts rescale: true"):
        parse_recipe(
            "merge_method: dare_ties\nbase_model: ./b\nmodels: [{model: ./a, parameters: {weight: 1}}]\n"
            "parameters: {rescale_mode: none, rescale: true}\n",
            "r.yaml",
        )


def test_density_with_task_arithmetic_is_accepted_and_noted_like_mergekit():
    r = parse_recipe(
        y("""
        merge_method: task_arithmetic
        base_model: ./base
        models: [{model: ./a, parameters: {weight: 1, density: 0.5}}]
        """)
    )
    assert "density" not in r.models[0].parameters
    assert any(":3:" in n and "'density' has no effect with task_arithmetic" in n for n in r.notes)


def test_method_names_match_the_methods_registry():
    from mergeplan.methods.registry import METHODS

    assert set(METHOD_NAMES) == set(METHODS)


def test_tensor_params_feed_the_methods_registry():
    from mergeplan.methods.registry import resolve_params

    r = parse_recipe(
        y("""
        merge_method: cabs
        base_model: ./base
        models:
          - {model: ./m, name: math, parameters: {weight: 1.1}}
          - {model: ./c, name: code, parameters: {weight: [1.0, 0.5], n: 8}}
        parameters: {order: [code, math], m: 16}
        """)
    )
    glob, per_model = r.tensor_params(MLP, 3, 4)
    assert glob["order"] == [1, 0] and glob["m"] == 16 and glob["lambda"] == 1.0
    assert per_model == [{"weight": 1.1, "n": 16}, {"weight": 0.5, "n": 8}]
    assert resolve_params("cabs", glob, per_model) == (glob, per_model)


def test_yaml_anchors_and_merge_keys_work_like_safe_load():
    r = parse_recipe(
        y("""
        merge_method: ties
        base_model: ./base
        models:
          - model: ./a
            parameters: &common {weight: 1, density: 0.5}
          - model: ./b
            parameters:
              <<: *common
              density: 0.3
        """)
    )
    assert r.models[1].parameters["weight"].setting == 1.0
    assert r.models[1].parameters["density"].setting == 0.3
    assert r.models[1].parameters["density"].line == 9
