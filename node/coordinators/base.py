"""What every coordinator (merge, search and fusion rounds) shares: the interface a node
gives them, and the polling loop that drives them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from hivemerge.node.storage.home import JsonStates


async def guarded(node, what: str, work) -> None:
    """Await one record's or one round's work: whatever it raises is logged (by ``node``)
    and skipped, so one malformed record or damaged round never stops a coordinator's other work."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        node.log(f"{what}: {type(exc).__name__}: {exc}"[:500])


class NodeServices(Protocol):
    """What a node gives its coordinators (rounds, searches, fusions): node/node.py's
    :class:`Node` implements it. Coordinators use only this, never a node's internals."""

    home: Path
    identity: Any  # protocol.identity.Identity
    store: Any  # node.store.ContentStore
    network: Any  # node.network.Network: get_records
    record_ttl: float
    keep_results: int | None
    content_lock: Any  # threading.Lock held by commands that add content
    client_mode: bool
    rounds: Any  # the node's RoundCoordinator (searches reuse its fetching and screening)
    peer_id: str

    def log(self, message: str) -> None: ...
    def run(self, coro, timeout: float) -> Any: ...
    def published(self) -> list[dict]: ...
    def contact(self) -> dict: ...
    def experts(self, domain: str | None = None) -> list[dict]: ...
    def live_ttl(self, maddrs: list[str]) -> float: ...
    async def store_record(self, kind: str, key: str, fields: dict, ttl: float) -> bool: ...
    async def fetch_async(self, content: str, progress=None, expected_size: int | None = None) -> Any: ...
    async def announce(self, gone: bool = False) -> None: ...


class Coordinator(JsonStates):
    """Calls ``tick`` every ``poll`` seconds for as long as the node runs."""

    label: str
    poll: float

    async def tick(self) -> None:
        raise NotImplementedError

    async def guarded(self, what: str, work) -> None:
        await guarded(self.node, f"{self.label}: {what}", work)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad moment must not end participation
                self.node.log(f"{self.label}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(self.poll)
