"""Shared fixtures: tiny models made on the spot, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(directory)


def make_llama(directory: Path, seed: int, base: Path | None = None, scale: float = 0.02, layers: int = 2) -> Path:
    """A tiny random Llama saved as safetensors; with ``base``, a perturbed copy of it (an 'expert')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    if base is None:
        model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A model directory holding exactly ``tensors`` (for hand-computed method tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three experts fine-tuned from it (random perturbations)."""
    root = tmp_path_factory.mktemp("family")
    base = make_llama(root / "base", seed=0)
    family = {"base": base}
    for i, name in enumerate(["math", "code", "logic"]):
        family[name] = make_llama(root / name, seed=100 + i, base=base)
    return family
