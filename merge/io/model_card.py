"""Files of the output directory besides the weights: config, tokenizer, model card."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hivemerge.merge.io.dtypes import dtype_name
from hivemerge.merge.io.manifest import TOKENIZER_FILES
from hivemerge.merge.layers import LAYER_COUNT_KEYS
from hivemerge.protocol.fingerprint import architecture_fingerprint


def write_config(recipe, out: Path) -> None:
    source = recipe.reference.source
    config = source.config()
    if config:
        # transformers 5 reads `dtype`; older releases `torch_dtype`.
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = dtype_name(recipe.out_dtype)
        if recipe.vocab is not None and "vocab_size" in config:
            config["vocab_size"] = len(recipe.vocab.tokens)
        if recipe.slices is not None:  # stacked layers: their count, and per-layer lists (layer_types) layer by layer
            before = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
            for k, value in list(config.items()):
                if isinstance(value, list) and before is not None and len(value) == before:
                    config[k] = [value[i] for i in recipe.slices.layers]
            for k in LAYER_COUNT_KEYS:
                if isinstance(config.get(k), int):
                    config[k] = recipe.slices.num_layers
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = source.read_file("generation_config.json")
    if generation is not None:
        (out / "generation_config.json").write_bytes(generation)


def copy_tokenizer(recipe, out: Path) -> list[str]:
    source = recipe.tokenizer_source.source
    copied = []
    for name in TOKENIZER_FILES:
        data = source.read_file(name)
        if data is not None:
            (out / name).write_bytes(data)
            copied.append(name)
    if recipe.vocab is not None and recipe.vocab.tokenizer is not None:  # the union's tokenizer, its added tokens in both files
        (out / "tokenizer.json").write_text(json.dumps(recipe.vocab.tokenizer, ensure_ascii=False) + "\n")
        config_file = out / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            decoder = {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in recipe.vocab.tokenizer["added_tokens"]}
            config["added_tokens_decoder"] = decoder
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        copied = sorted({*copied, "tokenizer.json"})
    return copied


def write_model_card(recipe, out: Path) -> None:
    inputs = ([recipe.base] if recipe.base else []) + [m for m in recipe.inputs if m is not recipe.base]
    rows = []
    for m in inputs:
        role = "base" if m is recipe.base else m.key
        fingerprint = architecture_fingerprint(m.source.shapes())[:16]
        rows.append(f"| {role} | `{m.ref}` | `{fingerprint}` |")
    front = {"library_name": "transformers", "tags": ["merge", "hivemerge", recipe.method.name]}
    if recipe.base is not None:
        front["base_model"] = recipe.base.ref
    title = recipe.name or "Merged model"
    card = "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False).strip(),
            "---",
            f"# {title}",
            "",
            f"Merged with [hivemerge](https://pypi.org/project/hivemerge/) using the **{recipe.method.name}** method: "
            f"{recipe.method.summary}",
            "",
            "## Input models",
            "",
            "| role | model | architecture fingerprint |",
            "| --- | --- | --- |",
            *rows,
            "",
            "## Recipe",
            "",
            "```yaml",
            yaml.safe_dump(recipe.document, sort_keys=False).strip(),
            "```",
            "",
        ]
    )
    (out / "README.md").write_text(card)
