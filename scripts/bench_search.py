"""Layer-wise search against the best uniform recipe, on the demo's experts.

1. Uniform recipes (one weight, and one density, per model) on a grid, for task
   arithmetic and TIES, each scored on the validation split; the best is kept.
2. CMA-ES over per-layer (or per-block) weights and densities, started from that best
   uniform recipe, scored on the same validation split.
3. Both winners evaluated on the test suites (``tasks.held_out``, 200 per suite, the
   demo's table), which neither the grid nor the search ever saw.

    python scripts/bench_search.py [--budget 200] [--blocks 2] [--count 200] [--compose-count 600] [--seed 0]

Single-threaded (tiny models gain nothing from more threads on a shared machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from hivemerge.merge.evaluation.fitness import Evaluation, ValidationFitness, validation_suites
from hivemerge.merge.recipe import validate_recipe
from hivemerge.merge.search.cmaes import SearchSettings, run_search, save_recipe
from hivemerge.merge.search.space import SearchSpace
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.experts import build_experts
from hivemerge.node.demo import shipped_models

SUITES = list(tasks.SUITES)  # math, strings, logic, compose
DOMAINS = list(tasks.DOMAINS)


def uniform(models: dict, method: str, weights: tuple[float, ...], density: float | None) -> dict:
    entries = []
    for domain, w in zip(DOMAINS, weights):
        params = {"weight": w} if density is None else {"weight": w, "density": density}
        entries.append({"model": str(models[domain]), "parameters": params})
    return {"merge_method": method, "base_model": str(models["base"]), "models": entries, "dtype": "float32", "out_dtype": "float32"}


def grid(models: dict) -> list[dict]:
    recipes = [uniform(models, "task_arithmetic", ws, None) for ws in itertools.product((0.2, 0.5, 1.0, 1.5), repeat=3)]
    recipes += [uniform(models, "ties", ws, d) for d in (0.5, 0.9) for ws in itertools.product((0.25, 0.5, 1.0), repeat=3)]
    return recipes


def describe(document: dict) -> str:
    parts = []
    for domain, entry in zip(DOMAINS, document["models"]):
        p = entry["parameters"]
        parts.append(f"{domain} w={p['weight']}" + (f" d={p['density']}" if "density" in p else ""))
    return f"{document['merge_method']}: " + ", ".join(parts)


def line(name: str, e) -> str:
    cells = "  ".join(f"{s} {100 * e.suites[s]['accuracy']:5.1f}% ({e.suites[s]['loss']:.2f})" for s in SUITES)
    mean = sum(e.suites[s]["accuracy"] for s in SUITES) / len(SUITES)
    return f"{name:<10} {cells}  mean {100 * mean:5.1f}%"


def mean_accuracy(e) -> float:
    return sum(e.suites[s]["accuracy"] for s in SUITES) / len(SUITES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=None,
                        help="trained (or reused) here with the demo's spec; default: the models shipped with hivemerge")
    parser.add_argument("--budget", type=int, default=200, help="search evaluations (the start recipe included)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--count", type=int, default=200, help="validation examples per domain suite")
    parser.add_argument("--compose-count", type=int, default=600,
                        help="validation examples of compose (at ~20%% accuracy its score is the noisiest)")
    parser.add_argument("--loss-weight", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=0.2)
    parser.add_argument("--popsize", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-search"))
    args = parser.parse_args()

    started = time.perf_counter()
    models = (build_experts(args.models.expanduser()) if args.models else shipped_models())
    suites = validation_suites(DOMAINS, args.count)
    suites["compose"] = tasks.validation("compose", args.compose_count)
    val = ValidationFitness(suites, args.loss_weight)
    test = ValidationFitness({s: tasks.held_out(s, tasks.TEST_COUNT) for s in SUITES}, args.loss_weight)

    recipes = grid(models)
    # the grid's scores depend only on the validation data and the fitness: reused from an
    # earlier run into the same --out with the same settings
    cache_path = args.out / "grid.json"
    cache_key = {"count": args.count, "compose_count": args.compose_count, "loss_weight": args.loss_weight, "recipes": recipes}
    cached = json.loads(cache_path.read_text()) if cache_path.is_file() else None
    cached = cached["evaluations"] if cached and cached["key"] == cache_key else None
    scored = []
    for i, document in enumerate(recipes):
        e = Evaluation.from_json(cached[i]) if cached else val(document)
        scored.append((e.score, i, document, e))
        print(f"grid {i + 1}/{len(recipes)}  {e.score:.4f}  {describe(document)}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps({"key": cache_key, "evaluations": [t[3].to_json() for t in scored]}))
    _, _, best_uniform, best_uniform_val = max(scored, key=lambda t: (t[0], -t[1]))
    print(f"best uniform on validation ({len(recipes)} recipes): {describe(best_uniform)}  score {best_uniform_val.score:.4f}")
    grid_seconds = time.perf_counter() - started  # (near 0 when the grid came from grid.json)

    space = SearchSpace(validate_recipe(best_uniform), blocks=args.blocks)

    def progress(p) -> None:
        print(f"search generation {p.generation}/{p.generations}: best {p.best.score:.4f}", file=sys.stderr, flush=True)

    settings = SearchSettings(budget=args.budget, seed=args.seed, popsize=args.popsize, sigma=args.sigma)
    result = run_search(space, val, settings, progress=progress)
    search_seconds = time.perf_counter() - started - grid_seconds
    args.out.mkdir(parents=True, exist_ok=True)
    save_recipe(args.out / "uniform.yaml", best_uniform, f"best uniform recipe of the grid ({len(recipes)} recipes)")
    save_recipe(args.out / "searched.yaml", result.best_recipe,
                f"hivemerge search: {result.evaluations} evaluations, blocks {args.blocks}, seed {args.seed}")
    print(f"search ({result.evaluations} evaluations, {space.dimension} values): validation score "
          f"{result.start.score:.4f} -> {result.best.score:.4f}")

    print(f"\ntest suites (held_out, {tasks.TEST_COUNT} per suite, never seen by grid or search): accuracy (answer loss)")
    rows = {"uniform": test(best_uniform), "searched": test(result.best_recipe)}
    for name, e in rows.items():
        print(line(name, e))
    diff = mean_accuracy(rows["searched"]) - mean_accuracy(rows["uniform"])
    print(f"difference (searched - uniform) in mean accuracy: {100 * diff:+.1f} points")
    print(f"validation: uniform {100 * mean_accuracy(best_uniform_val):.1f}%  searched {100 * mean_accuracy(result.best):.1f}% mean accuracy")
    print(f"time: grid {grid_seconds:.0f}s, search {search_seconds:.0f}s, total {time.perf_counter() - started:.0f}s")
    (args.out / "results.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "grid_size": len(recipes),
        "uniform": {"recipe": best_uniform, "validation": best_uniform_val.to_json(), "test": rows["uniform"].to_json()},
        "searched": {"recipe": result.best_recipe, "validation": result.best.to_json(), "test": rows["searched"].to_json()},
        "history": result.history, "difference_points": 100 * diff,
    }, indent=1))


if __name__ == "__main__":
    main()
