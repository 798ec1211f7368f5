"""``hivemerge identity new|show``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hivemerge.node.cli.options import HomeOption, JsonOption
from hivemerge.protocol.identity import KEY_FILE, Identity, default_home

app = typer.Typer(help="The node's Ed25519 identity (stored with mode 0600 in its home).", no_args_is_help=True)


def _print(identity: Identity, home: Path, as_json: bool) -> None:
    info = {"fingerprint": identity.fingerprint, "public_key": identity.public_hex, "key_file": str(home / KEY_FILE)}
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"fingerprint  {info['fingerprint']}\npublic key   {info['public_key']}\nkey file     {info['key_file']}")


@app.command()
def new(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Create a new identity (refuses to overwrite an existing one)."""
    home = default_home(home)
    identity = Identity.generate()
    identity.save(home)
    _print(identity, home, as_json)


@app.command()
def show(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Show the identity's fingerprint and public key."""
    home = default_home(home)
    _print(Identity.load(home), home, as_json)
