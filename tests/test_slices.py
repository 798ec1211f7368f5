"""mergekit's ``slices:`` with passthrough: layer ranges of several models stacked (a frankenmerge)."""

from __future__ import annotations

import json

import torch
from conftest import make_llama, merge_doc, run_cli
from safetensors.torch import load_file


def test_layer_ranges_of_two_models_stack_in_order(tmp_path):
    from transformers import AutoModelForCausalLM

    a = make_llama(tmp_path / "a", seed=1, layers=3)
    b = make_llama(tmp_path / "b", seed=2, layers=3)
    doc = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    out = merge_doc(doc, tmp_path / "out")
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    # output layers 0, 1 = a's 0, 1; output layers 2, 3 = b's 1, 2; embeddings from a, final norm and head from b
    sources = {0: (ta, 0), 1: (ta, 1), 2: (tb, 1), 3: (tb, 2)}
    for name, tensor in out.items():
        if ".layers." in name:
            j = int(name.split(".layers.")[1].split(".")[0])
            source, i = sources[j]
            assert torch.equal(tensor, source[name.replace(f".layers.{j}.", f".layers.{i}.")]), name
    assert sum(".layers.3." in n for n in out) == 9 and not any(".layers.4." in n for n in out)
    assert torch.equal(out["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], tb["lm_head.weight"]) and torch.equal(out["model.norm.weight"], tb["model.norm.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads and runs as a 4-layer model
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[1] == 3


def test_slices_are_checked_before_any_weight_is_read(tmp_path):
    a = make_llama(tmp_path / "a", seed=1, layers=2)
    doc = {"merge_method": "ties", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]}], "models": []}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    proc = run_cli("merge", tmp_path / "r.json", "--out", tmp_path / "out")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert proc.stderr.strip().splitlines() == ["error: slices: hivemerge stacks slices with merge_method passthrough; ties merges "
                                                "whole models listed under models; models: not with slices (each slice names its "
                                                "model); slices[0].sources[0].layer_range: must be [start, stop] with 0 <= start < "
                                                "stop <= 2, got [0, 3]"]
