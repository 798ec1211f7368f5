"""Network commands: ``node start``, ``publish``, ``experts``, ``fetch`` (the charter's
``network ...`` commands are in charter.py)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from hivemerge.merge.deltas.codecs import DEFAULT_CODEC
from hivemerge.merge.io.writer import parse_size
from hivemerge.merge.numerics.threads import use_threads
from hivemerge.node.cli.charter import network_ref, public_key
from hivemerge.node.cli.connect import connect
from hivemerge.node.cli.options import (
    DomainFilterOption, HomeOption, JsonOption, NetworkOption, OverwriteOption, PeerOption,
)
from hivemerge.node.control import ControlServer
from hivemerge.node.storage.store import DEFAULT_MAX_STORE
from hivemerge.node.ui import err, print_table
from hivemerge.protocol.charter import charter_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import default_home

node_app = typer.Typer(help="Run a hivemerge node.", no_args_is_help=True)


@node_app.command("start")
def start(
    home: HomeOption = None,
    listen: Annotated[Optional[list[str]], typer.Option("--listen", help="Multiaddr to listen on (repeatable).")] = None,
    peer: PeerOption = None,
    network: NetworkOption = None,
    record_ttl: Annotated[float, typer.Option(help="Seconds a DHT record lives unless refreshed.", min=10)] = 300.0,
    keep_results: Annotated[Optional[int], typer.Option(
        "--keep-results", min=0,
        help="Each time a round this node attested is known final or not, prune the store as "
             "`hivemerge store prune --keep N` does (off by default).",
    )] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1,
        help="CPU threads for merges and screening (default: the cores this process may use; fewer leave room for "
             "other work on the machine).",
    )] = None,
    max_store: Annotated[Optional[str], typer.Option(
        "--max-store",
        help="Most bytes the content store may hold, staging included (e.g. 500GiB, 2000GB); a fetch that "
             "would exceed it is refused before anything is written. Default 200GiB.",
    )] = None,
) -> None:
    """Join (or start) the network and serve until SIGINT/SIGTERM, then leave cleanly (or,
    should its p2p daemon die, say so and stop with exit status 1)."""
    genesis = network_ref(network) if network is not None else None  # checked before anything starts
    from hivemerge.node.node import DEFAULT_LISTEN, Node  # heavy: hivemind

    try:
        store_bytes = DEFAULT_MAX_STORE if max_store is None else parse_size(max_store)
    except (ValueError, OverflowError) as exc:  # OverflowError: "inf"
        raise UserInputError(f"--max-store: {exc}") from None
    home = default_home(home)
    threads = use_threads(threads)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    within = {} if genesis is None else {"network": genesis}  # dict: the signed genesis; str: its id
    node = Node(home, listen=listen or DEFAULT_LISTEN, peers=peer or [], record_ttl=record_ttl, keep_results=keep_results,
                max_store=store_bytes, **within)
    try:
        control = ControlServer(home, node)
    except BaseException:
        node.close()
        raise
    try:
        print(f"node {node.peer_id} (identity {node.identity.fingerprint}) on {home}, {threads} CPU thread(s)", flush=True)
        for maddr in node.maddrs():
            print(f"listening {maddr}", flush=True)
        if genesis is None:  # said once the node is up: a start that fails says only why
            err.print("no --network: this node runs a private test network without a charter (anyone's records count)")
        elif isinstance(genesis, str):
            print(f"network {genesis} (its genesis is looked up on the DHT)", flush=True)
        else:
            print(f"network {genesis['charter']['name']} (genesis {charter_id(genesis['charter'])})", flush=True)
        print("serving; Ctrl-C to stop", flush=True)
        while not stop.wait(1.0) and not node.daemon_died.is_set():
            pass
    finally:
        control.close()
        node.close()
        print("node stopped", flush=True)
    if node.daemon_died.is_set():
        raise SystemExit(1)  # the node logged why ("p2p daemon died")


def publish(
    model_dir: Annotated[Path, typer.Argument(help="The expert model directory, or a PEFT LoRA adapter directory of the base "
                                                   "(published as its low-rank factors).")],
    domain: Annotated[str, typer.Option("--domain", help="What the expert is good at, e.g. math.")],
    base: Annotated[Path, typer.Option("--base", help="The base model directory it was fine-tuned from.")],
    codec: Annotated[Optional[str], typer.Option("--codec", help="Delta codec (default: ternary).")] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Extract the signed delta, store it in the running node, and advertise the expert."""
    with connect(home, None) as node:
        record = node.publish(model_dir=str(model_dir.resolve()), domain=domain, base_dir=str(base.resolve()),
                              codec=codec or DEFAULT_CODEC)
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        err.print(f"published {domain} expert: delta {record['delta_id'][:12]} ({record['size']:,} bytes)")
        print(record["delta_id"])


def experts(
    domain: DomainFilterOption = None,
    as_json: JsonOption = False,
    home: HomeOption = None,
    peer: PeerOption = None,
) -> None:
    """What the network offers, from the DHT: published experts (deltas of a base) and
    heterogeneous experts' logit packs (for rounds with a fusion step)."""
    with connect(home, peer) as node:
        rows = [{"kind": "expert", **r} for r in node.experts(domain=domain)]
        packs = [{"kind": "pack", **r} for r in node.packs(domain=domain)]
    if as_json:
        print(json.dumps(rows + packs, indent=2))
        return
    columns = ("kind", "domain", "id", "model", "base / probe", "codecs / top-k", "size", "publisher")
    print_table(f"{len(rows)} expert(s), {len(packs)} pack(s)", columns, [
        *[("expert", r["domain"], r["delta_id"][:12], r["expert_id"][:12], r["base_id"][:12],
           ", ".join(f"{k} {v}" for k, v in sorted(r["codecs"].items())), f"{r['size']:,}", r["publisher"][:16]) for r in rows],
        *[("pack", r["domain"], r["pack_id"][:12], r["model_id"][:12], r["probe_id"][:12], f"top-{r['top_k']}",
           f"{r['size']:,}", r["publisher"][:16]) for r in packs],
    ])


def fetch(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write it (a directory).")],
    content: Annotated[
        Optional[str], typer.Argument(help="A delta id, an expert id or any content id (hm://ID or ID); "
                                      "omitted: the latest consensus model for --base.")
    ] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Rebuild the full expert from a delta on this base.")] = None,
    verify: Annotated[Optional[bool], typer.Option(
        "--verify/--no-verify", show_default=False,
        help="Recompute the consensus from the round's signed deltas and refuse a different id "
             "(default: when the deltas can be fetched).")] = None,
    trust: Annotated[Optional[list[str]], typer.Option(
        "--trust", help="Count only these keys' attestations: a public key, or a file of them, one per line (repeatable).")] = None,
    overwrite: OverwriteOption = False,
    home: HomeOption = None,
    peer: PeerOption = None,
    network: NetworkOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fetch content from the network, verified chunk by chunk, written atomically.

    Without ID: the latest final consensus model for --base (under the network's charter:
    final by its attesters), after checking its attestations and hashes and, by default,
    recomputing it; it gets a model card naming the charter, the round and its attesters.
    Through a running node, its network; through --peer, the one --network names.
    """
    trusted = trusted_keys(trust) if trust else None
    with connect(home, peer, network) as node:
        result = node.fetch(ref=content, out=str(out_dir.resolve()), base=str(base.resolve()) if base else None,
                            overwrite=overwrite, trust=trusted, verify=verify)
    if "round_id" in result and result.get("charter_id") is None:  # said once it worked: an error stays one line
        err.print("no network charter: the latest consensus was judged by a private test network's rules (anyone's "
                  "attestations count); give --network to a --peer client, or start the node with --network")
    if as_json:
        print(json.dumps(result, indent=2))
        return
    received = result.get("bytes_received")
    if "round_id" in result:
        how = (f"consensus of round {result['round_id'][:12]}, attested by {len(result['attesters'])}"
               + (", recomputed: the same bytes" if result.get("recomputed") else ", not recomputed"))
    elif received is not None:
        how = f"{received:,} bytes from {len(result['chunks_by_provider'])} provider(s)"
    else:
        how = "from the local store"
    err.print(f"fetched {result['content'][:12]} ({how}) -> {result['out']}")
    for peer_id, why in result.get("liars", {}).items():
        err.print(f"  avoided {peer_id}: {why}")
    for bundle_id, why in result.get("refused", {}).items():
        err.print(f"  refused bundle {bundle_id[:12]}: {why}")


def trusted_keys(items: list[str]) -> list[str]:
    """``--trust`` values: public keys, or files of them (one per line; # starts a comment)."""
    keys = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            if path.stat().st_size > 1 << 20:
                raise UserInputError(f"--trust {item}: larger than 1 MiB")
            lines = [line.split("#", 1)[0].strip() for line in path.read_text(errors="replace").splitlines()]
            keys += [public_key(line, f"--trust {item}:") for line in lines if line]
        else:
            keys.append(public_key(item, "--trust"))
    return sorted(set(keys))
