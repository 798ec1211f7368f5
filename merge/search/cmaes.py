"""CMA-ES over a layer-wise recipe space, deterministic for a seed and resumable.

The strategy (the ``cma`` package) draws from numpy's global generator. Every call into
it (construction, each ``ask`` and each ``tell``) runs under a generator seeded from
(seed, generation, step) and the caller's generator state is restored afterwards, so a
run depends on nothing but its seed and the fitness values, whatever else the process
draws in between.

The checkpoint is JSON (no pickle): the settings of the run and every generation's
candidates and evaluations. Resuming builds a fresh strategy with the same seed and
replays each generation (``ask`` must give back the stored candidates bit for bit, then
``tell`` the stored fitness), which restores the strategy exactly without evaluating
anything again; the run then goes on as if never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from hivemerge.merge.evaluation.fitness import Evaluation, Fitness
from hivemerge.merge.search.space import SearchSpace
from hivemerge.protocol.errors import UserInputError

CHECKPOINT_VERSION = 1
DEFAULT_SIGMA = 0.2  # in units of each coordinate's range


@dataclass
class SearchSettings:
    budget: int  # candidate evaluations, the start recipe included
    seed: int = 0
    popsize: int | None = None  # None: CMA-ES's default for the dimension
    sigma: float = DEFAULT_SIGMA

    def check(self) -> None:
        if self.budget < 2:
            raise UserInputError(f"--budget: must be at least 2 (the start recipe and one candidate), got {self.budget}")
        if self.popsize is not None and self.popsize < 2:
            raise UserInputError(f"--popsize: must be at least 2, got {self.popsize}")
        if not 0 < self.sigma <= 1:
            raise UserInputError(f"--sigma: must be in (0, 1], got {self.sigma}")
        if self.seed < 0:
            raise UserInputError(f"--seed: must be non-negative, got {self.seed}")


@dataclass
class Progress:
    evaluations: int
    total: int
    generation: int
    generations: int
    best: Evaluation
    resumed: bool = False  # this generation came from the checkpoint


@dataclass
class SearchResult:
    best_recipe: dict
    best: Evaluation
    start: Evaluation
    history: list[dict] = field(default_factory=list)  # per generation: best so far, mean, candidates' scores
    evaluations: int = 0


def default_popsize(dimension: int) -> int:
    return 4 + int(3 * math.log(dimension))


def plan(settings: SearchSettings, dimension: int) -> tuple[int, int]:
    """(population size, generations) that fit the budget (one evaluation goes to the start recipe)."""
    popsize = settings.popsize or default_popsize(dimension)
    popsize = max(2, min(popsize, settings.budget - 1))
    return popsize, max(1, (settings.budget - 1) // popsize)


def _seed_for(seed: int, *parts: object) -> int:
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


@contextmanager
def _numpy_seeded(seed: int, *parts: object) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(_seed_for(seed, *parts))
    try:
        yield
    finally:
        np.random.set_state(state)


def new_strategy(start: list[float], seed: int, popsize: int, sigma: float):
    import cma  # heavy: about 3 s to import, only when a search runs

    options = {
        "seed": _seed_for(seed, "init") or 1, "popsize": popsize, "bounds": [0.0, 1.0], "verbose": -9,
        "verb_log": 0, "verb_disp": 0, "maxiter": 10**9, "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9,
        "tolfunhist": 0, "tolstagnation": 10**9,
    }
    with _numpy_seeded(seed, "init"):
        return cma.CMAEvolutionStrategy(list(start), sigma, options)


# Candidates are rounded to this many decimals (of their [0, 1] coordinates). The nodes
# of a network search each run CMA-ES; numpy builds (BLAS) may differ in the last bits of
# the strategy's linear algebra, and rounding keeps such differences out of the recipes,
# hence out of the candidates' content ids that every node must agree on.
CANDIDATE_DECIMALS = 6


def ask(es, seed: int, generation: int) -> list[list[float]]:
    with _numpy_seeded(seed, generation, "ask"):
        es._hm_asked = es.ask()
    return [[round(float(v), CANDIDATE_DECIMALS) for v in x] for x in es._hm_asked]


def tell(es, seed: int, generation: int, scores: list[float]) -> None:
    with _numpy_seeded(seed, generation, "tell"):
        es.tell(es._hm_asked, [-s for s in scores])  # CMA-ES minimizes


def replay(space: SearchSpace, settings: SearchSettings, scores: list[list[float]]):
    """The strategy after generations whose candidates got ``scores`` (one list per
    generation, in candidate order): a pure function of the space, the settings and the
    scores, which is what lets every node of a network search draw the same candidates."""
    popsize, _ = plan(settings, space.dimension)
    es = new_strategy(space.start, settings.seed, popsize, settings.sigma)
    for generation, generation_scores in enumerate(scores):
        xs = ask(es, settings.seed, generation)
        if len(generation_scores) != len(xs):
            raise ValueError(f"generation {generation}: {len(generation_scores)} scores for {len(xs)} candidates")
        tell(es, settings.seed, generation, list(generation_scores))
    return es


def next_candidates(space: SearchSpace, settings: SearchSettings, scores: list[list[float]]) -> list[list[float]]:
    """The candidates of generation ``len(scores)``, given every earlier generation's scores."""
    es = replay(space, settings, scores)
    return ask(es, settings.seed, len(scores))


def settings_fingerprint(space: SearchSpace, settings: SearchSettings, fitness_id: dict) -> dict:
    """What a checkpoint must match to be resumed (the budget may grow)."""
    return {
        "space": space.describe(), "seed": settings.seed, "popsize": plan(settings, space.dimension)[0],
        "sigma": settings.sigma, "fitness": fitness_id,
    }


def _load_checkpoint(path: Path, fingerprint: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"--checkpoint {path}: not a readable search checkpoint ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
        raise UserInputError(f"--checkpoint {path}: not a search checkpoint of version {CHECKPOINT_VERSION}")
    if data.get("settings") != json.loads(json.dumps(fingerprint)):
        raise UserInputError(
            f"--checkpoint {path}: made by a search with other settings (recipe, blocks, suites, seed, popsize or sigma); "
            "use another checkpoint file or the same settings"
        )
    problem = _checkpoint_problem(data, fingerprint["popsize"])
    if problem:
        raise UserInputError(f"--checkpoint {path}: damaged search checkpoint ({problem}); delete it to start over")
    return data


def _is_evaluation(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("score"), (int, float)) and not isinstance(value["score"], bool)
            and isinstance(value.get("suites", {}), dict))


def _checkpoint_problem(data: dict, popsize: int) -> str | None:
    """What is wrong with a checkpoint's stored results, or None: they are trusted as the
    run's own, so their shape is checked before any is used."""
    if data.get("start") is not None and not _is_evaluation(data["start"]):
        return "start is not an evaluation"
    generations = data.get("generations")
    if not isinstance(generations, list):
        return "generations is not a list"
    if generations and data.get("start") is None:
        return "generations without a start"
    for index, generation in enumerate(generations):
        if not isinstance(generation, dict):
            return f"generation {index} is not an object"
        candidates, evaluations = generation.get("candidates"), generation.get("evaluations")
        if not (isinstance(candidates, list) and isinstance(evaluations, list) and len(candidates) == len(evaluations) == popsize):
            return f"generation {index} does not hold {popsize} candidates and their evaluations"
        if not all(_is_evaluation(e) for e in evaluations):
            return f"generation {index} has an evaluation without a numeric score"
    return None


def _save_checkpoint(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)


def run_search(
    space: SearchSpace,
    fitness: Fitness,
    settings: SearchSettings,
    checkpoint: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    fitness_id: dict | None = None,
    stop_after: int | None = None,
) -> SearchResult:
    """CMA-ES from the space's start point; returns the best recipe evaluated.

    ``fitness_id`` names what the fitness measures (suites, counts, weights) for the
    checkpoint; ``stop_after`` ends the run after that many generations in total (as an
    interruption would; resuming then goes on)."""
    settings.check()
    popsize, generations = plan(settings, space.dimension)
    fingerprint = settings_fingerprint(space, settings, fitness_id or {})
    saved = _load_checkpoint(checkpoint, fingerprint) if checkpoint else None
    data = saved or {"version": CHECKPOINT_VERSION, "settings": fingerprint, "start": None, "generations": []}
    total = 1 + generations * popsize

    cache: dict[str, Evaluation] = {}

    def evaluate(document: dict) -> Evaluation:
        key = json.dumps(document, sort_keys=True)
        if key not in cache:
            cache[key] = fitness(document)
        return cache[key]

    start_recipe = space.recipe(space.start)
    if data["start"] is None:
        start = evaluate(start_recipe)
        data["start"] = start.to_json()
        if checkpoint:
            _save_checkpoint(checkpoint, data)
    else:
        start = Evaluation.from_json(data["start"])
    best, best_x = start, list(space.start)
    history: list[dict] = []
    done = 1

    def record(generation: int, xs: list[list[float]], evaluations: list[Evaluation], resumed: bool) -> None:
        nonlocal best, best_x, done
        for x, e in zip(xs, evaluations):
            if e.score > best.score:  # strictly better: ties keep the earlier candidate
                best, best_x = e, x
        done += len(xs)
        scores = [e.score for e in evaluations]
        history.append({"generation": generation, "best": best.score, "mean": sum(scores) / len(scores), "scores": scores})
        if progress:
            progress(Progress(done, total, generation + 1, generations, best, resumed))

    es = new_strategy(space.start, settings.seed, popsize, settings.sigma)
    for generation, stored in enumerate(data["generations"]):
        xs = ask(es, settings.seed, generation)
        if xs != stored["candidates"]:
            raise UserInputError(f"--checkpoint {checkpoint}: replaying generation {generation} drew other candidates; the checkpoint does not belong to this run")
        evaluations = [Evaluation.from_json(e) for e in stored["evaluations"]]
        tell(es, settings.seed, generation, [e.score for e in evaluations])
        record(generation, xs, evaluations, resumed=True)

    for generation in range(len(data["generations"]), generations):
        if stop_after is not None and generation >= stop_after:
            break
        xs = ask(es, settings.seed, generation)
        evaluations = [evaluate(space.recipe(x)) for x in xs]
        tell(es, settings.seed, generation, [e.score for e in evaluations])
        data["generations"].append({"candidates": xs, "evaluations": [e.to_json() for e in evaluations]})
        if checkpoint:
            _save_checkpoint(checkpoint, data)
        record(generation, xs, evaluations, resumed=False)

    return SearchResult(space.recipe(best_x), best, start, history, done)


def save_recipe(path: Path, document: dict, comment: str = "") -> Path:
    """Write ``document`` as a YAML recipe (atomically), with ``comment`` as a header line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120))
    os.replace(staging, path)
    return path
