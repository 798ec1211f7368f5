"""Bundles: the files of one content object, cut into hashed chunks for transfer.

A bundle manifest lists each file's relative path, size and the SHA-256 of every
chunk; its id is the hash of the canonical manifest. A fetcher that knows the bundle
id (from a signed record) checks the manifest against it, then every chunk against
the manifest, so a provider can waste a fetcher's time but never corrupt its data.
"""

from __future__ import annotations

from typing import Any

from hivemerge.protocol.content import content_id, is_content_id
from hivemerge.protocol.errors import UserInputError

VERSION = 1
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_FILES = 10_000
# What one fetch may bring in, whatever a manifest claims: a fetch is bounded by the size a
# signed record states when the caller knows it, by the store quota, and always by this
# (room for the largest open models in 16 bits).
MAX_OBJECT_BYTES = 1 << 40
# A manifest is read whole into memory before anything checks it. Honest ones stay far
# below: MAX_CHUNKS hashes are ~2.2 MB of JSON, and MAX_FILES entries of short paths ~1.5 MB.
MAX_CHUNKS = 32_768  # a store cuts big objects into larger chunks to stay under this
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


class BundleError(UserInputError):
    """A bundle manifest is malformed or does not match its id."""


def bundle_manifest(content: str, chunk_size: int, files: list[dict]) -> dict:
    """``files``: [{path, size, chunks: [sha256, ...]}] in a fixed order."""
    return {"kind": "bundle", "version": VERSION, "content": content, "chunk_size": chunk_size, "files": files}


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    begin = index * chunk_size
    return begin, min(size, begin + chunk_size)


def _safe_path(path: Any) -> bool:
    # Relative, no parent references, no absolute or hidden tricks: a provider must not
    # make a fetcher write outside the target directory.
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")) or "\\" in path or "\x00" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def check_bundle(manifest: Any, expected_id: str) -> dict:
    """Validate an untrusted bundle manifest against the id a signed record gave."""
    if not isinstance(manifest, dict) or content_id(manifest) != expected_id:
        raise BundleError(f"bundle manifest does not match id {expected_id[:12]}")
    ok = (
        manifest.get("kind") == "bundle"
        and manifest.get("version") == VERSION
        and isinstance(manifest.get("content"), str) and is_content_id(manifest["content"])
        and isinstance(manifest.get("chunk_size"), int) and 0 < manifest["chunk_size"] <= MAX_CHUNK_SIZE
        and isinstance(manifest.get("files"), list) and 0 < len(manifest["files"]) <= MAX_FILES
    )
    if not ok:
        raise BundleError("malformed bundle manifest")
    seen = set()
    for f in manifest["files"]:
        if not (
            isinstance(f, dict) and _safe_path(f.get("path")) and f["path"] not in seen
            and isinstance(f.get("size"), int) and f["size"] >= 0
            and isinstance(f.get("chunks"), list)
            and len(f["chunks"]) == chunk_count(f["size"], manifest["chunk_size"])
            and all(isinstance(c, str) and is_content_id(c) for c in f["chunks"])
        ):
            raise BundleError("malformed bundle manifest file entry")
        seen.add(f["path"])
    return manifest
