"""JSONL files of records with named fields (evaluation suites, probe sets)."""

from __future__ import annotations

import json
from pathlib import Path

from hivemerge.protocol.errors import UserInputError


def read_records(path: Path, fields: tuple[str, ...], what: str, error: type[UserInputError] = UserInputError) -> list[tuple]:
    """The ``fields`` of every non-blank line, in order; ``error`` names the file (and the
    line) of anything unreadable, so bad input exits 2 with one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise error(f"{path}: not UTF-8 text ({what} is expected)") from None
    found = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            found.append(tuple(item[f] for f in fields))
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nesting past the parser's stack
            raise error(f"{path}:{i}: expected a JSON object with {' and '.join(fields)}") from None
    return found
