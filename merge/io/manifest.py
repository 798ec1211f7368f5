"""Manifests of local models: every tensor's and side file's hash, and the content id.

Hashing a 7B model reads 14 GB, so a manifest is remembered for the files it was made
from, each known by its name in the model, device, inode, size and modification time,
and looked at again on every use: a file written since is hashed again. Hard links of
the same files (the store's copy of a published base, a fetched model's --out) share the
manifest. As with make or rsync, a file rewritten in place with its modification time
set back is not noticed.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from hivemerge.merge.io.dtypes import SAFETENSORS_CODES
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.numerics import threads
from hivemerge.protocol.content import content_id, sha256_hex
from hivemerge.protocol.manifests import MODEL_FILES, TOKENIZER_FILES, WEIGHTS_INDEX_FILE, model_manifest

__all__ = ["MODEL_FILES", "TOKENIZER_FILES", "build_model_manifest", "files_key", "model_files", "model_id", "side_files"]


def side_files(model) -> dict[str, bytes]:
    """The model's config and tokenizer files that exist, by name."""
    found = {}
    for name in MODEL_FILES:
        data = model.read_file(name)
        if data is not None:
            found[name] = data
    return found


def model_files(model: SafetensorsModel) -> list[str]:
    """The names of the files a model's content id covers: the weights it reads (and
    their index) and its side files. A stored or fetched model holds exactly these."""
    names = [f.name for f in model.weight_files]
    if model.index_file is not None:
        names.append(WEIGHTS_INDEX_FILE)
    return sorted({*names, *(n for n in MODEL_FILES if model.side_file(n) is not None)})


_REMEMBERED = 64  # manifests kept, the least recently used dropped first
_manifests: OrderedDict[tuple, dict] = OrderedDict()
_lock = threading.Lock()  # a node screens deltas on several threads


def files_key(directory: Path, names: list[str]) -> tuple:
    """What identifies these files of ``directory`` as the file system says now: each one's
    name, device, inode, size and modification time (what this module's caches are keyed by)."""
    key = []
    for name in names:
        st = os.stat(directory / name)
        key.append((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(key)


def _files_key(model: SafetensorsModel) -> tuple:
    """What identifies the files a model's manifest covers."""
    return files_key(model.directory, model_files(model))


def build_model_manifest(model: SafetensorsModel) -> dict:
    """Every tensor's and side file's hash; remembered while the files stay as they were."""
    key = _files_key(model)
    with _lock:
        if key in _manifests:
            _manifests.move_to_end(key)
            return _manifests[key]
    manifest = _hash_model(model)
    if _files_key(model) == key:  # unchanged while it was read
        with _lock:
            _manifests[key] = manifest
            while len(_manifests) > _REMEMBERED:
                _manifests.popitem(last=False)
    return manifest


def _hash_model(model: SafetensorsModel) -> dict:
    names = list(model.tensors)
    # One tensor per task, taken by whichever worker is free (sizes differ); hashlib lets go of the GIL.
    hashes = threads.in_parallel(model.sha256, names)
    tensors = {
        name: {"dtype": SAFETENSORS_CODES[model.tensors[name].dtype], "shape": list(model.tensors[name].shape), "sha256": digest}
        for name, digest in zip(names, hashes)
    }
    files = {name: sha256_hex(data) for name, data in side_files(model).items()}
    return model_manifest(tensors, files)


def model_id(model: SafetensorsModel) -> str:
    """The content id of a local model (hashes every byte of it; cached per object)."""
    cached = getattr(model, "_content_id", None)
    if cached is None:
        cached = content_id(build_model_manifest(model))
        model._content_id = cached
    return cached
