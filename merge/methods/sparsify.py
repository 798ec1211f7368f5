"""Which entries of a task vector the sparsifiers keep, decided whole and applied in chunks.

A rule is decided over the whole tensor (an exact rank window by magnitude, or a
keyed random draw) and then hands out its mask chunk by chunk in flat order, so a
merge needs no whole-tensor float temporaries. Chunk for chunk, the masks are those
of :func:`exact.rank_window_mask` on ``|model - base|`` and of :func:`rng.bernoulli_mask`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from hivemerge.merge.numerics import exact, rng

# Elements per chunk: on a CPU the temporaries of a chunk stay in its caches; a GPU
# wants few, large kernels. The size never changes a result, only the speed.
_CPU_CHUNK = 1 << 18
_GPU_CHUNK = 1 << 24


def spans(numel: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks covering ``range(numel)``."""
    chunk = _CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


class KeepRule(Protocol):
    def keep_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """What is kept of ``delta``, the chunk of the flat task vector from index
        ``start``, as :func:`exact.mask_bits`. Chunks come in flat order."""


def magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as the selection compares it: half types widened to float32, exactly."""
    return delta.abs().float() if delta.dtype in (torch.float16, torch.bfloat16) else delta.abs()


class KeepNone:
    def keep_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        return torch.zeros_like(delta, dtype=exact.int_like(delta))


class KeepMask:
    """A mask computed whole (float64 task vectors, which have no radix select)."""

    def __init__(self, mask: torch.Tensor):
        self.flat = mask.reshape(-1)

    def keep_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        return exact.mask_bits(self.flat[start : start + delta.numel()], delta)


class KeepRanked:
    """Entries inside the top-k cut ``top`` (None: every entry) and outside ``skipped`` (None: no entry)."""

    def __init__(self, top: exact.TopK | None, skipped: exact.TopK | None):
        self.top, self.skipped = top, skipped

    def keep_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        values = magnitudes(delta)
        if self.top is None:
            keep = ~self.skipped.keep_bits(values, start)
        else:
            keep = self.top.keep_bits(values, start)
            if self.skipped is not None:
                keep &= ~self.skipped.keep_bits(values, start)
        return keep.to(exact.int_like(delta))  # -1 and 0 stay -1 and 0 in any width


class KeepRandom:
    """DARE's drop: each entry kept with probability ``density``, keyed by position."""

    def __init__(self, key: tuple[int, int], density: float):
        self.key, self.density = key, density

    def keep_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        return exact.mask_bits(rng.bernoulli_chunk(self.key, start, delta.numel(), self.density, delta.device), delta)


def keep_by_rank(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype, lo: int, hi: int) -> KeepRule | None:
    """Entries of ``model - base`` (flat, converted to ``dtype``) ranked ``lo .. hi-1`` by
    magnitude, ties by lower index: ``exact.rank_window_mask(|delta|, lo, hi - lo)``.
    None when that is every entry."""
    numel = base.numel()
    if hi <= lo:
        return KeepNone()
    if lo <= 0 and hi >= numel:
        return None
    if dtype == torch.float64:
        delta = model.to(dtype) - base.to(dtype)
        return KeepMask(exact.rank_window_mask(delta.abs(), lo, hi - lo))
    ks = [k for k in (hi, lo) if 0 < k < numel]
    if _unchanged(base, model, dtype):  # |delta| is +0 everywhere: the k largest are the first k, by the tie rule
        cuts = iter([exact.TopK(threshold=0, tie_end=k, nan=False) for k in ks])
    else:
        pieces = lambda: (_magnitudes_at(base, model, dtype, start, stop) for start, stop in spans(numel, base.device))  # noqa: E731
        cuts = iter(exact.top_k_cuts(pieces, ks))
    top = next(cuts) if hi < numel else None
    skipped = next(cuts) if lo > 0 else None
    return KeepRanked(top, skipped)


def _unchanged(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``model - base`` in ``dtype`` is exactly zero everywhere: equal values,
    finite in ``dtype`` (an infinity minus itself is NaN; 1e5 in bf16 is inf in fp16)."""
    return model.dtype == base.dtype and torch.equal(model, base) and exact.all_finite(base, dtype)


def _magnitudes_at(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
    """|model - base| over a span, computed as the merge computes it."""
    return magnitudes(model[start:stop].to(dtype, copy=True).sub_(base[start:stop].to(dtype)))
