"""Signed weight deltas: extraction, verification, application, and use as merge input.

A delta file is a safetensors container. Its tensors are the codec parts of every
expert tensor (``<tensor>::<part>``) and the expert's config and tokenizer files
(``__files__/<name>``, as bytes); its metadata holds the signed delta manifest
(:mod:`hivemerge.protocol.manifests`), which names the base and expert manifest ids
and the SHA-256 of every part. Opening a delta checks the signature and that the file
holds exactly what the manifest lists; every part's hash is checked whenever it is
read, and :meth:`DeltaFile.verify_all` reads them all, before any value is used.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.deltas.codecs import CODECS, DEFAULT_CODEC, check_options, parse_codec
from hivemerge.merge.deltas.signed_container import SignedContainer
from hivemerge.merge.io.adapters import AdapterSource, LoraAdapter, adapter_manifest, is_adapter
from hivemerge.merge.io.atomic import atomic_directory
from hivemerge.merge.io.dtypes import DTYPE_OF_CODE, SAFETENSORS_CODES
from hivemerge.merge.io.manifest import build_model_manifest, model_id, side_files
from hivemerge.merge.io.sources import SafetensorsModel, TensorInfo, parse_config
from hivemerge.merge.io.writer import AppendingWriter, ShardedWriter
from hivemerge.merge.layers import natural_key
from hivemerge.merge.numerics import exact
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.fingerprint import describe_mismatch
from hivemerge.protocol.identity import Identity, fingerprint
from hivemerge.protocol.manifests import FILE_PART_PREFIX, check_delta_manifest, delta_manifest, part_name
from hivemerge.protocol.signing import sign_manifest

METADATA_KEY = "hivemerge.delta"
SIGNED_KIND = "delta"

Progress = Callable[[int, int, str], None]


class DeltaError(UserInputError):
    """A delta file is corrupt, forged, or does not fit the base it is used with.
    ``delta_id``: the delta's id, when the file opened (a round excludes that delta)."""

    def __init__(self, message: str, delta_id: str | None = None):
        super().__init__(message)
        self.delta_id = delta_id


@dataclass
class ExtractReport:
    path: Path
    delta_id: str
    base_id: str
    expert_id: str
    codecs: dict[str, int]
    bytes: int
    seconds: float


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not exact.all_finite(tensor):
        raise DeltaError(f"{what} has NaN or Inf values")


def extract_delta(
    base_dir: str | Path,
    expert_dir: str | Path,
    out_file: str | Path,
    identity: Identity,
    codec: str = DEFAULT_CODEC,
    progress: Progress | None = None,
) -> ExtractReport:
    """Encode (expert - base) with ``codec``, sign it with ``identity``, write ``out_file`` atomically.

    ``expert_dir`` may be a LoRA adapter of the base (merge/io/adapters.py): its adapted
    tensors are stored as their low-rank factors (codec ``lowrank``, megabytes where the
    expert is gigabytes), the tensors it replaces losslessly, the rest as ``same``: the
    delta names the merged expert, which it rebuilds exactly."""
    started = time.perf_counter()
    main_codec, main_opts = parse_codec(codec)
    base = SafetensorsModel(base_dir)
    base_manifest = build_model_manifest(base)
    if is_adapter(Path(expert_dir)):
        expert = AdapterSource(base, LoraAdapter(expert_dir))
        expert_manifest = adapter_manifest(expert, base_manifest)
    else:
        expert = SafetensorsModel(expert_dir)
        if base.shapes() != expert.shapes():
            raise DeltaError(f"{expert_dir}: architecture differs from the base ({describe_mismatch(base.shapes(), expert.shapes())})")
        expert_manifest = build_model_manifest(expert)

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = AppendingWriter(out_file)
    try:
        entries: dict[str, dict] = {}
        names = sorted(expert.tensors, key=natural_key)
        for i, name in enumerate(names):
            if isinstance(expert, AdapterSource) and name not in expert.replaced:
                entries[name] = _adapter_entry(writer, name, expert)
            elif isinstance(expert, AdapterSource):  # modules_to_save: few, and kept exact like the factors
                entries[name] = _encode_tensor(writer, name, base, expert, CODECS["lossless"], {})
            else:
                entries[name] = _encode_tensor(writer, name, base, expert, main_codec, main_opts)
            if progress:
                progress(i + 1, len(names), name)
        files = {}
        for fname, data in side_files(expert).items():
            files[fname] = writer.add(FILE_PART_PREFIX + fname, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        manifest = delta_manifest(
            content_id(base_manifest), content_id(expert_manifest), base_manifest["architecture"], entries, files
        )
        signed = sign_manifest(identity, SIGNED_KIND, manifest)
        writer.finish({METADATA_KEY: json.dumps(signed, sort_keys=True, separators=(",", ":"))})
    except BaseException:
        writer.abort()
        raise
    return ExtractReport(
        out_file, content_id(manifest), manifest["base"], manifest["expert"],
        dict(Counter(e["codec"] for e in entries.values())), out_file.stat().st_size, time.perf_counter() - started,
    )


def _adapter_entry(writer: AppendingWriter, name: str, expert: AdapterSource) -> dict:
    """An adapter's tensor: its factors as they are (lowrank), or ``same`` where it adapts nothing."""
    info = expert.tensors[name]
    pair = expert.pairs.get(name)
    parts, codec, params = {}, "same", {}
    if pair is not None:
        parts = {"a": pair.a.to(torch.float32).contiguous(), "b": pair.b.to(torch.float32).contiguous()}
        params = check_options(CODECS["lowrank"], {"rank": pair.a.shape[0], "scale": pair.scale, "transposed": pair.transposed},
                               f"{expert.adapter.directory}: {name}")
        codec = "lowrank"
    stored = {}
    for part, tensor in parts.items():
        _check_finite(tensor, f"adapter factor {part} of {name}")
        stored[part] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape), "sha256": writer.add(part_name(name, part), tensor)}
    return {"codec": codec, "dtype": SAFETENSORS_CODES[info.dtype], "shape": list(info.shape), "params": params, "parts": stored}


def _encode_tensor(writer: AppendingWriter, name: str, base: SafetensorsModel, expert: SafetensorsModel, codec, opts) -> dict:
    expert_t, base_t = expert.get(name), base.get(name)  # each read once
    _check_finite(expert_t, f"expert tensor {name}")
    # Equal bytes are the same tensor only in the same dtype (0x3C00 is 1.0 in fp16, 1/128 in bf16).
    if expert_t.dtype == base_t.dtype and torch.equal(_bytes_of(expert_t), _bytes_of(base_t)):
        codec, opts = CODECS["same"], {}
    elif codec.lossy and expert_t.is_floating_point() and expert_t.dim() < 2:
        # Norms and biases stay fp16 under a lossy codec: they cost little and matter much.
        codec, opts = CODECS["fp16"], {}
    elif not expert_t.is_floating_point():
        codec, opts = CODECS["lossless"], {}
    parts = codec.encode(name, base_t, expert_t, opts)
    stored = {}
    for part, tensor in parts.items():
        _check_finite(tensor, f"encoded part {part} of {name}")
        sha = writer.add(part_name(name, part), tensor)
        stored[part] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape), "sha256": sha}
    return {
        "codec": codec.name,
        "dtype": SAFETENSORS_CODES[expert_t.dtype],
        "shape": list(expert_t.shape),
        "params": opts,
        "parts": stored,
    }


# What a delta's own numbers can raise in a codec (overflowing Python floats, fsum of infinities):
# a verdict on the delta, like its malformed parts.
_ARITHMETIC = (ArithmeticError, ValueError, TypeError)


def _raise_if_local(exc: Exception) -> None:
    """A failure of this machine (out of memory), not of the delta: it must not become a
    public verdict on the delta (a round would exclude it here and nowhere else)."""
    if isinstance(exc, RuntimeError) and "alloc" in str(exc).lower():
        raise exc


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


class DeltaFile:
    """A delta container, opened and checked: signature, manifest, layout."""

    def __init__(self, path: str | Path, expected_signer: str | None = None):
        # The container's layout rules (canonical header, exact metadata, signature, no
        # gaps or trailing bytes, every part hashed) are shared with logit packs.
        self._container = SignedContainer(Path(path), METADATA_KEY, SIGNED_KIND, DeltaError, expected_signer)
        self.path = self._container.path
        try:
            self.manifest = check_delta_manifest(self._container.manifest)
        except UserInputError as exc:
            raise DeltaError(f"{self.path}: {exc}") from None
        self.signer: str = self._container.signer
        self.id = content_id(self.manifest)
        expected: dict[str, dict] = {}
        for name, entry in self.manifest["tensors"].items():
            for part, info in entry["parts"].items():
                expected[part_name(name, part)] = info
        for fname, sha in self.manifest["files"].items():
            expected[FILE_PART_PREFIX + fname] = {"dtype": "U8", "shape": None, "sha256": sha}
        self._container.locate(expected)
        self._options = {}
        for name, entry in self.manifest["tensors"].items():
            codec = CODECS.get(entry["codec"])
            if codec is None:
                raise DeltaError(f"{self.path}: tensor {name} uses unknown codec {entry['codec']!r}")
            if entry["dtype"] not in DTYPE_OF_CODE:
                raise DeltaError(f"{self.path}: tensor {name} has unknown dtype {entry['dtype']!r}")
            self._options[name] = check_options(codec, entry.get("params", {}), f"{self.path}: tensor {name} codec")

    # -- data -----------------------------------------------------------------------
    def read_part(self, key: str) -> torch.Tensor:
        return self._container.read_part(key)

    def verify_all(self) -> None:
        for key in self._container.parts():
            self.read_part(key)

    def files(self) -> dict[str, bytes]:
        return {f: self.read_part(FILE_PART_PREFIX + f).numpy().tobytes() for f in self.manifest["files"]}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(e["shape"]) for n, e in self.manifest["tensors"].items()}

    def tensor_info(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(DTYPE_OF_CODE[e["dtype"]], tuple(e["shape"])) for n, e in self.manifest["tensors"].items()}

    def decode(self, name: str, base: torch.Tensor, in_place: bool = False, into: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's tensor from the base's. ``in_place``: the base tensor is the caller's
        own scratch: the expert is written over it (no second tensor of its size).
        ``into``: a uint8 buffer to write the expert into, when it is large enough."""
        entry = self.manifest["tensors"][name]
        shape, dtype = tuple(entry["shape"]), DTYPE_OF_CODE[entry["dtype"]]
        if tuple(base.shape) != shape:
            raise DeltaError(f"{self.path}: tensor {name} has shape {list(shape)}, the base's is {list(base.shape)}")
        parts = self._parts(name)
        out = base if in_place else None
        if into is not None and into.numel() >= base.numel() * dtype.itemsize:
            out = into[: base.numel() * dtype.itemsize].view(dtype).view(shape)
        try:
            out = CODECS[entry["codec"]].decode(base, parts, dtype, shape, self._options[name], out=out)
        except (RuntimeError, KeyError, IndexError, UserInputError, *_ARITHMETIC) as exc:
            _raise_if_local(exc)
            raise DeltaError(f"{self.path}: tensor {name} cannot be decoded ({exc})", self.id) from None
        if not exact.all_finite(out):  # base + delta overflowed
            raise DeltaError(f"{self.path}: decoded tensor {name} has NaN or Inf values", self.id)
        return out

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        """A tensor's parts, each read and hash-checked, flat: a part's shape is its writer's
        to choose, and codecs check sizes and read entries in flat order."""
        return {p: self.read_part(part_name(name, p)).reshape(-1) for p in self.manifest["tensors"][name]["parts"]}

    def squares(self, name: str) -> float | None:
        """Sum of the tensor's squared delta entries as encoded, from its parts alone (the
        codec's rule, codecs.Codec.squares); None when its codec needs the base."""
        entry = self.manifest["tensors"][name]
        parts = self._parts(name)
        try:
            return CODECS[entry["codec"]].squares(parts, tuple(entry["shape"]), self._options[name])
        except UserInputError as exc:
            raise DeltaError(f"{self.path}: tensor {name}: {exc}", self.id) from None
        except (RuntimeError, KeyError, IndexError, *_ARITHMETIC) as exc:
            _raise_if_local(exc)
            raise DeltaError(f"{self.path}: tensor {name} cannot be read ({exc})", self.id) from None

    def summary(self) -> dict:
        parts_bytes = self._container.data_bytes()
        return {
            "delta_id": self.id,
            "signer": self.signer,
            "signer_fingerprint": fingerprint(bytes.fromhex(self.signer)),
            "base_id": self.manifest["base"],
            "expert_id": self.manifest["expert"],
            "architecture": self.manifest["architecture"],
            "codecs": dict(Counter(e["codec"] for e in self.manifest["tensors"].values())),
            "tensors": len(self.manifest["tensors"]),
            "parameters": sum(_numel(e["shape"]) for e in self.manifest["tensors"].values()),
            "file_bytes": self.path.stat().st_size,
            "data_bytes": parts_bytes,
        }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_base(delta: DeltaFile, base: SafetensorsModel) -> None:
    """The base must be exactly the one the delta was made against."""
    if base.shapes() != delta.shapes():
        raise DeltaError(
            f"{delta.path}: the base's architecture differs from the delta's ({describe_mismatch(delta.shapes(), base.shapes())})"
        )
    actual = model_id(base)
    if actual != delta.manifest["base"]:
        raise DeltaError(
            f"{delta.path}: made against base {delta.manifest['base'][:12]}, but {base.directory} is {actual[:12]}"
        )


class DeltaSource:
    """A base plus a verified delta, read like a model directory (a merge input)."""

    def __init__(self, delta: DeltaFile, base: SafetensorsModel):
        check_base(delta, base)
        delta.verify_all()
        self.delta, self.base = delta, base
        self.directory = delta.path
        self.tensors = delta.tensor_info()
        self.files = delta.files()

    def names(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.shape for n, i in self.tensors.items()}

    def read_file(self, name: str) -> bytes | None:
        return self.files.get(name)

    def config(self) -> dict:
        return parse_config(self.read_file("config.json"), f"{self.directory}:config.json")

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's tensor; ``into`` as for :meth:`SafetensorsModel.get` holds the base's,
        then the expert's, decoded over it."""
        return self.delta.decode(name, self.base.get(name, into), in_place=True)

    def get_over(self, name: str, base: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's tensor decoded from ``base``, the base's tensor as the caller read
        it from :attr:`base` (left as it is), into the uint8 buffer ``into`` when it is large enough."""
        return self.delta.decode(name, base, into=into)


def apply_delta(base_dir: str | Path, delta_path: str | Path, out_dir: str | Path, overwrite: bool = False,
                progress: Progress | None = None) -> dict:
    """Rebuild the expert as a model directory. Returns a summary (with ``exact``:
    whether the result is byte-identical to the expert the delta was made from)."""
    delta = DeltaFile(delta_path)
    source = DeltaSource(delta, SafetensorsModel(base_dir))  # checks base id and every hash first
    layout = [(n, i.dtype, i.shape) for n, i in sorted(source.tensors.items(), key=lambda kv: natural_key(kv[0]))]
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, layout)
        try:
            for i, (name, _, _) in enumerate(layout):
                writer.write(name, source.get(name))
                if progress:
                    progress(i + 1, len(layout), name)
            writer.finish()
        finally:
            writer.abort()
        for fname, data in source.files.items():
            (staging / fname).write_bytes(data)
        rebuilt_id = content_id(build_model_manifest(SafetensorsModel(staging)))
    return {**delta.summary(), "rebuilt_id": rebuilt_id, "exact": rebuilt_id == delta.manifest["expert"]}
