"""``hivemerge search``: CMA-ES over per-layer merge weights and densities."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hivemerge.merge.recipe import load_recipe
from hivemerge.merge.search.space import SearchSpace
from hivemerge.node.cli.options import HomeOption, json_flag
from hivemerge.node.storage.store import ContentStore
from hivemerge.node.ui import err, out
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import default_home


def search(
    recipe: Annotated[Path, typer.Argument(help="Start recipe (task_arithmetic, ties, dare_ties, ...): its models, method and values.")],
    suite: Annotated[list[str], typer.Option("--suite", help="math, strings, logic, compose (their validation split, never the test examples), or a JSONL file of {prompt, answer} (repeatable).")],
    budget: Annotated[int, typer.Option(help="Candidate recipes to evaluate, the start recipe included.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the best recipe (YAML, an ordinary recipe).")],
    blocks: Annotated[Optional[int], typer.Option(help="Blocks of consecutive layers sharing one value (default: one per layer).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the search; the same seed gives the same result.")] = 0,
    checkpoint: Annotated[Optional[Path], typer.Option(help="JSON checkpoint, written after every generation; an existing one is resumed.")] = None,
    popsize: Annotated[Optional[int], typer.Option(help="Candidates per generation (default: CMA-ES's, 4 + 3 ln d).")] = None,
    count: Annotated[int, typer.Option(help="Validation examples per built-in suite.")] = 100,
    loss_weight: Annotated[float, typer.Option(help="Fitness = mean accuracy - this x mean answer loss.")] = 0.25,
    sigma: Annotated[float, typer.Option(help="Initial step size, as a share of each value's range.")] = 0.2,
    max_weight: Annotated[float, typer.Option(help="Upper bound of the searched weights (lower bound 0).")] = 2.0,
    as_json: Annotated[bool, json_flag("Print the outcome as JSON.")] = False,
    home: HomeOption = None,
) -> None:
    """Search per-layer merge weights (and densities) with CMA-ES on validation data.

    For every merged model the search varies one weight (and one density, for
    TIES, DARE and breadcrumbs) per block of layers, plus one for the tensors
    outside the layers, starting from the recipe's own values. Each candidate
    is merged in memory with the engine and scored on the suites' validation
    examples: score = mean accuracy - loss weight x mean answer loss. The best
    recipe is written as an ordinary recipe with per-layer tables, ready for
    `hivemerge merge`. --checkpoint makes a long search resumable.
    """
    from hivemerge.merge.evaluation.fitness import ValidationFitness, validation_suites  # heavy: the engine
    from hivemerge.merge.search.cmaes import SearchSettings, plan, run_search, save_recipe  # heavy: the engine

    settings = SearchSettings(budget=budget, seed=seed, popsize=popsize, sigma=sigma)
    settings.check()
    suites = validation_suites(suite, count)
    if out_path.resolve() == recipe.resolve():
        raise UserInputError("--out: would overwrite the start recipe; choose another file")
    store = ContentStore(default_home(home))
    start = load_recipe(recipe, resolver=store.resolve)
    space = SearchSpace(start, blocks=blocks, max_weight=max_weight, recipe_dir=recipe.parent)
    fitness = ValidationFitness(suites, loss_weight, recipe_dir=recipe.parent, resolver=store.resolve)
    pop, generations = plan(settings, space.dimension)
    err.print(
        f"searching {space.dimension} values ({len(space.params)} parameter(s) x {len(start.inputs)} models x "
        f"{len(space.blocks)} blocks + outside the layers): {generations} generations of {pop} on {', '.join(suites)}"
    )
    with Progress(TextColumn("[bold]searching[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("", total=1 + generations * pop)

        def progress(p) -> None:
            bar.update(task, completed=p.evaluations, total=p.total, description=f"best {p.best.score:.4f}")
            err.print(f"generation {p.generation}/{p.generations}: best score {p.best.score:.4f}" + (" (from checkpoint)" if p.resumed else ""))

        result = run_search(space, fitness, settings, checkpoint=checkpoint, progress=progress, fitness_id=fitness.describe())
    comment = (
        f"found by `hivemerge search` (seed {seed}, {result.evaluations} evaluations, suites {', '.join(suites)}): "
        f"score {result.best.score:.4f}, start recipe {result.start.score:.4f}"
    )
    save_recipe(out_path, result.best_recipe, comment)
    summary = {
        "out": str(out_path), "evaluations": result.evaluations, "start": result.start.to_json(), "best": result.best.to_json(),
        "history": [{"generation": h["generation"], "best": h["best"], "mean": h["mean"]} for h in result.history],
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"validation: start recipe vs best of {result.evaluations}")
    for column in ("suite", "start accuracy", "best accuracy", "start loss", "best loss"):
        table.add_column(column, justify="right" if column != "suite" else "left")
    for name in suites:
        s, b = result.start.suites[name], result.best.suites[name]
        table.add_row(name, f"{100 * s['accuracy']:.1f}%", f"{100 * b['accuracy']:.1f}%", f"{s['loss']:.3f}", f"{b['loss']:.3f}")
    table.add_row("score", f"{result.start.score:.4f}", f"{result.best.score:.4f}", "", "")
    out.print(table)
    err.print(f"wrote the best recipe to {out_path}")
