"""Reductions and selections whose results do not depend on device or thread count.

Consensus between peers compares hashes of merged bytes, so every number that feeds
the output must be reproducible bit for bit. Elementwise IEEE operations are (except
division by a number on CUDA: see :func:`divide`); library reductions (sum, norm) are
not, since their summation order depends on threads, SIMD width and device. These
helpers only use elementwise operations and integer counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_HI_BUCKETS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit clear)
_LO_BUCKETS = 1 << 16
_INF_BITS = 0x7F800000  # bits of +inf: those of NaN lie above


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


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest (1-based) of non-negative float32 ``values``, exactly."""
    flat = values.reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError("kth_largest expects float32")
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k={k} out of range for {flat.numel()} values")
    threshold = top_k_cuts((flat,), flat.__getitem__, [k])[0].threshold
    return torch.tensor([threshold], dtype=torch.int32, device=flat.device).view(torch.float32)[0]


@dataclass(frozen=True)
class TopK:
    """The k largest of some non-negative float32 values: those above the threshold and,
    of those equal to it, the ones at ``ties`` (the lowest flat indices)."""

    threshold: int  # the threshold's bits
    ties: torch.Tensor  # ascending flat indices
    nan: bool  # whether the values hold NaN

    def keep_bits(self, values: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The selection over the flat ``values`` that start at index ``start`` of the
        whole, as int32: -1 (all bits set) where kept, 0 elsewhere.

        For non-negative floats, value order is bit order, so one integer subtraction
        and shift does what a comparison does (NaN aside: it is greater than nothing)."""
        if self.nan:
            values = torch.nan_to_num(values, nan=0.0, posinf=math.inf)
        keep = (self.threshold - values.view(torch.int32)).bitwise_right_shift_(31)
        if self.ties.numel():
            lo, hi = torch.searchsorted(self.ties, self.ties.new_tensor([start, start + values.numel()])).tolist()
            keep[self.ties[lo:hi] - start] = -1
        return keep


def top_k_cuts(
    chunks: Iterable[torch.Tensor], at: Callable[[torch.Tensor], torch.Tensor], ks: list[int]
) -> list[TopK]:
    """The :class:`TopK` of each k (1 <= k <= count) over non-negative float32 values.

    ``chunks`` yields the values in flat order, in pieces of any size, and ``at(indices)``
    gives the values at some flat indices again, so the values never need to be whole
    in memory. A radix select on the float bits (for non-negative IEEE floats the bit
    pattern orders like the value): the high 16 bits of every value (kept, 2 bytes
    each) give one histogram for every k; the values in each k's bucket, fetched by
    ``at``, give the threshold by their low 16 bits and the ties to keep by their
    indices. Integer counts, no sort.
    """
    highs, counts = _high_halves(chunks)
    buckets = [_select_bucket(counts, k) for k in ks]
    members = {b: _bucket_members(highs, at, b) for b in {bucket for bucket, _ in buckets}}
    nans = _count_nans(highs, at) if int(counts[_INF_BITS >> 16 :].sum()) else 0
    cuts = []
    for k, (bucket, above) in zip(ks, buckets):
        index, low = members[bucket]
        low_bucket, above_low = _select_bucket(torch.bincount(low, minlength=_LO_BUCKETS), k - above)
        threshold = (bucket << 16) | low_bucket
        need = k - (above + above_low - nans)  # values equal to the threshold to keep
        ties = index[low == low_bucket][:need] if threshold <= _INF_BITS else index[:0]  # nothing equals NaN
        cuts.append(TopK(threshold, ties, nans > 0))
    return cuts


def _high_halves(chunks: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The high 16 bits of the values, chunk by chunk (int16), and their histogram."""
    highs, counts = [], None
    for values in chunks:
        high = (values.view(torch.int32) >> 16).to(torch.int16)
        highs.append(high)
        found = torch.bincount(high, minlength=_HI_BUCKETS)
        counts = found if counts is None else counts.add_(found)
    return highs, counts


def _bucket_members(highs: list[torch.Tensor], at, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) and low 16 bits of the values whose high bits are ``bucket``."""
    indices, start = [], 0
    for high in highs:
        indices.append(_sparse_nonzero(high == bucket) + start)
        start += high.numel()
    index = torch.cat(indices)
    return index, at(index).view(torch.int32) & 0xFFFF


def _count_nans(highs: list[torch.Tensor], at) -> int:
    """NaN's bits lie above every number's, yet NaN compares greater than nothing: the
    selection must know how many there are."""
    above_inf_bucket = sum(int(torch.count_nonzero(high > _INF_BITS >> 16)) for high in highs)
    _, low = _bucket_members(highs, at, _INF_BITS >> 16)
    return above_inf_bucket + int(torch.count_nonzero(low))  # in inf's bucket, all but inf are NaN


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the True entries of a flat boolean mask. nonzero scans a mask
    byte by byte; a sparse one is found faster as 8-byte words first, then inside the
    words that hold a True."""
    whole = mask.numel() - mask.numel() % 8
    hit = mask[:whole].view(torch.int64).nonzero().view(-1)  # needs mask's own (aligned) memory
    inside = mask[:whole].view(-1, 8)[hit].nonzero()
    found = hit[inside[:, 0]] * 8 + inside[:, 1]
    return torch.cat([found, mask[whole:].nonzero().view(-1) + whole])


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
    cut = top_k_cuts((flat,), flat.__getitem__, [k])[0]
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
