"""What the merge and search coordinators share: per-round state files in the node's
home, and the polling loop that drives them."""

from __future__ import annotations

import asyncio
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from hivemerge.merge.atomic import write_file_atomic

# The node's own files in its home: what it publishes and what it takes part in. They
# alone decide what its content store keeps (node/retention.py).
PUBLISHED_FILE = "published.json"  # the experts this node published
PACKS_FILE = "packs.json"  # the logit packs this node published
WATCH_FILE = "fusion_bases.json"  # bases of fusion rounds this node proposed (it may be their fuser)
CONSENSUS_FILE = "consensus.json"  # the consensus results this node fetched
ROUNDS_DIR, SEARCHES_DIR, FUSIONS_DIR = "rounds", "searches", "fusions"  # one state file per round


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON atomically and durably: a crash leaves the former file, never
    an empty or half-written one."""
    write_file_atomic(path, json.dumps(value, indent=2).encode())


async def guarded(node, what: str, work) -> None:
    """Await one record's or one round's work: whatever it raises is logged (by ``node``)
    and skipped, so one malformed record or damaged round never stops a coordinator's other work."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        node.log(f"{what}: {type(exc).__name__}: {exc}"[:500])


class Phase(StrEnum):
    """Where a round, search or fusion stands in this node's state file (written as its text)."""

    PROPOSED = "proposed"  # a search this node proposed
    COMMITTED = "committed"  # signed a commitment; waiting for the deadline
    FETCHING = "fetching"  # a search's deltas being fetched and screened
    SEARCHING = "searching"  # a search's generations under way
    AWAITING_FINAL = "awaiting final round"  # a search's first owner, standing in for a proposer that may be gone
    MERGING = "merging"  # a round's deltas being fetched, screened and merged
    ATTESTED = "attested"  # the result's id attested; finality settled later
    FUSING = "fusing"  # the designated fuser distilling
    FUSED = "fused"  # the fused delta stored; to commit
    DONE = "done"  # a search that ended
    FAILED = "failed"  # with the error, for round status


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


class JsonStates:
    """One JSON file per round in ``self.dir``, each written atomically (a crash leaves the
    former state, never half a file). Used by the merge and the search coordinators.

    A state file damaged anyway (a full disk, an editor, a crash of an older version) is
    logged and skipped: one bad file must not stop every tick of the coordinator. It is
    left in place for its owner to look at (pruning keeps what it mentions,
    node/retention.py)."""

    dir: Path

    def state(self, round_id: str) -> dict | None:
        path = self.dir / f"{round_id}.json"
        return self._load(path) if path.is_file() else None

    def save(self, state: dict) -> None:
        write_json(self.dir / f"{state['proposal']['round_id']}.json", state)

    def states(self) -> list[dict]:
        loaded = (self._load(p) for p in sorted(self.dir.glob("*.json")))
        return [s for s in loaded if s is not None]

    def _load(self, path: Path) -> dict | None:
        try:
            state = json.loads(path.read_bytes())
            if not (isinstance(state, dict) and isinstance(state.get("proposal"), dict)
                    and isinstance(state.get("phase"), str)):
                raise ValueError("not a round state")
            return state
        except (OSError, ValueError, RecursionError) as exc:
            self._log(f"skipping the damaged state file {path} ({type(exc).__name__}: {exc})")
            return None

    def _log(self, message: str) -> None:
        node = getattr(self, "node", None)
        if node is not None:
            node.log(message)
        else:
            print(message, file=sys.stderr, flush=True)


class StateDir(JsonStates):
    """The state files of one folder, read as the coordinators read them (``round status``)."""

    def __init__(self, directory: Path):
        self.dir = directory


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
