"""Tiny causal LMs on the synthetic tasks: a character tokenizer built locally, a
small Llama, and a deterministic training loop. Used to make the demo's base and
domain experts, and (``encoder=hetero.encode_pairs``) the heterogeneous test expert;
its optimizer, schedule and step are distillation's (merge/fusion/distill.py). Nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from hivemerge.merge.fusion.distill import optimizer, optimizer_step
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.merge.toy.tasks import ALPHABET, Example

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS = 0, 1


def build_tokenizer():
    """A character-level fast tokenizer (one token per character of ALPHABET)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # heavy: only when training
    from transformers import PreTrainedTokenizerFast  # heavy: transformers

    vocab = {t: i for i, t in enumerate(SPECIAL + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def new_model(vocab_size: int, seed: int, hidden: int = 128, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: transformers

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode(examples: list[Example], tokenizer, with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels cover only the answer (and its newline)."""
    rows, labels = [], []
    for ex in examples:
        prompt = [BOS] + tokenizer.convert_tokens_to_ids(list(ex.prompt))
        answer = tokenizer.convert_tokens_to_ids(list(ex.answer + "\n")) if with_answer else []
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def train(
    model, tokenizer, sample: Callable[[random.Random], Example], steps: int, seed: int, lr: float = 2e-3,
    batch: int = 64, progress: Callable[[int, int, float], None] | None = None,
    encoder: Callable[[list[Example], object], dict[str, torch.Tensor]] | None = None,
) -> None:
    """AdamW with warmup and cosine decay; deterministic for a seed. ``encoder`` makes a
    batch (input ids, attention mask, labels) from examples and the tokenizer: by default
    :func:`encode` (the character tokenizer); :func:`hetero.encode_pairs` for any tokenizer."""
    with single_thread():
        _train(model, tokenizer, sample, steps, seed, lr, batch, progress, encoder or encode)


def _train(model, tokenizer, sample, steps, seed, lr, batch, progress, encoder) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt, sched = optimizer(model, steps, lr)
    model.train()
    for step in range(steps):
        loss = model(**encoder([sample(rng) for _ in range(batch)], tokenizer)).loss
        optimizer_step(model, opt, sched, loss)
        if progress:
            progress(step + 1, steps, loss.item())
    model.eval()


def save(model, tokenizer, directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model.to(torch.float32)
    return directory
