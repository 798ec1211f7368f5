"""A counter-based random generator that gives the same bits on every device.

torch's generators differ between CPU (Mersenne Twister) and CUDA (Philox) and with
the order of calls, which would break consensus: every peer must draw the same DARE
mask. Here element ``i`` of the stream keyed by (seed, tensor name, model index) is a
pure integer hash of ``i`` and the key, computed with exact int64 arithmetic (no
overflow), so it is identical on CPU and GPU, for any thread count and any order.
"""

from __future__ import annotations

import hashlib

import torch

from hivemerge.merge.numerics import placement

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements per step: bounds the int64 temporaries to a few tens of MB
# Elements hashed at a time on the CPU: the int64 temporaries (512 KB each) stay in the
# cache. Hashing 4M elements at once ran at 5M elements/s on one core here, 64K steps at
# 63M (scripts/bench_dare_masks.py).
_CPU_STEP = 1 << 16


def stream_key(seed: int, tensor_name: str, model_index: int) -> tuple[int, int]:
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{model_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


# The hash works in place on ``x`` with one scratch tensor of its shape: on the CPU the
# allocations, not the arithmetic, would dominate.
def _mul32_(x: torch.Tensor, c: int, scratch: torch.Tensor) -> None:
    """x = (x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    # only the low 16 bits of the high product matter
    torch.mul(x, c >> 16, out=scratch).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    x.mul_(c & 0xFFFF).add_(scratch).bitwise_and_(_M32)  # low product < 2**48


def _shift_xor_(x: torch.Tensor, bits: int, scratch: torch.Tensor) -> None:
    """x ^= x >> bits."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, bits, out=scratch))


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    # "lowbias32" integer hash (C. Wellons): full avalanche in two multiplies.
    _shift_xor_(x, 16, scratch)
    _mul32_(x, 0x7FEB352D, scratch)
    _shift_xor_(x, 15, scratch)
    _mul32_(x, 0x846CA68B, scratch)
    _shift_xor_(x, 16, scratch)


def uint32_stream(key: tuple[int, int], start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``start .. start+count-1`` of the keyed stream, as int64 in [0, 2**32)."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    scratch = torch.empty_like(index)
    x = (index & _M32).bitwise_xor_(key[0])
    _mix32_(x, scratch)
    x.bitwise_xor_(index.bitwise_right_shift_(32)).bitwise_xor_(key[1])
    _mix32_(x, scratch)
    return x


def bernoulli_mask(
    key: tuple[int, int], numel: int, keep_probability: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Flat boolean mask, each element True with probability ``keep_probability``."""
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        mask[start : start + count] = bernoulli_chunk(key, start, count, keep_probability, device)
    return mask


def bernoulli_each(key: tuple[int, int], start: int, probabilities: torch.Tensor) -> torch.Tensor:
    """Entries ``start ..`` of a keyed draw, entry i True with its own probability (float32
    ``probabilities``, flat): the stream's integer below p * 2**32, compared exactly in
    float64 (both sides are exact there)."""
    stream = uint32_stream(key, start, probabilities.numel(), probabilities.device)
    return stream.to(torch.float64) < probabilities.reshape(-1).to(torch.float64) * float(1 << 32)


def bernoulli_chunk(
    key: tuple[int, int], start: int, count: int, keep_probability: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Elements ``start .. start+count-1`` of the mask :func:`bernoulli_mask` draws."""
    threshold = min(1 << 32, round(keep_probability * (1 << 32)))
    device = torch.device(device)
    if not placement.cpu_ways(device) or count <= _CPU_STEP:  # a GPU takes the whole chunk in one launch
        return uint32_stream(key, start, count, device) < threshold
    mask = torch.empty(count, dtype=torch.bool)
    for offset in range(0, count, _CPU_STEP):
        step = min(_CPU_STEP, count - offset)
        mask[offset : offset + step] = uint32_stream(key, start + offset, step) < threshold
    return mask
