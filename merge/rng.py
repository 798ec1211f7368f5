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

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements per step: bounds the int64 temporaries to a few tens of MB


def stream_key(seed: int, tensor_name: str, model_index: int) -> tuple[int, int]:
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{model_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo = x * (c & 0xFFFF)  # < 2**48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits of the high product matter
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons): full avalanche in two multiplies.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uint32_stream(key: tuple[int, int], start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``start .. start+count-1`` of the keyed stream, as int64 in [0, 2**32)."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _mix32((index & _M32) ^ key[0])
    return _mix32(x ^ (index >> 32) ^ key[1])


def bernoulli_mask(
    key: tuple[int, int], numel: int, keep_probability: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Flat boolean mask, each element True with probability ``keep_probability``."""
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        mask[start : start + count] = bernoulli_chunk(key, start, count, keep_probability, device)
    return mask


def bernoulli_chunk(
    key: tuple[int, int], start: int, count: int, keep_probability: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Elements ``start .. start+count-1`` of the mask :func:`bernoulli_mask` draws."""
    threshold = min(1 << 32, round(keep_probability * (1 << 32)))
    return uint32_stream(key, start, count, device) < threshold
