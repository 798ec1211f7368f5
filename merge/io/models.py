"""Loading a Hugging Face causal LM and its tokenizer from a local folder (the one loader
of evaluation, packs, distillation and the demo). Weights only from safetensors; no
remote code."""

from __future__ import annotations

from pathlib import Path

import torch

from hivemerge.protocol.errors import UserInputError


def load_causal_lm(directory: str | Path):
    """(model in eval mode, float32; tokenizer) of a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when a model is loaded

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserInputError(f"{directory}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(directory)
