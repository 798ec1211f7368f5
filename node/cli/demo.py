"""``hivemerge eval`` and ``hivemerge demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# The demo's synthetic tasks register themselves as the built-in suites (math, strings,
# logic, compose) of `eval`, `search` and search rounds: the CLI offers them by name.
from hivemerge.merge.toy import tasks
from hivemerge.merge.evaluation.evaluate import evaluate
from hivemerge.merge.evaluation.suites import load_suite
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.node.cli.options import JsonOption
from hivemerge.node.ui import err, out


def eval_command(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (transformers, safetensors).")],
    suite: Annotated[list[str], typer.Option("--suite", help="math, strings, logic, compose, or a JSONL file of {prompt, answer} (repeatable).")],
    count: Annotated[int, typer.Option(help="Examples per built-in suite.", min=1)] = 200,
    as_json: JsonOption = False,
) -> None:
    """Exact-match accuracy of greedy answers, and the answer loss, on held-out suites."""
    for s in suite:  # a wrong --suite is reported before any model is loaded
        load_suite(s, count)
    model, tokenizer = load_causal_lm(model_dir)
    results = [vars(evaluate(model, tokenizer, s, count)) for s in suite]
    if as_json:
        print(json.dumps(results, indent=2))
        return
    table = Table(title=str(model_dir))
    for column in ("suite", "accuracy", "loss", "examples"):
        table.add_column(column)
    for r in results:
        table.add_row(r["suite"], f"{100 * r['accuracy']:.1f}%", f"{r['loss']:.3f}", str(r["examples"]))
    out.print(table)


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write results.json, results.png and the consensus model.")] = Path("hivemerge-demo"),
    workdir: Annotated[Optional[Path], typer.Option(help="Node homes, scratch and retrained models (default ~/.cache/hivemerge/demo).")] = None,
    count: Annotated[int, typer.Option(help="Examples per suite.", min=10)] = 200,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the base and the experts again (many minutes; cached in --workdir) "
                                                     "instead of using those shipped with hivemerge.")] = False,
) -> None:
    """The main job: experts, a local network, a merge round healed with the experts' logit packs, the consensus model, the table."""
    from hivemerge.node.demo import run_demo  # heavy: the engine and the toy training

    workdir = workdir or Path.home() / ".cache" / "hivemerge" / "demo"
    # One display of our own: a spinner with the time spent on the step under way, and a
    # bar per training stage when the models are trained.
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}[/]"), BarColumn(), TextColumn("{task.fields[steps]}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        step = bar.add_task("", total=None, steps="")
        tasks_by_stage: dict = {}

        def say(message: str) -> None:
            err.print(f"[bold cyan]>[/] {message}")
            bar.reset(step, description=message[:60], total=None)

        def train_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks_by_stage:
                tasks_by_stage[stage] = bar.add_task(f"training {stage}", total=total, steps="")
                err.print(f"  training {stage} ({total} steps)")
            bar.update(tasks_by_stage[stage], completed=done, steps=f"{done}/{total}")

        result = run_demo(workdir, out_dir, say=say, train_progress=train_progress, count=count, retrain=retrain)

    table = Table(title=f"hivemerge demo: accuracy % (loss) on {count} held-out examples per suite")
    table.add_column("model")
    for s in tasks.SUITES:
        table.add_column(s, justify="right")
    for name, row in result["results"].items():
        table.add_row(name, *[f"{100 * row[s]['accuracy']:.1f} ({row[s]['loss']:.2f})" for s in tasks.SUITES])
    out.print(table)
    # whole lines (no wrapping), for a user to compare with another machine's
    healed = "healed: healing trains, its bytes vary with the CPU" if result["fusion_verdict"] == "kept" else "the weight merge"
    out.print(f"weight merge id (before healing; the same on every machine): {result['weight_merge_id']}", soft_wrap=True)
    out.print(f"consensus id ({healed}): {result['consensus_id']}", soft_wrap=True)
    err.print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.png'} in {result['seconds']:.0f}s")
