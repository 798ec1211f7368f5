"""The node a network command talks to: the one running on the home, or a short-lived
client that joins through ``--peer``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hivemerge.node.cli.charter import network_ref
from hivemerge.node.control import RemoteNode, node_is_running
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import default_home


@contextmanager
def connect(home: Path | None, peers: list[str] | None, network: str | None = None) -> Iterator:
    """The node running on the home, or a short-lived client joined through --peer, within
    ``network`` (``--network``: a genesis charter file or id; None: a private test network)."""
    home = default_home(home)
    if node_is_running(home):
        if network is not None:
            raise UserInputError(f"--network: a node is running on {home} and the command goes through it, within "
                                 "the network it was started in (hivemerge network show); omit --network")
        yield RemoteNode(home)
        return
    if not peers:
        raise UserInputError(f"no node is running on {home}; start one (hivemerge node start) or pass --peer MADDR")
    genesis = network_ref(network) if network is not None else None  # checked before anything starts
    from hivemerge.node.node import Node  # heavy: hivemind

    client = Node(home, listen=["/ip4/127.0.0.1/tcp/0"], peers=peers, client_mode=True, network=genesis)
    try:
        yield client
    finally:
        client.close()
