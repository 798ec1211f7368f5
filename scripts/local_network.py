"""In-process nodes on loopback for the benchmarks: the first listens, the rest join
through it; all are closed (and their folder removed) on the way out, errors included."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@contextmanager
def local_network(root: Path, count: int, **node_options) -> Iterator[list]:
    from hivemerge.node.node import Node

    shutil.rmtree(root, ignore_errors=True)
    nodes: list = []
    try:
        nodes.append(Node(root / "n0", listen=[LOOPBACK], **node_options))
        seed = nodes[0].maddrs()
        for i in range(1, count):
            nodes.append(Node(root / f"n{i}", listen=[LOOPBACK], peers=seed, **node_options))
        yield nodes
    finally:
        for node in reversed(nodes):
            node.close()
        shutil.rmtree(root, ignore_errors=True)
