"""Parameter values (scalars, gradients, filters, per-layer tables) and where they land.

The unit tests call ``resolve_value`` directly; the merge tests run a 4-layer tiny Llama
through the engine and check every output tensor against base + w * (expert - base)
with the coefficient ``w`` that the test works out for that tensor's name.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import merge_doc
from safetensors.torch import load_file

from hivemerge.merge.layers import count_layers, layer_index, layer_position
from hivemerge.merge.params import ParamSpec, resolve_value, validate_value

# -- resolve_value ---------------------------------------------------------------------


def test_scalar():
    assert resolve_value(0.25, "model.layers.3.mlp.up_proj.weight", 4) == 0.25


@pytest.mark.parametrize(
    "name,t",
    [
        ("model.embed_tokens.weight", 0.0),
        ("model.layers.0.self_attn.q_proj.weight", 0.0),
        ("model.layers.1.mlp.up_proj.weight", 1 / 3),
        ("model.layers.2.input_layernorm.weight", 2 / 3),
        ("model.layers.3.mlp.down_proj.weight", 1.0),
        ("model.norm.weight", 0.0),  # mergekit 0.1.5 plans the post-layer weights at t=0
        ("lm_head.weight", 0.0),
    ],
)
def test_gradient_position(name, t):
    assert layer_position(name, 4) == pytest.approx(t, abs=1e-15)
    assert resolve_value([0.0, 1.0], name, 4) == pytest.approx(t, abs=1e-15)
    # two segments: [0.2 -> 0.8] over t in [0, 1/2], [0.8 -> 0.5] over [1/2, 1]
    want = 0.2 + 0.6 * (2 * t) if t <= 0.5 else 0.8 - 0.3 * (2 * t - 1)
    assert resolve_value([0.2, 0.8, 0.5], name, 4) == pytest.approx(want, abs=1e-12)


def test_gradient_by_hand():
    # 3 points over 4 layers: layer 1 at t=1/3 -> 2/3 of the way from 0.2 to 0.8 = 0.6
    assert resolve_value([0.2, 0.8, 0.5], "model.layers.1.mlp.up_proj.weight", 4) == pytest.approx(0.6)
    # layer 2 at t=2/3 -> 1/3 of the way from 0.8 to 0.5 = 0.7
    assert resolve_value([0.2, 0.8, 0.5], "model.layers.2.mlp.up_proj.weight", 4) == pytest.approx(0.7)
    # a single-point list is a constant
    assert resolve_value([0.4], "model.layers.2.mlp.up_proj.weight", 4) == 0.4


def test_bool_gradient_picks_a_point():
    assert resolve_value([False, True], "model.embed_tokens.weight", 4) is False
    assert resolve_value([False, True], "lm_head.weight", 4) is False  # outside the layers: t=0
    assert resolve_value([False, True], "model.layers.3.mlp.up_proj.weight", 4) is True


def test_filters_first_match_wins():
    value = [{"filter": "layers.1.", "value": 0.9}, {"filter": "mlp", "value": 0.8}, {"value": 0.1}]
    assert resolve_value(value, "model.layers.1.mlp.up_proj.weight", 4) == 0.9
    assert resolve_value(value, "model.layers.2.mlp.up_proj.weight", 4) == 0.8
    assert resolve_value(value, "model.layers.2.self_attn.q_proj.weight", 4) == 0.1
    assert resolve_value(value, "lm_head.weight", 4) == 0.1


def test_filters_without_catch_all_and_with_gradients():
    assert resolve_value([{"filter": "mlp", "value": 0.8}], "lm_head.weight", 4) is None
    value = [{"filter": "mlp", "value": [0.0, 0.3]}, {"value": 1.0}]
    assert resolve_value(value, "model.layers.2.mlp.up_proj.weight", 4) == pytest.approx(0.2)
    assert resolve_value(value, "model.layers.2.self_attn.q_proj.weight", 4) == 1.0


def test_per_layer_table_gives_each_layer_its_value():  # was shadowed by the merge test of the same name below
    table = {"per_layer": [0.1, 0.4, 0.7, 1.0], "default": 0.3}
    for i, v in enumerate([0.1, 0.4, 0.7, 1.0]):
        assert resolve_value(table, f"model.layers.{i}.self_attn.o_proj.weight", 4) == v
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolve_value(table, name, 4) == 0.3
    # the default may itself be a gradient; every tensor outside the layers sits at t = 0,
    # as in mergekit (merge/layers.py), so the LM head takes the gradient's first point too
    graded = {"per_layer": [5, 6, 7, 8], "default": [0.25, 1.0]}
    assert resolve_value(graded, "model.embed_tokens.weight", 4) == 0.25
    assert resolve_value(graded, "lm_head.weight", 4) == 0.25
    assert resolve_value(graded, "model.layers.9.mlp.up_proj.weight", 10) == 1.0  # past the table: the gradient's end
    # without a default, tensors outside the layers have no value here
    assert resolve_value({"per_layer": [1, 2, 3, 4]}, "model.norm.weight", 4) is None


def test_layer_helpers():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.layers_norm.weight") is None
    assert count_layers(["model.layers.0.a", "model.layers.5.a", "lm_head.weight"]) == 6
    assert count_layers(["model.layers.0.a"], {"num_hidden_layers": 9}) == 9


def test_validate_value_messages():
    spec = ParamSpec("density", float, 1.0, low=0.0, high=1.0, low_open=True)
    cases = {
        1.5: "p: must be in (0, 1], got 1.5",
        0.0: "p: must be in (0, 1], got 0.0",
        "x": "p: must be a number, got 'x'",
        True: "p: must be a number, got True",
        float("nan"): "p: must be finite, got nan",
    }
    for value, message in cases.items():
        errors = []
        validate_value(spec, value, "p", 4, errors)
        assert errors == [message]
    errors = []
    validate_value(spec, [0.5, 2.0], "p", 4, errors)
    assert errors == ["p[1]: must be in (0, 1], got 2.0"]
    errors = []
    validate_value(spec, {"per_layer": [0.5, 0.5, 0.5]}, "p", 4, errors)
    assert errors == ["p.per_layer: expected 4 values (one per layer), got 3 values"]
    errors = []
    validate_value(spec, [{"filter": "mlp"}], "p", 4, errors)
    assert errors == ["p[0].value: required"]
    errors = []
    for ok in (0.5, 1, [0.1, 1.0], [{"filter": "mlp", "value": 0.5}, {"value": [0.2, 0.3]}], {"per_layer": [1, 1, 1, 1], "default": 0.5}):
        validate_value(spec, ok, "p", 4, errors)
    assert errors == []


# -- on a 4-layer model -------------------------------------------------------------------

LAYERS = 4


def layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def where(name: str) -> float:
    """Gradient position worked out from the name: layer i at i/3; everything outside the layers 0."""
    i = layer_of(name)
    if i is not None:
        return i / (LAYERS - 1)
    return 0.0


@pytest.fixture(scope="module")
def tensors(llama4):
    return load_file(str(llama4["base"] / "model.safetensors")), load_file(str(llama4["expert"] / "model.safetensors"))


def check_task_arithmetic(tmp_path, llama4, tensors, weight, expected, extra=None):
    base, expert = tensors
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama4["base"]),
        "models": [{"model": str(llama4["expert"]), "parameters": {"weight": weight}}],
        "dtype": "float32",
        **(extra or {}),
    }
    out = merge_doc(doc, tmp_path / "out")
    assert set(out) == set(base)
    assert len(out) == 2 + 9 * LAYERS + 1  # embeddings, lm_head, 9 per layer, final norm
    for name, value in out.items():
        w = expected(name)
        want = base[name] + (expert[name] - base[name]) * w
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7, msg=f"{name}: expected weight {w}")
    return out


def test_weight_gradient(tmp_path, llama4, tensors):
    check_task_arithmetic(tmp_path, llama4, tensors, [0.0, 1.0], where)
    # the interpolated values are really different per layer
    assert sorted({where(n) for n in tensors[0]}) == [0.0, 1 / 3, 2 / 3, 1.0]


def test_three_point_gradient(tmp_path, llama4, tensors):
    per_layer = {0: 0.2, 1: 0.6, 2: 0.7, 3: 0.5}

    def expected(name):
        i = layer_of(name)
        if i is not None:
            return per_layer[i]
        return 0.2  # outside the layers: t=0, the first point

    check_task_arithmetic(tmp_path, llama4, tensors, [0.2, 0.8, 0.5], expected)


def test_filters(tmp_path, llama4, tensors):
    weight = [
        {"filter": "layers.1.", "value": 0.9},
        {"filter": "mlp", "value": 0.25},
        {"filter": "self_attn", "value": 0.5},
        {"value": 0.125},
    ]

    def expected(name):
        if ".layers.1." in name:
            return 0.9
        if ".mlp." in name:
            return 0.25
        if ".self_attn." in name:
            return 0.5
        return 0.125  # layer norms, embeddings, final norm, lm_head

    check_task_arithmetic(tmp_path, llama4, tensors, weight, expected)


def test_filter_with_gradient_value(tmp_path, llama4, tensors):
    weight = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    check_task_arithmetic(tmp_path, llama4, tensors, weight, lambda n: where(n) if ".mlp." in n else 0.5)


def test_per_layer_table(tmp_path, llama4, tensors):
    table = [0.1, 0.4, 0.7, 1.0]
    weight = {"per_layer": table, "default": 0.3}
    check_task_arithmetic(
        tmp_path, llama4, tensors, weight, lambda n: table[layer_of(n)] if layer_of(n) is not None else 0.3
    )


def test_per_model_parameter_given_globally(tmp_path, llama4, tensors):
    doc_extra = {"parameters": {"weight": [0.0, 1.0]}}
    base, expert = tensors
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama4["base"]),
        "models": [{"model": str(llama4["expert"])}],  # no weight of its own
        "dtype": "float32",
        **doc_extra,
    }
    out = merge_doc(doc, tmp_path / "out")
    for name, value in out.items():
        torch.testing.assert_close(value, base[name] + (expert[name] - base[name]) * where(name), rtol=1e-6, atol=1e-7)


def test_model_value_overrides_global(tmp_path, llama4, tensors):
    check_task_arithmetic(
        tmp_path, llama4, tensors, 0.75, lambda n: 0.75, extra={"parameters": {"weight": 0.1}}
    )


def test_per_layer_density_keeps_int_density_n(tmp_path, llama4, tensors):
    """TIES with one expert: each tensor keeps exactly int(density * n) entries of its delta,
    the largest by magnitude, with the density of its own layer."""
    base, expert = tensors
    densities = [0.25, 0.5, 0.75, 1.0]
    doc = {
        "merge_method": "ties",
        "base_model": str(llama4["base"]),
        "models": [{"model": str(llama4["expert"]), "parameters": {"weight": 1.0, "density": {"per_layer": densities, "default": 0.125}}}],
        "dtype": "float32",
    }
    out = merge_doc(doc, tmp_path / "out")
    for name, value in out.items():
        i = layer_of(name)
        density = densities[i] if i is not None else 0.125
        delta = (expert[name] - base[name]).reshape(-1)
        n = delta.numel()
        k = int(density * n)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(delta.abs(), descending=True, stable=True)[:k]] = True
        want = torch.where(keep, base[name].reshape(-1) + delta, base[name].reshape(-1))
        assert torch.equal(value.reshape(-1), want), name
        assert int((value.reshape(-1) != base[name].reshape(-1)).sum()) == k, name


def test_slerp_t_gradient(tmp_path, llama4, tensors):
    """A global parameter given as a gradient: t = 0 outside the layers (the base comes
    out unchanged, as in mergekit) and t = 1 at the last layer (the other model comes out)."""
    base, expert = tensors
    doc = {
        "merge_method": "slerp",
        "base_model": str(llama4["base"]),
        "models": [{"model": str(llama4["expert"])}],
        "parameters": {"t": [0.0, 1.0]},
        "dtype": "float32",
    }
    out = merge_doc(doc, tmp_path / "out")
    torch.testing.assert_close(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["lm_head.weight"], base["lm_head.weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["model.norm.weight"], base["model.norm.weight"], rtol=1e-6, atol=1e-7)
    # layer 0 at t=0 is the base; layer 3 at t=1 the expert; a middle layer is neither
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["model.layers.3.mlp.up_proj.weight"], expert["model.layers.3.mlp.up_proj.weight"], rtol=1e-6, atol=1e-7)
    mid = "model.layers.1.mlp.up_proj.weight"
    assert not torch.allclose(out[mid], base[mid]) and not torch.allclose(out[mid], expert[mid])
