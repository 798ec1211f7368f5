"""Packing boolean masks into bytes (8 per byte, little-endian bit order), exactly."""

from __future__ import annotations

from functools import cache

import torch

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# Row b: the 8 bits of byte b, lowest first; and how many of them are set. Unpacking by
# table lookup is one gather, several times faster than shifting and masking each bit.
_BITS_OF_BYTE = ((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1).bool()
_ONES_IN_BYTE = _BITS_OF_BYTE.sum(1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of ``packed`` as booleans."""
    table = _BITS_OF_BYTE.to(packed.device)
    return torch.index_select(table, 0, packed.reshape(-1).to(torch.int32)).reshape(-1)[:count]


def count_bits(packed: torch.Tensor, count: int) -> int:
    """How many of the first ``count`` bits of ``packed`` are set (bits past ``count`` in
    its last byte, which a writer may have set, are not counted)."""
    whole, rest = divmod(count, 8)
    packed = packed.reshape(-1)  # a part's shape is the writer's to choose
    found = torch.bincount(packed[:whole], minlength=256).cpu()
    total = int(found @ _ONES_IN_BYTE)
    if rest:
        total += (int(packed[whole]) & ((1 << rest) - 1)).bit_count()
    return total


def count_bits_per_group(packed: torch.Tensor, count: int, group: int) -> torch.Tensor:
    """How many of the first ``count`` bits of ``packed`` are set in each run of
    ``group`` bits (a multiple of 8; the last run may be short), as int64: a byte's
    count by table, a byte an entry, not a boolean per bit."""
    if group % 8:
        raise ValueError(f"group of {group} bits is not whole bytes")
    whole, rest = divmod(count, 8)
    packed = packed.reshape(-1)  # a part's shape is the writer's to choose
    per_byte = torch.index_select(_ONES_IN_BYTE.to(packed.device), 0, packed[: whole + (rest > 0)].to(torch.int32))
    if rest:  # bits past count in the last byte (a writer may set them) are not counted
        per_byte[-1] = (int(packed[whole]) & ((1 << rest) - 1)).bit_count()
    per_group = group // 8
    pad = -per_byte.numel() % per_group
    if pad:
        per_byte = torch.cat([per_byte, per_byte.new_zeros(pad)])
    return per_byte.view(-1, per_group).sum(1)


@cache
def _signed_rows() -> torch.Tensor:
    """Row ``m * 256 + w``: the 8 entries of mask byte ``m`` as int8, 0 where its bit is
    clear and, where set, +1 or -1 by the next unused low bit of ``w`` (1: +1), as an
    int64 per row (8 int8 lanes)."""
    mask = torch.arange(256).view(-1, 1, 1)
    window = torch.arange(256).view(1, -1, 1)
    bit = (mask >> torch.arange(8)) & 1
    before = torch.cumsum(bit, -1) - bit  # set bits below each position: which sign it takes
    sign = (window >> before) & 1
    return (bit * (2 * sign - 1)).to(torch.int8).reshape(-1).view(torch.int64)


def signed_bits(mask: torch.Tensor, signs: torch.Tensor, start: int, count: int, taken: int) -> tuple[torch.Tensor, int]:
    """Entries ``start .. start+count-1`` (``start`` a multiple of 8) of a ternary
    pattern, as int8: 0 where the ``mask`` bit is clear, else +1 or -1 by the kept
    entry's bit in ``signs`` (one per set mask bit, in order); ``taken`` set bits come
    before ``start``. Returns them and the set bits through the span.

    A byte of the mask at a time: its set bits and the sign bits they take index one
    table row, so no entry-sized index is built (masked_scatter is several times slower).
    Mask bits past ``count`` in the last byte are ignored."""
    rows = _signed_rows().to(mask.device)
    m = mask[start // 8 : (start + count + 7) // 8].to(torch.int64, copy=True)  # ours: the last byte is masked in place
    if count % 8:
        m[-1] &= (1 << count % 8) - 1
    per_byte = torch.index_select(_ONES_IN_BYTE.to(mask.device), 0, m)
    offsets = torch.cumsum(per_byte, 0).sub_(per_byte).add_(taken & 7)  # each byte's first sign bit, from byte taken // 8
    kept = int(offsets[-1] + per_byte[-1]) - (taken & 7) if m.numel() else 0
    first = taken // 8
    stream = signs[first : first + (taken % 8 + kept + 7) // 8].to(torch.int64)
    stream = torch.cat([stream, stream.new_zeros(2)])  # a window may run one byte past the last sign byte
    at = offsets >> 3
    window = torch.index_select(stream, 0, at).bitwise_or_(torch.index_select(stream, 0, at + 1) << 8)
    window = window.bitwise_right_shift_(offsets & 7).bitwise_and_((1 << per_byte) - 1)
    values = torch.index_select(rows, 0, (m << 8).bitwise_or_(window)).view(torch.int8)[:count]
    return values, taken + kept
