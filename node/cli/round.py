"""``hivemerge round propose|status``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from hivemerge.merge.recipe import read_recipe_document
from hivemerge.node.cli.connect import connect
from hivemerge.node.cli.options import HomeOption, JsonOption
from hivemerge.node.storage.home import SEARCHES_DIR, StateDir
from hivemerge.node.ui import err, print_table
from hivemerge.protocol.identity import default_home

app = typer.Typer(help="Merge rounds: agree on a merge, compute it everywhere, attest the result.", no_args_is_help=True)


@app.command()
def propose(
    recipe: Annotated[Path, typer.Argument(help="Round recipe (YAML/JSON): merge_method, base_model, select, deadline, ...")],
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Announce a signed merge round for the running node's network."""
    document = read_recipe_document(recipe)
    base = document.get("base_model")
    if isinstance(base, str) and not base.startswith("hm://"):
        candidate = Path(base).expanduser()
        if not candidate.exists() and (recipe.parent / candidate).exists():
            candidate = recipe.parent / candidate
        document["base_model"] = str(candidate.resolve())
    replay = document["fusion"].get("replay") if isinstance(document.get("fusion"), dict) else None
    if isinstance(replay, str) and not replay.startswith("hm://"):  # a replay file: found as base_model is
        for candidate in (Path(replay).expanduser(), recipe.parent / Path(replay).expanduser()):
            if candidate.is_file():
                document["fusion"]["replay"] = str(candidate.resolve())
                break
    fusion = document.get("fusion")
    if isinstance(fusion, dict) and fusion.get("fuser") is None and not as_json:
        err.print("this node is the round's fuser: it distils the fusion step before it proposes the round")
    with connect(home, None) as node:
        proposal = node.propose(document=document)
    if as_json:
        print(json.dumps(proposal, indent=2))
        return
    left = proposal["deadline"] - time.time()
    kind = "search round" if "search" in proposal else "round"
    err.print(f"proposed {kind} {proposal['round_id'][:12]} for base {proposal['base_id'][:12]}; commitments close in {left:.0f}s")
    print(proposal["round_id"])


@app.command()
def status(
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rounds this node took part in: phase, participants, exclusions with reasons, attestations."""
    with connect(home, None) as node:
        rows = node.round_status()
        charter = node.charter_status()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if charter["charter"] is None:
        err.print("no network charter: a private test network (any key may propose, commit and attest)")
    else:
        document = charter["charter"]["charter"]
        roles = ", ".join(f"{key[:16]}: {'/'.join(r)}" for key, r in sorted(document["roster"].items()))
        print(f"network {document['name']}, charter version {document['version']} ({charter['id'][:12]}); roster: {roles}")
    print_table(f"{len(rows)} round(s)", ("round", "phase", "participants", "attested", "final", "result", "excluded"), [(
        r["proposal"]["round_id"][:12], r["phase"] + (f" ({r['error']})" if r.get("error") else ""),
        str(len(r["commitments"])), str(len(r["attestations"])), "yes" if r["final"] else "no",
        (r["final_result"] or r.get("result_id") or "-")[:12],
        "\n".join(f"{d[:12]}: {why}" for d, why in (r.get("excluded") or {}).items()) or "-",
    ) for r in rows])
    ignored = [(r["proposal"]["round_id"][:12], what, why) for r in rows for what, why in sorted((r.get("ignored") or {}).items())]
    if ignored:
        print_table(f"{len(ignored)} record(s) ignored under the charter", ("round", "record", "why"), ignored)
    _print_fusions(rows)
    _print_searches(home)


def fusion_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    """(round, fuser, fused delta, replay set, verdict) of every round with a fusion step."""
    return [(r["proposal"]["round_id"][:12], (f["fuser"] or "-")[:12], (f["delta_id"] or "-")[:12],
             (f["replay_id"] or "-")[:12], f["verdict"]) for r in rows if (f := r.get("fusion"))]


def _print_fusions(rows: list[dict]) -> None:
    """The fusion step of the rounds that have one, in a table of its own (the rounds table is full)."""
    found = fusion_rows(rows)
    if not found:
        return
    print_table(f"{len(found)} fusion step(s)", ("round", "fuser", "fused delta", "replay", "verdict"), found)


def _print_searches(home) -> None:
    """Search rounds this node took part in (their local state files), if any."""
    states = StateDir(default_home(home) / SEARCHES_DIR).states()  # a damaged file is reported and skipped
    if not states:
        return
    columns = ("search", "phase", "roles", "generations", "best score", "final round")
    print_table(f"{len(states)} search round(s)", columns, [(
        s["proposal"]["round_id"][:12], s["phase"] + (f" ({s['error']})" if s.get("error") else ""), ", ".join(s["roles"]),
        f"{len(s.get('history') or [])}/{s['proposal']['search']['generations']}",
        "-" if s.get("best", {}).get("score") is None else f"{s['best']['score']:.4f}", (s.get("final_round") or "-")[:12],
    ) for s in states])
