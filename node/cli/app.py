"""The ``hivemerge`` command line: builds the app, registers the command groups (one module
each, see __init__.py) and runs it.

Every command turns a :class:`UserInputError` into one ``error:`` line on stderr and
exit status 2, a :class:`ComputationError` (a merge that produced NaN) into one line and
exit status 1; other failures exit 1.
"""

from __future__ import annotations

import sys

import typer

from hivemerge.node.cli import charter as cmd_charter
from hivemerge.node.cli import delta as cmd_delta
from hivemerge.node.cli import demo as cmd_demo
from hivemerge.node.cli import fuse as cmd_fuse
from hivemerge.node.cli import identity as cmd_identity
from hivemerge.node.cli import merge as cmd_merge
from hivemerge.node.cli import network as cmd_network
from hivemerge.node.cli import round as cmd_round
from hivemerge.node.cli import search as cmd_search
from hivemerge.node.cli import store as cmd_store
from hivemerge.node.ui import quiet_third_party
from hivemerge.protocol.errors import ComputationError, UserInputError

app = typer.Typer(
    name="hivemerge",
    help="Merge domain-expert language models, offline or over a peer-to-peer network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Listed in --help in this order: the main job, offline work, the network.
app.command()(cmd_demo.demo)
app.command("eval")(cmd_demo.eval_command)
app.command(epilog=cmd_merge.methods_epilog())(cmd_merge.merge)
app.command()(cmd_search.search)
app.command()(cmd_merge.methods)
app.add_typer(cmd_delta.app, name="delta")
app.command()(cmd_fuse.fuse)
app.add_typer(cmd_fuse.app, name="pack")
app.add_typer(cmd_identity.app, name="identity")
app.add_typer(cmd_charter.app, name="network")
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
    except ComputationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's usage errors and friends
        import click  # only on this path: start-up does not load click (typer has its own copy)

        # typer >= 0.2x raises the usage errors of its own vendored click copy, whose
        # classes derive from typer.exceptions.TyperException rather than click's
        usage_errors = (click.ClickException, getattr(typer.exceptions, "TyperException", click.ClickException))
        if isinstance(exc, usage_errors) and hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
