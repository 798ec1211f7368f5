"""``hivemerge merge`` (a recipe, offline) and ``hivemerge methods`` (the merge methods)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hivemerge.merge.io.writer import parse_size
from hivemerge.merge.methods import METHODS
from hivemerge.merge.numerics.threads import use_threads
from hivemerge.merge.recipe import load_recipe
from hivemerge.node.cli.options import HomeOption, JsonTableOption, OverwriteOption
from hivemerge.node.storage.store import ContentStore
from hivemerge.node.ui import err, out as stdout, tensor_progress  # `out` is merge's --out
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import default_home


def methods_epilog() -> str:
    """The end of ``merge --help``: every method with its summary."""
    lines = ["Methods (see `hivemerge methods` for their parameters):\n\n"]
    for name, method in sorted(METHODS.items()):
        lines.append(f"  {name}: {method.summary}\n\n")
    return "".join(lines)


def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (YAML or JSON, mergekit dialect).")],
    out: Annotated[Path, typer.Option("--out", help="Output model directory (written atomically).")],
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads for the merge (0: the cores this process may use).", min=0)] = 0,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 2GB or 500MB.")] = "2GB",
    overwrite: OverwriteOption = False,
    home: HomeOption = None,
) -> None:
    """Merge models that share a base, as a recipe says, into a Hugging Face model directory.

    Inputs are model directories, delta files (applied to base_model) or hm://<id>
    content ids from the node's store in --home.
    """
    from hivemerge.merge.engine import run_merge  # heavy: the engine

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise UserInputError(f"--max-shard-size: {exc}") from None
    use_threads(threads or None)
    store = ContentStore(default_home(home))
    plan = load_recipe(recipe, resolver=store.resolve)  # validated whole before any weight is read
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    with tensor_progress("merging") as progress:
        result = run_merge(plan, out, device=device, max_shard_bytes=shard_bytes, overwrite=overwrite, progress=progress)
    err.print(
        f"merged {result.tensors} tensors with {plan.method.name} on {result.device} "
        f"in {result.seconds:.1f}s -> {result.out_dir}"
    )


def methods(as_json: JsonTableOption = False) -> None:
    """List the merge methods and their declared parameters."""
    described = [m.describe() for _, m in sorted(METHODS.items())]
    if as_json:
        print(json.dumps(described, indent=2))
        return
    table = Table(title="merge methods", show_lines=True)
    for column in ("method", "inputs", "global parameters", "per-model parameters", "summary"):
        table.add_column(column)

    def fmt(params: list[dict]) -> str:
        return "\n".join(
            f"{p['name']}: {p['type']} {p['range']}" + (" (required)" if p["required"] else f" = {p['default']}")
            for p in params
        ) or "-"

    for d in described:
        inputs = d["models"] + (" + base" if d["requires_base"] else "")
        table.add_row(d["name"], inputs, fmt(d["global_parameters"]), fmt(d["model_parameters"]), d["summary"])
    stdout.print(table)
