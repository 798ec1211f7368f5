"""Probe sets: instruction-response pairs on which experts publish their distributions.

A probe file is JSONL, one ``{"prompt": ..., "response": ...}`` object a line; the
response is exactly the text that follows the prompt (for the synthetic tasks, the
answer and its newline). The probe's id is a pure function of the pairs in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hivemerge.merge.io.jsonl import read_records
from hivemerge.protocol.packs import MAX_PROBE_BYTES, PackError, probe_id


@dataclass(frozen=True)
class ProbeSet:
    pairs: list[tuple[str, str]]
    id: str
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.pairs)


def make_probe(pairs: list[tuple[str, str]], path: Path | None = None) -> ProbeSet:
    if not pairs:
        raise PackError(f"{path or 'probe set'}: no examples")
    for i, (prompt, response) in enumerate(pairs):
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise PackError(f"{path or 'probe set'}: example {i + 1} needs a prompt and a non-empty response")
    return ProbeSet(list(pairs), probe_id(pairs), path)


def load_probe(path: str | Path) -> ProbeSet:
    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: no such probe file")
    if path.stat().st_size > MAX_PROBE_BYTES:  # it is parsed whole
        raise PackError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_PROBE_BYTES} a probe set may be")
    return make_probe(read_records(path, ("prompt", "response"), "a JSONL probe set", PackError), path)


def probe_bytes(pairs: list[tuple[str, str]]) -> bytes:
    """The canonical bytes of a probe file (what a node stores and serves)."""
    return "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs).encode()


def write_probe(pairs: list[tuple[str, str]], path: str | Path) -> ProbeSet:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(probe_bytes(pairs))
    return make_probe(pairs, path)
