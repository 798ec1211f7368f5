"""Reductions and selections whose results do not depend on device or thread count.

Consensus between peers compares hashes of merged bytes, so every number that feeds
the output must be reproducible bit for bit. Elementwise IEEE operations are; library
reductions (sum, norm) are not, since their summation order depends on threads, SIMD
width and device. These helpers only use elementwise operations and integer counts.
"""

from __future__ import annotations

import torch

_HI_BUCKETS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit clear)
_LO_BUCKETS = 1 << 16


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


def dot(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Exactly-rounded products (float32 inputs are exact in float64), summed by :func:`pairwise_sum`."""
    if dim is None:
        return pairwise_sum(a.reshape(-1).to(torch.float64) * b.reshape(-1).to(torch.float64))
    return pairwise_sum(a.to(torch.float64) * b.to(torch.float64), dim)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest (1-based) of non-negative float32 ``values``, exactly.

    A two-pass radix select on the float bits (for non-negative IEEE floats the bit
    pattern orders like the value): count the high 16 bits, then the low 16 bits of
    the bucket that holds the k-th element. Two integer histograms instead of a sort.
    """
    flat = values.reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError("kth_largest expects float32")
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k={k} out of range for {flat.numel()} values")
    bits = flat.contiguous().view(torch.int32)
    high = bits >> 16
    bucket, above = _select_bucket(torch.bincount(high, minlength=_HI_BUCKETS), k)
    low = bits[high == bucket] & 0xFFFF
    low_bucket, _ = _select_bucket(torch.bincount(low, minlength=_LO_BUCKETS), k - above)
    pattern = torch.tensor([(bucket << 16) | low_bucket], dtype=torch.int32, device=flat.device)
    return pattern.view(torch.float32)[0]


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
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    need = k - int(mask.sum())
    at_threshold = flat == threshold
    if int(at_threshold.sum()) > need:
        at_threshold &= torch.cumsum(at_threshold, 0) <= need
    return (mask | at_threshold).view(values.shape)


def rank_window_mask(values: torch.Tensor, skip_top: int, keep: int) -> torch.Tensor:
    """Mask of the values ranked ``skip_top .. skip_top+keep-1`` in descending order."""
    return top_k_mask(values, skip_top + keep) & ~top_k_mask(values, skip_top)
