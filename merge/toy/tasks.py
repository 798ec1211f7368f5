"""Synthetic reasoning tasks: three domains and their compositions.

Every example is a prompt and an answer in a small character vocabulary. Each domain
is one skill; a compositional task needs two skills in one problem, which no single
domain expert was trained on. Generation is deterministic for a seed. A fixed tenth
of all prompts (by hash) is held out: the evaluation suites draw only from it and
training (``training_only``) never does, so held-out accuracy is not memorization.

- ``math``:    ``47+38=`` -> ``85``
- ``strings``: ``rev 4821=`` -> ``1284``
- ``logic``:   ``max 37 52=`` -> ``52``
- ``compose``: ``rev 47+38=`` -> ``58`` (math, then strings) and
               ``max 23+41 52=`` -> ``64`` (math, then logic)
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from hivemerge.merge.evaluation.suites import Example, register_suite
from hivemerge.protocol.errors import UserInputError

ALPHABET = "0123456789+= maxrev\n"


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 10**digits - 1)


def math_task(rng: random.Random, digits: int = 2) -> Example:
    a, b = _number(rng, digits), _number(rng, digits)
    return Example(f"{a}+{b}=", str(a + b))


def strings_task(rng: random.Random, digits: int = 4) -> Example:
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, digits)))
    return Example(f"rev {s}=", s[::-1])


def logic_task(rng: random.Random, digits: int = 2) -> Example:
    a, b = _number(rng, digits), _number(rng, digits)
    return Example(f"max {a} {b}=", str(max(a, b)))


def compose_task(rng: random.Random, digits: int = 2) -> Example:
    a, b = _number(rng, digits), _number(rng, digits)
    if rng.random() < 0.5:
        return Example(f"rev {a}+{b}=", str(a + b)[::-1])
    c = _number(rng, digits + 1) % 200
    return Example(f"max {a}+{b} {c}=", str(max(a + b, c)))


DOMAINS: dict[str, Callable[[random.Random], Example]] = {
    "math": math_task,
    "strings": strings_task,
    "logic": logic_task,
}
SUITES: dict[str, Callable[[random.Random], Example]] = {**DOMAINS, "compose": compose_task}
HELD_OUT_SEED = 1_000_003  # far from any training seed
HELD_OUT_SHARE = 10  # one prompt in this many is reserved for evaluation


def is_held_out(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out split (a fixed share of all prompts, by hash)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % HELD_OUT_SHARE == 0


def training_only(sample: Callable[[random.Random], Example]) -> Callable[[random.Random], Example]:
    """``sample`` restricted to the training split: it draws again while the prompt is held out."""

    def draw(rng: random.Random) -> Example:
        while True:
            example = sample(rng)
            if not is_held_out(example.prompt):
                return example

    return draw


def examples(task: str, count: int, seed: int) -> list[Example]:
    make = SUITES[task]
    rng = random.Random(f"{task}:{seed}")
    return [make(rng) for _ in range(count)]


def held_out(task: str, count: int = 200) -> list[Example]:
    """``count`` examples of the held-out split, the same ones every time."""
    make = SUITES[task]
    rng = random.Random(f"{task}:{HELD_OUT_SEED}")
    found: list[Example] = []
    while len(found) < count:
        example = make(rng)
        if is_held_out(example.prompt):
            found.append(example)
    return found


VALIDATION_SEED = 2_000_029
TEST_COUNT = 200  # the test suites reported (held_out(task, 200)); validation never draws them


def validation(task: str, count: int = 100) -> list[Example]:
    """``count`` distinct examples of the held-out split that are not among the test
    examples ``held_out(task, TEST_COUNT)``: data a search may tune on (no model ever
    trained on it) while the test figures stay unseen."""
    make = SUITES[task]
    test = {e.prompt for e in held_out(task, TEST_COUNT)}
    rng = random.Random(f"{task}:{VALIDATION_SEED}")
    found: list[Example] = []
    seen: set[str] = set()
    for _ in range(10_000 * max(1, count)):
        if len(found) == count:
            return found
        example = make(rng)
        if is_held_out(example.prompt) and example.prompt not in test and example.prompt not in seen:
            seen.add(example.prompt)
            found.append(example)
    if len(found) < count:
        raise UserInputError(f"{task}: only {len(found)} validation examples exist outside the test suite (asked {count})")
    return found


# The four tasks are the built-in suites of `hivemerge eval`, `search` and search rounds.
for _task in SUITES:
    register_suite(_task, test=lambda count, task=_task: held_out(task, count),
                   validation=lambda count, task=_task: validation(task, count))
