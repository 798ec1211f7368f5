"""Experts that added tokens (chat fine-tunes): vocabularies lined up by token
(``tokenizer_source: union | base | model:REF``), as mergekit does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama, merge_doc, run_cli


def expert_with_tokens(base: Path, out: Path, tokens: list[str], seed: int) -> Path:
    """A perturbed copy of ``base`` whose tokenizer added ``tokens``, with random rows for them."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    make_llama(out, seed=seed, base=base)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    tokenizer.add_tokens(tokens)
    model = LlamaForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(len(tokenizer))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[-len(tokens):] = torch.randn(len(tokens), matrix.shape[1], generator=g)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = make_llama(root / "base", seed=0)
    return {"base": base, "chat": expert_with_tokens(base, root / "chat", ["<|user|>", "<|bot|>"], 1),
            "tools": expert_with_tokens(base, root / "tools", ["<tool>", "<|bot|>"], 2)}


def recipe(family, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "dtype": "float32",
            "models": [{"model": str(family["chat"]), "parameters": {"weight": 0.5}},
                       {"model": str(family["tools"]), "parameters": {"weight": 0.5}}], **extra}


def rows(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_union_lines_up_tokens_and_new_rows_come_from_the_models_that_have_them(family, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = merge_doc(recipe(family, tokenizer_source="union"), tmp_path / "out")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    base_size = rows(family["base"])["model.embed_tokens.weight"].shape[0]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|bot|>", "<tool>")}
    assert ids == {"<|user|>": base_size, "<|bot|>": base_size + 1, "<tool>": base_size + 2}  # base's, then in recipe order
    assert out["model.embed_tokens.weight"].shape[0] == base_size + 3
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == base_size + 3
    chat, tools, base = rows(family["chat"]), rows(family["tools"]), rows(family["base"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        # a token one expert added: that expert's row, exactly; one both added: the mean of their rows
        assert torch.equal(out[name][ids["<|user|>"]], chat[name][base_size])
        assert torch.equal(out[name][ids["<tool>"]], tools[name][base_size])
        assert torch.allclose(out[name][ids["<|bot|>"]], (chat[name][base_size + 1] + tools[name][base_size + 1]) / 2, atol=1e-7)
        # the base's tokens: task arithmetic over the lined-up rows
        want = base[name] + 0.5 * (chat[name][:base_size] - base[name]) + 0.5 * (tools[name][:base_size] - base[name])
        assert torch.allclose(out[name][:base_size], want, atol=1e-6)
    # the merged model scores an expert's new token with that expert's head row: same hidden state, same logit
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    hidden = torch.randn(3, out["lm_head.weight"].shape[1])
    logits = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits[:, ids["<tool>"]], hidden @ tools["lm_head.weight"][base_size], rtol=1e-5, atol=1e-5)
    assert tokenizer.tokenize("<tool> <|user|>") == ["<tool>", "<|user|>"]


def test_base_keeps_the_base_vocabulary(family, tmp_path):
    out = merge_doc(recipe(family, tokenizer_source="base"), tmp_path / "out")
    base = rows(family["base"])
    assert out["model.embed_tokens.weight"].shape == base["model.embed_tokens.weight"].shape
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (family["base"] / "tokenizer.json").read_bytes()


def test_without_tokenizer_source_differing_vocabularies_say_how_to_fix_it(family, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(recipe(family)))
    proc = run_cli("merge", tmp_path / "r.json", "--out", tmp_path / "out")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert "its vocabulary differs" in proc.stderr and "set tokenizer_source: union" in proc.stderr


def test_model_takes_that_models_vocabulary(family, tmp_path):
    out = merge_doc(recipe(family, tokenizer_source=f"model:{family['chat']}"), tmp_path / "out")
    chat, base_size = rows(family["chat"]), rows(family["base"])["lm_head.weight"].shape[0]
    assert out["lm_head.weight"].shape[0] == base_size + 2  # chat's two tokens; <tool> is not in its vocabulary
    assert torch.equal(out["lm_head.weight"][base_size], chat["lm_head.weight"][base_size])  # <|user|>: chat's alone
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (family["chat"] / "tokenizer.json").read_bytes()


def test_union_with_the_base_listed_among_the_models(family, tmp_path):
    """linear keeps the base as an input when it is listed: its rows are lined up too."""
    doc = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32", "base_model": str(family["base"]),
           "models": [{"model": str(family[n]), "parameters": {"weight": 1.0}} for n in ("base", "chat", "tools")]}
    out = merge_doc(doc, tmp_path / "out")
    chat, base = rows(family["chat"]), rows(family["base"])
    size = base["lm_head.weight"].shape[0]
    assert torch.equal(out["lm_head.weight"][size], chat["lm_head.weight"][size])  # <|user|>: chat's alone
    assert out["lm_head.weight"].shape[0] == size + 3
