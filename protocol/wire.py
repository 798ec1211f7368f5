"""Wire messages of the bundle transfer protocol.

Over one libp2p stream a client sends requests, each one JSON line, and reads for each
a JSON header line followed by ``size`` raw bytes:

- ``{"op": "bundle", "bundle": ID}`` -> the canonical bundle manifest
- ``{"op": "chunk", "bundle": ID, "file": I, "chunk": J}`` -> that chunk's bytes

A failed request answers ``{"ok": false, "error": "..."}`` and no bytes. Nothing in a
response is trusted: manifests are checked against their id, chunks against the
manifest.
"""

from __future__ import annotations

import json
from typing import Any

from hivemerge.protocol.content import canonical_json, is_content_id

BUNDLE_PROTOCOL = "/hivemerge/bundle/1.0.0"
MAX_LINE = 4096


class WireError(ValueError):
    pass


def encode_request(op: str, bundle: str, file: int | None = None, chunk: int | None = None) -> bytes:
    message: dict[str, Any] = {"op": op, "bundle": bundle}
    if op == "chunk":
        message.update(file=file, chunk=chunk)
    return canonical_json(message) + b"\n"


def parse_request(line: bytes) -> dict:
    if len(line) > MAX_LINE:
        raise WireError("request line too long")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):  # deep nesting fits in MAX_LINE and blows the parser's stack
        raise WireError("request is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("bundle"), str) or not is_content_id(message["bundle"]):
        raise WireError("request names no bundle id")
    if message.get("op") == "bundle" and set(message) == {"op", "bundle"}:
        return message
    if message.get("op") == "chunk" and set(message) == {"op", "bundle", "file", "chunk"}:
        if all(isinstance(message[k], int) and not isinstance(message[k], bool) and message[k] >= 0 for k in ("file", "chunk")):
            return message
    raise WireError("malformed request")


def encode_header(size: int | None = None, error: str | None = None) -> bytes:
    body = {"ok": False, "error": error} if error is not None else {"ok": True, "size": size}
    return canonical_json(body) + b"\n"


def parse_header(line: bytes, max_size: int) -> int:
    """The payload size announced by a response header; raises WireError on errors."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise WireError("response header is not JSON") from None
    if not isinstance(message, dict):
        raise WireError("malformed response header")
    if message.get("ok") is not True:
        raise WireError(f"provider refused: {message.get('error')!r}")
    size = message.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_size:
        raise WireError(f"announced size {size!r} out of range")
    return size
