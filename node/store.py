"""The node's local content store: verified objects under ``HOME/store``, by content id.

Deltas are files (``store/objects/<id>.delta.safetensors``), models are directories
(``store/models/<id>/``). Objects enter only after their id is checked, so what the
store returns under an id is what that id names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hivemerge.merge.delta import DeltaFile
from hivemerge.protocol.errors import UserInputError

DELTA_SUFFIX = ".delta.safetensors"


class ContentStore:
    def __init__(self, home: Path):
        self.root = Path(home) / "store"
        self.objects = self.root / "objects"
        self.models = self.root / "models"

    def resolve(self, cid: str) -> Path:
        for path in (self.objects / f"{cid}{DELTA_SUFFIX}", self.models / cid):
            if path.exists():
                return path
        raise UserInputError(f"hm://{cid}: not in the content store at {self.root}")

    def add_delta(self, path: Path) -> str:
        """Verify a delta file completely and copy it in; returns its id."""
        delta = DeltaFile(path)
        delta.verify_all()
        self.objects.mkdir(parents=True, exist_ok=True)
        target = self.objects / f"{delta.id}{DELTA_SUFFIX}"
        if not target.exists():
            staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
            shutil.copyfile(path, staging)
            os.replace(staging, target)
        return delta.id
