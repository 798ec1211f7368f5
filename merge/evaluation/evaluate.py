"""Evaluation: exact-match accuracy of greedy answers, and the answer loss.

Decoding is a batched greedy loop over left-padded prompts that stops at a newline,
so a suite of a few hundred examples takes seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hivemerge.merge.evaluation.suites import Example, load_suite
from hivemerge.merge.io.tokens import left_padded, pad_id, prompt_ids, response_batch
from hivemerge.merge.numerics.threads import single_thread


@dataclass
class SuiteResult:
    suite: str
    accuracy: float
    loss: float
    examples: int


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[Example]) -> float:
    """Mean cross-entropy on the answers and their newline (the prompts are context only)."""
    return float(model(**response_batch(tokenizer, [(e.prompt, e.answer + "\n") for e in examples])).loss)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new: int = 6) -> list[str]:
    """Each prompt's greedy continuation up to its first newline (or ``max_new`` tokens), as
    text. Prompts are left-padded so that one forward pass extends them all; any tokenizer."""
    ids, mask = left_padded([prompt_ids(tokenizer, p) for p in prompts], pad_id(tokenizer))
    out: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    for _ in range(max_new):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                texts[i] = tokenizer.decode(out[i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                done[i] = "\n" in texts[i]
        if all(done):
            break
        ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(nxt).unsqueeze(1)], 1)
    return [text.split("\n", 1)[0] for text in texts]


@torch.no_grad()
def score_examples(model, tokenizer, examples: list[Example], batch: int = 256) -> tuple[float, float]:
    """(exact-match accuracy of greedy answers, mean answer loss) on ``examples``: the one
    scorer of ``hivemerge eval``, the demo, and a search's fitness."""
    correct, loss_sum = 0, 0.0
    for i in range(0, len(examples), batch):
        part = examples[i : i + batch]
        # room for the longest answer and its newline (a JSONL suite's answers may be long)
        answers = greedy_answers(model, tokenizer, [e.prompt for e in part], max_new=max(len(e.answer) for e in part) + 1)
        correct += sum(a == e.answer for a, e in zip(answers, part))
        loss_sum += answer_loss(model, tokenizer, part) * len(part)
    return correct / len(examples), loss_sum / len(examples)


def evaluate(model, tokenizer, suite: str, count: int = 200) -> SuiteResult:
    examples = load_suite(suite, count)
    with single_thread():
        accuracy, loss = score_examples(model, tokenizer, examples)
    return SuiteResult(suite, accuracy, loss, len(examples))
