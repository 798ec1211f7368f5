"""Logit packs: an expert's top-k next-token log-probabilities on a probe set.

Any Hugging Face causal LM directory (safetensors) with its own tokenizer can make a
pack. For every probe example the expert reads ``prompt + response`` (tokenized as
two pieces, so the response's tokens are exactly its own) and the pack keeps, for
every response token, the k most likely next tokens and their log-probabilities
(fp16), the response token itself and its log-probability, and the text of every
token id it mentions (``pieces.json``), so a fuser needs no copy of the expert's
tokenizer. The file is a signed safetensors container laid out like a delta: the
signed manifest (:mod:`hivemerge.protocol.packs`) rides in the metadata and names the
probe id, the model and tokenizer hashes and every tensor's SHA-256; the pack's id is
the manifest's content id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hivemerge.merge.deltas.signed_container import SignedContainer
from hivemerge.merge.fusion.probe import ProbeSet
from hivemerge.merge.io.dtypes import SAFETENSORS_CODES
from hivemerge.merge.io.manifest import TOKENIZER_FILES, build_model_manifest
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.io.tokens import pad_id, right_padded, token_text, tokenize_pair
from hivemerge.merge.io.writer import AppendingWriter
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.protocol.content import canonical_json, content_id, sha256_hex
from hivemerge.protocol.identity import Identity, fingerprint
from hivemerge.protocol.manifests import FILE_PART_PREFIX
from hivemerge.protocol.packs import (
    MAX_PACK_BYTES,
    MAX_PIECE_CHARS,
    MAX_PIECES_BYTES,
    PACK_KIND,
    PACK_TENSORS,
    PIECES_FILE,
    PackError,
    check_pack_manifest,
    pack_manifest,
)
from hivemerge.protocol.signing import sign_manifest

METADATA_KEY = "hivemerge.pack"
DEFAULT_TOP_K = 8

Progress = Callable[[int, int, str], None]


def tokenizer_id(model_dir: Path) -> str:
    """The hash of a model's tokenizer files (what decides how it cuts text)."""
    files = {name: sha256_hex((model_dir / name).read_bytes()) for name in TOKENIZER_FILES if (model_dir / name).is_file()}
    if not files:
        raise PackError(f"{model_dir}: no tokenizer files")
    return content_id(files)


# -- making a pack --------------------------------------------------------------------

@dataclass
class PackReport:
    path: Path
    pack_id: str
    probe_id: str
    tokens: int
    bytes: int
    seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


@torch.no_grad()
def expert_distributions(model, tokenizer, probe: ProbeSet, top_k: int, batch: int = 64,
                         progress: Progress | None = None) -> dict[str, torch.Tensor | list[int]]:
    """Top-k log-probs (and the reference token's) at every response token, examples in probe order."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    encoded = [tokenize_pair(tokenizer, p, r) for p, r in probe.pairs]
    for i, (ids, _) in enumerate(encoded):
        if limit and len(ids) > limit:
            raise PackError(f"probe example {i + 1} is {len(ids)} tokens, more than the model's {limit} positions")
    vocab = model.get_output_embeddings().weight.shape[0]
    if top_k > vocab:
        raise PackError(f"--top-k {top_k} is larger than the model's vocabulary ({vocab})")
    pad = pad_id(tokenizer)
    out_ids, out_lp, targets, target_lp, lengths = [], [], [], [], []
    with single_thread():
        for start in range(0, len(encoded), batch):
            part = encoded[start : start + batch]
            ids, mask = right_padded([e[0] for e in part], pad)
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, (seq, first) in enumerate(part):
                positions = torch.arange(first - 1, len(seq) - 1)  # the position before each response token
                lp = logprobs[row, positions]
                gold = torch.tensor(seq[first:])
                top = lp.topk(top_k, dim=-1)
                out_ids.append(top.indices)
                out_lp.append(top.values)
                targets.append(gold)
                target_lp.append(lp.gather(1, gold[:, None])[:, 0])
                lengths.append(len(seq) - first)
            if progress:
                progress(min(start + batch, len(encoded)), len(encoded), "examples")
    return {"ids": torch.cat(out_ids), "logprobs": torch.cat(out_lp), "targets": torch.cat(targets),
            "target_logprobs": torch.cat(target_lp), "lengths": lengths, "vocab": vocab}


def make_pack(model_dir: str | Path, probe: ProbeSet, out_file: str | Path, identity: Identity,
              top_k: int = DEFAULT_TOP_K, progress: Progress | None = None) -> PackReport:
    """Compute an expert's pack on ``probe``, sign it with ``identity``, write ``out_file`` atomically."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    model, tokenizer = load_causal_lm(model_dir)
    dists = expert_distributions(model, tokenizer, probe, top_k, progress=progress)
    # int16 ids halve the bytes of a pack for vocabularies below 32768 tokens.
    id_dtype = torch.int16 if dists["vocab"] <= 32767 else torch.int32
    tensors = {
        "ids": dists["ids"].to(id_dtype), "logprobs": dists["logprobs"].to(torch.float16),
        "targets": dists["targets"].to(id_dtype), "target_logprobs": dists["target_logprobs"].to(torch.float16),
    }
    mentioned = sorted(set(tensors["ids"].flatten().tolist()) | set(tensors["targets"].tolist()))
    special = sorted(set(tokenizer.all_special_ids) & set(mentioned))
    texts = {str(t): token_text(tokenizer, t) for t in mentioned}
    too_long = [t for t, text in texts.items() if len(text) > MAX_PIECE_CHARS]
    if too_long:
        raise PackError(f"token {too_long[0]} of {model_dir} is longer than {MAX_PIECE_CHARS} characters, more than a pack may carry")
    pieces = canonical_json({"pieces": texts, "special": special})
    model = content_id(build_model_manifest(SafetensorsModel(model_dir)))
    pack_id = write_pack(Path(out_file), tensors, pieces, probe.id, model, tokenizer_id(model_dir), top_k,
                         dists["lengths"], identity)
    return PackReport(Path(out_file), pack_id, probe.id, sum(dists["lengths"]), Path(out_file).stat().st_size,
                      time.perf_counter() - started)


def write_pack(out_file: Path, tensors: dict[str, torch.Tensor], pieces: bytes, probe: str, model: str, tokenizer: str,
               top_k: int, lengths: list[int], identity: Identity) -> str:
    """Sign and write a pack's tensors (:data:`PACK_TENSORS`) and token texts atomically; returns its id."""
    if sum(t.numel() * t.element_size() for t in tensors.values()) + len(pieces) > MAX_PACK_BYTES:
        raise PackError(f"the pack would be larger than the {MAX_PACK_BYTES >> 20} MiB a pack may be; use a smaller "
                        "probe set or --top-k")
    if len(pieces) > MAX_PIECES_BYTES:
        raise PackError(f"the pack's token texts exceed {MAX_PIECES_BYTES >> 20} MiB")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = AppendingWriter(out_file)
    try:
        entries = {}
        for name in PACK_TENSORS:
            t = tensors[name]
            entries[name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape), "sha256": writer.add(name, t)}
        files = {PIECES_FILE: writer.add(FILE_PART_PREFIX + PIECES_FILE, torch.frombuffer(bytearray(pieces), dtype=torch.uint8))}
        manifest = pack_manifest(probe, model, tokenizer, top_k, lengths, entries, files)
        check_pack_manifest(manifest)
        signed = sign_manifest(identity, PACK_KIND, manifest)
        writer.finish({METADATA_KEY: json.dumps(signed, sort_keys=True, separators=(",", ":"))})
    except BaseException:
        writer.abort()
        raise
    return content_id(manifest)


# -- reading a pack -------------------------------------------------------------------

@dataclass
class ExampleDistributions:
    """One probe example as the expert saw it: per response token, its text, and the
    top-k candidates' texts with their probabilities."""

    targets: list[str]
    candidates: list[list[tuple[str, float]]]


def _logprob_faults(values: torch.Tensor) -> tuple[bool, bool]:
    """(any NaN, any value above log 1 by more than fp16 rounding): what no log-probability
    is. -inf is fine (probability 0 in fp16)."""
    values = values.float()
    return bool(torch.isnan(values).any()), bool((values > 0.01).any())


class PackFile:
    """A pack, opened and checked: signature, manifest, layout. :meth:`load` checks every hash."""

    def __init__(self, path: str | Path, expected_signer: str | None = None):
        if Path(path).is_file() and Path(path).stat().st_size > MAX_PACK_BYTES:
            raise PackError(f"{path}: {Path(path).stat().st_size} bytes, more than the {MAX_PACK_BYTES} a pack may be")
        self._container = SignedContainer(Path(path), METADATA_KEY, PACK_KIND, PackError, expected_signer)
        self.path = self._container.path
        try:
            self.manifest = check_pack_manifest(self._container.manifest)
        except PackError as exc:
            raise PackError(f"{self.path}: {exc}") from None
        self.signer = self._container.signer
        self.id = content_id(self.manifest)
        expected = {name: entry for name, entry in self.manifest["tensors"].items()}
        expected[FILE_PART_PREFIX + PIECES_FILE] = {"dtype": "U8", "shape": None, "sha256": self.manifest["files"][PIECES_FILE]}
        self._container.locate(expected)

    def check_probe(self, probe: ProbeSet) -> None:
        """The pack must be for exactly this probe set."""
        if self.manifest["probe"] != probe.id:
            raise PackError(f"{self.path}: made for probe set {self.manifest['probe'][:12]}, "
                            f"but {probe.path or 'the probe'} is {probe.id[:12]}")
        if len(self.manifest["lengths"]) != len(probe):  # only a forged manifest could get here
            raise PackError(f"{self.path}: has {len(self.manifest['lengths'])} examples, the probe set {len(probe)}")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self._container.read_part(name) for name in PACK_TENSORS}

    def pieces(self) -> tuple[dict[int, str], set[int]]:
        if self._container.part_bytes(FILE_PART_PREFIX + PIECES_FILE) > MAX_PIECES_BYTES:
            raise PackError(f"{self.path}: {PIECES_FILE} is larger than {MAX_PIECES_BYTES} bytes")
        raw = self._container.read_part(FILE_PART_PREFIX + PIECES_FILE).numpy().tobytes()
        try:
            data = json.loads(raw)
            pieces = {int(k): str(v) for k, v in data["pieces"].items()}
            special = {int(t) for t in data["special"]}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise PackError(f"{self.path}: {PIECES_FILE} is malformed") from None
        if not all(0 <= t < 2**31 for t in (*pieces, *special)):  # ids are I16 or I32: others name no token
            raise PackError(f"{self.path}: {PIECES_FILE} names token ids outside [0, 2**31)")
        if any(len(text) > MAX_PIECE_CHARS for text in pieces.values()):
            raise PackError(f"{self.path}: a token text is longer than {MAX_PIECE_CHARS} characters")
        return pieces, special

    def verify(self, block_bytes: int = 1 << 20) -> None:
        """What :meth:`load` checks (every hash, log-probs that are log-probabilities, a text
        for every token id), read as a stream: memory is bounded by ``block_bytes`` and the
        token texts, not by the pack (a fetched pack is verified before it enters the store).
        A part's values are judged once its hash held, so damage reads as damage."""
        pieces, _ = self.pieces()
        known = torch.tensor(sorted(pieces), dtype=torch.long)
        missing: set[int] = set()
        for name in ("ids", "targets"):
            for block in self._container.stream_part(name, block_bytes):
                ids = block.long()
                if len(missing) < 5:
                    missing.update(ids[~torch.isin(ids, known)][:5].tolist())
        self._refuse_missing(missing)
        nan = positive = False
        for block in self._container.stream_part("logprobs", block_bytes):
            faults = _logprob_faults(block)
            nan, positive = nan or faults[0], positive or faults[1]
        self._refuse_logprobs(nan, positive)
        for _ in self._container.stream_part("target_logprobs", block_bytes):
            pass  # its hash

    def _refuse_logprobs(self, nan: bool, positive: bool) -> None:
        if nan:
            raise PackError(f"{self.path}: log-probs have NaN values")
        if positive:
            raise PackError(f"{self.path}: log-probs above 0 (not log-probabilities)")

    def _refuse_missing(self, missing: set[int]) -> None:
        if missing:
            raise PackError(f"{self.path}: token ids {sorted(missing)[:5]} have no text in {PIECES_FILE}")

    def load(self) -> list[ExampleDistributions]:
        """Every example's distributions (checks every hash; token ids must have a text)."""
        t = self.tensors()
        pieces, special = self.pieces()
        ids, probs, targets = t["ids"].long(), t["logprobs"].float().exp(), t["targets"].long()
        self._refuse_logprobs(*_logprob_faults(t["logprobs"]))
        self._refuse_missing((set(ids.flatten().tolist()) | set(targets.tolist())) - set(pieces))
        found, row = [], 0
        for n in self.manifest["lengths"]:
            cands = []
            for r in range(row, row + n):
                cands.append([(pieces[i], p) for i, p in zip(ids[r].tolist(), probs[r].tolist()) if i not in special])
            found.append(ExampleDistributions([pieces[i] for i in targets[row : row + n].tolist()], cands))
            row += n
        return found

    def summary(self) -> dict:
        tokens = sum(self.manifest["lengths"])
        size = self.path.stat().st_size
        return {
            "pack_id": self.id,
            "signer": self.signer,
            "signer_fingerprint": fingerprint(bytes.fromhex(self.signer)),
            "probe_id": self.manifest["probe"],
            "model_id": self.manifest["model"],
            "tokenizer_id": self.manifest["tokenizer"],
            "top_k": self.manifest["top_k"],
            "examples": len(self.manifest["lengths"]),
            "tokens": tokens,
            "file_bytes": size,
            "bytes_per_token": round(size / max(tokens, 1), 2),
        }
