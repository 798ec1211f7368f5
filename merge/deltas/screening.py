"""Screening of deltas before a merge round uses them.

Each delta is checked completely (signature, every hash, the base it was made
against, that it was signed by the node that committed it, the sizes of its parts and
that they are finite) and its norm is measured, so every peer computes the same
numbers and excludes the same deltas. The outlier rule itself lives in protocol/rounds.py.

Screening does not decode: the norm is that of the delta as encoded, from its parts
(codecs.Codec.squares), so a round decodes each delta once, in its merge. A decoded
tensor that overflows the base's dtype is found there (DeltaError naming the delta).
Only codecs that need the base to say anything (lossless) are decoded here.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import torch

from hivemerge.merge.deltas.delta import DeltaError, DeltaFile, check_base
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.numerics import exact
from hivemerge.protocol.errors import UserInputError

_SPAN = 1 << 20  # entries of a decoded tensor compared at a time (the norm of lossless deltas)


def delta_norm(delta: DeltaFile, base: SafetensorsModel) -> float:
    """L2 norm of the delta over all tensors, identical on every peer."""
    squares = []
    for name in sorted(delta.shapes()):
        part = delta.squares(name)
        if part is None:  # its codec needs the base: decoded, compared a span at a time
            original = base.get(name)
            expert, original = delta.decode(name, original).reshape(-1), original.reshape(-1)
            part = math.fsum(float(exact.pairwise_sum((expert[s : s + _SPAN].to(torch.float64)
                                                       - original[s : s + _SPAN].to(torch.float64)).square()))
                             for s in range(0, expert.numel(), _SPAN))
        squares.append(part)
    try:
        return math.sqrt(math.fsum(squares))
    except (OverflowError, ValueError):  # finite squares whose sum overflows
        raise DeltaError(f"{delta.path}: its squared norm overflows", delta.id) from None


def check_decodes(path: Path, base: SafetensorsModel) -> None:
    """Decode every tensor of a screened delta onto the base (one tensor at a time, over
    the base's own copy) and raise DeltaError if any overflows its dtype. For work that
    decodes a delta many times (a search's candidates) or must find every such delta at
    once (a round's merge that met one)."""
    delta = DeltaFile(path)
    for name in sorted(delta.shapes()):
        delta.decode(name, base.get(name), in_place=True)


def screen_delta(path: Path, base: SafetensorsModel, committers: Collection[str]) -> float:
    """The delta's norm if it passes every check; raises UserInputError saying why not.
    ``committers``: every participant that committed this delta id; its signer must be
    one of them (a stranger who commits someone else's delta id cannot get it excluded)."""
    delta = DeltaFile(path)
    if delta.signer not in committers:
        raise UserInputError(f"signed by {delta.signer[:16]}, not by the participant that committed it")
    check_base(delta, base)  # its base's id and shapes
    delta.files()  # the side files' hashes
    norm = delta_norm(delta, base)  # every tensor part's hash, size and finiteness
    if not math.isfinite(norm):
        raise UserInputError("non-finite norm")
    return norm
