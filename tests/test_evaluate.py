"""The character tokenizer, the training loop and evaluation (greedy exact match, the
answer loss, ``hivemerge eval``), on tiny real models trained here in about a second."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from delta_fixtures import CliRunner, assert_user_error

from hivemerge.merge.evaluation.evaluate import answer_loss, evaluate, greedy_answers
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.tasks import ALPHABET, Example
from hivemerge.merge.toy.training import BOS, PAD, build_tokenizer, encode, new_model, save, train
from hivemerge.protocol.errors import UserInputError

HIDDEN, LAYERS = 32, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: more threads only oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(list(text))


def mixed_prompts(per_suite: int = 12) -> list[str]:
    """Prompts of every suite: 4 to 14 characters, so left padding is exercised."""
    return [e.prompt for s in tasks.SUITES for e in tasks.held_out(s, per_suite)]


def seven(rng: random.Random) -> Example:
    """A trivial task: any suite's prompt, and the answer is always 7."""
    return Example(tasks.SUITES[rng.choice(sorted(tasks.SUITES))](rng).prompt, "7")


@pytest.fixture(scope="module")
def seven_model(tok):
    """A real tiny model trained hard on ``seven``; returns (model, loss before, loss after)."""
    probe = [seven(random.Random(5)) for _ in range(64)]
    model = new_model(len(tok), seed=1, hidden=HIDDEN, layers=LAYERS)
    before = answer_loss(model, tok, probe)
    train(model, tok, seven, steps=40, seed=0, lr=3e-3, batch=32)
    return model, before, answer_loss(model, tok, probe)


@pytest.fixture(scope="module")
def random_model(tok):
    return new_model(len(tok), seed=2, hidden=HIDDEN, layers=LAYERS).eval()


# -- the tokenizer -----------------------------------------------------------------------

def test_one_token_per_alphabet_character(tok):
    assert len(tok) == 4 + len(ALPHABET)
    assert ids_of(tok, ALPHABET) == list(range(4, 4 + len(ALPHABET)))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD, BOS, 2, 3)


def test_tokenizer_round_trips_every_alphabet_string(tok, tmp_path):
    rng = random.Random(0)
    strings = [ALPHABET, ALPHABET[::-1], "  ", "\n\n", "max 9 9=\n", "rev 0=0\n", *ALPHABET]
    strings += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for s in strings:
        ids = ids_of(tok, s)
        assert len(ids) == len(s) and tok.unk_token_id not in ids
        assert "".join(tok.convert_ids_to_tokens(ids)) == s
        assert tok.decode(ids) == s
        # the tokenizer's own pipeline splits into the same characters; the saved one agrees
        assert tok(s, add_special_tokens=False)["input_ids"] == ids
        assert loaded(s, add_special_tokens=False)["input_ids"] == ids
        assert ids_of(loaded, s) == ids


def test_encode_masks_the_prompt_and_labels_answer_and_newline(tok):
    i = {c: ids_of(tok, c)[0] for c in ALPHABET}
    batch = encode([Example("1+2=", "3"), Example("rev 12=", "21")], tok)
    row0 = [BOS, i["1"], i["+"], i["2"], i["="], i["3"], i["\n"]]
    row1 = [BOS, i["r"], i["e"], i["v"], i[" "], i["1"], i["2"], i["="], i["2"], i["1"], i["\n"]]
    assert batch["input_ids"].tolist() == [row0 + [PAD] * 4, row1]
    assert batch["labels"].tolist() == [
        [-100] * 5 + [i["3"], i["\n"]] + [-100] * 4,
        [-100] * 8 + [i["2"], i["1"], i["\n"]],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0] * 4, [1] * 11]
    assert all(t.dtype == torch.long for t in batch.values())

    prompts_only = encode([Example("1+2=", "3"), Example("rev 12=", "21")], tok, with_answer=False)
    assert prompts_only["input_ids"].tolist() == [row0[:5] + [PAD] * 3, row1[:8]]
    assert (prompts_only["labels"] == -100).all()
    assert prompts_only["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8]


# -- training ----------------------------------------------------------------------------

def _trained(tok, seed: int, progress=None) -> dict[str, torch.Tensor]:
    from hivemerge.merge.toy.experts import base_mix

    model = new_model(len(tok), seed=0, hidden=HIDDEN, layers=LAYERS)
    train(model, tok, base_mix, steps=6, seed=seed, batch=16, progress=progress)
    return model.state_dict()


def test_train_is_deterministic_for_a_seed(tok):
    torch.manual_seed(123)  # the global RNG state must not matter
    calls = []
    a = _trained(tok, seed=4, progress=lambda done, total, loss: calls.append((done, total, loss)))
    torch.manual_seed(456)
    random.seed(789)
    b = _trained(tok, seed=4)
    c = _trained(tok, seed=5)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [(d, t) for d, t, _ in calls] == [(n, 6) for n in range(1, 7)]
    assert all(isinstance(loss, float) and loss > 0 for _, _, loss in calls)
    assert torch.get_num_threads() == 1  # restored to what it was (the fixture's 1)


def test_train_restores_the_thread_count(tok):
    torch.set_num_threads(2)
    try:
        model = new_model(len(tok), seed=0, hidden=16, layers=1)
        train(model, tok, seven, steps=1, seed=0, batch=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_train_lowers_the_loss_on_a_trivial_task(seven_model):
    model, before, after = seven_model
    assert before > 2.5  # ~ln(24): a fresh model knows nothing
    assert after < 0.5 * before, (before, after)
    assert not model.training  # train() leaves the model in eval mode


# -- greedy decoding -----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["random", "seven", "partly trained"])
def test_batched_left_padded_answers_equal_one_prompt_at_a_time(tok, which, random_model, seven_model):
    if which == "random":
        model = random_model
    elif which == "seven":
        model = seven_model[0]
    else:
        from hivemerge.merge.toy.experts import base_mix

        model = new_model(len(tok), seed=3, hidden=HIDDEN, layers=LAYERS)
        train(model, tok, base_mix, steps=15, seed=1, lr=3e-3, batch=32)
    prompts = mixed_prompts()
    assert len({len(p) for p in prompts}) >= 5
    batched = greedy_answers(model, tok, prompts)
    single = [greedy_answers(model, tok, [p])[0] for p in prompts]
    assert batched == single
    # and in another order and batch split: each answer depends only on its own prompt
    order = list(range(len(prompts)))
    random.Random(1).shuffle(order)
    shuffled = greedy_answers(model, tok, [prompts[k] for k in order[:20]]) + \
        greedy_answers(model, tok, [prompts[k] for k in order[20:]])
    assert shuffled == [batched[k] for k in order]


def test_greedy_stops_at_the_newline(tok, seven_model):
    model = seven_model[0]
    prompts = mixed_prompts(5)
    assert greedy_answers(model, tok, prompts) == ["7"] * len(prompts)
    assert greedy_answers(model, tok, prompts, max_new=1) == ["7"] * len(prompts)


class Oracle(torch.nn.Module):
    """A stub causal LM whose logits favour the right next character of the answer it is
    given for each prompt (every prompt ends at its only '='); the loss is the usual shifted
    cross-entropy over the labels."""

    def __init__(self, tok, answers: dict[str, str]):
        super().__init__()
        self.tok, self.answers, self.vocab = tok, answers, len(tok)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r in range(input_ids.shape[0]):
            text = ""
            for c in range(input_ids.shape[1]):
                if mask[r, c]:
                    token = input_ids[r, c].item()
                    text += "" if token == BOS else self.tok.convert_ids_to_tokens(token)
                if "=" not in text:
                    continue
                prompt = text[: text.index("=") + 1]
                target = self.answers[prompt] + "\n"
                done = len(text) - len(prompt)
                if done < len(target):
                    logits[r, c, self.tok.convert_tokens_to_ids(target[done])] = 10.0
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), labels[:, 1:].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss)


@pytest.mark.parametrize("suite", sorted(tasks.SUITES))
def test_a_model_that_knows_the_answers_scores_100(tok, suite):
    examples = tasks.held_out(suite, 60)
    oracle = Oracle(tok, {e.prompt: e.answer for e in examples})
    result = evaluate(oracle, tok, suite, 60)
    assert (result.suite, result.accuracy, result.examples) == (suite, 1.0, 60)
    assert result.loss < 0.01


def test_accuracy_is_the_exact_match_count(tok):
    """An oracle that is wrong on a chosen third of the prompts (it appends a digit, or
    answers one character short): the accuracy is exactly the hand count of the others."""
    examples = tasks.held_out("compose", 90)
    prompts = sorted({e.prompt for e in examples})
    wrong = set(prompts[::3])
    answers = {}
    for k, e in enumerate(examples):
        if e.prompt in wrong:
            answers[e.prompt] = e.answer + "1" if k % 2 else e.answer[:-1]
        else:
            answers[e.prompt] = e.answer
    oracle = Oracle(tok, answers)
    got = greedy_answers(oracle, tok, [e.prompt for e in examples])
    assert got == [answers[e.prompt] for e in examples]
    expected = sum(e.prompt not in wrong for e in examples)
    assert 0 < expected < 90
    assert evaluate(oracle, tok, "compose", 90).accuracy == expected / 90


def test_a_real_model_trained_to_answer_scores_100_and_a_random_one_near_0(tok, tmp_path, seven_model, random_model):
    model = seven_model[0]
    rows = [Example(p, "7") for p in mixed_prompts(10)]
    # a suite where half the answers are 7 (and near misses are not): exactly 50%
    rng = random.Random(0)
    half = [Example(e.prompt, "7" if k % 2 == 0 else rng.choice(["77", "7 ", "07", "8", "17"])) for k, e in enumerate(rows)]
    for name, suite in (("all", rows), ("half", half)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(vars(e)) + "\n" for e in suite))
    assert evaluate(model, tok, str(tmp_path / "all.jsonl")).accuracy == 1.0
    assert evaluate(model, tok, str(tmp_path / "half.jsonl")).accuracy == 0.5
    # on the math suite it scores exactly the share of answers that are 7
    math = tasks.held_out("math", 100)
    assert evaluate(model, tok, "math", 100).accuracy == sum(e.answer == "7" for e in math) / 100
    for suite in tasks.SUITES:
        result = evaluate(random_model, tok, suite, 100)
        assert result.accuracy <= 0.03, (suite, result)
        assert result.loss > 2.5


def test_long_answers_of_a_jsonl_suite_can_be_matched(tok, tmp_path):
    """A user's suite may have answers longer than the built-in ones (at most 4 characters)."""
    rows = [Example("1+1=", "2"), Example("rev 1234567890=", "0987654321"), Example("max 1 2 3 4 5 6 7=", "7777777")]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(vars(e)) + "\n" for e in rows))
    oracle = Oracle(tok, {e.prompt: e.answer for e in rows})
    assert evaluate(oracle, tok, str(path)).accuracy == 1.0
    # and an answer that runs on past the expected one (no newline) is not a match
    runs_on = Oracle(tok, {e.prompt: e.answer + "12" for e in rows})
    assert evaluate(runs_on, tok, str(path)).accuracy == 0.0


def test_answer_loss_is_the_mean_answer_token_cross_entropy(tok, seven_model):
    model = seven_model[0]
    examples = tasks.held_out("logic", 20)
    batch = encode(examples, tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = 0.0, 0
    for r, e in enumerate(examples):
        start = 1 + len(e.prompt)  # BOS and the prompt
        for k, ch in enumerate(e.answer + "\n"):
            logp = torch.log_softmax(logits[r, start + k - 1].double(), -1)
            total -= logp[ids_of(tok, ch)[0]].item()
            n += 1
    assert n == sum(len(e.answer) + 1 for e in examples)
    assert answer_loss(model, tok, examples) == pytest.approx(total / n, rel=1e-5)


# -- saved models and the command line ------------------------------------------------------

@pytest.fixture(scope="module")
def saved_seven(tmp_path_factory, tok, seven_model):
    return save(seven_model[0], tok, tmp_path_factory.mktemp("models") / "seven")


def test_load_model_gives_the_same_model(saved_seven, tok, seven_model):
    model, loaded_tok = load_causal_lm(saved_seven)
    assert not model.training
    original = seven_model[0].state_dict()
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    prompts = mixed_prompts(4)
    assert greedy_answers(model, loaded_tok, prompts) == greedy_answers(seven_model[0], tok, prompts)


def test_load_model_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(UserInputError, match="not a model directory"):
        load_causal_lm(tmp_path / "absent")
    with pytest.raises(UserInputError, match="not a model directory"):
        load_causal_lm(tmp_path)


_EVAL_DRIVER_IMPORTS = (
    "import transformers, hivemerge.merge.evaluation.evaluate, hivemerge.merge.toy.training\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # imported once, before forking\n"
)


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory):
    """Started with the module's first test, so that its imports overlap the tests before
    the command-line ones."""
    # its driver has also imported transformers: each forked `hivemerge eval` skips that
    runner = CliRunner(tmp_path_factory.mktemp("eval-cli"), preload=_EVAL_DRIVER_IMPORTS)
    yield runner
    runner.close()


def test_eval_cli_prints_the_json_results(cli, saved_seven, tmp_path):
    suite = tmp_path / "sevens.jsonl"
    suite.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in mixed_prompts(3)))
    result = cli("eval", saved_seven, "--suite", "math", "--suite", suite, "--count", 30, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    model, tok = load_causal_lm(saved_seven)
    expected = [vars(evaluate(model, tok, "math", 30)), vars(evaluate(model, tok, str(suite)))]
    assert [r["suite"] for r in rows] == ["math", str(suite)]
    assert [(r["accuracy"], r["examples"]) for r in rows] == [(e["accuracy"], e["examples"]) for e in expected]
    assert [(30, sum(e.answer == "7" for e in tasks.held_out("math", 30)) / 30), (12, 1.0)] == \
        [(r["examples"], r["accuracy"]) for r in rows]
    for r, e in zip(rows, expected):
        assert r["loss"] == pytest.approx(e["loss"], rel=1e-4)
    assert "Traceback" not in result.stderr


def test_eval_cli_table(cli, saved_seven):
    result = cli("eval", saved_seven, "--suite", "logic", "--count", 10)
    assert result.returncode == 0, result.stderr
    assert "logic" in result.stdout and "%" in result.stdout


def test_eval_cli_user_errors_exit_2(cli, saved_seven, tmp_path):
    assert_user_error(cli("eval", tmp_path / "no-such-model", "--suite", "math", "--json"),
                      "not a model directory", "no-such-model")
    assert_user_error(cli("eval", saved_seven, "--suite", "arithmetic", "--json"),
                      "--suite: 'arithmetic' is neither a built-in suite")
    assert_user_error(cli("eval", saved_seven, "--suite", "math", "--suite", tmp_path / "absent.jsonl", "--json"),
                      "absent.jsonl", "neither a built-in suite")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "1+2="}\n')
    assert_user_error(cli("eval", saved_seven, "--suite", bad, "--json"), f"{bad}:2: expected a JSON object")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(cli("eval", saved_seven, "--suite", empty), "no examples")
