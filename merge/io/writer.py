"""A streaming writer of sharded safetensors with a layout planned up front.

The dtype and shape of every output tensor are known before the merge starts, so the
shards, their headers and every tensor's offset are computed first. Each merged
tensor is then written straight to its place and dropped: peak memory is one tensor,
not a shard (mergekit buffers whole shards). Files follow the Hugging Face naming:
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.io.dtypes import SAFETENSORS_CODES
from hivemerge.merge.io.sources import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    begin: int  # offset in the shard's data section
    end: int


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty((), dtype=dtype).element_size()


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    if unit not in units or not number:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 500MB, 1GiB)")
    value = int(float(number) * units[unit])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


class ShardedWriter:
    def __init__(self, directory: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.plan: list[PlannedTensor] = []
        shard, used = 0, 0
        for name, dtype, shape in tensors:
            size = _nbytes(dtype, shape)
            if used and used + size > max_shard_bytes:
                shard, used = shard + 1, 0
            self.plan.append(PlannedTensor(name, dtype, tuple(shape), shard, used, used + size))
            used += size
        self.num_shards = shard + 1 if tensors else 0
        self.files = [self._file_name(i) for i in range(self.num_shards)]
        self._next = 0
        self._handle = None
        self._open_shard = -1

    def _file_name(self, shard: int) -> str:
        if self.num_shards == 1:
            return SINGLE_FILE
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def _header(self, shard: int) -> bytes:
        header: dict = {"__metadata__": {"format": "pt"}}
        for t in self.plan:
            if t.shard == shard:
                header[t.name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan; tensors arrive in plan order."""
        planned = self.plan[self._next]
        if name != planned.name:
            raise RuntimeError(f"tensor {name} written out of order; expected {planned.name}")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {planned.dtype} {planned.shape}")
        if planned.shard != self._open_shard:
            self._close()
            self._handle = open(self.directory / self.files[planned.shard], "wb")
            self._handle.write(self._header(planned.shard))
            self._open_shard = planned.shard
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; returns the files written."""
        self._close()
        if self._next != len(self.plan):
            raise RuntimeError(f"only {self._next} of {len(self.plan)} planned tensors were written")
        written = list(self.files)
        if self.num_shards > 1:
            index = {
                "metadata": {"total_size": sum(t.end - t.begin for t in self.plan)},
                "weight_map": {t.name: self.files[t.shard] for t in self.plan},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            written.append(INDEX_FILE)
        return written

    def abort(self) -> None:
        self._close()


class AppendingWriter:
    """One safetensors file whose layout is only known at the end (delta parts).

    Parts are appended to a temporary data file as they are produced (their sizes
    depend on the data), with their SHA-256 computed on the way; :meth:`finish`
    writes the header (with the metadata, which may contain those hashes) and then
    the data, and moves the result into place atomically.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data_path = self.path.with_name(f".{self.path.name}.data-{os.getpid()}")
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> str:
        """Append a tensor; returns the SHA-256 of its raw bytes."""
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._data.write(memoryview(data))
        end = self._offset + data.nbytes
        self._entries[name] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self._offset, end]}
        self._offset = end
        return hashlib.sha256(memoryview(data)).hexdigest()

    def finish(self, metadata: dict[str, str]) -> None:
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt", **metadata}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        staging = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        try:
            with open(staging, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(header)) + header)
                shutil.copyfileobj(data, out, 1 << 22)
            os.replace(staging, self.path)
        finally:
            self.abort()
            staging.unlink(missing_ok=True)

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)
