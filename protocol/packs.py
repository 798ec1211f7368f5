"""Probe sets and logit packs: what a heterogeneous expert contributes, and its checks.

A probe set is a list of instruction-response pairs; its id is the hash of its
canonical JSON, so every peer that holds the same pairs computes the same id. A logit
pack is an expert's top-k next-token log-probabilities over the response tokens of a
probe set, with its own tokenizer. Its manifest names the probe id, the expert model
and tokenizer hashes, k, the number of response tokens of every example and the hash
of every stored tensor; it is signed like a delta. Manifests come from the network,
so :func:`check_pack_manifest` validates them before any field is used.
"""

from __future__ import annotations

from typing import Any

from hivemerge.protocol.content import content_id, is_content_id
from hivemerge.protocol.errors import UserInputError

VERSION = 1
PROBE_KIND = "probe"
PACK_KIND = "pack"
MAX_TOP_K = 256
# Longest token text a pack may carry: alignment costs grow with it, and a signed pack
# is still untrusted input to every participant that checks a fusion.
MAX_PIECE_CHARS = 128
# Largest pack file a node opens (fetched or local). A pack is verified as a stream, but a
# fuser still reads every pack it fuses into memory; 256 MiB is ~7M response tokens at top-8
# (a probe set of 10,000 examples of 200 tokens is 72 MB), or ~250,000 at top-256.
MAX_PACK_BYTES = 256 * 1024 * 1024
# The token texts are parsed whole into a dict: every id of a 256k vocabulary with escaped
# texts fits in a few MB.
MAX_PIECES_BYTES = 16 * 1024 * 1024
# A probe set is parsed whole (every pair into memory): 10,000 examples of a few KB each.
MAX_PROBE_BYTES = 64 * 1024 * 1024

# What a pack stores per response token (rows), and how wide each row is.
PACK_TENSORS = {
    "ids": "top_k",  # the k most likely next tokens, in the expert's vocabulary
    "logprobs": "top_k",  # their log-probabilities (fp16)
    "targets": None,  # the response token itself (the expert's tokenization of the reference)
    "target_logprobs": None,  # its log-probability
}
ID_DTYPES = ("I16", "I32")
PIECES_FILE = "pieces.json"  # token id -> text, for every id the pack mentions


class PackError(UserInputError):
    """A pack or probe set is malformed, forged, or does not fit what it is used with."""


def probe_manifest(pairs: list[tuple[str, str]]) -> dict:
    return {"kind": PROBE_KIND, "version": VERSION, "pairs": [[p, r] for p, r in pairs]}


def probe_id(pairs: list[tuple[str, str]]) -> str:
    """The content id of a probe set (order matters: packs store examples in this order)."""
    return content_id(probe_manifest(pairs))


def pack_manifest(probe: str, model: str, tokenizer: str, top_k: int, lengths: list[int],
                  tensors: dict[str, dict], files: dict[str, str]) -> dict:
    """``tensors``: name -> {dtype, shape, sha256}; ``files``: name -> sha256."""
    return {
        "kind": PACK_KIND,
        "version": VERSION,
        "probe": probe,
        "model": model,
        "tokenizer": tokenizer,
        "top_k": top_k,
        "lengths": list(lengths),
        "tensors": dict(sorted(tensors.items())),
        "files": dict(sorted(files.items())),
    }


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PackError(f"malformed pack manifest: {message}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_pack_manifest(manifest: Any) -> dict:
    """Structural validation of an untrusted pack manifest; returns it unchanged."""
    _require(isinstance(manifest, dict), "not a mapping")
    _require(set(manifest) == {"kind", "version", "probe", "model", "tokenizer", "top_k", "lengths", "tensors", "files"},
             "unexpected or missing keys")
    _require(manifest["kind"] == PACK_KIND, "kind is not 'pack'")
    _require(manifest["version"] == VERSION, f"unsupported version {manifest['version']!r}")
    for key in ("probe", "model", "tokenizer"):
        _require(isinstance(manifest[key], str) and is_content_id(manifest[key]), f"{key} is not a content id")
    k = manifest["top_k"]
    _require(_is_count(k) and 1 <= k <= MAX_TOP_K, f"top_k must be in [1, {MAX_TOP_K}]")
    lengths = manifest["lengths"]
    _require(isinstance(lengths, list) and lengths and all(_is_count(n) for n in lengths), "lengths must be a list of counts")
    rows = sum(lengths)
    tensors = manifest["tensors"]
    _require(isinstance(tensors, dict) and set(tensors) == set(PACK_TENSORS), f"tensors must be exactly {sorted(PACK_TENSORS)}")
    for name, width in PACK_TENSORS.items():
        entry = tensors[name]
        _require(isinstance(entry, dict) and set(entry) == {"dtype", "shape", "sha256"}, f"tensor {name} is malformed")
        want_shape = [rows, k] if width else [rows]
        _require(entry["shape"] == want_shape, f"tensor {name} has shape {entry['shape']}, expected {want_shape}")
        _require(isinstance(entry["sha256"], str) and is_content_id(entry["sha256"]), f"tensor {name} has a bad hash")
    _require(tensors["ids"]["dtype"] in ID_DTYPES and tensors["targets"]["dtype"] == tensors["ids"]["dtype"],
             f"token ids must be one of {ID_DTYPES}, the same for ids and targets")
    _require(tensors["logprobs"]["dtype"] == "F16" and tensors["target_logprobs"]["dtype"] == "F16", "log-probs must be F16")
    files = manifest["files"]
    _require(isinstance(files, dict) and set(files) == {PIECES_FILE}, f"files must be exactly [{PIECES_FILE!r}]")
    _require(isinstance(files[PIECES_FILE], str) and is_content_id(files[PIECES_FILE]), "pieces file has a bad hash")
    return manifest
