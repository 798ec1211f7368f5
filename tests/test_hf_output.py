"""The merged directory is a Hugging Face model: transformers loads it (sharded or not),
its weights are the merged safetensors, and it generates. Plus the methods listing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_RECIPES, write_recipe
from delta_fixtures import shared_runner
from safetensors.torch import load_file

from hivemerge.merge.engine import run_merge
from hivemerge.merge.recipe import load_recipe


@pytest.fixture(scope="module")
def ties_dir(family_merges):
    _, out, proc = family_merges[("ties", "threads1")]
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def loaded(ties_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ties_dir)
    return model.eval(), AutoTokenizer.from_pretrained(ties_dir)


def test_loads_and_state_dict_is_the_merged_file(ties_dir, loaded):
    model, _ = loaded
    merged = load_file(str(ties_dir / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(merged)
    for name, tensor in merged.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), name


def test_generates(loaded):
    model, tokenizer = loaded
    inputs = tokenizer("w1 w2 w3", return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[5, 6, 7]]  # the fixture's word-level vocabulary
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1 and 4 <= out.shape[1] <= 7
    assert out[0, :3].tolist() == [5, 6, 7]
    assert all(0 <= t < len(tokenizer) for t in out[0].tolist())
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert out[0, 3].item() == int(logits[0, -1].argmax())  # greedy: the first new token is the argmax


def test_model_card_and_config(ties_dir, tiny_family):
    card = (ties_dir / "README.md").read_text()
    assert "**ties**" in card and str(tiny_family["math"]) in card and "merge_method: ties" in card
    config = json.loads((ties_dir / "config.json").read_text())
    base_config = json.loads((tiny_family["base"] / "config.json").read_text())
    assert config["num_hidden_layers"] == base_config["num_hidden_layers"] == 2
    assert config["dtype"] == "float32"


def test_sharded_output_loads_identically(family_merges, ties_dir, loaded):
    from transformers import AutoModelForCausalLM

    _, sharded, proc = family_merges[("ties", "sharded")]
    assert proc.returncode == 0, proc.stderr
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not (sharded / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    whole = load_file(str(ties_dir / "model.safetensors"))
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    pieces = {}
    for shard in shards:
        data = load_file(str(sharded / shard))
        assert (sharded / shard).stat().st_size <= 30_000 + 4096 or len(data) == 1  # header + at most 30 KB of data
        assert all(index["weight_map"][n] == shard for n in data)
        pieces.update(data)
    assert set(pieces) == set(whole)
    assert all(torch.equal(pieces[n], whole[n]) for n in whole)
    model = AutoModelForCausalLM.from_pretrained(sharded)
    reference = loaded[0].state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in model.state_dict().items())


def test_relative_paths_from_the_recipe_folder(tiny_family, tmp_path, tmp_path_factory, ties_dir):
    """Model paths relative to the recipe's folder work from another working directory."""
    import os

    recipe_dir, elsewhere = tmp_path / "recipes", tmp_path / "a" / "b"
    recipe_dir.mkdir()
    elsewhere.mkdir(parents=True)
    doc = FAMILY_RECIPES["ties"](tiny_family)
    doc["base_model"] = os.path.relpath(doc["base_model"], recipe_dir)
    for m in doc["models"]:
        m["model"] = os.path.relpath(m["model"], recipe_dir)
    assert doc["base_model"].startswith("../") and not (elsewhere / doc["base_model"]).exists()
    recipe = write_recipe(recipe_dir / "ties.yaml", doc)
    result = shared_runner(tmp_path_factory)("merge", recipe, "--out", tmp_path / "out", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    a = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = load_file(str(ties_dir / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in b)


def test_overwrite_replaces_a_directory(tiny_family, tmp_path, ties_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_merge(load_recipe(family_recipe_file(tiny_family, tmp_path)), out, device="cpu", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").read_bytes() == (ties_dir / "model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def family_recipe_file(tiny_family, tmp_path):
    return write_recipe(tmp_path / "ties.yaml", FAMILY_RECIPES["ties"](tiny_family))


def test_methods_json(tmp_path_factory):
    result = shared_runner(tmp_path_factory)("methods", "--json")
    assert result.returncode == 0, result.stderr
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    assert sorted(listed) == sorted(
        ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock",
         "median", "trimmed_mean", "centered_clip", "della", "della_linear", "nearswap", "sce", "nuslerp", "multislerp", "karcher", "ram", "ramplus_tl", "arcee_fusion", "passthrough"]
    )

    def param(method, name):
        specs = listed[method]["global_parameters"] + listed[method]["model_parameters"]
        (spec,) = [s for s in specs if s["name"] == name]
        return spec

    density = param("ties", "density")
    assert (density["type"], density["range"], density["default"], density["required"]) == ("float", "(0, 1]", 1.0, False)
    assert param("ties", "weight")["required"] is True
    assert param("ties", "normalize")["default"] is True
    assert param("task_arithmetic", "normalize")["default"] is False
    assert param("dare_ties", "rescale")["default"] is True
    assert param("ties", "rescale")["default"] is False and param("della", "epsilon")["default"] == 0.15
    assert param("sce", "select_topk")["range"] == "[0, 1]" and listed["nearswap"]["models"] == "1..1"
    t = param("slerp", "t")
    assert (t["required"], t["range"], t["default"]) == (True, "[0, 1]", None)
    assert listed["slerp"]["models"] == "1..1" and listed["slerp"]["requires_base"] is True
    assert listed["model_stock"]["models"] == "2..n"
    assert listed["linear"]["requires_base"] is False
    gamma = param("breadcrumbs", "gamma")
    assert (gamma["range"], gamma["default"]) == ("[0, 1]", 0.01)
    for m in listed.values():
        assert m["summary"]
        for spec in m["global_parameters"] + m["model_parameters"]:
            assert spec["doc"], (m["name"], spec["name"])
