"""Fused CPU loops for the merge's hottest passes: a ternary delta's decode and the
task-vector merge of a span, each one pass over memory instead of a dozen torch operations.

Every loop here does, entry by entry, the IEEE float32 operations of the torch code it
stands for (codecs.Ternary.decode, methods/task_arithmetic.py), in the same order:
numba adds and multiplies as written (no fused multiply-add, no reassociation without
``fastmath``), so the bytes are the same; tests compare the two paths on zeros of both
signs, NaN, infinities and ties. The torch code stays the path on other devices and
dtypes (:func:`usable`), and under :func:`disabled`.

Half types are read and written as their bits (uint16): bfloat16 widens to float32
exactly by a shift and narrows by round-to-nearest-even, NaN written as 0xFFFF as
torch's CPU conversion writes it. float16 is left to torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from hivemerge.merge.numerics.bits import _signed_rows

_TYPES = (torch.bfloat16, torch.float32)
_local = threading.local()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops can take these tensors: on the CPU, contiguous, bfloat16
    or float32, and not inside :func:`disabled`."""
    return not getattr(_local, "off", False) and all(
        t.device.type == "cpu" and t.dtype in _TYPES and t.is_contiguous() for t in tensors)


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


def _raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's memory as numpy: bfloat16 as its bits."""
    flat = t.reshape(-1)
    return flat.view(torch.uint16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()


# -- float32 <-> bits, and bfloat16 <-> float32, inside the loops

@intrinsic
def _float_of_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float(typingctx, value):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _widen(x):  # the entry as float32
    raise NotImplementedError


@overload(_widen, inline="always")
def _widen_impl(x):
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    return lambda x: _float_of_bits(np.uint32(x) << np.uint32(16))


def _store(out, i, value):  # out[i] = value in out's dtype
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(out, i, value):
    if isinstance(out.dtype, types.Float):
        def store(out, i, value):
            out[i] = value
        return store

    def store_bfloat16(out, i, value):
        bits = _bits_of_float(value)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out[i] = np.uint16(rounded | (np.uint32(0) - np.uint32(value != value)))  # noqa: PLR0124 (NaN: 0xFFFF)
    return store_bfloat16


# nogil: the merge's worker threads run them side by side; error_model numpy: IEEE division
# (x / 0 is inf, no Python ZeroDivisionError check in the loop)
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_SIGN_MASK = np.uint32(0x7FFFFFFF)
_NAN_ABOVE = np.uint32(0x7F800000)  # magnitude bits above those of inf are NaN


# -- ternary decode

@_jit
def _ternary_span(base, mask, signs, scale, block, start, stop, taken, rows, lanes, out):
    """Two loops: a mask byte at a time, its 8 entries' signs (-1, 0, +1 as int8) by one
    lookup in ``rows`` (bits._signed_rows, by the byte and the 8 sign bits from the next
    unused one); then entry by entry, a scale block at a time, the float32 arithmetic."""
    n = stop - start  # lanes: 8 int8 signs per mask byte
    k = taken  # set mask bits so far: the next sign bit's index
    last = signs.size - 1  # a byte whose bits are unused still reads a window: reads are kept in bounds
    masks = mask[start >> 3 : (stop + 7) >> 3]
    for b in range(lanes.size):
        m = np.int64(masks[b])
        at = k >> 3
        window = ((np.int64(signs[min(at, last)]) | (np.int64(signs[min(at + 1, last)]) << 8)) >> (k & 7)) & 0xFF
        lanes[b] = rows[(m << 8) | window]
        k += np.int64(_ones(m))
    entries = lanes.view(np.int8)
    done = 0
    while done < n:  # slices, and loops from 0: numba then indexes without negative-index checks, and vectorizes
        index = (start + done) // block
        end = min(n, (index + 1) * block - start)
        size = _widen(scale[index])
        sign, base_part, out_part = entries[done:end], base[start + done : start + end], out[start + done : start + end]
        for i in range(sign.size):
            # sign: as codecs.signed_bits' int8 converted, never -0.0
            _store(out_part, i, _widen(base_part[i]) + np.float32(sign[i]) * size)
        done = end


@_jit
def _ones(byte):
    byte = byte - ((byte >> 1) & 0x55)
    byte = (byte & 0x33) + ((byte >> 2) & 0x33)
    return (byte + (byte >> 4)) & 0x0F


def ternary_span(base: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, block: int,
                 start: int, stop: int, taken: int, out: torch.Tensor) -> None:
    """Entries ``start .. stop-1`` of ``base + sign * scale`` into ``out`` (flat, its
    dtype): codecs.Ternary.decode's arithmetic. ``taken``: mask bits set before ``start``.
    The caller has checked the parts' sizes against the tensor's (no bounds are checked here)."""
    if not (0 <= start <= stop <= base.numel() == out.numel() and mask.numel() * 8 >= stop
            and scale.numel() * block >= stop and block > 0 and start % 8 == 0):
        raise ValueError("ternary span out of the parts' bounds")
    _ternary_span(_raw(base), mask.reshape(-1).numpy(), signs.reshape(-1).numpy(), _raw(scale), block, start, stop,
                  taken, _signed_rows().numpy(), scratch("lanes", (stop - start + 7) // 8, torch.int64).numpy(), _raw(out))


# -- the task-vector merge of a span

@_jit
def _kept(magnitude, index, threshold, tie_end, nan):
    """exact.TopK.keep_bits of one entry: above the threshold, or equal to it below tie_end.
    Bitwise, not short-circuit: these tests are a coin toss, branches mispredict."""
    clean = magnitude & (np.uint32(0) - np.uint32(not (nan and magnitude > _NAN_ABOVE)))  # NaN counts as 0 when nan
    return (clean > threshold) | ((index < tie_end) & (magnitude == threshold))


@_jit
def _task_vector(base, model, first, top, skip, mask, factor, weight, row):
    has_top, has_skip, has_mask = top[0] >= 0, skip[0] >= 0, mask.size > 0
    for i in range(row.size):
        delta = _widen(model[i]) - _widen(base[i])
        magnitude = _bits_of_float(delta) & _SIGN_MASK
        keep = True
        if has_mask:
            keep = mask[i] != 0
        if has_top:
            keep = _kept(magnitude, first + i, top[0], top[1], top[2])
        if has_skip:
            keep = keep & ~_kept(magnitude, first + i, skip[0], skip[1], skip[2])
        delta = _float_of_bits(_bits_of_float(delta) & (np.uint32(0) - np.uint32(keep)))
        if factor != np.float32(1.0):
            delta = delta * factor
        if weight != np.float32(1.0):
            delta = delta * weight
        row[i] = delta


# _elect's sign election starts its sums at +0.0 where _elect_signs starts them at the
# first expert's term and share, and adds +0.0 for a disagreeing entry where torch adds a
# zero that may be -0.0. No output differs: a term is +0.0 or a nonzero agreeing entry, so
# +0.0 + the first term is that term, and x + -0.0 == x + +0.0 for every x but -0.0,
# which no term is; a share's zero sign shows only in a sum of 0, which becomes 1 in
# both (and x * 1.0 is x: a weight of 1 multiplies nothing there either).
# Each loop is elementwise and branch-free, so the compiler vectorizes it (the signs are
# a coin toss: branches would mispredict), and the sums run in expert order.

@_jit
def _sum(rows, total):
    for j in range(total.size):
        total[j] = rows[0, j]
    for e in range(1, rows.shape[0]):
        for j in range(total.size):
            total[j] = total[j] + rows[e, j]


@_jit
def _elect(rows, weights, total, agreed, shares):
    """The sums of the entries, and of the weights, that agree with the sign of ``total``."""
    for j in range(total.size):
        agreed[j] = np.float32(0.0)
        shares[j] = np.float32(0.0)
    for e in range(rows.shape[0]):
        w = _bits_of_float(weights[e])
        for j in range(total.size):
            d = rows[e, j]
            positive = total[j] >= np.float32(0.0)  # NaN: the majority is negative
            # same sign as the majority (a zero or NaN agrees with nothing): all bits set or none
            agrees = np.uint32(0) - np.uint32((positive & (d > np.float32(0.0))) | (~positive & (d < np.float32(0.0))))
            agreed[j] = agreed[j] + _float_of_bits(_bits_of_float(d) & agrees)
            shares[j] = shares[j] + _float_of_bits(w & agrees)


@_jit
def _divide_by_shares(total, shares):
    one = _bits_of_float(np.float32(1.0))
    for j in range(total.size):
        zero = np.uint32(0) - np.uint32(shares[j] == np.float32(0.0))  # a sum of 0 becomes 1
        total[j] = total[j] / _float_of_bits((_bits_of_float(shares[j]) & ~zero) | (one & zero))


@_jit
def _divide(total, divisor):
    for j in range(total.size):
        total[j] = total[j] / divisor


@_jit
def _scale_add(total, scale, base, out):
    if scale != np.float32(1.0):
        for j in range(total.size):
            total[j] = total[j] * scale
    for j in range(total.size):
        _store(out, j, total[j] + _widen(base[j]))


@_jit
def _mix(rows, weights, consensus, normalize, divisor, scale, base, work, out):
    total, agreed, shares = work[0], work[1], work[2]
    _sum(rows, total)
    if consensus:
        _elect(rows, weights, total, agreed, shares)
        total = agreed
        if normalize:
            _divide_by_shares(total, shares)
    elif normalize:
        _divide(total, divisor)
    _scale_add(total, scale, base, out)


@_jit
def _magnitudes(base, model, out):
    for i in range(out.size):
        out[i] = _float_of_bits(_bits_of_float(_widen(model[i]) - _widen(base[i])) & _SIGN_MASK)


def magnitudes(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """|model - base| in float32 (NaN's sign bit cleared, as torch's abs does), into this
    thread's scratch: valid until this thread's next call."""
    if base.numel() != model.numel():
        raise ValueError("magnitude span sizes differ")
    out = scratch("magnitudes", base.numel())
    _magnitudes(_raw(base), _raw(model), out.numpy())
    return out


_NO_CUT = np.array([-1, 0, 0], dtype=np.int64)
_NO_MASK = np.zeros(0, dtype=np.int32)


def _cut(top) -> np.ndarray:
    return _NO_CUT if top is None else np.array([top.threshold, top.tie_end, int(top.nan)], dtype=np.int64)


def task_vector(base: torch.Tensor, model: torch.Tensor, first: int, top, skipped, mask: torch.Tensor | None,
                factor: float, weight: float, row: torch.Tensor) -> None:
    """``row`` (float32) = the kept entries of ``model - base`` (float32), times ``factor``
    and ``weight`` where those are not 1; the others +0. Kept: by the rank cuts ``top`` and
    ``skipped`` (exact.TopK or None; the span starts at flat index ``first``), or by
    ``mask`` (nonzero: kept) when given."""
    if not base.numel() == model.numel() == row.numel() or (mask is not None and mask.numel() != row.numel()):
        raise ValueError("task vector span sizes differ")
    _task_vector(_raw(base), _raw(model), first, _cut(top), _cut(skipped),
                 _NO_MASK if mask is None else _raw(mask.view(torch.int32)), np.float32(factor), np.float32(weight), row.numpy())


def mix(rows: torch.Tensor, weights: list[float], consensus: bool, normalize: bool, divisor: float, scale: float,
        base: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = the merged task vector of the float32 ``rows`` (one per expert) plus
    ``base``: TIES sign consensus or the plain sum, divided (by the agreeing weights, or
    by ``divisor``) when ``normalize``, times ``scale`` (lambda)."""
    if not rows.shape[1] == base.numel() == out.numel() or rows.shape[0] != len(weights) or not rows.shape[0]:
        raise ValueError("mix span sizes differ")
    work = scratch("mix", 3 * rows.shape[1]).view(3, rows.shape[1]).numpy()
    _mix(rows.numpy(), np.array(weights, dtype=np.float32), consensus, normalize, np.float32(divisor), np.float32(scale),
         _raw(base), work, _raw(out))
