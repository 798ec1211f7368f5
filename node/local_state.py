"""Per-round state files a coordinator keeps in the node's home."""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonStates:
    """One JSON file per round in ``self.dir``, each written atomically (a crash leaves the
    former state, never half a file). Used by the merge and the search coordinators."""

    dir: Path

    def state(self, round_id: str) -> dict | None:
        path = self.dir / f"{round_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, state: dict) -> None:
        path = self.dir / f"{state['proposal']['round_id']}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)

    def states(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]
