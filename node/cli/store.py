"""``hivemerge store list|prune``: what the node's content store holds, and freeing it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from hivemerge.node.cli.options import HomeOption, JsonTableOption, json_flag
from hivemerge.node.control import node_is_running
from hivemerge.node.storage.retention import inventory, prune as prune_store
from hivemerge.node.ui import err, print_table
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import default_home

app = typer.Typer(
    help="The node's content store: what it holds and why, and removing what nothing needs any more.",
    no_args_is_help=True,
)

KeepOption = Annotated[int, typer.Option(
    "--keep", min=0, help="Consensus results to keep per base: the newest this node attested or fetched.")]


def size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _row(item) -> dict:
    return {"id": item.cid, "kind": item.kind, "bytes": item.size, "kept": item.kept, "reasons": item.reasons}


@app.command("list")
def list_command(
    home: HomeOption = None,
    keep: KeepOption = 1,
    as_json: JsonTableOption = False,
) -> None:
    """Every stored model, delta, pack and probe set, its size, and why it is kept.

    A row with no reason is what `hivemerge store prune` would remove with
    the same --keep.
    """
    items = inventory(default_home(home), keep)
    if as_json:
        print(json.dumps([_row(i) for i in items], indent=2))
        return
    free = sum(i.size for i in items if not i.kept)
    print_table(
        f"{len(items)} stored object(s), {size_text(sum(i.size for i in items))}; {size_text(free)} removable",
        ("id", "kind", "size", "kept because"),
        [(i.cid[:12], i.kind, size_text(i.size), "; ".join(i.reasons) or "-") for i in items],
    )


@app.command()
def prune(
    home: HomeOption = None,
    keep: KeepOption = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    as_json: Annotated[bool, json_flag("Print the removed objects as JSON.")] = False,
) -> None:
    """Remove what nothing on this node needs any more (stop the node first).

    Kept: what the node publishes; whatever a round, search or fusion that
    has not ended names; per base, the --keep newest consensus results it
    attested or fetched, and that base. Removed: older round results and
    fetched copies, other experts' deltas and packs of ended rounds, fused
    deltas of ended rounds. Interrupted downloads stay for the fetch that
    resumes them.
    """
    home = default_home(home)
    if not dry_run and node_is_running(home):
        raise UserInputError(f"a node is running on {home}: stop it first; it may be using what no state file names yet")
    removed = prune_store(home, keep, dry_run=dry_run)
    if as_json:
        print(json.dumps({"dry_run": dry_run, "removed": [_row(i) for i in removed],
                          "bytes": sum(i.size for i in removed)}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        err.print(f"{verb} {item.kind} {item.cid[:12]} ({size_text(item.size)})")
    err.print(f"{verb} {len(removed)} object(s), {size_text(sum(i.size for i in removed))}")
