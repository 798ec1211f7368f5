"""Evaluation suites: prompt and answer pairs, by name or from a JSONL file.

A named suite has two splits: ``test`` (what ``hivemerge eval`` and the demo report) and
``validation`` (what a search tunes on; it never overlaps the test split). Names come
from a registry: a package that generates suites registers them (the demo's synthetic
tasks do so in merge/toy/tasks.py, which the command line's demo module imports). Any
other suite is a JSONL file of ``{"prompt": ..., "answer": ...}`` lines, used whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hivemerge.merge.io.jsonl import read_records
from hivemerge.protocol.errors import UserInputError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}\n"


Split = Callable[[int], list[Example]]  # count -> that many examples, the same ones every time


@dataclass(frozen=True)
class NamedSuite:
    test: Split
    validation: Split


NAMED_SUITES: dict[str, NamedSuite] = {}


def register_suite(name: str, test: Split, validation: Split) -> None:
    NAMED_SUITES[name] = NamedSuite(test, validation)


def read_suite_file(name: str) -> list[Example]:
    path = Path(name)
    if not path.is_file():
        raise UserInputError(f"--suite: {name!r} is neither a built-in suite {sorted(NAMED_SUITES)} nor a JSONL file")
    found = [Example(str(p), str(a)) for p, a in read_records(path, ("prompt", "answer"), "a JSONL suite")]
    if not found:
        raise UserInputError(f"{path}: no examples")
    return found


def load_suite(name: str, count: int = 200) -> list[Example]:
    """A named suite's test split (``count`` examples), or a JSONL file (all of it)."""
    return NAMED_SUITES[name].test(count) if name in NAMED_SUITES else read_suite_file(name)


def validation_suite(name: str, count: int) -> list[Example]:
    """A named suite's validation split (never its test examples), or a JSONL file as given."""
    return NAMED_SUITES[name].validation(count) if name in NAMED_SUITES else read_suite_file(name)
