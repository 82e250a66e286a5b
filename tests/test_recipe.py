"""Recipe parsing and validation: clear messages naming the key, value and line."""

from __future__ import annotations

import pytest

from dmerge.errors import RecipeError, RecipeWarning
from dmerge.methods import get_method
from dmerge.recipe import evaluate_setting, load_recipe


def _err(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(text, is_text=True)
    return str(e.value)


def test_bad_parameter_value_names_key_value_and_line():
    msg = _err("""merge_method: linear
models:
  - model: a
    parameters:
      weight: 1
  - model: b
    parameters:
      weight: [0.1, "x"]
""")
    assert msg == "models[1].parameters.weight[1] (line 8): must be a number, got 'x'"


def test_bool_parameter():
    msg = _err("""merge_method: linear
parameters:
  normalize: maybe
models:
  - model: a
    parameters: {weight: 1}
""")
    assert "parameters.normalize (line 3): must be true or false, got 'maybe'" in msg


def test_unknown_method():
    assert "unknown method 'franken'" in _err("merge_method: franken\nmodels:\n  - model: a\n")


def test_missing_merge_method():
    assert _err("models:\n  - model: a\n").startswith("merge_method")


def test_models_and_slices_exclusive():
    msg = _err("""merge_method: passthrough
models:
  - model: a
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
""")
    assert "exactly one of 'models' or 'slices'" in msg


def test_layer_range_order():
    msg = _err("""merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [4, 2]
""")
    assert msg.startswith("slices[0].sources[0].layer_range (line 5)") and "[4, 2]" in msg


def test_slice_sources_same_length():
    msg = _err("""merge_method: linear
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 3]
""")
    assert "same number of layers" in msg


def test_bad_dtype():
    assert "dtype (line 4): must be one of" in _err("merge_method: linear\nmodels:\n  - model: a\ndtype: int4\n")


def test_base_required():
    assert "base_model" in _err("merge_method: task_arithmetic\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")


def test_unknown_key_in_model_entry():
    msg = _err("merge_method: linear\nmodels:\n  - model: a\n    parameter: {weight: 1}\n")
    assert msg.startswith("models[0].parameter (line 4): is not a known key")


def test_not_yaml():
    assert "not valid YAML" in _err("merge_method: [linear\n")


def test_gradient_interpolation_matches_mergekit_rule():
    weight = get_method("linear").param("weight")
    assert evaluate_setting([0.0, 1.0], "x", 0.25, weight) == 0.25
    # five anchors over depth: t = 0.3 lies 20% of the way from anchor 1 to anchor 2
    assert evaluate_setting([0, 0.5, 0.3, 0.7, 1], "x", 0.3, weight) == pytest.approx(0.5 + 0.2 * (0.3 - 0.5))
    assert evaluate_setting([0, 0.5, 0.3, 0.7, 1], "x", 1.0, weight) == 1.0


def test_filters_pick_first_match_by_substring():
    weight = get_method("linear").param("weight")
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5, weight) == 0.1
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5, weight) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.5, weight) == 0.9
    assert evaluate_setting(setting[:2], "model.norm.weight", 0.5, weight) is None


# ---------------------------------------------------------------------------------------
# misspelled keys and parameters

TIES_MISSPELLED = """merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 1
  - model: b
    parameters:
      densty: 0.5
      weight: 1
"""


def test_misspelled_parameter_is_an_error_with_a_suggestion():
    assert _err(TIES_MISSPELLED) == (
        "models[1].parameters.densty (line 9): ties has no parameter 'densty'; did you mean 'density'?")


def test_parameter_of_no_method_and_close_to_none_lists_the_methods_own():
    msg = _err("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5, zork: 1}\nmodels:\n  - model: a\n  - model: b\n")
    assert msg == "parameters.zork (line 3): slerp has no parameter 'zork'; it takes t"


def test_parameter_of_another_method_is_ignored_with_a_warning():
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      density: 0.5\n"
    with pytest.warns(RecipeWarning) as record:
        load_recipe(text, is_text=True)
    assert [str(w.message) for w in record] == ["models[0].parameters.density (line 6): linear ignores 'density'"]


def test_misspelled_top_level_key_is_reported_before_the_missing_one():
    msg = _err("merge_methd: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    assert msg == "merge_methd (line 1): is not a recipe key; did you mean 'merge_method'?"
    assert "did you mean 'dtype'?" in _err("merge_method: linear\ndtpye: float32\nmodels:\n  - model: a\n")


def test_unrelated_top_level_key_is_ignored_with_a_warning_as_mergekit_does():
    text = "merge_method: linear\nmodel_name: my-merge\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
    with pytest.warns(RecipeWarning, match=r"^model_name \(line 2\): is not a recipe key; ignored"):
        load_recipe(text, is_text=True)


def test_misspelled_nested_key_is_reported_before_the_missing_one():
    msg = _err("merge_method: linear\nmodels:\n  - modle: a\n    parameters: {weight: 1}\n")
    assert msg == "models[0].modle (line 3): is not a known key here; did you mean 'model'?"


def test_unknown_method_suggests_the_closest():
    assert _err("merge_method: tie\nmodels:\n  - model: a\n") == (
        "merge_method (line 1): unknown method 'tie'; did you mean 'ties'?")
    with pytest.raises(RecipeError, match="did you mean 'slerp'"):
        get_method("slurp")
