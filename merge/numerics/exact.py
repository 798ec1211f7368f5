"""Reductions and selections whose results do not depend on device or thread count.

Consensus between peers compares hashes of merged bytes, so every number that feeds
the output must be reproducible bit for bit. Elementwise IEEE operations are (except
division by a number on CUDA: see :func:`divide`); library reductions (sum, norm) are
not, since their summation order depends on threads, SIMD width and device. These
helpers only use elementwise operations and integer counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hivemerge.merge.numerics import kernels, threads

_HI_BUCKETS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit clear)
_LO_BUCKETS = 1 << 16
_INF_BITS = 0x7F800000  # bits of +inf: those of NaN lie above


def all_finite(values: torch.Tensor, dtype: torch.dtype | None = None, span: int = 1 << 20) -> bool:
    """Whether every value is finite, checked a span at a time: ``isfinite`` of a whole
    bf16 embedding makes float32 and boolean temporaries of its size. The largest
    magnitude of a span is NaN if any value is (max propagates NaN), and over the
    dtype's largest finite value if any is infinite. ``dtype``: whether they are finite
    once converted to it."""
    if not values.is_floating_point():
        return True
    dtype = dtype or values.dtype
    flat = values.reshape(-1)
    if dtype == values.dtype or _widens(values.dtype, dtype):
        # On the bits, no conversion: finite iff the exponent bits (those of inf) are not all set.
        ints = int_like(flat)
        exponent = int(torch.tensor(math.inf, dtype=values.dtype).view(ints))
        if kernels.usable(flat):
            finite = lambda i: kernels.finite(flat[i : i + span])  # noqa: E731 (the same test, one fused loop)
            return all(threads.each(finite, range(0, flat.numel(), span), threads.parts_on(flat.device)))
        finite = lambda i: bool(flat[i : i + span].view(ints).bitwise_and(exponent).max() < exponent)  # noqa: E731
    else:
        largest = torch.finfo(dtype).max
        finite = lambda i: bool(flat[i : i + span].to(dtype).abs().max() <= largest)  # noqa: E731
    return all(threads.each(finite, range(0, flat.numel(), span), threads.parts_on(flat.device)))


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``source`` value converts to ``target`` exactly (so stays finite or not)."""
    return source in (torch.float16, torch.bfloat16, torch.float32) and target == torch.float64 or (
        source in (torch.float16, torch.bfloat16) and target == torch.float32)


def pairwise_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum along ``dim`` in float64 by a fixed binary tree of elementwise additions."""
    x = x.to(torch.float64).movedim(dim, -1)
    n = x.shape[-1]
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    size = 1 << (n - 1).bit_length()
    if size != n:
        x = torch.nn.functional.pad(x, (0, size - n))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def divide(x: torch.Tensor, divisor: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x / divisor`` for a Python number, rounded as the CPU rounds it, on every device.

    Given a number, CUDA multiplies by its reciprocal (two roundings) where the CPU
    divides (one); a divisor held in a tensor is divided on both. Half types are divided
    in float32 and rounded once, as the CPU does with a number. ``out`` may be ``x``."""
    opmath = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    d = torch.tensor(divisor, dtype=opmath, device=x.device)
    if opmath == x.dtype:
        return torch.div(x, d, out=out)
    quotient = (x.to(opmath) / d).to(x.dtype)
    return quotient if out is None else out.copy_(quotient)


def dot(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Exactly-rounded products (float32 inputs are exact in float64), summed by :func:`pairwise_sum`."""
    if dim is None:
        return pairwise_sum(a.reshape(-1).to(torch.float64) * b.reshape(-1).to(torch.float64))
    return pairwise_sum(a.to(torch.float64) * b.to(torch.float64), dim)


_LOWRANK_BLOCK = 1 << 18  # float64 entries of a row block: its rank-1 updates stay in the cache


def lowrank_rows(b: torch.Tensor, a: torch.Tensor, scale: float, transposed: bool, start: int, stop: int) -> torch.Tensor:
    """Rows ``start .. stop-1`` of ``scale * (b @ a)`` (of its transpose when ``transposed``)
    in float64, summed over the rank one term at a time, in order: float32 products are
    exact in float64, so each entry depends on the inputs alone (a library matmul's order
    varies with device and threads), and on no row block size."""
    left, right = (a.T, b.T) if transposed else (b, a)  # (rows, r) and (r, cols)
    left, right = left[start:stop].to(torch.float64), right.to(torch.float64)
    out = torch.zeros(stop - start, right.shape[1], dtype=torch.float64, device=b.device)
    step = max(1, _LOWRANK_BLOCK // max(right.shape[1], 1))
    for row in range(0, stop - start, step):
        block = out[row : row + step]
        for k in range(right.shape[0]):
            block.add_(left[row : row + step, k : k + 1] * right[k : k + 1])
    return out.mul_(scale)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest (1-based) of non-negative float32 ``values``, exactly."""
    flat = values.reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError("kth_largest expects float32")
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k={k} out of range for {flat.numel()} values")
    threshold = top_k_cuts(_pieces(flat), [k])[0].threshold
    return torch.tensor([threshold], dtype=torch.int32, device=flat.device).view(torch.float32)[0]


@dataclass(frozen=True)
class TopK:
    """The k largest of some non-negative float32 values: those above the threshold and,
    of those equal to it, the ones at flat indices below ``tie_end`` (the lowest)."""

    threshold: int  # the threshold's bits
    tie_end: int  # values equal to the threshold are kept below this flat index
    nan: bool  # whether the values hold NaN

    def keep_bits(self, values: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The selection over the flat ``values`` that start at index ``start`` of the
        whole, as int32: -1 (all bits set) where kept, 0 elsewhere.

        For non-negative floats, value order is bit order, so one integer subtraction
        and shift does what a comparison does (NaN aside: it is greater than nothing)."""
        bits = values.view(torch.int32)
        clean = torch.nan_to_num(values, nan=0.0, posinf=math.inf).view(torch.int32) if self.nan else bits
        keep = (self.threshold - clean).bitwise_right_shift_(31)
        ties = min(max(self.tie_end - start, 0), values.numel())
        if ties:  # a NaN's bits equal no threshold the ties are kept at (those lie at or below inf's)
            keep[:ties].bitwise_or_((bits[:ties] == self.threshold).view(torch.int8).to(torch.int32).neg_())
        return keep


@dataclass(frozen=True)
class Spans:
    """Non-negative float32 values that are never whole in memory: ``at(start, stop)``
    computes flat entries ``start .. stop-1`` afresh, ``span`` entries at a time (its
    result may be reused memory: each pass is done with it before it calls ``at`` again)."""

    at: Callable[[int, int], torch.Tensor]
    numel: int
    span: int = 1 << 18
    # True when no value lies strictly between 0 and 2**-133 (float32 bits 0x10000): then
    # the lowest high-bits bucket holds only zeros. So it is for |a - b| of half-precision
    # numbers: a nonzero difference is a multiple of their smallest step, bf16's 2**-133.
    zeros_alone: bool = False
    device: torch.device = torch.device("cpu")  # where ``at`` computes: it decides how the passes split

    def parts(self) -> int:
        return threads.parts_on(self.device)

    def bounds(self) -> list[tuple[int, int]]:
        return [(start, min(self.numel, start + self.span)) for start in range(0, self.numel, self.span)]

    def reduce(self, count: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The sum over the spans of ``count(values)`` (integer counts: any order gives the
        same sum), the spans split among the merge's workers."""
        bounds = self.bounds()

        def run(group: range) -> torch.Tensor:
            total = None
            for i in group:
                found = count(self.at(*bounds[i]))
                total = found if total is None else total.add_(found)
            return total

        partial = threads.in_parallel(run, threads.split(len(bounds), self.parts()))
        total = partial[0]
        for more in partial[1:]:
            total.add_(more)
        return total


def top_k_cuts(values: Spans, ks: list[int]) -> list[TopK]:
    """The :class:`TopK` of each k (1 <= k <= count) over non-negative float32 values.

    A radix select on the float bits (for non-negative IEEE floats the bit pattern
    orders like the value) in three passes over the spans, each split among the merge's
    workers; nothing of the values' size is kept. The first counts the high 16 bits of
    every value, which gives each k's bucket; the second counts the low 16 bits of the
    values in those buckets, which gives each threshold; the third finds the flat index
    past the last value equal to a threshold that is kept (ties go to the lowest
    indices). Integer counts, no sort, no index arrays.
    """
    # decided here, for the whole (a span is smaller), in the caller's thread (kernels.disabled is per thread)
    fused = kernels.wanted(values.device, values.numel)
    counts = values.reduce(lambda v: _count_high_bits(v, fused))
    buckets = [_select_bucket(counts, k) for k in ks]
    inf_bucket = _INF_BITS >> 16
    nan_zone = int(counts[inf_bucket:].sum()) > 0  # inf or NaN: the selection must know how many NaN there are
    wanted = {bucket for bucket, _ in buckets} | ({inf_bucket} if nan_zone else set())
    known = {0: _only_zeros(counts[0])} if values.zeros_alone and 0 in wanted else {}  # e.g. ternary deltas' cut
    lows = {**_low_counts(values, sorted(wanted - set(known))), **known}
    nans = int(counts[inf_bucket + 1 :].sum()) + int(lows[inf_bucket][1:].sum()) if nan_zone else 0
    thresholds, needs = [], []
    for k, (bucket, above) in zip(ks, buckets):
        low_bucket, above_low = _select_bucket(lows[bucket], k - above)
        thresholds.append((bucket << 16) | low_bucket)
        needs.append(k - (above + above_low - nans))  # values equal to the threshold to keep
    ends = _tie_ends(values, thresholds, needs)
    return [TopK(t, end, nans > 0) for t, end in zip(thresholds, ends)]


def _count_high_bits(values: torch.Tensor, fused: bool) -> torch.Tensor:
    """The histogram of the high 16 bits of non-negative float32 values (by the fused
    loop where asked and the values suit it)."""
    if fused and kernels.fits(values) and values.dtype == torch.float32:
        return kernels.high_bit_counts(values, _HI_BUCKETS)
    return torch.bincount(values.view(torch.int32) >> 16, minlength=_HI_BUCKETS)


def _only_zeros(count: torch.Tensor) -> torch.Tensor:
    """The low-bits histogram of a bucket 0 that holds ``count`` zeros and nothing else."""
    found = torch.zeros(_LO_BUCKETS, dtype=count.dtype, device=count.device)
    found[0] = count
    return found


def _low_counts(values: Spans, buckets: list[int]) -> dict[int, torch.Tensor]:
    """For each high-bits bucket, the histogram of the low 16 bits of the values in it."""
    if not buckets:
        return {}
    bins = _LO_BUCKETS + 2

    def count(piece: torch.Tensor) -> torch.Tensor:
        bits = piece.view(torch.int32)
        # Offset into each bucket and clamp: values below it count in bin 0, above it in the
        # last; no boolean mask and no index array (a bucket may hold most values).
        return torch.cat([torch.bincount((bits - (bucket << 16)).clamp_(-1, _LO_BUCKETS).add_(1), minlength=bins)
                          for bucket in buckets])

    found = values.reduce(count).view(len(buckets), bins)
    return {bucket: found[i, 1 : _LO_BUCKETS + 1] for i, bucket in enumerate(buckets)}


def _tie_ends(values: Spans, thresholds: list[int], needs: list[int]) -> list[int]:
    """For each threshold, the flat index just past the ``need``-th value equal to it (all
    of them if there are fewer); 0 where none is kept (nothing equals a NaN threshold).

    The spans are counted a wave at a time (one span per worker), in order, and the scan
    stops at the wave that holds the last tie needed: most cuts need a few of their ties."""
    ends = [0] * len(thresholds)
    left = {i: need for i, (t, need) in enumerate(zip(thresholds, needs)) if need > 0 and t <= _INF_BITS}
    bounds = values.bounds()
    wave = values.parts()
    for first in range(0, len(bounds), wave):
        if not left:
            break
        looking = list(left)

        def equal_counts(where: tuple[int, int]) -> list[int]:
            bits = values.at(*where).view(torch.int32)
            return [int(torch.count_nonzero(bits == thresholds[i])) for i in looking]

        for (start, stop), counts in zip(bounds[first : first + wave], threads.in_parallel(equal_counts, bounds[first : first + wave])):
            for i, count in zip(looking, counts):
                if i not in left:
                    continue
                if count >= left[i]:
                    equal = values.at(start, stop).view(torch.int32) == thresholds[i]
                    ends[i] = start + int(equal.nonzero()[left[i] - 1, 0]) + 1
                    del left[i]
                else:
                    left[i] -= count
    for i in left:
        ends[i] = values.numel
    return ends


def _pieces(flat: torch.Tensor, size: int = 1 << 18) -> Spans:
    """``flat`` as :class:`Spans`, for :func:`top_k_cuts`."""
    return Spans(lambda start, stop: flat[start:stop], flat.numel(), size, device=flat.device)


def _select_bucket(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest element, and how many elements lie above it."""
    from_top = torch.cumsum(counts.flip(0), 0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], device=counts.device, dtype=from_top.dtype))[0])
    bucket = counts.numel() - 1 - j
    above = int(from_top[j]) - int(counts[bucket])
    return bucket, above


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest non-negative values; ties broken by lower flat index.

    Any float dtype: half types are widened to float32 (exactly), float64 is sorted.

    The tie rule makes the selection a pure function of the values, and the masks
    nested: ``top_k_mask(v, j) <= top_k_mask(v, k)`` for ``j <= k``.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # exact and order-preserving: the same selection
    elif flat.dtype != torch.float32:
        # No radix select for other dtypes (float64 recipes): a stable sort has only one
        # possible answer, the same tie rule, so it is just as reproducible.
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
        return mask.view(values.shape)
    cut = top_k_cuts(_pieces(flat), [k])[0]
    return cut.keep_bits(flat).bool().view(values.shape)


def rank_window_mask(values: torch.Tensor, skip_top: int, keep: int) -> torch.Tensor:
    """Mask of the values ranked ``skip_top .. skip_top+keep-1`` in descending order."""
    return top_k_mask(values, skip_top + keep) & ~top_k_mask(values, skip_top)


# -- masks as integers: where(keep, x, 0.0) as an AND, several times faster on the CPU

_INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def int_like(values: torch.Tensor) -> torch.dtype:
    """The integer dtype as wide as ``values``' elements."""
    return _INT_OF_WIDTH[values.element_size()]


def mask_bits(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask as integers as wide as ``like``'s elements: -1 where True, 0 where False."""
    return keep.view(torch.uint8).to(int_like(like)).neg_()  # via uint8: bool conversions are slow


def keep_or_zero(values: torch.Tensor, keep_bits: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, values, 0.0)`` bit for bit (NaN and -0.0 included), with
    ``keep`` given as :func:`mask_bits`. Returns ``values``, changed in place."""
    values.view(int_like(values)).bitwise_and_(keep_bits)
    return values
