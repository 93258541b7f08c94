import pytest

from streammerge.config import evaluate, interpolate, parse_config
from streammerge.errors import ConfigError


def test_gradient_interpolates_across_positions():
    assert interpolate([0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert interpolate([0.0, 1.0, 0.0], 0.5) == pytest.approx(1.0)
    assert interpolate([0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    assert interpolate([2.0], 0.9) == 2.0
    assert interpolate([0.0, 0.5, 1.0], 1.0) == 1.0


def test_filters_match_substrings_in_order_and_fall_through():
    value = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert evaluate(value, "model.layers.3.self_attn.q_proj.weight", 0.0, float) == 0.1
    assert evaluate(value, "model.layers.3.mlp.up_proj.weight", 0.5, float) == pytest.approx(0.5)
    assert evaluate(value, "model.norm.weight", 0.0, float) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0, float) is None


def test_string_scalars_convert_and_discrete_lists_select():
    assert evaluate("1e-3", "x", 0.0, float) == pytest.approx(1e-3)
    assert evaluate([True, False], "x", 0.0, bool) is True
    assert evaluate([True, False], "x", 1.0, bool) is False


def test_valid_config_parses():
    cfg = parse_config({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                        "dtype": "bf16"})
    assert cfg.dtype == "bfloat16"
    assert cfg.referenced_models() == ["a"]


@pytest.mark.parametrize("doc, needle", [
    ({"models": [{"model": "a"}]}, "merge_method: required key is missing"),
    ({"merge_method": "linear"}, "give exactly one of 'models' or 'slices'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of 'models' or 'slices'"),
    ({"merge_method": "linear", "models": []}, "'models' is empty"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "bf17"}, "dtype: unknown dtype 'bf17'"),
    ({"merge_method": "linear", "modles": [{"model": "a"}]}, "did you mean 'models'"),
    ({"merge_method": "linear", "models": [{"model": "a", "paramters": {}}]}, "models[0].paramters: unknown key; did you mean 'parameters'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]}, "slices[0].sources[0].layer_range"),
    ("just a string", "must be a YAML mapping"),
])
def test_validation_errors_name_the_key(doc, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "cfg.yml")
    assert needle in str(e.value)
    if isinstance(doc, dict):
        assert str(e.value).startswith("cfg.yml: invalid merge config")


def test_unknown_method_suggests_close_names():
    from streammerge.methods import get_method

    with pytest.raises(ConfigError) as e:
        get_method("lienar")
    assert "did you mean 'linear'" in str(e.value)
    assert "known methods:" in str(e.value)
