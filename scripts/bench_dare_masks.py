#!/usr/bin/env python3
"""DARE's keyed masks on the CPU: hivemerge's generator against the one-pass form it replaced.

`merge/numerics/rng.py` draws each DARE mask element from an integer hash of its position. The
one-pass form (below, as it was) hashed each span it was asked for at once, allocating a
dozen int64 temporaries of the span's size; the current form hashes 64K elements at a
time, in place, so its temporaries stay in the cache. Two span sizes are timed: 4M
elements (``bernoulli_mask``, the sparse DARE delta codec) and 256K (the merge engine's
CPU chunks, ``methods/sparsify.py``). Both forms run in this process, interleaved, on the
same elements, and must give the same bits.

    python scripts/bench_dare_masks.py [--elements 50000000] [--repeat 3] [--threads 0]

For scale: a dare_ties merge of three 220M-parameter experts draws 660M mask elements
(`python scripts/bench_merge.py --method dare_ties` times the whole merge).
"""

from __future__ import annotations

import argparse
import time

import torch

from hivemerge.merge.numerics import rng

_M32 = 0xFFFFFFFF
SPANS = {"4M spans (delta codec)": 1 << 22, "256K spans (merge engine)": 1 << 18}


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def one_pass_mask(key: tuple[int, int], numel: int, keep_probability: float, span: int) -> torch.Tensor:
    """The mask as the former code drew it: each span hashed in one pass."""
    threshold = min(1 << 32, round(keep_probability * (1 << 32)))
    mask = torch.empty(numel, dtype=torch.bool)
    for start in range(0, numel, span):
        index = torch.arange(start, min(numel, start + span), dtype=torch.int64)
        x = _mix32((index & _M32) ^ key[0])
        mask[start : start + index.numel()] = _mix32(x ^ (index >> 32) ^ key[1]) < threshold
    return mask


def current_mask(key: tuple[int, int], numel: int, keep_probability: float, span: int) -> torch.Tensor:
    """The mask as hivemerge draws it when asked for one span at a time."""
    mask = torch.empty(numel, dtype=torch.bool)
    for start in range(0, numel, span):
        count = min(span, numel - start)
        mask[start : start + count] = rng.bernoulli_chunk(key, start, count, keep_probability)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=50_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    key = rng.stream_key(0, "model.layers.0.mlp.down_proj.weight", 1)
    print(f"DARE mask, {args.elements:,} elements, keep 0.5, {torch.get_num_threads()} thread(s), fastest of {args.repeat}")
    all_same = True
    for label, span in SPANS.items():
        forms = {"one pass (former)": one_pass_mask, "hivemerge (64K steps, in place)": current_mask}
        best = {name: float("inf") for name in forms}
        masks = {}
        for _ in range(args.repeat):
            for name, draw in forms.items():
                started = time.perf_counter()
                masks[name] = draw(key, args.elements, 0.5, span)
                best[name] = min(best[name], time.perf_counter() - started)
        same = torch.equal(*masks.values())
        all_same &= same
        print(label)
        for name, seconds in best.items():
            print(f"  {name:34} {seconds:7.2f} s  {args.elements / seconds / 1e6:7.1f} M elements/s")
        old, new = best.values()
        print(f"  speed-up {old / new:.2f}x; identical bits: {same}")
    if not all_same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
