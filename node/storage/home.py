"""The node's own files in its home: what it publishes, what it takes part in, and
one JSON state file per round, search and fusion (with the phase it is in)."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path

from hivemerge.merge.io.atomic import write_file_atomic
from hivemerge.protocol.errors import UserInputError

# The node's own files in its home: what it publishes and what it takes part in. They
# alone decide what its content store keeps (node/storage/retention.py).
PUBLISHED_FILE = "published.json"  # the experts this node published
PACKS_FILE = "packs.json"  # the logit packs this node published
WATCH_FILE = "fusion_bases.json"  # bases of fusion rounds this node proposed (it may be their fuser)
CONSENSUS_FILE = "consensus.json"  # the consensus results this node fetched
CHARTER_FILE = "charter.json"  # the network charter's versions this node followed, from its genesis
ROUNDS_DIR, SEARCHES_DIR, FUSIONS_DIR = "rounds", "searches", "fusions"  # one state file per round


def read_json(path: Path, default):
    """A home file's value, or ``default`` when there is none. A damaged file raises
    UserInputError naming it: its owner must look at it, and nothing overwrites it."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserInputError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); repair or remove it") from None


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON atomically and durably: a crash leaves the former file, never
    an empty or half-written one."""
    write_file_atomic(path, json.dumps(value, indent=2).encode())


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
    LISTED = "listed"  # under a charter: the proposer, no attester, published the participant list (its part)
    FAILED = "failed"  # with the error, for round status


class JsonStates:
    """One JSON file per round in ``self.dir``, each written atomically (a crash leaves the
    former state, never half a file). Used by the merge and the search coordinators.

    A state file damaged anyway (a full disk, an editor, a crash of an older version) is
    logged and skipped: one bad file must not stop every tick of the coordinator. It is
    left in place for its owner to look at (pruning keeps what it mentions,
    node/storage/retention.py)."""

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
