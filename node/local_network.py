"""Nodes in this process on 127.0.0.1: the loopback network of the demo, the benchmarks
and the tests (one helper for all three).

The first node listens; each later one joins through the first unless given peers. Every
node started is closed by :meth:`LocalNetwork.close_all`, which the context manager calls
on the way out, errors included.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from hivemerge.node.node import Node

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class LocalNetwork:
    def __init__(self, root: Path, **node_options):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.node_options = node_options  # for every node (record_ttl, round_poll, device ...)
        self.open: list[Node] = []
        self._seed: list[str] = []

    def start(self, name: str, peers: list | tuple | None = None, home: Path | None = None,
              listen: list[str] | None = None, **options) -> Node:
        """A node in ``root/name`` (or ``home``), joining through ``peers`` (default: the first node)."""
        joined = self._seed if peers is None else [str(p) for p in peers]
        node = Node(home or self.root / name, listen=listen or [LOOPBACK], peers=joined, **{**self.node_options, **options})
        self.open.append(node)
        if not self._seed and not node.client_mode:
            self._seed = node.maddrs()
        return node

    def start_many(self, names: list[str]) -> list[Node]:
        return [self.start(name) for name in names]

    def close(self, node: Node) -> None:
        if node in self.open:
            self.open.remove(node)
            node.close()

    def close_all(self, side_by_side: bool = False) -> None:
        """Close every node still open: the last started first (each says goodbye while its
        peers still listen), or all at once with ``side_by_side`` (quicker when some died)."""
        nodes, self.open = self.open, []
        if not nodes:
            return
        if not side_by_side:
            errors = []
            for node in reversed(nodes):
                try:
                    node.close()
                except Exception as exc:  # close the others anyway
                    errors.append(exc)
        else:
            with ThreadPoolExecutor(len(nodes)) as pool:
                futures = [pool.submit(node.close) for node in nodes]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]


@contextmanager
def local_network(root: Path, count: int, fresh: bool = True, **node_options) -> Iterator[list[Node]]:
    """``count`` nodes in ``root`` (emptied first when ``fresh``), closed on the way out."""
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    network = LocalNetwork(root, **node_options)
    try:
        yield network.start_many([f"n{i}" for i in range(count)])
    finally:
        network.close_all()
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
