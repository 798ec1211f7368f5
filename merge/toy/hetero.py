"""A heterogeneous expert for fusion tests and benchmarks: another architecture (GPT-2),
another tokenizer (byte-level BPE trained here), a domain the demo's models lack.

The domain is ``rotate``: ``arm 48213=`` -> ``82134`` (move the first digit to the
end), 3 to 5 digits, written only with the pivot's characters (``tasks.ALPHABET``), so
the pivot can learn it. It keeps the held-out split of :mod:`tasks`: nothing here
trains on a held-out prompt. Text goes through :func:`packs.tokenize_pair` exactly as
packs and distillation tokenize it, and greedy answers are decoded with any tokenizer.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hivemerge.merge.io.tokens import prompt_ids, response_batch
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.training import save, train

DOMAIN = "rotate"


def rotate_task(rng: random.Random, shortest: int = 3, longest: int = 5) -> tasks.Example:
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(shortest, longest)))
    return tasks.Example(f"arm {s}=", s[1:] + s[0])


def training_examples(count: int, seed: int) -> list[tasks.Example]:
    draw = tasks.training_only(rotate_task)
    rng = random.Random(f"{DOMAIN}:{seed}")
    return [draw(rng) for _ in range(count)]


def held_out(count: int = 200) -> list[tasks.Example]:
    rng = random.Random(f"{DOMAIN}:{tasks.HELD_OUT_SEED}")
    found: list[tasks.Example] = []
    while len(found) < count:
        example = rotate_task(rng)
        if tasks.is_held_out(example.prompt) and example not in found:
            found.append(example)
    return found


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 320):
    """A GPT-2 style byte-level BPE tokenizer, trained on ``texts`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy: only when the expert is built
    from transformers import PreTrainedTokenizerFast  # heavy: transformers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def new_gpt2(vocab_size: int, seed: int, hidden: int = 128, layers: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy: transformers

    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=hidden, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def encode_pairs(examples: list[tasks.Example], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels cover only the response (answer and newline)."""
    return response_batch(tokenizer, [(e.prompt, e.answer + "\n") for e in examples])


@torch.no_grad()
def greedy_accuracy(model, tokenizer, examples: list[tasks.Example], max_new: int = 8) -> float:
    """Exact-match accuracy of greedy answers (up to the newline), any tokenizer; one example at a time
    so no padding question arises (suites are small)."""
    correct = 0
    with single_thread():
        for e in examples:
            cur = torch.tensor([prompt_ids(tokenizer, e.prompt)])
            text = ""
            for _ in range(max_new):
                nxt = int(model(input_ids=cur).logits[0, -1].argmax())
                text += tokenizer.decode([nxt], clean_up_tokenization_spaces=False)
                if "\n" in text:
                    break
                cur = torch.cat([cur, torch.tensor([[nxt]])], 1)
            correct += text.split("\n")[0] == e.answer
    return correct / len(examples)


@torch.no_grad()
def response_loss(model, tokenizer, examples: list[tasks.Example]) -> float:
    """Mean per-token CE on the responses (each model in its own tokenization)."""
    with single_thread():
        return float(model(**encode_pairs(examples, tokenizer)).loss)


def build_hetero_expert(directory: Path, steps: int = 1500, seed: int = 0, hidden: int = 128, layers: int = 4,
                        progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Train (or reuse) the GPT-2 ``rotate`` expert in ``directory``."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = build_bpe_tokenizer([e.text for e in training_examples(4000, seed)] + list(tasks.ALPHABET))
    model = new_gpt2(len(tokenizer), seed, hidden, layers)
    train(model, tokenizer, tasks.training_only(rotate_task), steps, seed + 1, progress=progress, encoder=encode_pairs)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save(model, tokenizer, staging)
    staging.rename(directory)
    return directory
