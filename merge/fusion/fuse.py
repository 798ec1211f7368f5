"""Fusing the distributions of several experts onto the pivot's tokens.

Each source's response tokens are aligned with the pivot's (:func:`align.align_tokens`).
Where one source token covers one or more pivot tokens, the source's top-k candidates
give a distribution over the pivot's vocabulary at each of them: at the first pivot
token every candidate maps through :class:`align.VocabMap`; at a later one only the
candidates that continue the text already emitted in the group count, and what
remains of each maps (so a BPE source predicting ``"45"`` over ``"44"`` says, for a
character pivot, "4" and then "5" or "4" in proportion). Pivot tokens covered by
several source tokens at once get no distribution from that source.

Per pivot token, the sources that have a distribution are fused:

- ``mince``: the one with the lowest cross-entropy against the reference token;
- ``avgce``: their average, weighted by ``softmax(-cross-entropy)`` (that is, by the
  probability each gave the reference token).

A token no source covers has no fused distribution; distillation then uses the
reference token alone there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hivemerge.merge.fusion.align import VocabMap, align_tokens
from hivemerge.merge.fusion.packs import ExampleDistributions
from hivemerge.protocol.fusion import METHODS  # a round's fusion block names them: one list for both

Dist = dict[int, float]  # pivot token id -> probability (sums to 1)
EPS = 1e-6  # probability floor: a source that never proposed the reference token has CE ~13.8, not inf


def project(example: ExampleDistributions, pivot_texts: list[str], vocab: VocabMap) -> list[Dist | None]:
    """One source's distributions, moved onto the pivot's response tokens (None where it says nothing)."""
    out: list[Dist | None] = [None] * len(pivot_texts)
    for group in align_tokens(example.targets, pivot_texts):
        (s0, s1), (p0, p1) = group.src, group.piv
        if s1 - s0 != 1 or p1 == p0:
            continue  # several source tokens for one pivot token, or a token on one side only
        prefix = ""
        for k in range(p0, p1):
            out[k] = _continuations(example.candidates[s0], prefix, vocab)
            prefix += pivot_texts[k]
    return out


def _continuations(candidates: list[tuple[str, float]], prefix: str, vocab: VocabMap) -> Dist | None:
    dist: Dist = {}
    for text, p in candidates:
        if p <= 0 or len(text) <= len(prefix) or not text.startswith(prefix):
            continue
        tid = vocab(text[len(prefix):])
        if tid is not None:
            dist[tid] = dist.get(tid, 0.0) + p
    total = sum(dist.values())
    return {t: p / total for t, p in sorted(dist.items())} if total > 0 else None


def cross_entropy(dist: Dist, gold: int) -> float:
    return -math.log(max(dist.get(gold, 0.0), EPS))


@dataclass
class Fused:
    dist: Dist | None
    chosen: int | None = None  # MinCE: the source picked
    weights: list[float] = field(default_factory=list)  # AvgCE: per source (0 where it had nothing)


def fuse_token(dists: list[Dist | None], gold: int, method: str) -> Fused:
    present = [(s, d) for s, d in enumerate(dists) if d is not None]
    if not present:
        return Fused(None)
    ce = {s: cross_entropy(d, gold) for s, d in present}
    if method == "mince":
        best = min(ce, key=lambda s: (ce[s], s))  # ties: the first source
        return Fused(dict(dists[best]), chosen=best)
    if method == "avgce":
        low = min(ce.values())
        raw = {s: math.exp(low - c) for s, c in ce.items()}  # softmax(-ce), shifted for stability
        total = sum(raw.values())
        weights = [raw.get(s, 0.0) / total for s in range(len(dists))]
        fused: Dist = {}
        for s, d in present:
            for t, p in d.items():
                fused[t] = fused.get(t, 0.0) + weights[s] * p
        return Fused(dict(sorted(fused.items())), weights=weights)
    raise ValueError(f"unknown fusion method {method!r}; expected one of {METHODS}")


@dataclass
class FusionStats:
    tokens: int = 0
    covered: int = 0  # tokens with a fused distribution
    per_source_covered: list[int] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)  # MinCE: how often each source was chosen

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "covered": self.covered, "per_source_covered": self.per_source_covered,
                "picks": self.picks}


def fuse_examples(sources: list[list[ExampleDistributions]], pivot_texts: list[list[str]], pivot_gold: list[list[int]],
                  vocab: VocabMap, method: str) -> tuple[list[list[Dist | None]], FusionStats]:
    """Fused distributions for every probe example (pivot tokenization), and how much was covered."""
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {METHODS}")
    stats = FusionStats(per_source_covered=[0] * len(sources), picks=[0] * len(sources))
    fused_all = []
    for e, (texts, gold) in enumerate(zip(pivot_texts, pivot_gold)):
        projected = [project(src[e], texts, vocab) for src in sources]
        row = []
        for k, g in enumerate(gold):
            dists = [p[k] for p in projected]
            result = fuse_token(dists, g, method)
            row.append(result.dist)
            stats.tokens += 1
            stats.covered += result.dist is not None
            for s, d in enumerate(dists):
                stats.per_source_covered[s] += d is not None
            if result.chosen is not None:
                stats.picks[result.chosen] += 1
        fused_all.append(row)
    return fused_all, stats
