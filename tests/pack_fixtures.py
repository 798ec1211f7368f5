"""Synthetic logit packs of any size, signed with a test key, with no model behind them
(for size caps and memory bounds; tests/fuse_fixtures.py makes real ones)."""

from __future__ import annotations

from pathlib import Path

import torch

from hivemerge.merge.fusion.packs import PACK_TENSORS, write_pack
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.identity import Identity

PACK_BYTES_PER_TOKEN = 36  # top-8: 8 int16 ids, 8 fp16 log-probs, the target and its log-prob


def synthetic_tensors(tokens: int, top_k: int = 8, vocab: int = 2000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "ids": torch.randint(0, vocab, (tokens, top_k), generator=g).to(torch.int16),
        "logprobs": (-10 * torch.rand(tokens, top_k, generator=g)).to(torch.float16),
        "targets": torch.randint(0, vocab, (tokens,), generator=g).to(torch.int16),
        "target_logprobs": (-10 * torch.rand(tokens, generator=g)).to(torch.float16),
    }


def synthetic_pack(path: Path, tokens: int, identity: Identity, top_k: int = 8, vocab: int = 2000,
                   per_example: int = 200, tensors: dict[str, torch.Tensor] | None = None,
                   pieces: dict[int, str] | None = None) -> str:
    """Write a signed pack of ``tokens`` response tokens; returns its id. ``tensors`` and
    ``pieces`` replace the random values and the texts (every id below ``vocab``)."""
    tensors = tensors or synthetic_tensors(tokens, top_k, vocab)
    assert set(tensors) == set(PACK_TENSORS)
    texts = pieces if pieces is not None else {t: f"t{t}" for t in range(vocab)}
    raw = canonical_json({"pieces": {str(t): text for t, text in texts.items()}, "special": []})
    lengths = [per_example] * (tokens // per_example) + ([tokens % per_example] if tokens % per_example else [])
    return write_pack(Path(path), tensors, raw, "ab" * 32, "cd" * 32, "ef" * 32, top_k, lengths, identity)
