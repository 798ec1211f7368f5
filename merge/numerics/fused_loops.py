"""The numba loops behind kernels.py (see its docstring for what they promise): imported
on a merge's first fused call, so commands that merge nothing never load numba."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

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


def _jit(function):
    """nogil: the merge's worker threads run the loops side by side; error_model numpy:
    IEEE division (x / 0 is inf, no Python ZeroDivisionError check in the loop). The
    compiled code is cached on disk where numba finds a writable place (beside this file,
    ~/.cache, NUMBA_CACHE_DIR); where it finds none (a read-only install and home), each
    process compiles the loops again instead of failing."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, cache=False, error_model="numpy")(function)

_SIGN_MASK = np.uint32(0x7FFFFFFF)
_NAN_ABOVE = np.uint32(0x7F800000)  # magnitude bits above those of inf are NaN


# -- ternary decode

@_jit
def ternary_span(base, mask, signs, scale, block, start, stop, taken, rows, lanes, out):
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
        window = 0  # a delta that keeps nothing has no sign byte to read
        if last >= 0:
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


# -- the task-vector merge of a span

@_jit
def _kept(magnitude, index, threshold, tie_end, nan):
    """exact.TopK.keep_bits of one entry: above the threshold, or equal to it below tie_end.
    Bitwise, not short-circuit: these tests are a coin toss, branches mispredict."""
    clean = magnitude & (np.uint32(0) - np.uint32(not (nan and magnitude > _NAN_ABOVE)))  # NaN counts as 0 when nan
    return (clean > threshold) | ((index < tie_end) & (magnitude == threshold))


@_jit
def task_vector(base, model, first, top, skip, mask, factor, weight, row):
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
def mix(rows, weights, consensus, normalize, divisor, scale, base, work, out):
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
def magnitudes(base, model, out):
    for i in range(out.size):
        out[i] = _float_of_bits(_bits_of_float(_widen(model[i]) - _widen(base[i])) & _SIGN_MASK)


@_jit
def finite(values, exponent):
    """Whether no entry has all of ``exponent``'s bits set (inf and NaN do): a max, which
    vectorizes, not an early exit, which does not."""
    worst = values.dtype.type(0)
    for i in range(values.size):
        worst = max(worst, values[i] & exponent)
    return worst < exponent


@_jit
def count_high_bits(bits, counts):
    """counts[b >> 16] += 1 for each 32-bit pattern b (counts: 65536 entries)."""
    for i in range(bits.size):
        counts[bits[i] >> 16] += 1
