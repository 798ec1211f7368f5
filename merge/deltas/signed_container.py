"""Reading a signed safetensors container: the layout rules deltas follow, for any kind.

The container is what :class:`hivemerge.merge.io.writer.AppendingWriter` writes: a
canonical header (compact JSON, nothing else), metadata that is exactly
``{"format": "pt", KEY: signed manifest}``, and a data section with no gaps, overlaps
or trailing bytes. The caller says which parts the manifest promises (dtype, shape,
SHA-256); every part's hash is checked when it is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from hivemerge.merge.io.dtypes import DTYPE_OF_CODE
from hivemerge.merge.io.sources import check_layout, is_count_list, read_header
from hivemerge.protocol.content import sha256_hex
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.signing import verify_signed


class SignedContainer:
    """Opens ``path``, checks the header and the signature; :meth:`locate` then checks the layout."""

    def __init__(self, path: Path, metadata_key: str, kind: str, error: type[UserInputError],
                 expected_signer: str | None = None):
        self.path, self.error = Path(path), error
        if not self.path.is_file():
            raise error(f"{self.path}: no such {kind} file")
        header, self._data_start = read_header(self.path)
        self._check_canonical_header(header)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or metadata_key not in meta:
            raise error(f"{self.path}: not a hivemerge {kind} (no signed manifest in its metadata)")
        # Exactly what the writer puts there: nothing unsigned can ride along or change.
        if meta != {"format": "pt", metadata_key: meta[metadata_key]}:
            raise error(f"{self.path}: metadata is not what hivemerge writes (corrupted or altered)")
        try:
            self.signed = json.loads(meta[metadata_key])
            self.manifest = verify_signed(self.signed, kind, expected_signer)
        except (ValueError, TypeError, RecursionError):  # not a string; nested past the parser's stack
            raise error(f"{self.path}: the signed manifest is not valid JSON") from None
        except UserInputError as exc:
            raise error(f"{self.path}: {exc}") from None
        self.signer: str = self.signed["signer"]
        self._header = header
        self._parts: dict[str, tuple[int, int, torch.dtype, list[int], str]] = {}

    def _check_canonical_header(self, header: dict) -> None:
        # JSON parsing would not notice changed whitespace or key order: require the exact bytes.
        expected = json.dumps(header, separators=(",", ":")).encode()
        expected += b" " * (-len(expected) % 8)
        with self.path.open("rb") as f:
            f.seek(8)
            if f.read(self._data_start - 8) != expected:
                raise self.error(f"{self.path}: header is not in canonical form (corrupted)")

    def locate(self, expected: dict[str, dict]) -> None:
        """``expected``: part name -> {dtype, shape (None: any), sha256}, as the manifest lists them."""
        header, fail = self._header, self.error
        if set(header) != set(expected):
            extra, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
            raise fail(f"{self.path}: file does not hold what its manifest lists (extra {extra[:3]}, missing {missing[:3]})")
        spans = []
        for key, entry in header.items():
            want = expected[key]
            try:
                begin, end = entry["data_offsets"]
                dtype = DTYPE_OF_CODE[entry["dtype"]]
                if set(entry) != {"dtype", "shape", "data_offsets"} or not is_count_list(entry["shape"]) \
                        or not is_count_list([begin, end]) or begin > end:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise fail(f"{self.path}: malformed header entry {key}") from None
            if entry["dtype"] != want["dtype"] or (want["shape"] is not None and entry["shape"] != want["shape"]):
                raise fail(f"{self.path}: part {key} is not the dtype/shape its manifest lists")
            numel = 1
            for d in entry["shape"]:
                numel *= d
            if end - begin != numel * torch.empty((), dtype=dtype).element_size():
                raise fail(f"{self.path}: part {key} has a byte range that does not fit its shape")
            self._parts[key] = (begin, end, dtype, entry["shape"], want["sha256"])
            spans.append((begin, end))
        check_layout(self.path, self._data_start, spans, fail)

    def read_part(self, key: str) -> torch.Tensor:
        begin, end, dtype, shape, sha = self._parts[key]
        with self.path.open("rb") as f:
            f.seek(self._data_start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin or sha256_hex(data) != sha:
            raise self.error(f"{self.path}: part {key} fails its hash check (corrupted)")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def stream_part(self, key: str, block_bytes: int = 1 << 20):
        """A part's values as flat tensors of about ``block_bytes`` each, read and hashed a
        block at a time (memory stays bounded by the block, not the part). Its hash is
        checked once the last block was read, so a caller must consume every block and may
        only rely on what it checked once the loop ends."""
        begin, end, dtype, shape, sha = self._parts[key]
        item = torch.empty((), dtype=dtype).element_size()
        block_bytes = max(item, block_bytes - block_bytes % item)
        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            f.seek(self._data_start + begin)
            left = end - begin
            while left:
                data = bytearray(min(block_bytes, left))
                got = f.readinto(data)
                if not got:
                    break
                del data[got:]
                left -= len(data)
                digest.update(data)
                if len(data) % item:
                    break  # truncated mid-value: the hash check below fails
                yield torch.frombuffer(data, dtype=dtype)
        if left or digest.hexdigest() != sha:
            raise self.error(f"{self.path}: part {key} fails its hash check (corrupted)")

    def part_bytes(self, key: str) -> int:
        begin, end, *_ = self._parts[key]
        return end - begin

    def parts(self) -> list[str]:
        return list(self._parts)

    def data_bytes(self) -> int:
        return sum(end - begin for begin, end, *_ in self._parts.values())

