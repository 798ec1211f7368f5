"""Content addressing: canonical encodings and the ids derived from them.

Everything peers agree on is identified by the SHA-256 of a canonical JSON encoding
(sorted keys, no insignificant whitespace, UTF-8), so any two peers that hold the same
manifest compute the same id, and any change to it changes the id.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

ID_PREFIX = "hm://"
_ID_RE = re.compile(r"[0-9a-f]{64}")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_id(manifest: dict) -> str:
    """The id of a manifest: 64 lowercase hex characters."""
    return sha256_hex(canonical_json(manifest))


def is_content_id(text: str) -> bool:
    # fullmatch: "$" would also match before a trailing newline, and ids become file names
    return _ID_RE.fullmatch(text) is not None


def parse_content_ref(ref: str) -> str | None:
    """The id in ``hm://<id>`` (or a bare id), else None."""
    candidate = ref.removeprefix(ID_PREFIX)
    return candidate if is_content_id(candidate) else None


def short_id(cid: str) -> str:
    return cid[:12]
