"""Text to token ids for any Hugging Face tokenizer: packs, distillation, evaluation and
training all cut prompts and responses the same way.

A prompt is ``[bos] + prompt`` (the context every response token is predicted from); a
response is tokenized as its own piece, so its tokens never straddle the prompt boundary.
"""

from __future__ import annotations

import torch

from hivemerge.protocol.packs import PackError


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``[bos] + prompt`` ids."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PackError("an example with an empty prompt needs a tokenizer with a BOS token")
    return ids


def tokenize_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """``[bos] + prompt + response`` ids and where the response starts."""
    p = prompt_ids(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not r:
        raise PackError(f"response {response!r} tokenizes to nothing")
    return p + r, len(p)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), every row starting at column 0."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), every row ending at the last column (for batched generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def response_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``(prompt, response)`` pairs whose labels cover only the
    response (the rest is -100): what a causal LM's loss on the responses needs."""
    rows, firsts = zip(*(tokenize_pair(tokenizer, p, r) for p, r in pairs))
    ids, mask = right_padded(list(rows), pad_id(tokenizer))
    labels = torch.full_like(ids, -100)
    for i, (row, first) in enumerate(zip(rows, firsts)):
        labels[i, first : len(row)] = torch.tensor(row[first:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
