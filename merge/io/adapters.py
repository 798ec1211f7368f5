"""PEFT LoRA adapters as merge inputs: a base model plus an adapter, read like the model
PEFT's ``merge_and_unload`` would give (W + scale * B A per target module).

Only safetensors adapters are read (``adapter_model.safetensors``; a pickle
``adapter_model.bin`` is refused) and only plain LoRA: DoRA and other PEFT types are
refused with the reason. PEFT's module names map to the base's tensors: the key
``base_model.model.<module>.lora_A.weight`` adapts ``<module>.weight``; embedding
adapters store ``lora_embedding_A``/``_B``; other tensors in the file (PEFT's
``modules_to_save``) replace the base's tensor of the same name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hivemerge.merge.io.manifest import side_files
from hivemerge.merge.io.sources import SafetensorsModel, parse_config, read_header
from hivemerge.merge.numerics import exact
from hivemerge.protocol.content import sha256_hex
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.manifests import model_manifest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "adapter_model.pt")
_MAX_CONFIG_BYTES = 1 << 20
_PREFIX = "base_model.model."
_ROWS_AT_ONCE = 1 << 20  # entries of a row block merged at a time
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraPair:
    """One adapted tensor: delta = scale * B @ A (transposed for embeddings and fan-in-fan-out layers)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    transposed: bool

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows of the delta in float32, as a low-rank delta decodes them (exact.lowrank_rows)."""
        return exact.lowrank_rows(self.b, self.a, self.scale, self.transposed, start, stop).to(torch.float32)


class LoraAdapter:
    """A PEFT LoRA adapter directory, checked: its config, and every tensor's name and shape."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / ADAPTER_CONFIG
        if config_path.stat().st_size > _MAX_CONFIG_BYTES:
            raise UserInputError(f"{config_path}: larger than {_MAX_CONFIG_BYTES} bytes")
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{config_path}: not a JSON adapter config ({exc})") from None
        if not isinstance(self.config, dict):
            raise UserInputError(f"{config_path}: not a JSON object")
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UserInputError(f"{config_path}: a {peft_type} adapter; hivemerge merges LoRA adapters only")
        if self.config.get("use_dora"):
            raise UserInputError(f"{config_path}: a DoRA adapter (use_dora); hivemerge merges plain LoRA adapters only")
        if self.config.get("lora_bias"):
            raise UserInputError(f"{config_path}: lora_bias adapters are not supported")
        weights = self.directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = [n for n in _PICKLED if (self.directory / n).exists()]
            raise UserInputError(f"{self.directory}: no {ADAPTER_WEIGHTS}" + (
                f" ({pickled[0]} is a pickle, which hivemerge never loads; save with safe_serialization=True)" if pickled else ""))
        read_header(weights)  # the header's size and form are checked before safetensors reads it
        self.pairs_raw: dict[str, dict[str, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(_PREFIX):
                    raise UserInputError(f"{weights}: tensor {key[:200]!r} is not under {_PREFIX!r} (not a PEFT LoRA adapter)")
                name = key[len(_PREFIX):]
                match = _KEY.fullmatch(name)
                if match is None:
                    # modules_to_save, and the base's own embeddings PEFT saves beside an embedding adapter
                    self.replaced[name.replace(".modules_to_save.default", "").replace(".base_layer", "")] = f.get_tensor(key)
                else:
                    part = "a" if match["part"] in ("lora_A.weight", "lora_embedding_A") else "b"
                    entry = self.pairs_raw.setdefault(match["module"], {})
                    entry[part] = f.get_tensor(key)
                    entry["embedding"] = torch.tensor(match["part"].startswith("lora_embedding"))
        for module, entry in self.pairs_raw.items():
            if "a" not in entry or "b" not in entry:
                raise UserInputError(f"{weights}: module {module} has lora_{'A' if 'a' not in entry else 'B'} missing")

    def base_reference(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    def _scale(self, module: str, rank: int) -> float:
        """lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), with PEFT's per-module patterns."""
        alpha = self.config.get("lora_alpha", 8)
        r = self.config.get("r", rank)
        for key, table in (("alpha", self.config.get("alpha_pattern")), ("r", self.config.get("rank_pattern"))):
            for pattern, value in (table or {}).items():  # PEFT's rule: the pattern matches a suffix of dotted names
                if re.fullmatch(rf"(.*\.)?({pattern})", module):
                    alpha, r = (value, r) if key == "alpha" else (alpha, value)
        if not isinstance(alpha, (int, float)) or not isinstance(r, int) or r <= 0 or r != rank:
            raise UserInputError(f"{self.directory}: module {module}: rank {rank} in the weights, r={r!r}, lora_alpha={alpha!r} in the config")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def pairs(self, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, LoraPair]:
        """The adapted base tensors by name, checked against the base's shapes."""
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        out: dict[str, LoraPair] = {}
        for module, entry in self.pairs_raw.items():
            name = f"{module}.weight"
            if name not in base_shapes:
                raise UserInputError(f"{self.directory}: adapts {module}, which the base has no tensor {name} for")
            a, b = entry["a"], entry["b"]
            embedding = bool(entry["embedding"])
            transposed = embedding or fan_in_fan_out
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise UserInputError(f"{self.directory}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not multiply")
            shape = (b.shape[0], a.shape[1]) if not transposed else (a.shape[1], b.shape[0])
            if tuple(base_shapes[name]) != shape:
                raise UserInputError(f"{self.directory}: module {module}: B A is {list(shape)}, the base's {name} is {list(base_shapes[name])}")
            # PEFT stores embeddings' factors as (r, num) and (dim, r): B A is (dim, num), transposed
            out[name] = LoraPair(a, b, self._scale(module, a.shape[0]), transposed)
        for name, tensor in self.replaced.items():
            if name not in base_shapes or tuple(tensor.shape) != tuple(base_shapes[name]):
                raise UserInputError(f"{self.directory}: holds {name} {list(tensor.shape)}, which is no tensor of the base")
        return out


class AdapterSource:
    """A base model with a LoRA adapter merged in, read like a model directory (a merge
    input): each adapted tensor is (W + delta) computed in float32 and rounded to W's dtype once."""

    def __init__(self, base: SafetensorsModel, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter
        self.directory = Path(f"{base.directory}+{adapter.directory}")
        self.tensors = base.tensors
        self.pairs = adapter.pairs(base.shapes())
        # PEFT saves the base's own embeddings beside an embedding adapter: only what differs replaces
        self.replaced = {n: t.to(self.tensors[n].dtype) for n, t in adapter.replaced.items()
                         if not torch.equal(t.to(self.tensors[n].dtype), base.get(n))}

    def names(self) -> list[str]:
        return self.base.names()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.base.shapes()

    def side_file(self, name: str) -> Path | None:
        return self.base.side_file(name)

    def read_file(self, name: str) -> bytes | None:
        return self.base.read_file(name)

    def config(self) -> dict:
        return parse_config(self.read_file("config.json"), self.base.directory / "config.json")

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        replaced = self.replaced.get(name)
        weight = self.base.get(name, into) if replaced is None else replaced.clone()
        pair = self.pairs.get(name)
        if pair is None:
            return weight
        step = max(1, _ROWS_AT_ONCE // max(weight.shape[1], 1))
        for row in range(0, weight.shape[0], step):  # a block of rows at a time: float32 temporaries stay small
            rows = weight[row : row + step]
            rows.copy_(rows.to(torch.float32).add_(pair.rows(row, min(weight.shape[0], row + step))))  # one rounding
        return weight


def adapter_manifest(source: AdapterSource, base_manifest: dict) -> dict:
    """The manifest of the model the adapter makes of the base (what ``delta apply`` and a
    merge of it rebuild): the base's hashes, but for the tensors it adapts or replaces."""
    tensors = dict(base_manifest["tensors"])
    for name in sorted({*source.pairs, *source.replaced}):
        tensor = source.get(name)
        tensors[name] = {"dtype": tensors[name]["dtype"], "shape": list(tensor.shape),
                         "sha256": sha256_hex(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())}
    files = {name: sha256_hex(data) for name, data in side_files(source).items()}
    return model_manifest(tensors, files)

