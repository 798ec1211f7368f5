"""Tiny models on the synthetic tasks' character tokenizer, for the search tests."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import perturbed_copy


def char_model(directory: Path, seed: int, base: Path | None = None, scale: float = 0.05) -> Path:
    """A tiny 4-layer Llama on the tasks' character tokenizer (an 'expert': a perturbed base)."""
    from hivemerge.merge.toy.training import build_tokenizer, new_model

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = new_model(len(tokenizer), seed, hidden=32, layers=4) if base is None else perturbed_copy(base, scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def char_family(root: Path) -> dict[str, Path]:
    base = char_model(root / "base", 0)
    return {"base": base, "a": char_model(root / "a", 1, base), "b": char_model(root / "b", 2, base)}
