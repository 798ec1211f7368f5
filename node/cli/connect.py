"""The node a network command talks to: the one running on the home, or a short-lived
client that joins through ``--peer``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hivemerge.node.control import RemoteNode, node_is_running
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import default_home


@contextmanager
def connect(home: Path | None, peers: list[str] | None) -> Iterator:
    """The node running on the home, or a short-lived client joined through --peer."""
    home = default_home(home)
    if node_is_running(home):
        yield RemoteNode(home)
        return
    if not peers:
        raise UserInputError(f"no node is running on {home}; start one (hivemerge node start) or pass --peer MADDR")
    from hivemerge.node.node import Node  # heavy: hivemind

    client = Node(home, listen=["/ip4/127.0.0.1/tcp/0"], peers=peers, client_mode=True)
    try:
        yield client
    finally:
        client.close()
