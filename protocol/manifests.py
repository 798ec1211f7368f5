"""Manifests: what a model or a delta is, hash by hash.

A model manifest lists every tensor (name, safetensors dtype code, shape, SHA-256 of
its raw bytes) and the hashes of its config and tokenizer files, plus the
architecture fingerprint. A delta manifest names the base and expert manifests it
connects, the codec of every tensor and the hash of every stored part. Manifests come
from the network, so :func:`check_delta_manifest` validates their structure before
any field is used.
"""

from __future__ import annotations

import re
from typing import Any

from hivemerge.protocol.content import is_content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.fingerprint import architecture_fingerprint

VERSION = 1
FILE_PART_PREFIX = "__files__/"  # embedded config/tokenizer files in a delta container

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)
# The side files that are part of a model's identity (a README is not). Names that come
# from the network (a delta's files, a model bundle's files) are checked against this
# list: a model's file is named, never a path a publisher could point elsewhere.
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# A weights shard: a plain file name (no folder, not hidden), as Hugging Face names them.
_WEIGHTS_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.safetensors")
_PART_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a codec's part: q, scale, mask, ...
MAX_NAME_CHARS = 1024  # a tensor name (real ones are well under 200)
DELTA_KEYS = {"kind", "version", "base", "expert", "architecture", "tensors", "files"}
TENSOR_KEYS = {"codec", "dtype", "shape", "params", "parts"}
PART_KEYS = {"dtype", "shape", "sha256"}


class ManifestError(UserInputError):
    """A manifest is malformed or does not match the data it describes."""


def model_manifest(tensors: dict[str, dict], files: dict[str, str]) -> dict:
    """``tensors``: name -> {dtype, shape, sha256}; ``files``: file name -> sha256."""
    return {
        "kind": "model",
        "version": VERSION,
        "architecture": architecture_fingerprint({n: t["shape"] for n, t in tensors.items()}),
        "tensors": {n: {"dtype": t["dtype"], "shape": list(t["shape"]), "sha256": t["sha256"]} for n, t in sorted(tensors.items())},
        "files": dict(sorted(files.items())),
    }


def delta_manifest(base_id: str, expert_id: str, architecture: str, tensors: dict[str, dict], files: dict[str, str]) -> dict:
    """``tensors``: name -> {codec, dtype, shape, params, parts: {part: {dtype, shape, sha256}}}."""
    return {
        "kind": "delta",
        "version": VERSION,
        "base": base_id,
        "expert": expert_id,
        "architecture": architecture,
        "tensors": dict(sorted(tensors.items())),
        "files": dict(sorted(files.items())),
    }


def part_name(tensor: str, part: str) -> str:
    return f"{tensor}::{part}"


def is_weights_file(name: Any) -> bool:
    """A safetensors shard's file name (``model.safetensors``, ``model-00001-of-00002.safetensors``)."""
    return isinstance(name, str) and _WEIGHTS_FILE.fullmatch(name) is not None


def is_model_file(name: Any) -> bool:
    """A file a model directory may hold: a side file, a weights shard, or the shards' index."""
    return isinstance(name, str) and (name in MODEL_FILES or name == WEIGHTS_INDEX_FILE or is_weights_file(name))


def _is_tensor_name(name: Any) -> bool:
    # Part keys are "<tensor>::<part>" and side files "__files__/<name>": a tensor name
    # must not be able to spell another entry's key, nor the container's metadata key.
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and "::" not in name
            and not name.startswith(FILE_PART_PREFIX) and name != "__metadata__" and name.isprintable())


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(f"malformed delta manifest: {message}")


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def check_delta_manifest(manifest: Any) -> dict:
    """Structural validation of an untrusted delta manifest; returns it unchanged."""
    _require(isinstance(manifest, dict), "not a mapping")
    _require(manifest.get("kind") == "delta", "kind is not 'delta'")
    _require(manifest.get("version") == VERSION, f"unsupported version {manifest.get('version')!r}")
    # Exact key sets: every field is one the readers check (a missing one is no KeyError later).
    _require(set(manifest) == DELTA_KEYS, f"fields are {sorted(manifest)[:10]}, expected {sorted(DELTA_KEYS)}")
    for key in ("base", "expert", "architecture"):
        _require(isinstance(manifest.get(key), str) and is_content_id(manifest[key]), f"{key} is not a content id")
    tensors = manifest.get("tensors")
    _require(isinstance(tensors, dict) and tensors, "no tensors")
    for name, entry in tensors.items():
        _require(_is_tensor_name(name), f"tensor name {name[:200]!r} is not allowed")
        _require(isinstance(entry, dict) and set(entry) == TENSOR_KEYS,
                 f"tensor {name} is not a mapping of {sorted(TENSOR_KEYS)}")
        _require(isinstance(entry.get("codec"), str), f"tensor {name} has no codec")
        _require(isinstance(entry.get("dtype"), str), f"tensor {name} has no dtype")
        _require(_is_shape(entry.get("shape")), f"tensor {name} has a bad shape")
        _require(isinstance(entry["params"], dict), f"tensor {name} has bad params")
        parts = entry.get("parts")
        _require(isinstance(parts, dict), f"tensor {name} has no parts")
        for part, info in parts.items():
            _require(
                _PART_NAME.fullmatch(part) is not None and isinstance(info, dict) and set(info) == PART_KEYS
                and isinstance(info.get("dtype"), str) and _is_shape(info.get("shape"))
                and isinstance(info.get("sha256"), str) and is_content_id(info["sha256"]),
                f"part {part} of {name} is malformed",
            )
    # Records and rounds group deltas by this field: it must say what the tensors are.
    _require(manifest["architecture"] == architecture_fingerprint({n: e["shape"] for n, e in tensors.items()}),
             "architecture does not match its tensors' names and shapes")
    files = manifest["files"]
    _require(isinstance(files, dict) and all(isinstance(v, str) and is_content_id(v) for v in files.values()), "bad files")
    for name in files:  # written into the output folder by apply and fetch --base
        _require(name in MODEL_FILES, f"file {name[:200]!r} is not a model side file (allowed: {', '.join(MODEL_FILES)})")
    return manifest
