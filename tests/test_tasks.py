"""The synthetic tasks: right answers, determinism, a held-out split that training
never sees, the alphabet, and JSONL suites."""

from __future__ import annotations

import inspect
import json
import random
import re
import subprocess
import sys

import pytest

from hivemerge.merge.evaluation.suites import load_suite
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.tasks import ALPHABET, Example
from hivemerge.protocol.errors import UserInputError

N = 500  # generated examples per task in the answer checks


class Scripted:
    """A stand-in for random.Random that returns scripted values and records the calls."""

    def __init__(self, *values):
        self.values = list(values)
        self.calls: list[tuple] = []

    def _next(self, call):
        self.calls.append(call)
        return self.values.pop(0)

    def randint(self, a, b):
        return self._next(("randint", a, b))

    def choice(self, seq):
        return self._next(("choice", seq))

    def random(self):
        return self._next(("random",))


# -- answers ---------------------------------------------------------------------------

def test_docstring_examples_exactly():
    assert tasks.math_task(Scripted(47, 38)) == Example("47+38=", "85")
    strings = Scripted(4, "4", "8", "2", "1")
    assert tasks.strings_task(strings) == Example("rev 4821=", "1284")
    assert strings.calls[0] == ("randint", 2, 4)  # 2 to 4 digits
    assert tasks.logic_task(Scripted(37, 52)) == Example("max 37 52=", "52")
    assert tasks.logic_task(Scripted(52, 37)) == Example("max 52 37=", "52")
    assert tasks.compose_task(Scripted(47, 38, 0.3)) == Example("rev 47+38=", "58")
    # the third operand is a 3-digit draw taken modulo 200: 452 -> 52
    compose = Scripted(23, 41, 0.7, 452)
    assert tasks.compose_task(compose) == Example("max 23+41 52=", "64")
    assert compose.calls == [("randint", 0, 99), ("randint", 0, 99), ("random",), ("randint", 0, 999)]
    assert tasks.compose_task(Scripted(23, 41, 0.7, 199)) == Example("max 23+41 199=", "199")
    # a sum whose reversal starts with 0 keeps it: 60 -> "06"
    assert tasks.compose_task(Scripted(25, 35, 0.1)) == Example("rev 25+35=", "06")
    # digits=1 draws 0..9
    one = Scripted(3, 9)
    assert tasks.math_task(one, 1) == Example("3+9=", "12")
    assert one.calls == [("randint", 0, 9), ("randint", 0, 9)]


def test_example_text_is_prompt_answer_newline():
    assert Example("4+5=", "9").text == "4+5=9\n"


def test_math_answers():
    for ex in tasks.examples("math", N, seed=3):
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", ex.prompt).groups())
        assert 0 <= a <= 99 and 0 <= b <= 99
        assert ex.answer == str(a + b)


def test_strings_answers():
    lengths = set()
    for ex in tasks.examples("strings", N, seed=3):
        (s,) = re.fullmatch(r"rev (\d{2,4})=", ex.prompt).groups()
        lengths.add(len(s))
        assert ex.answer == "".join(reversed(s))
    assert lengths == {2, 3, 4}


def test_logic_answers():
    for ex in tasks.examples("logic", N, seed=3):
        a, b = map(int, re.fullmatch(r"max (\d+) (\d+)=", ex.prompt).groups())
        assert 0 <= a <= 99 and 0 <= b <= 99
        assert ex.answer == str(a if a >= b else b)


def test_compose_answers():
    kinds = {"rev": 0, "max": 0}
    for ex in tasks.examples("compose", N, seed=3):
        rev = re.fullmatch(r"rev (\d+)\+(\d+)=", ex.prompt)
        if rev:
            a, b = map(int, rev.groups())
            assert ex.answer == str(a + b)[::-1]
            kinds["rev"] += 1
            continue
        a, b, c = map(int, re.fullmatch(r"max (\d+)\+(\d+) (\d+)=", ex.prompt).groups())
        assert 0 <= c < 200
        total = a + b
        assert ex.answer == str(total if total >= c else c)
        kinds["max"] += 1
    # both compositions, about half each
    assert 175 <= kinds["rev"] <= 325 and 175 <= kinds["max"] <= 325, kinds


# -- determinism -----------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(tasks.SUITES))
def test_generation_is_deterministic_for_a_seed(task):
    assert tasks.examples(task, 100, seed=5) == tasks.examples(task, 100, seed=5)
    assert tasks.examples(task, 100, seed=5) != tasks.examples(task, 100, seed=6)
    assert tasks.held_out(task, 100) == tasks.held_out(task, 100)
    assert tasks.held_out(task, 60) == tasks.held_out(task, 100)[:60]  # a smaller suite is a prefix
    assert load_suite(task, 100) == tasks.held_out(task, 100)


def test_held_out_is_the_same_in_another_process():
    """String seeds hash with SHA-512, not Python's salted hash: same suites under any PYTHONHASHSEED."""
    code = ("import json\nfrom hivemerge.merge.toy import tasks\n"
            "print(json.dumps({t: [[e.prompt, e.answer] for e in tasks.held_out(t, 50)] for t in tasks.SUITES}))")
    here = {t: [[e.prompt, e.answer] for e in tasks.held_out(t, 50)] for t in tasks.SUITES}
    for hashseed in ("1", "4242"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == here


# -- the held-out split ----------------------------------------------------------------

def _training_streams(tmp_path, monkeypatch) -> dict[str, list[str]]:
    """Every prompt build_experts(SPEC) trains on, stage by stage: ``train`` is replaced by a
    recorder, and the recorded sampler is replayed with the recorded seed, steps and batch
    exactly as train() consumes it (one Random(seed), steps * batch draws)."""
    from hivemerge.merge.toy import experts, training

    batch_default = inspect.signature(training.train).parameters["batch"].default
    recorded = []

    def record(model, tokenizer, sample, steps, seed, lr=None, batch=batch_default, progress=None):
        recorded.append((sample, steps, seed, batch))

    monkeypatch.setattr(experts, "train", record)
    # the samplers do not depend on the model: a smaller one is quicker to make and save
    monkeypatch.setattr(experts, "new_model", lambda vocab, seed, hidden, layers: training.new_model(vocab, seed, 16, 1))
    experts.build_experts(tmp_path / "models", spec=experts.SPEC, workers=1)  # in this process, where train is the recorder
    stages = ["base", *tasks.DOMAINS]
    assert len(recorded) == len(stages)
    streams = {}
    for stage, (sample, steps, seed, batch) in zip(stages, recorded):
        assert steps == experts.SPEC["base_steps" if stage == "base" else "expert_steps"]
        rng = random.Random(seed)
        streams[stage] = [sample(rng).prompt for _ in range(steps * batch)]
    return streams


def test_held_out_prompts_are_never_trained_on(tmp_path, monkeypatch):
    """Asserted precisely: with the real SPEC (at the time of writing 1500 base steps and
    600 per expert at batch 64: 211,200 training draws), none of the 200 held-out prompts
    of any built-in suite is ever drawn for training. (Before the split, 196 of the 198
    distinct held-out math prompts were in the math expert's training stream.)"""
    from hivemerge.merge.toy.experts import SPEC

    streams = _training_streams(tmp_path, monkeypatch)
    assert sum(map(len, streams.values())) == 64 * (SPEC["base_steps"] + 3 * SPEC["expert_steps"])
    trained = set().union(*map(set, streams.values()))
    assert not any(tasks.is_held_out(p) for p in trained)
    for suite in tasks.SUITES:
        held = {e.prompt for e in tasks.held_out(suite, 200)}
        assert all(tasks.is_held_out(p) for p in held)
        assert held.isdisjoint(trained), (suite, sorted(held & trained)[:5])
    # each expert still trains mostly on its own domain (replay 0.2 of the base mix)
    shapes = {"math": r"\d+\+\d+=", "strings": r"rev \d+=", "logic": r"max \d+ \d+="}
    for domain, pattern in shapes.items():
        share = sum(bool(re.fullmatch(pattern, p)) for p in streams[domain]) / len(streams[domain])
        assert share > 0.8, (domain, share)


def test_held_out_split_is_a_tenth_and_suites_are_varied():
    prompts = [e.prompt for e in tasks.examples("math", 5000, seed=11)]
    share = sum(map(tasks.is_held_out, prompts)) / len(prompts)
    assert 0.08 < share < 0.12, share
    distinct = {s: len({e.prompt for e in tasks.held_out(s, 200)}) for s in tasks.SUITES}
    # math and logic have 1,000 held-out prompts, compose more; strings has ~10 of 2 digits
    assert distinct["math"] >= 150 and distinct["logic"] >= 150 and distinct["compose"] >= 180, distinct
    assert distinct["strings"] >= 100, distinct


# -- the alphabet ----------------------------------------------------------------------

def test_every_character_is_in_the_alphabet():
    from hivemerge.merge.toy.experts import base_mix

    rng = random.Random(0)
    texts = [base_mix(rng).text for _ in range(2000)]
    for task in tasks.SUITES:
        texts += [e.text for e in tasks.examples(task, 1000, seed=1)]
        texts += [e.text for e in tasks.held_out(task, 200)]
    used = set("".join(texts))
    assert used <= set(ALPHABET), used - set(ALPHABET)
    assert used == set(ALPHABET)  # and every character of it is used
    assert len(set(ALPHABET)) == len(ALPHABET)  # one token id per character


# -- JSONL suites ----------------------------------------------------------------------

def test_load_suite_reads_jsonl(tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n  \n{"prompt": "max 3 9=", "answer": 9, "note": "x"}\n')
    assert load_suite(str(path)) == [Example("1+1=", "2"), Example("max 3 9=", "9")]
    # count applies to built-in suites only: a file is taken whole
    assert len(load_suite(str(path), count=1)) == 2


@pytest.mark.parametrize("line", [
    "{not json", '{"prompt": "1+1="}', '{"answer": "2"}', '["1+1=", "2"]', '"1+1="', "5", "null",
])
def test_load_suite_rejects_a_malformed_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n' + line + "\n")
    with pytest.raises(UserInputError) as info:
        load_suite(str(path))
    assert str(info.value) == f"{path}:2: expected a JSON object with prompt and answer"


def test_load_suite_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(UserInputError, match="neither a built-in suite"):
        load_suite(str(tmp_path / "absent.jsonl"))
    with pytest.raises(UserInputError, match="neither a built-in suite"):
        load_suite("arithmetic")  # not a suite name, not a file
    with pytest.raises(UserInputError, match="neither a built-in suite"):
        load_suite(str(tmp_path))  # a directory
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserInputError, match="no examples"):
            load_suite(str(tmp_path / name))


def test_load_suite_rejects_a_binary_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x80\x00\xff\xfe{}")
    with pytest.raises(UserInputError, match="not UTF-8 text"):
        load_suite(str(path))
