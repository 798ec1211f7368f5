"""Fused CPU loops for the merge's hottest passes, each one pass over memory instead of a
dozen torch operations: a ternary delta's decode, the selection's magnitudes and high-bit
histogram, the task-vector merge of a span, and the finiteness check.

Every loop (numerics/fused_loops.py) does, entry by entry, the IEEE float32 operations of
the torch code it stands for (codecs.Ternary.decode, methods/task_arithmetic.py,
methods/sparsify.py, numerics/exact.py), in the same order: numba adds and multiplies as
written (no fused multiply-add, no reassociation without ``fastmath``), so the bytes are
the same; tests/test_kernels.py compares the two paths on zeros of both signs, NaN,
infinities and ties. The torch code stays the path on other devices and dtypes, for
tensors under :data:`MIN_ENTRIES`, and under :func:`disabled` (see :func:`usable`).

Half types are read and written as their bits (uint16): bfloat16 widens to float32
exactly by a shift and narrows by round-to-nearest-even, NaN written as 0xFFFF as
torch's CPU conversion writes it. float16 is left to torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from hivemerge.merge.numerics import placement
from hivemerge.merge.numerics.bits import _signed_rows

_TYPES = (torch.bfloat16, torch.float32)
_local = threading.local()


# Fewer entries than this take the torch operations: loading numba and its compiled loops
# costs a process about a second, which small tensors (tests, the demo) never repay.
MIN_ENTRIES = 1 << 20


def enabled() -> bool:
    """False inside :func:`disabled` (in the thread that entered it: the merge decides in
    its caller's thread, before its spans go to the workers)."""
    return not getattr(_local, "off", False)


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops can take these tensors: on the CPU, contiguous, bfloat16 or float32."""
    return all(t.device.type == "cpu" and t.dtype in _TYPES and t.is_contiguous() for t in tensors)


def wanted(device: torch.device, numel: int) -> bool:
    """Whether work over ``numel`` entries on ``device`` takes the fused loops where its
    tensors :func:`fits`: :func:`enabled`, the CPU's ways (placement.py), and
    :data:`MIN_ENTRIES` entries or more. For a decision made before the tensors exist
    (the radix select's spans); :func:`usable` otherwise."""
    return enabled() and placement.cpu_ways(device) and numel >= MIN_ENTRIES


def usable(*tensors: torch.Tensor) -> bool:
    """Whether to use the fused loops on these tensors: they :func:`fits` (so they share
    the CPU) and the largest is :func:`wanted`."""
    return bool(tensors) and fits(*tensors) and wanted(tensors[0].device, max(t.numel() for t in tensors))


@contextmanager
def disabled() -> Iterator[None]:
    """The torch operations instead (in this thread): what the loops are tested against."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def scratch(slot: str, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``count`` entries of this thread's reusable buffer ``slot`` (contents undefined).
    Fresh memory for every span cost more in page faults than the loops' arithmetic."""
    buffers = _local.__dict__.setdefault("scratch", {})
    held = buffers.get(slot)
    if held is None or held.numel() < count or held.dtype != dtype:
        held = buffers[slot] = torch.empty(count, dtype=dtype)
    return held[:count]


Array = torch.Tensor | np.ndarray


def raw(t: Array) -> np.ndarray:
    """A tensor's memory as a flat numpy array (bfloat16 as its bits); an array as it is.
    Each costs some microseconds: a caller that runs a loop span by span converts its
    whole tensors once and hands the loops slices."""
    if isinstance(t, np.ndarray):
        return t
    if not t.is_contiguous():  # reshape would copy it: a loop's output would go into the copy
        raise ValueError("the fused loops take contiguous tensors")
    flat = t.reshape(-1)
    return flat.view(torch.uint16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()


def _size(t: Array) -> int:
    return t.size if isinstance(t, np.ndarray) else t.numel()


def _loops():
    """The compiled loops (numerics/fused_loops.py), imported on first use: loading numba
    and its cache costs a process about a second, which only a merge repays."""
    from hivemerge.merge.numerics import fused_loops

    return fused_loops


def ternary_span(base: Array, mask: Array, signs: Array, scale: Array, block: int,
                 start: int, stop: int, taken: int, out: Array) -> None:
    """Entries ``start .. stop-1`` of ``base + sign * scale`` into ``out`` (flat, its
    dtype): codecs.Ternary.decode's arithmetic. ``taken``: mask bits set before ``start``.
    The caller has checked the parts' sizes against the tensor's (no bounds are checked here)."""
    if not (0 <= start <= stop <= _size(base) == _size(out) and _size(mask) * 8 >= stop
            and _size(scale) * block >= stop and block > 0 and start % 8 == 0):
        raise ValueError("ternary span out of the parts' bounds")
    _loops().ternary_span(raw(base), raw(mask), raw(signs), raw(scale), block, start, stop, taken, _signed_rows().numpy(),
                          scratch("lanes", (stop - start + 7) // 8, torch.int64).numpy(), raw(out))


def magnitudes(base: Array, model: Array) -> torch.Tensor:
    """|model - base| in float32 (NaN's sign bit cleared, as torch's abs does), into this
    thread's scratch: valid until this thread's next call."""
    if _size(base) != _size(model):
        raise ValueError("magnitude span sizes differ")
    out = scratch("magnitudes", _size(base))
    _loops().magnitudes(raw(base), raw(model), out.numpy())
    return out


_NO_CUT = np.array([-1, 0, 0], dtype=np.int64)
_NO_MASK = np.zeros(0, dtype=np.int32)


_EXPONENT = {torch.bfloat16: np.uint16(0x7F80), torch.float32: np.uint32(0x7F800000)}  # the bits of inf


def finite(values: torch.Tensor) -> bool:
    """Whether every value is finite (by its exponent bits, as exact.all_finite checks)."""
    flat = values.reshape(-1)
    bits = raw(flat) if flat.dtype == torch.bfloat16 else flat.view(torch.int32).numpy().view(np.uint32)
    return bool(_loops().finite(bits, _EXPONENT[flat.dtype]))


def high_bit_counts(values: torch.Tensor, buckets: int) -> torch.Tensor:
    """``torch.bincount(values.view(int32) >> 16, minlength=buckets)`` for non-negative
    float32 ``values`` (int64; a value with its sign bit set is refused, as bincount
    refuses the negative number it makes)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    _loops().count_high_bits(values.reshape(-1).view(torch.int32).numpy().view(np.uint32), counts)
    if counts[1 << 15 :].any() or counts[buckets:].any():
        raise ValueError("high-bit counts of negative or out-of-range values")
    return torch.from_numpy(counts[:buckets])


def _cut(top) -> np.ndarray:
    return _NO_CUT if top is None else np.array([top.threshold, top.tie_end, int(top.nan)], dtype=np.int64)


def task_vector(base: Array, model: Array, first: int, top, skipped, mask: torch.Tensor | None,
                factor: float, weight: float, row: torch.Tensor) -> None:
    """``row`` (float32) = the kept entries of ``model - base`` (float32), times ``factor``
    and ``weight`` where those are not 1; the others +0. Kept: by the rank cuts ``top`` and
    ``skipped`` (exact.TopK or None; the span starts at flat index ``first``), or by
    ``mask`` (nonzero: kept) when given."""
    if not _size(base) == _size(model) == row.numel() or (mask is not None and mask.numel() != row.numel()):
        raise ValueError("task vector span sizes differ")
    _loops().task_vector(raw(base), raw(model), first, _cut(top), _cut(skipped),
                         _NO_MASK if mask is None else raw(mask.view(torch.int32)), np.float32(factor), np.float32(weight),
                         row.numpy())


def mix(rows: torch.Tensor, weights: list[float], consensus: bool, normalize: bool, divisor: float, scale: float,
        base: Array, out: Array) -> None:
    """``out`` = the merged task vector of the float32 ``rows`` (one per expert) plus
    ``base``: TIES sign consensus or the plain sum, divided (by the agreeing weights, or
    by ``divisor``) when ``normalize``, times ``scale`` (lambda)."""
    if not rows.shape[1] == _size(base) == _size(out) or rows.shape[0] != len(weights) or not rows.shape[0]:
        raise ValueError("mix span sizes differ")
    work = scratch("mix", 3 * rows.shape[1]).view(3, rows.shape[1]).numpy()
    _loops().mix(rows.numpy(), np.array(weights, dtype=np.float32), consensus, normalize, np.float32(divisor),
                 np.float32(scale), raw(base), work, raw(out))
