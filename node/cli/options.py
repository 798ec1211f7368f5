"""Options that several commands share, each declared once: the same flag, help text and
type wherever it appears. The default (None or False) stays at the parameter, as typer
wants it there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

HomeOption = Annotated[Optional[Path], typer.Option("--home", help="Node home (default $HIVEMERGE_HOME or ~/.hivemerge).")]

PeerOption = Annotated[Optional[list[str]], typer.Option("--peer", help="Multiaddr of a peer to join through (repeatable).")]


def json_flag(help: str | None = None) -> Any:
    """``--json``: print the command's result as JSON, with a help line where a command has one."""
    return typer.Option("--json", help=help)


JsonOption = Annotated[bool, json_flag()]

JsonTableOption = Annotated[bool, json_flag("Print as JSON.")]  # commands that print a table otherwise

# typer names the flag after the parameter: it must be called ``overwrite`` (--overwrite/--no-overwrite).
OverwriteOption = Annotated[bool, typer.Option(help="Replace --out if it exists and is not empty.")]

SignerOption = Annotated[Optional[str], typer.Option("--signer", help="Require this signer (fingerprint or public key).")]

NetworkOption = Annotated[Optional[str], typer.Option(
    "--network",
    help="The network to work within: its genesis charter file (e.g. charter.json, signed by its maintainers) "
         "or its id (the genesis is found on the DHT). Without it: a private test network, no charter.",
)]

DomainFilterOption = Annotated[Optional[str], typer.Option("--domain", help="Only this domain.")]
