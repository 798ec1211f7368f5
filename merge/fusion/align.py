"""Token alignment across tokenizers, and vocabulary mapping.

Two tokenizers cut the same text into different tokens. :func:`align_tokens` groups
the source tokens and the pivot tokens into aligned groups by dynamic programming:
a group joins one or more consecutive tokens on each side, costs the edit distance
between the two joined strings, and the cheapest monotone path wins (the finest
one among equals). On identical texts the optimal groups cut exactly at the shared
token boundaries; where the tokenizers render the text a little differently
(normalised whitespace, byte fallbacks) the edit distance still finds the nearest
alignment instead of failing.

:class:`VocabMap` maps a source token's text onto the pivot vocabulary: the exact
piece when the pivot has it, else the nearest by edit distance (ties go to the piece
sharing the longest prefix, then the lowest id), as in FuseLLM / FuseChat.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

LONG_GROUP = 16  # one token against up to this many on the other side (a BPE word against characters)
SHORT_GROUP = 4  # several against several (boundaries that cross)


@lru_cache(maxsize=1 << 16)
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute: 1 each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class Group:
    """Source tokens ``src[0]:src[1]`` aligned with pivot tokens ``piv[0]:piv[1]`` (either may be empty)."""

    src: tuple[int, int]
    piv: tuple[int, int]
    cost: int


def _steps() -> list[tuple[int, int]]:
    steps = [(1, 0), (0, 1)]  # a token with no counterpart (costs its length)
    steps += [(1, b) for b in range(1, LONG_GROUP + 1)] + [(a, 1) for a in range(2, LONG_GROUP + 1)]
    steps += [(a, b) for a in range(2, SHORT_GROUP + 1) for b in range(2, SHORT_GROUP + 1)]
    return steps


STEPS = _steps()


def align_tokens(src: list[str], piv: list[str], band: int = 8) -> list[Group]:
    """The cheapest grouping of ``src`` against ``piv`` (texts of consecutive tokens).

    ``band`` bounds how far (in characters) the two prefixes may drift apart, which
    keeps the search linear in the sequence length.
    """
    if src == piv and all(src):
        # Same tokens (a source with the pivot's tokenizer): the search would find exactly
        # these groups, the only zero-cost path with one group per token, and no path is
        # finer since every unmatched token costs its length. It took most of a check's time.
        return [Group((i, i + 1), (i, i + 1), 0) for i in range(len(src))]
    return _search(src, piv, band)


def _search(src: list[str], piv: list[str], band: int) -> list[Group]:
    src_at = [0]
    for t in src:
        src_at.append(src_at[-1] + len(t))
    piv_at = [0]
    for t in piv:
        piv_at.append(piv_at[-1] + len(t))
    n, m = len(src), len(piv)
    inf = (float("inf"), 0)
    # best[(i, j)] = (cost, -groups) of aligning src[:i] with piv[:j]; smaller is better.
    best: dict[tuple[int, int], tuple[float, int]] = {(0, 0): (0, 0)}
    back: dict[tuple[int, int], tuple[int, int, int]] = {}
    for i in range(n + 1):
        for j in range(m + 1):
            here = best.get((i, j))
            if here is None:
                continue
            for a, b in STEPS:
                if i + a > n or j + b > m:
                    continue
                if abs(src_at[i + a] - piv_at[j + b]) > band:
                    continue
                left, right = "".join(src[i : i + a]), "".join(piv[j : j + b])
                cost = edit_distance(left, right) if a and b else len(left) + len(right)
                cand = (here[0] + cost, here[1] - 1)
                if cand < best.get((i + a, j + b), inf):
                    best[(i + a, j + b)] = cand
                    back[(i + a, j + b)] = (i, j, cost)
    if (n, m) not in best:  # only when the texts drift apart by more than the band
        return _search(src, piv, max(1, band) * 4)  # deletions always reach the end once the band is wide enough
    groups = []
    i, j = n, m
    while (i, j) != (0, 0):
        pi, pj, cost = back[(i, j)]
        groups.append(Group((pi, i), (pj, j), cost))
        i, j = pi, pj
    return groups[::-1]


class VocabMap:
    """Source token text -> pivot token id: exact, else nearest by edit distance."""

    def __init__(self, pivot_pieces: dict[int, str]):
        self._exact: dict[str, int] = {}
        for tid in sorted(pivot_pieces):
            self._exact.setdefault(pivot_pieces[tid], tid)
        self._pieces = sorted((tid, text) for tid, text in pivot_pieces.items() if text)
        self._cache: dict[str, int | None] = {}

    def __call__(self, text: str) -> int | None:
        if text in self._exact:
            return self._exact[text]
        if text not in self._cache:
            self._cache[text] = self._nearest(text)
        return self._cache[text]

    def _nearest(self, text: str) -> int | None:
        if not text or not self._pieces:
            return None

        def key(item: tuple[int, str]) -> tuple[int, int, int]:
            tid, piece = item
            return edit_distance(text, piece), -_common_prefix(text, piece), tid

        return min(self._pieces, key=key)[0]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
