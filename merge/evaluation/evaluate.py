"""Evaluation: exact-match accuracy of greedy answers, and the answer loss.

Decoding is a batched greedy loop over left-padded prompts that stops at a newline,
so a suite of a few hundred examples takes seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.toy.tasks import Example, load_suite
from hivemerge.protocol.errors import UserInputError


@dataclass
class SuiteResult:
    suite: str
    accuracy: float
    loss: float
    examples: int


def load_model(directory: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserInputError(f"{directory}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[Example]) -> float:
    from hivemerge.merge.toy.training import encode

    batch = encode(examples, tokenizer)
    return float(model(**batch).loss)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new: int = 6) -> list[str]:
    from hivemerge.merge.toy.training import BOS, PAD

    encoded = [[BOS] + tokenizer.convert_tokens_to_ids(list(p)) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding: every prompt ends at the same column
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    newline = tokenizer.convert_tokens_to_ids("\n")
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t == newline:
                    done[i] = True
                else:
                    out[i].append(t)
        if done.all():
            break
        ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(nxt).unsqueeze(1)], 1)
    return ["".join(tokenizer.convert_ids_to_tokens(o)) for o in out]


def evaluate(model, tokenizer, suite: str, count: int = 200) -> SuiteResult:
    from hivemerge.merge.toy.training import single_thread

    examples = load_suite(suite, count)
    answers = []
    with single_thread():
        for i in range(0, len(examples), 256):
            part = examples[i : i + 256]
            # room for the longest answer and its newline (a JSONL suite's answers may be long)
            answers += greedy_answers(model, tokenizer, [e.prompt for e in part], max_new=max(len(e.answer) for e in part) + 1)
        loss = answer_loss(model, tokenizer, examples[:256])
    correct = sum(a == e.answer for a, e in zip(answers, examples))
    return SuiteResult(suite, correct / len(examples), loss, len(examples))
