"""What the merge and search coordinators share: per-round state files in the node's
home, and the polling loop that drives them."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

# The node's own files in its home: what it publishes and what it takes part in. They
# alone decide what its content store keeps (node/retention.py).
PUBLISHED_FILE = "published.json"  # the experts this node published
PACKS_FILE = "packs.json"  # the logit packs this node published
WATCH_FILE = "fusion_bases.json"  # bases of fusion rounds this node proposed (it may be their fuser)
CONSENSUS_FILE = "consensus.json"  # the consensus results this node fetched
ROUNDS_DIR, SEARCHES_DIR, FUSIONS_DIR = "rounds", "searches", "fusions"  # one state file per round


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON atomically: a crash leaves the former file, never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class JsonStates:
    """One JSON file per round in ``self.dir``, each written atomically (a crash leaves the
    former state, never half a file). Used by the merge and the search coordinators."""

    dir: Path

    def state(self, round_id: str) -> dict | None:
        path = self.dir / f"{round_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, state: dict) -> None:
        write_json(self.dir / f"{state['proposal']['round_id']}.json", state)

    def states(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]


class Coordinator(JsonStates):
    """Calls ``tick`` every ``poll`` seconds for as long as the node runs."""

    label: str
    poll: float

    async def tick(self) -> None:
        raise NotImplementedError

    async def guarded(self, what: str, work) -> None:
        """Await one record's or one round's work: whatever it raises is logged and
        skipped, so one malformed record or damaged round never stops the others."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.node.log(f"{self.label}: {what}: {type(exc).__name__}: {exc}"[:500])

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad moment must not end participation
                self.node.log(f"{self.label}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(self.poll)
