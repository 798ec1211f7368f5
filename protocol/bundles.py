"""Bundles: the files of one content object, cut into hashed chunks for transfer.

A bundle manifest lists each file's relative path, size and the SHA-256 of every
chunk; its id is the hash of the canonical manifest. A fetcher that knows the bundle
id (from a signed record) checks the manifest against it, then every chunk against
the manifest, so a provider can waste a fetcher's time but never corrupt its data.

File paths are names, never paths: a bundle is either one file named
``<content id><suffix>`` (a delta, a logit pack, a probe set) or a model's files, each a
plain name that a model folder may hold (:func:`hivemerge.protocol.manifests.is_model_file`).
"""

from __future__ import annotations

from typing import Any

from hivemerge.protocol import bounds
from hivemerge.protocol.content import content_id, is_content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.manifests import is_model_file, is_weights_file

VERSION = 1
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_FILES = 10_000
# What one fetch may bring in, whatever a manifest claims: a fetch is bounded by the size a
# signed record states when the caller knows it, by the store quota, and always by this
# (room for the largest open models in 16 bits).
MAX_OBJECT_BYTES = bounds.MAX_OBJECT_BYTES
# A manifest is read whole into memory before anything checks it. Honest ones stay far
# below: MAX_CHUNKS hashes are ~2.2 MB of JSON, and MAX_FILES entries of short paths ~1.5 MB.
MAX_CHUNKS = 32_768  # a store cuts big objects into larger chunks to stay under this
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
DELTA_SUFFIX = ".delta.safetensors"
PACK_SUFFIX = ".pack.safetensors"
PROBE_SUFFIX = ".probe.jsonl"
FILE_SUFFIXES = (DELTA_SUFFIX, PACK_SUFFIX, PROBE_SUFFIX)  # objects that are one file


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


def object_suffix(bundle: dict) -> str | None:
    """The suffix of a one-file object's bundle (its one file is ``<content id><suffix>``),
    or None for a model's bundle."""
    files = bundle["files"]
    if len(files) != 1:
        return None
    return next((s for s in FILE_SUFFIXES if files[0]["path"] == bundle["content"] + s), None)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_bundle(manifest: Any, expected_id: str) -> dict:
    """Validate an untrusted bundle manifest against the id a signed record gave."""
    if not isinstance(manifest, dict) or content_id(manifest) != expected_id:
        raise BundleError(f"bundle manifest does not match id {expected_id[:12]}")
    ok = (
        manifest.get("kind") == "bundle"
        and manifest.get("version") == VERSION
        and isinstance(manifest.get("content"), str) and is_content_id(manifest["content"])
        and _is_count(manifest.get("chunk_size")) and 0 < manifest["chunk_size"] <= MAX_CHUNK_SIZE
        and isinstance(manifest.get("files"), list) and 0 < len(manifest["files"]) <= MAX_FILES
    )
    if not ok:
        raise BundleError("malformed bundle manifest")
    # A provider must not make a fetcher write outside its staging folder, nor store and
    # re-serve files that the content id does not cover: names, never paths.
    object_names = {manifest["content"] + s for s in FILE_SUFFIXES}
    seen = set()
    for f in manifest["files"]:
        if not (
            isinstance(f, dict) and isinstance(f.get("path"), str) and f["path"] not in seen
            and (is_model_file(f["path"]) or f["path"] in object_names)
            and _is_count(f.get("size"))
            and isinstance(f.get("chunks"), list)
            and len(f["chunks"]) == chunk_count(f["size"], manifest["chunk_size"])
            and all(isinstance(c, str) and is_content_id(c) for c in f["chunks"])
        ):
            shown = repr(f.get("path"))[:80] if isinstance(f, dict) else type(f).__name__
            raise BundleError(f"malformed bundle manifest file entry {shown}")
        seen.add(f["path"])
    if seen & object_names and len(seen) != 1:
        raise BundleError("malformed bundle manifest: a one-file object's bundle holds other files")
    if not seen & object_names and not any(is_weights_file(p) for p in seen):
        raise BundleError("malformed bundle manifest: a model's bundle holds no weights file")
    return manifest
