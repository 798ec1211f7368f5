"""Read-only access to the tensors of a model directory, one tensor at a time.

Inputs are safetensors (a single ``model.safetensors`` or shards listed by
``model.safetensors.index.json``). Only headers are parsed up front; a tensor's bytes
are read when :meth:`SafetensorsModel.get` asks for it, so a merge never holds whole
models. Pickled checkpoints are refused: they can execute code on load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.dtypes import DTYPE_OF_CODE
from hivemerge.protocol.errors import UserInputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Location:
    file: Path
    begin: int  # absolute byte range of the raw data in ``file``
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header without touching tensor data.

    Returns the header (``__metadata__`` included) and where the data section starts."""
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than its header length")
            n = int.from_bytes(raw_len, "little")
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: not a readable safetensors file (header is not a mapping)")
    return header, 8 + n


def parse_config(raw: bytes | None, where: Path | str) -> dict:
    if raw is None:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise UserInputError(f"{where}: malformed JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{where}: config is not a JSON object")
    return config


class SafetensorsModel:
    """A model directory of safetensors shards, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserInputError(f"{self.directory}: no such model directory")
        self.tensors: dict[str, TensorInfo] = {}
        self._locations: dict[str, _Location] = {}
        for file in self._shard_files():
            header, data_start = read_header(file)
            header.pop("__metadata__", None)
            for name, entry in header.items():
                code = entry.get("dtype")
                if code not in DTYPE_OF_CODE:
                    raise UserInputError(f"{file}: tensor {name} has unsupported dtype {code}")
                begin, end = entry["data_offsets"]
                self.tensors[name] = TensorInfo(DTYPE_OF_CODE[code], tuple(entry["shape"]))
                self._locations[name] = _Location(file, data_start + begin, data_start + end)

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise UserInputError(f"{index}: malformed index ({exc})") from None
            files = sorted({self.directory / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise UserInputError(f"{index}: shard files missing: {missing}")
            return files
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return [single]
        shards = sorted(self.directory.glob("*.safetensors"))
        if shards:
            return shards
        if any((self.directory / p).exists() for p in PICKLE_FILES):
            raise UserInputError(
                f"{self.directory}: only pickle checkpoints found; hivemerge reads safetensors only "
                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise UserInputError(f"{self.directory}: no safetensors weights found")

    # -- metadata -------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: info.shape for n, info in self.tensors.items()}

    def read_file(self, name: str) -> bytes | None:
        """A side file (config, tokenizer) of the model, or None."""
        path = self.directory / name
        return path.read_bytes() if path.is_file() else None

    def config(self) -> dict:
        return parse_config(self.read_file("config.json"), self.directory / "config.json")

    # -- data -----------------------------------------------------------------------
    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's values, read from the file into memory of their own, or into
        ``into`` when that uint8 buffer is large enough (the result then views it).

        A plain read, not a memory map: the pages of a map would stay resident and be
        counted against the merge for as long as the map is open. Reading into a reused
        buffer spares the page faults of fresh memory, a good part of the reading time."""
        where, info = self._locations[name], self.tensors[name]
        size = where.end - where.begin
        if size != math.prod(info.shape) * info.dtype.itemsize:
            raise UserInputError(f"{where.file}: tensor {name} holds {size} bytes, not what its dtype and shape need")
        if into is None or into.numel() < size:
            tensor = torch.empty(info.shape, dtype=info.dtype)
        else:
            tensor = into[:size].view(info.dtype).view(info.shape)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with where.file.open("rb", buffering=0) as f:
            f.seek(where.begin)
            done = 0
            while done < size:  # one read returns at most ~2 GiB
                got = f.readinto(buffer[done:])
                if not got:
                    raise UserInputError(f"{where.file}: truncated (tensor {name})")
                done += got
        return tensor

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's bytes exactly as stored (what manifests hash)."""
        info = self._locations[name]
        with info.file.open("rb") as f:
            f.seek(info.begin)
            data = f.read(info.end - info.begin)
        if len(data) != info.end - info.begin:
            raise UserInputError(f"{info.file}: truncated (tensor {name})")
        return data
