"""Tiny causal LMs on the synthetic tasks: a character tokenizer built locally, a
small Llama, and a deterministic training loop. Used to make the demo's base and
domain experts, and (``encoder=hetero.encode_pairs``) the heterogeneous test expert;
distillation shares its optimizer, schedule and step (:func:`optimizer`,
:func:`optimizer_step`). Nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from hivemerge.merge.toy.tasks import ALPHABET, Example

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS = 0, 1


def build_tokenizer():
    """A character-level fast tokenizer (one token per character of ALPHABET)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def new_model(vocab_size: int, seed: int, hidden: int = 128, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

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


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a busy machine extra threads
    make them many times slower (oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def optimizer(model, steps: int, lr: float):
    """(optimizer, scheduler) of every training loop here: AdamW without weight decay,
    linear warmup over the first 5% of ``steps``, cosine decay to zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup, total = max(1, steps // 20), max(1, steps)
    # The cosine goes through a float32 tensor, not math.cos: the demo experts were trained
    # so, and their bytes (the demo cache, the tests' expected figures) depend on it.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item())
    )
    return opt, sched


def optimizer_step(model, opt, sched, loss: torch.Tensor) -> None:
    """One step: gradients of ``loss``, clipped to norm 1, then the optimizer and the schedule."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


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
