"""Which entries of a task vector the sparsifiers keep, decided whole and applied in chunks.

A rule is decided over the whole tensor (an exact rank window by magnitude, or a
keyed random draw) and then hands out its mask chunk by chunk in flat order, so a
merge needs no whole-tensor float temporaries. Chunk for chunk, the masks are those
of :func:`exact.rank_window_mask` on ``|model - base|`` and of :func:`rng.bernoulli_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

from hivemerge.merge.numerics import exact, kernels, placement, rng, threads
from hivemerge.merge.numerics.bits import pack_bits, unpack_bits
from hivemerge.protocol.errors import UserInputError

# Elements per chunk: on a CPU the temporaries of a chunk stay in its caches; a GPU
# wants few, large kernels. The size never changes a result, only the speed.
_CPU_CHUNK = 1 << 18
_GPU_CHUNK = 1 << 24
T = TypeVar("T")


def chunk_size(device: torch.device) -> int:
    return _CPU_CHUNK if placement.cpu_ways(device) else _GPU_CHUNK


def spans(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks covering ``range(numel)``."""
    chunk = chunk_size(device)
    return [(start, min(numel, start + chunk)) for start in range(0, numel, chunk)]


def each_span(numel: int, device: torch.device, work: Callable[[int, int], T]) -> list[T]:
    """``work(start, stop)`` for every chunk, in flat order, the chunks split in contiguous
    runs among the merge's workers (each chunk's work is its own: no result depends on
    how they are split)."""
    return threads.each(lambda bounds: work(*bounds), spans(numel, device), threads.parts_on(device))


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


def della_bounds(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities run from density - epsilon to density + epsilon: inside (0, 1)."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise UserInputError(f"della: density +- epsilon must lie in (0, 1), got density {density:g}, epsilon {epsilon:g}")


class KeepDella:
    """DELLA's MagPrune: in each row (a 1-D tensor is one row), the entry of ascending
    magnitude rank r of c is kept with probability (density - epsilon) + 2 epsilon r/(c-1),
    drawn from the keyed stream. Ranks tie by lower index (a stable sort). The mask is
    decided a block of whole rows at a time and kept packed: one bit per entry. Its
    bounds (della_bounds) are checked by the method, before any shortcut."""

    def __init__(self, base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
                 density: float, epsilon: float, key: tuple[int, int]):
        numel = base.numel()
        cols = numel // shape[0] if len(shape) >= 2 and shape[0] else numel
        rows_per_block = max(8, _BLOCK // max(cols, 1) // 8 * 8)  # a multiple of 8: each block packs to whole bytes

        def block_bits(row: int) -> torch.Tensor:
            start, stop = row * cols, min(numel, (row + rows_per_block) * cols)
            values = magnitudes(model[start:stop].to(dtype, copy=True).sub_(base[start:stop].to(dtype))).view(-1, cols)
            order = torch.argsort(values, dim=1, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(cols, device=order.device).expand_as(order))
            # float32 as mergekit computes it: (rank - min) / (max - min), then the affine map
            spread = exact.divide(rank.to(torch.float32), max(cols - 1, 1)).clamp_(0, 1)  # CUDA would multiply by 1/(c-1)
            probability = spread.mul_(2).mul_(epsilon).add_(density - epsilon)
            return pack_bits(rng.bernoulli_each(key, start, probability))

        rows = range(0, numel // max(cols, 1), rows_per_block)
        packed = threads.each(block_bits, rows, threads.parts_on(base.device))
        self.bits = torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)

    def keep_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        first = start // 8
        span = unpack_bits(self.bits[first : (start + delta.numel() + 7) // 8], start - 8 * first + delta.numel())
        return exact.mask_bits(span[start - 8 * first :].to(delta.device), delta)


_BLOCK = 1 << 20  # entries per block of rows decided at a time (DELLA): bounds the sort's temporaries
_RESCALE_SPAN = 1 << 18  # the L1 sums' spans: one size on every device, so every peer sums alike


def l1_rescale(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype, rule: KeepRule) -> float:
    """mergekit's ``rescale``: the factor that gives the kept entries the L1 norm of the
    whole task vector, sum|delta| / sum|kept| (1 where either is below 1e-7), as float32.
    The sums are exact per span (float32 magnitudes summed in float64 by a fixed tree)
    and added by math.fsum: every device gets the same factor."""
    def sums(start: int) -> tuple[float, float]:
        stop = min(base.numel(), start + _RESCALE_SPAN)
        delta = model[start:stop].to(dtype, copy=True).sub_(base[start:stop].to(dtype))
        keep = rule.keep_bits(delta, start)
        size = delta.abs_()
        return float(exact.pairwise_sum(size)), float(exact.pairwise_sum(exact.keep_or_zero(size, keep)))

    found = threads.each(sums, range(0, base.numel(), _RESCALE_SPAN), threads.parts_on(base.device))
    total, kept = math.fsum(b for b, _ in found), math.fsum(a for _, a in found)
    if total < 1e-7 or kept < 1e-7:
        return 1.0
    return float(torch.tensor(total / kept, dtype=torch.float32))


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
    if unchanged(base, model, dtype):  # |delta| is +0 everywhere: the k largest are the first k, by the tie rule
        cuts = iter([exact.TopK(threshold=0, tie_end=k, nan=False) for k in ks])
    else:
        half = (torch.float16, torch.bfloat16)
        values = exact.Spans(_magnitudes_of(base, model, dtype), numel, chunk_size(base.device),
                             zeros_alone=dtype in half or (base.dtype in half and model.dtype in half), device=base.device)
        cuts = iter(exact.top_k_cuts(values, ks))
    top = next(cuts) if hi < numel else None
    skipped = next(cuts) if lo > 0 else None
    return KeepRanked(top, skipped)


def unchanged(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``model - base`` in ``dtype`` is exactly zero everywhere: equal values,
    finite in ``dtype`` (an infinity minus itself is NaN; 1e5 in bf16 is inf in fp16)."""
    return model.dtype == base.dtype and torch.equal(model, base) and exact.all_finite(base, dtype)


def _magnitudes_of(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
    """``at(start, stop)``: |model - base| over a span, computed as the merge computes it
    (by the fused loop where it can: then in the thread's scratch, which the selection's
    passes use up before they ask for the next span)."""
    if dtype == torch.float32 and kernels.usable(base, model):
        raw_base, raw_model = kernels.raw(base), kernels.raw(model)
        return lambda start, stop: kernels.magnitudes(raw_base[start:stop], raw_model[start:stop])
    return lambda start, stop: magnitudes(model[start:stop].to(dtype, copy=True).sub_(base[start:stop].to(dtype)))
