"""`hivemerge search`: the layer-wise space, validation data, CMA-ES determinism and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from search_fixtures import char_family as make_char_family

from hivemerge.merge.evaluation.evaluate import score_examples
from hivemerge.merge.evaluation.fitness import Evaluation, InMemoryMerger, ValidationFitness, validation_suites
from hivemerge.merge.recipe import validate_recipe
from hivemerge.merge.search.cmaes import SearchSettings, run_search
from hivemerge.merge.search.space import SearchSpace, split_blocks
from hivemerge.merge.toy import tasks
from hivemerge.protocol.errors import UserInputError


@pytest.fixture(scope="module")
def char_family(tmp_path_factory) -> dict[str, Path]:
    return make_char_family(tmp_path_factory.mktemp("search-family"))


def _ties(family: dict[str, Path]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(family["b"]), "parameters": {"weight": [0.2, 0.8]}},  # a gradient; density: default 1.0
        ],
        "dtype": "float32",
    }


# -- validation data -------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(tasks.SUITES))
def test_validation_never_draws_a_test_prompt(task):
    test = {e.prompt for e in tasks.held_out(task, tasks.TEST_COUNT)}
    val = tasks.validation(task, 300)
    prompts = [e.prompt for e in val]
    assert len(prompts) == 300 and len(set(prompts)) == 300
    assert not set(prompts) & test
    assert all(tasks.is_held_out(p) for p in prompts)  # no model trained on them either
    assert tasks.validation(task, 300) == val  # the same every time
    assert validation_suites([task], 50)[task] == val[:50]


def test_validation_suites_refuse_unknown_names():
    with pytest.raises(UserInputError, match="neither a built-in suite"):
        validation_suites(["nope"], 10)


# -- the space: vector -> recipe -------------------------------------------------------

def test_split_blocks():
    assert split_blocks(4, 2) == [[0, 1], [2, 3]]
    assert split_blocks(5, 2) == [[0, 1], [2, 3, 4]]
    assert split_blocks(4, 4) == [[0], [1], [2], [3]]
    assert split_blocks(4, 1) == [[0, 1, 2, 3]]


def test_vector_to_recipe_by_hand(char_family):
    space = SearchSpace(validate_recipe(_ties(char_family)), blocks=2, max_weight=2.0)
    labels = [c.label for c in space.coords]
    assert labels == [
        f"models[{m}].{p}.{b}" for m in (0, 1) for p in ("weight", "density") for b in ("default", "block0", "block1")
    ]
    # start: weight 1.0 of [0, 2] -> 0.5; density 0.5 of [0.1, 1] -> 4/9; the gradient [0.2, 0.8]
    # over 4 layers is 0.2 outside the layers, 0.2/0.4 in layers 0-1 (mean 0.3), 0.6/0.8 in 2-3 (mean 0.7)
    assert space.start == pytest.approx([0.5, 0.5, 0.5, 4 / 9, 4 / 9, 4 / 9, 0.1, 0.15, 0.35, 1.0, 1.0, 1.0])
    x = [0.25, 0.0, 1.0, 0.5, 0.2, 1.3, 0.6, 0.75, -0.2, 1.0, 0.0, 0.123456]
    document = space.recipe(x)
    a, b = document["models"][0]["parameters"], document["models"][1]["parameters"]
    assert a["weight"] == {"per_layer": [0.0, 0.0, 2.0, 2.0], "default": 0.5}
    assert a["density"] == {"per_layer": [0.28, 0.28, 1.0, 1.0], "default": 0.55}  # 1.3 clips to 1
    assert b["weight"] == {"per_layer": [1.5, 1.5, 0.0, 0.0], "default": 1.2}
    assert b["density"] == {"per_layer": [0.1, 0.1, 0.2111, 0.2111], "default": 1.0}  # 0.1 + 0.9 * 0.123456, 4 digits
    assert document["models"][0]["model"] == str(char_family["a"].resolve())
    recipe = validate_recipe(document)  # an ordinary recipe
    assert recipe.model_params_for(recipe.inputs[0], "model.layers.3.mlp.up_proj.weight") == {"weight": 2.0, "density": 1.0}
    assert recipe.model_params_for(recipe.inputs[1], "lm_head.weight") == {"weight": 1.2, "density": 1.0}


@pytest.mark.parametrize("method, params, searched", [
    ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, ("weight", "density")),
    ("nuslerp", {"weight": 1.0}, ("weight",)),
    ("multislerp", {"weight": 1.0}, ("weight",)),
])
def test_the_new_methods_search_their_weights_and_densities(char_family, tmp_path, method, params, searched):
    """The methods with per-model weights (and densities) are searched like ties; the
    recipe a point gives merges."""
    from hivemerge.merge.engine import run_merge

    document = {"merge_method": method, "base_model": str(char_family["base"]), "dtype": "float32",
                "models": [{"model": str(char_family[m]), "parameters": dict(params)} for m in ("a", "b")]}
    space = SearchSpace(validate_recipe(document), blocks=2)
    assert [c.label for c in space.coords] == [f"models[{m}].{p}.{b}" for m in (0, 1) for p in searched
                                               for b in ("default", "block0", "block1")]
    run_merge(validate_recipe(space.recipe([0.4] * space.dimension)), tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_space_refuses_what_it_cannot_search(char_family):
    slerp = {"merge_method": "slerp", "base_model": str(char_family["base"]),
             "models": [{"model": str(char_family["base"])}, {"model": str(char_family["a"])}], "parameters": {"t": 0.5}}
    with pytest.raises(UserInputError, match="no per-model weight"):
        SearchSpace(validate_recipe(slerp))
    with pytest.raises(UserInputError, match="--blocks: must be between 1 and the number of layers \\(4\\), got 5"):
        SearchSpace(validate_recipe(_ties(char_family)), blocks=5)
    task_arithmetic = {**_ties(char_family), "merge_method": "task_arithmetic"}
    task_arithmetic["models"] = [{"model": m["model"], "parameters": {"weight": 0.5}} for m in task_arithmetic["models"]]
    assert SearchSpace(validate_recipe(task_arithmetic)).dimension == 2 * (4 + 1)  # weights only, one per layer


# -- the fitness: the in-memory merge is the engine's merge ------------------------------

def test_fitness_merges_like_the_engine(char_family, tmp_path):
    from hivemerge.merge.engine import run_merge
    from hivemerge.merge.io.models import load_causal_lm

    space = SearchSpace(validate_recipe(_ties(char_family)), blocks=2)
    document = space.recipe([0.3, 0.6, 0.9, 0.5, 0.2, 0.8, 0.7, 0.1, 0.4, 0.6, 0.3, 0.9])
    suites = validation_suites(["math", "logic"], 6)
    fitness = ValidationFitness(suites, loss_weight=0.5)
    got = fitness(document)
    merger = fitness._merger
    run_merge(validate_recipe(document), tmp_path / "merged", device="cpu")
    model, tokenizer = load_causal_lm(tmp_path / "merged")
    for name, tensor in model.state_dict().items():
        assert torch.equal(merger.state[name], tensor), name
    expected = {s: score_examples(model, tokenizer, ex) for s, ex in suites.items()}
    for s, (accuracy, loss) in expected.items():
        assert got.suites[s] == {"accuracy": accuracy, "loss": pytest.approx(loss, abs=1e-6)}
    mean_acc = sum(a for a, _ in expected.values()) / 2
    mean_loss = sum(l for _, l in expected.values()) / 2
    assert got.score == pytest.approx(mean_acc - 0.5 * mean_loss, abs=1e-6)
    assert mean_loss > 0
    # a second candidate reuses the model object and gives what a fresh merger gives
    other = space.recipe([0.9] * space.dimension)
    fitness(other)
    fresh = InMemoryMerger(validate_recipe(other))
    fresh.load(validate_recipe(other))
    for name in merger.state:
        assert torch.equal(merger.state[name], fresh.state[name])


# -- the CMA-ES loop on a fitness with a known optimum ---------------------------------

class Quadratic:
    """Maximal (0) where every searched value equals its target; counts its calls."""

    def __init__(self, space: SearchSpace, target: list[float]):
        self.space, self.target, self.calls = space, target, 0

    def __call__(self, document: dict) -> Evaluation:
        self.calls += 1
        values = []
        for c in self.space.coords:
            table = document["models"][c.model]["parameters"][c.param]
            values.append(table["default"] if c.block is None else table["per_layer"][self.space.blocks[c.block][0]])
        return Evaluation(-sum((v - t) ** 2 for v, t in zip(values, self.target)))


@pytest.fixture()
def quadratic(char_family):
    space = SearchSpace(validate_recipe(_ties(char_family)), blocks=2)
    target = [c.low + (c.high - c.low) * (0.15 + 0.7 * i / 11) for i, c in enumerate(space.coords)]
    return space, target


def test_search_finds_a_known_optimum(quadratic):
    space, target = quadratic
    fitness = Quadratic(space, target)
    result = run_search(space, fitness, SearchSettings(budget=700, seed=1))
    assert result.start.score < -1.0  # far away at the start
    found = [c.value(u) for c, u in zip(space.coords, _best_units(space, result.best_recipe))]
    assert found == pytest.approx(target, abs=0.05)
    assert result.best.score > -0.005
    assert result.evaluations == 1 + (699 // 11) * 11  # popsize 4 + int(3 ln 12) = 11
    assert fitness.calls <= result.evaluations  # candidates that round to one recipe are evaluated once


def _best_units(space: SearchSpace, document: dict) -> list[float]:
    units = []
    for c in space.coords:
        table = document["models"][c.model]["parameters"][c.param]
        v = table["default"] if c.block is None else table["per_layer"][space.blocks[c.block][0]]
        units.append(c.unit(v))
    return units


def test_same_seed_same_search(quadratic):
    space, target = quadratic
    runs = [run_search(space, Quadratic(space, target), SearchSettings(budget=60, seed=s)) for s in (7, 7, 8)]
    np.random.seed(123)  # a caller's draws must not matter either
    np.random.rand(5)
    again = run_search(space, Quadratic(space, target), SearchSettings(budget=60, seed=7))
    for other in (runs[1], again):
        assert other.history == runs[0].history
        assert other.best_recipe == runs[0].best_recipe and other.best.score == runs[0].best.score
    assert runs[2].history != runs[0].history  # the seed matters


def test_candidates_do_not_depend_on_the_last_bits_of_the_strategy(quadratic):
    """Nodes with other numpy/BLAS builds may differ in the last bits of CMA-ES's state;
    the candidates (hence the recipes and their content ids) are rounded and stay the same."""
    from hivemerge.merge.search.cmaes import CANDIDATE_DECIMALS, ask, replay

    space, target = quadratic
    settings = SearchSettings(budget=60, seed=4, popsize=5)
    scores = [[-0.5, -0.25, -1.0, -0.75, -0.1], [-0.3, -0.2, -0.6, -0.05, -0.9]]
    here, there = replay(space, settings, scores), replay(space, settings, scores)
    there.mean = there.mean * (1 + 1e-14)  # another machine's rounding
    there.sigma = there.sigma * (1 - 1e-14)
    drawn = ask(here, settings.seed, 2)
    assert drawn == ask(there, settings.seed, 2)
    assert all(v == round(v, CANDIDATE_DECIMALS) for x in drawn for v in x)
    unrounded = [[float(v) for v in x] for x in here._hm_asked]
    assert unrounded != [[float(v) for v in x] for x in there._hm_asked]  # the states did differ
    assert max(abs(a - b) for x, y in zip(drawn, unrounded) for a, b in zip(x, y)) <= 0.5 * 10.0 ** -CANDIDATE_DECIMALS


def test_resume_equals_an_uninterrupted_run(quadratic, tmp_path):
    space, target = quadratic
    settings = SearchSettings(budget=80, seed=5, popsize=6)
    whole = run_search(space, Quadratic(space, target), settings)
    assert len(whole.history) == 13

    checkpoint = tmp_path / "search.json"
    first = Quadratic(space, target)
    partial = run_search(space, first, settings, checkpoint=checkpoint, stop_after=4)
    assert len(partial.history) == 4 and first.calls == 1 + 4 * 6
    saved = json.loads(checkpoint.read_text())
    assert len(saved["generations"]) == 4 and saved["settings"]["seed"] == 5
    assert len(saved["generations"][0]["candidates"]) == 6

    np.random.seed(99)  # what ran in between must not matter
    second = Quadratic(space, target)
    resumed = run_search(space, second, settings, checkpoint=checkpoint)
    assert second.calls == 9 * 6  # nothing evaluated twice
    assert resumed.history == whole.history
    assert resumed.best_recipe == whole.best_recipe and resumed.best.score == whole.best.score
    assert resumed.evaluations == whole.evaluations == 1 + 13 * 6

    # a checkpoint of other settings is refused, not silently mixed in
    with pytest.raises(UserInputError, match="other settings"):
        run_search(space, Quadratic(space, target), SearchSettings(budget=80, seed=6, popsize=6), checkpoint=checkpoint)
    # a longer budget goes on from the finished checkpoint
    longer = run_search(space, Quadratic(space, target), SearchSettings(budget=92, seed=5, popsize=6), checkpoint=checkpoint)
    assert longer.history[:13] == whole.history and len(longer.history) == 15


@pytest.mark.parametrize("damage, problem", [
    (lambda d: d.update(start={"score": "high"}), "start is not an evaluation"),
    (lambda d: d.update(start=None), "generations without a start"),
    (lambda d: d.update(generations={"0": 1}), "generations is not a list"),
    (lambda d: d["generations"].append(["x"]), "generation 2 is not an object"),
    (lambda d: d["generations"][1]["evaluations"].pop(), "generation 1 does not hold 6 candidates"),
    (lambda d: d["generations"][0].pop("candidates"), "generation 0 does not hold 6 candidates"),
    (lambda d: d["generations"][0]["evaluations"][3].pop("score"), "generation 0 has an evaluation without a numeric score"),
    (lambda d: d["generations"][1]["evaluations"][0].update(score=True), "generation 1 has an evaluation without a numeric score"),
    (lambda d: d["generations"][1]["evaluations"][0].update(suites=[]), "generation 1 has an evaluation without a numeric score"),
])
def test_a_damaged_checkpoint_is_refused_with_what_is_wrong(quadratic, tmp_path, damage, problem):
    space, target = quadratic
    settings = SearchSettings(budget=80, seed=5, popsize=6)
    checkpoint = tmp_path / "search.json"
    run_search(space, Quadratic(space, target), settings, checkpoint=checkpoint, stop_after=2)
    data = json.loads(checkpoint.read_text())
    damage(data)
    checkpoint.write_text(json.dumps(data))
    fitness = Quadratic(space, target)
    with pytest.raises(UserInputError, match=f"damaged search checkpoint \\({problem}"):
        run_search(space, fitness, settings, checkpoint=checkpoint)
    assert fitness.calls == 0  # refused before anything was evaluated


def test_search_settings_are_checked():
    for settings, message in [
        (SearchSettings(budget=1), "--budget"), (SearchSettings(budget=10, popsize=1), "--popsize"),
        (SearchSettings(budget=10, sigma=0), "--sigma"), (SearchSettings(budget=10, seed=-1), "--seed"),
    ]:
        with pytest.raises(UserInputError, match=message):
            settings.check()


# -- the command ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    from cli_runner import CliRunner

    runner = CliRunner(tmp_path_factory.mktemp("search-cli"), preload="import hivemerge.merge.search.cmaes, hivemerge.merge.evaluation.fitness")
    yield runner
    runner.close()


def test_search_command(cli, char_family, tmp_path):
    recipe = tmp_path / "start.yaml"
    recipe.write_text(yaml.safe_dump(_ties(char_family)))
    out = tmp_path / "found.yaml"
    argv = ["search", recipe, "--suite", "math", "--suite", "compose", "--budget", "7", "--popsize", "3",
            "--count", "4", "--blocks", "2", "--out", out, "--json", "--checkpoint", tmp_path / "ck.json"]
    first = cli(*argv)
    summary = first.json()
    assert summary["evaluations"] == 7 and len(summary["history"]) == 2
    assert summary["best"]["score"] >= summary["start"]["score"]
    assert "generation 2/2" in first.stderr
    found = yaml.safe_load(out.read_text())
    assert out.read_text().startswith("# found by `hivemerge search`")
    recipe_found = validate_recipe(found)
    assert found["models"][0]["parameters"]["weight"]["per_layer"][0] == found["models"][0]["parameters"]["weight"]["per_layer"][1]
    # the best recipe's score is reproducible from the file alone
    again = ValidationFitness(validation_suites(["math", "compose"], 4), 0.25)(found)
    assert again.score == pytest.approx(summary["best"]["score"], abs=1e-9)
    assert recipe_found.method.name == "ties"
    # resuming the finished checkpoint evaluates nothing and gives the same recipe
    rerun = cli(*argv)
    assert rerun.json()["best"] == summary["best"] and "(from checkpoint)" in rerun.stderr
    assert yaml.safe_load(out.read_text()) == found


@pytest.mark.parametrize("change, message", [
    ({"--suite": "nonsense"}, "--suite: 'nonsense' is neither a built-in suite"),
    ({"--budget": "1"}, "--budget: must be at least 2"),
    ({"--blocks": "9"}, "--blocks: must be between 1 and the number of layers (4), got 9"),
    ({"method": "slerp"}, "merge_method: slerp has no per-model weight to search"),
])
def test_search_command_errors(cli, char_family, tmp_path, change, message):
    document = _ties(char_family)
    if change.get("method") == "slerp":
        document = {"merge_method": "slerp", "base_model": document["base_model"],
                    "models": [{"model": document["base_model"]}, {"model": str(char_family["a"])}], "parameters": {"t": 0.5}}
    recipe = tmp_path / "start.yaml"
    recipe.write_text(yaml.safe_dump(document))
    options = {"--suite": "math", "--budget": "5", "--out": str(tmp_path / "o.yaml"), "--count": "2"}
    options.update({k: v for k, v in change.items() if k.startswith("--")})
    argv = ["search", recipe] + [x for kv in options.items() for x in kv]
    result = cli(*argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr_lines == [f"error: {message}"] or (len(result.stderr_lines) == 1 and message in result.stderr)
    assert not (tmp_path / "o.yaml").exists()


def test_next_candidates_is_the_search_rule(quadratic):
    """What a network search relies on: from the settings and the earlier scores alone,
    any process draws the candidates the search itself drew."""
    from hivemerge.merge.search.cmaes import next_candidates

    space, target = quadratic
    settings = SearchSettings(budget=25, seed=11, popsize=4)
    fitness = Quadratic(space, target)
    asked: list[list[list[float]]] = []
    scores: list[list[float]] = []
    result = run_search(space, fitness, settings, progress=lambda p: None)
    for h in result.history:
        scores.append(h["scores"])
    for g in range(len(scores) + 1):
        asked.append(next_candidates(space, settings, scores[:g]))
    for g, xs in enumerate(asked[:-1]):
        assert [fitness_of(space, target, x) for x in xs] == scores[g]
    assert len(asked[-1]) == 4 and asked[-1] != asked[-2]


def fitness_of(space, target, x) -> float:
    return Quadratic(space, target)(space.recipe(x)).score
