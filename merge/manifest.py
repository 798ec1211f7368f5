"""Manifests of local models: every tensor's and side file's hash, and the content id."""

from __future__ import annotations

from hivemerge.merge.dtypes import SAFETENSORS_CODES
from hivemerge.merge.sources import SafetensorsModel
from hivemerge.protocol.content import content_id, sha256_hex
from hivemerge.protocol.manifests import model_manifest

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
# The side files that are part of a model's identity (a README is not).
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def side_files(model) -> dict[str, bytes]:
    """The model's config and tokenizer files that exist, by name."""
    found = {}
    for name in MODEL_FILES:
        data = model.read_file(name)
        if data is not None:
            found[name] = data
    return found


def build_model_manifest(model: SafetensorsModel) -> dict:
    tensors = {
        name: {"dtype": SAFETENSORS_CODES[info.dtype], "shape": list(info.shape), "sha256": sha256_hex(model.raw_bytes(name))}
        for name, info in model.tensors.items()
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
