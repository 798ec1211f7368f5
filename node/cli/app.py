"""The ``hivemerge`` command line.

Every command turns a :class:`UserInputError` into one ``error:`` line on stderr and
exit status 2; other failures exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hivemerge.protocol.errors import UserInputError

app = typer.Typer(
    name="hivemerge",
    help="Merge domain-expert language models, offline or over a peer-to-peer network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
from hivemerge.node.cli import delta as cmd_delta, demo as cmd_demo, identity as cmd_identity, network as cmd_network, round as cmd_round  # noqa: E402
from hivemerge.node.ui import err, quiet_third_party, tensor_progress  # noqa: E402
from hivemerge.node.cli import search as cmd_search  # noqa: E402
from hivemerge.node.cli import fuse as cmd_fuse  # noqa: E402
from hivemerge.node.cli import store as cmd_store  # noqa: E402



def _methods_epilog() -> str:
    from hivemerge.merge.methods import METHODS

    lines = ["Methods (see `hivemerge methods` for their parameters):\n\n"]
    for name, method in sorted(METHODS.items()):
        lines.append(f"  {name}: {method.summary}\n\n")
    return "".join(lines)


# Listed in --help in this order: the main job, offline work, the network.
app.command()(cmd_demo.demo)
app.command("eval")(cmd_demo.eval_command)


@app.command(epilog=_methods_epilog())
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (YAML or JSON, mergekit dialect).")],
    out: Annotated[Path, typer.Option("--out", help="Output model directory (written atomically).")],
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads for the merge math (0: torch's default).", min=0)] = 0,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 2GB or 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists and is not empty.")] = False,
    home: cmd_identity.HomeOption = None,
) -> None:
    """Merge models that share a base, as a recipe says, into a Hugging Face model directory.

    Inputs are model directories, delta files (applied to base_model) or hm://<id>
    content ids from the node's store in --home.
    """
    import torch

    from hivemerge.merge.engine import run_merge
    from hivemerge.merge.recipe import load_recipe
    from hivemerge.merge.io.writer import parse_size
    from hivemerge.node.storage.store import ContentStore
    from hivemerge.protocol.identity import default_home

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise UserInputError(f"--max-shard-size: {exc}") from None
    if threads:
        torch.set_num_threads(threads)
    store = ContentStore(default_home(home))
    plan = load_recipe(recipe, resolver=store.resolve)  # validated whole before any weight is read
    with tensor_progress("merging") as progress:
        result = run_merge(plan, out, device=device, max_shard_bytes=shard_bytes, overwrite=overwrite, progress=progress)
    err.print(
        f"merged {result.tensors} tensors with {plan.method.name} on {result.device} "
        f"in {result.seconds:.1f}s -> {result.out_dir}"
    )


app.command()(cmd_search.search)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the merge methods and their declared parameters."""
    from hivemerge.merge.methods import METHODS

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
    from hivemerge.node.ui import out as stdout

    stdout.print(table)


app.add_typer(cmd_delta.app, name="delta")
app.command()(cmd_fuse.fuse)
app.add_typer(cmd_fuse.app, name="pack")
app.add_typer(cmd_identity.app, name="identity")
app.add_typer(cmd_network.node_app, name="node")
app.command()(cmd_network.publish)
app.command()(cmd_network.experts)
app.command()(cmd_network.fetch)
app.add_typer(cmd_round.app, name="round")
app.add_typer(cmd_store.app, name="store")


def main() -> None:
    quiet_third_party()
    try:
        app(standalone_mode=False)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's usage errors and friends
        import click

        # typer >= 0.2x raises the usage errors of its own vendored click copy, whose
        # classes derive from typer.exceptions.TyperException rather than click's
        usage_errors = (click.ClickException, getattr(typer.exceptions, "TyperException", click.ClickException))
        if isinstance(exc, usage_errors) and hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
