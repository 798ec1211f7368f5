"""Read-only access to the tensors of a model directory, one tensor at a time.

Inputs are safetensors (a single ``model.safetensors`` or shards listed by
``model.safetensors.index.json``). Only headers are parsed up front; a tensor's bytes
are read when :meth:`SafetensorsModel.get` asks for it, so a merge never holds whole
models. Pickled checkpoints are refused: they can execute code on load.

Model folders also arrive from the network (a fetched model is opened here before its
id is checked), so headers and the index are checked strictly: every byte of a shard's
data belongs to exactly one tensor, the index names plain shard files of the folder
and exactly the tensors they hold. A file that is a symbolic link out of the folder is
refused: what is read from a model folder ends up in published deltas.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.io.dtypes import DTYPE_OF_CODE
from hivemerge.merge.numerics import threads
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.manifests import WEIGHTS_INDEX_FILE, is_weights_file

INDEX_FILE = WEIGHTS_INDEX_FILE
SINGLE_FILE = "model.safetensors"
MAX_INDEX_BYTES = 16 * 1024 * 1024  # a large model's index is a few hundred KB
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


_READ_SPAN = 4 << 20  # bytes of a tensor read by one worker at a time


def read_exactly(fd: int, into: memoryview, offset: int, truncated: str) -> None:
    """Fill ``into`` from the file at ``offset`` by positioned reads (threads may share
    the file); UserInputError(``truncated``) where the file ends first."""
    done = 0
    while done < len(into):  # one read returns at most ~2 GiB
        got = os.preadv(fd, [into[done:]], offset + done)
        if not got:
            raise UserInputError(truncated)
        done += got


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
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than the parser's stack
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


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard map; every shard a plain file name, never a path."""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
        document = json.loads(index.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserInputError(f"{index}: malformed index ({exc})") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map or not set(document) <= {"metadata", "weight_map"}
            or not isinstance(document.get("metadata", {}), dict)):
        raise UserInputError(f"{index}: malformed index (expected {{metadata, weight_map}} with a non-empty weight_map)")
    for name, fname in weight_map.items():
        if not is_weights_file(fname):
            raise UserInputError(
                f"{index}: tensor {name[:80]} is mapped to {str(fname)[:80]!r}, not a shard file name of the folder")
    return weight_map


def is_count_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _tensor_entry(file: Path, name: str, entry) -> tuple[TensorInfo, int, int]:
    """One header entry, checked: a known dtype, a shape, and a byte range that fits them."""
    code = entry.get("dtype") if isinstance(entry, dict) else None
    if code not in DTYPE_OF_CODE:
        raise UserInputError(f"{file}: tensor {name} has unsupported dtype {code}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (is_count_list(shape) and is_count_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise UserInputError(f"{file}: tensor {name} has a malformed header entry")
    info = TensorInfo(DTYPE_OF_CODE[code], tuple(shape))
    if offsets[1] - offsets[0] != math.prod(shape) * info.dtype.itemsize:
        raise UserInputError(f"{file}: tensor {name} holds {offsets[1] - offsets[0]} bytes, not what its dtype and shape need")
    return info, offsets[0], offsets[1]


def check_layout(file: Path, data_start: int, spans: list[tuple[int, int]],
                 error: type[UserInputError] = UserInputError) -> None:
    """As the safetensors format requires: the tensors' byte ranges cover the data section
    exactly, so a file carries no bytes that no tensor hash (and so no content id) covers.
    Shards and signed containers (deltas, packs) alike."""
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise error(f"{file}: data section has gaps or overlaps")
        position = end
    size, expected = file.stat().st_size, data_start + position
    if size != expected:
        after = f"; {size - expected} bytes after the last tensor's data" if size > expected else ""
        raise error(f"{file}: truncated or padded ({size} bytes, expected {expected}){after}")


def float_dtype(model) -> torch.dtype | None:
    """The floating dtype that holds most of a model's parameters (None: it has none)."""
    counts: dict[torch.dtype, int] = {}
    for info in model.tensors.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    return max(sorted(counts, key=str), key=counts.__getitem__) if counts else None


class SafetensorsModel:
    """A model directory of safetensors shards, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserInputError(f"{self.directory}: no such model directory")
        self._root = self.directory.resolve()
        self.tensors: dict[str, TensorInfo] = {}
        self._locations: dict[str, _Location] = {}
        self.index_file: Path | None = None  # set by _shard_files when an index lists the shards
        self.weight_files, weight_map = self._shard_files()
        for file in self.weight_files:
            header, data_start = read_header(file)
            header.pop("__metadata__", None)
            spans = []
            for name, entry in header.items():
                info, begin, end = _tensor_entry(file, name, entry)
                if name in self.tensors:
                    raise UserInputError(f"{file}: tensor {name} is also in {self._locations[name].file.name}")
                self.tensors[name] = info
                self._locations[name] = _Location(file, data_start + begin, data_start + end)
                spans.append((begin, end))
            check_layout(file, data_start, spans)
        if weight_map is not None:
            held = {n: loc.file.name for n, loc in self._locations.items()}
            if held != weight_map:
                wrong = sorted(set(held.items()) ^ set(weight_map.items()))[0][0]
                raise UserInputError(f"{self.index_file}: the index does not list what its shards hold (tensor {wrong})")

    def _own_file(self, name: str) -> Path | None:
        """``directory/name`` if it is a file of the folder, else None. A symbolic link out of
        the folder is refused: a model folder from elsewhere could point config.json at a
        private file, which publishing would then embed in a public delta."""
        path = self.directory / name
        if not path.is_file():
            return None
        if path.is_symlink() and not path.resolve().is_relative_to(self._root):
            raise UserInputError(
                f"{path}: a symbolic link out of the model folder (to {path.resolve()}); "
                "hivemerge reads only the folder's own files (copy the file in, e.g. cp -L)"
            )
        return path

    def _shard_files(self) -> tuple[list[Path], dict[str, str] | None]:
        """The weights files and, when an index lists them, its weight map."""
        index = self._own_file(INDEX_FILE)
        if index is not None:
            self.index_file = index
            weight_map = _read_weight_map(index)
            files = []
            for fname in sorted(set(weight_map.values())):
                path = self._own_file(fname)
                if path is None:
                    raise UserInputError(f"{index}: shard file missing: {fname}")
                files.append(path)
            return files, weight_map
        single = self._own_file(SINGLE_FILE)
        if single is not None:
            return [single], None
        shards = []
        for path in sorted(self.directory.glob("*.safetensors")):
            if not is_weights_file(path.name):
                raise UserInputError(f"{path}: not a plain shard file name (letters, digits, '.', '_', '-')")
            if self._own_file(path.name) is not None:
                shards.append(path)
        if shards:
            return shards, None
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

    def side_file(self, name: str) -> Path | None:
        """The path of a side file (config, tokenizer) of the model, or None."""
        return self._own_file(name)

    def read_file(self, name: str) -> bytes | None:
        """A side file (config, tokenizer) of the model, or None."""
        path = self._own_file(name)
        return path.read_bytes() if path is not None else None

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

            def read(start: int) -> None:
                read_exactly(f.fileno(), buffer[start : start + _READ_SPAN], where.begin + start,
                             f"{where.file}: truncated (tensor {name})")

            # Copying from the page cache is most of a read: the spans are split among the workers.
            threads.each(read, range(0, size, _READ_SPAN))
        return tensor

    def sha256(self, name: str) -> str:
        """The sha256 of the tensor's bytes as stored (what manifests hash), read a piece at
        a time: hashing side by side, the workers hold a piece each, not a tensor each."""
        info = self._locations[name]
        digest, size = hashlib.sha256(), info.end - info.begin
        piece = memoryview(bytearray(min(size, _READ_SPAN)))
        with info.file.open("rb", buffering=0) as f:
            for start in range(0, size, _READ_SPAN):
                view = piece[: min(_READ_SPAN, size - start)]
                read_exactly(f.fileno(), view, info.begin + start, f"{info.file}: truncated (tensor {name})")
                digest.update(view)
        return digest.hexdigest()

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's bytes exactly as stored (what manifests hash)."""
        info = self._locations[name]
        with info.file.open("rb") as f:
            f.seek(info.begin)
            data = f.read(info.end - info.begin)
        if len(data) != info.end - info.begin:
            raise UserInputError(f"{info.file}: truncated (tensor {name})")
        return data
