"""Screening of deltas before a merge round uses them.

Each delta is checked completely (signature, every hash, the base it was made
against, that it was signed by the node that committed it, finite values) and its
norm is measured with exact reductions, so every peer computes the same numbers and
excludes the same deltas. The outlier rule itself lives in protocol/rounds.py.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

from hivemerge.merge.deltas.delta import DeltaFile, DeltaSource
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.numerics import exact
from hivemerge.protocol.errors import UserInputError


def delta_norm(source: DeltaSource) -> float:
    """L2 norm of (expert - base) over all tensors, identical on every peer."""
    squares = []
    for name in sorted(source.tensors):
        expert = source.get(name).float()
        diff = expert - source.base.get(name).float()
        squares.append(float(exact.dot(diff, diff)))
    return math.sqrt(math.fsum(squares))


def screen_delta(path: Path, base: SafetensorsModel, committers: Collection[str]) -> float:
    """The delta's norm if it passes every check; raises UserInputError saying why not.
    ``committers``: every participant that committed this delta id; its signer must be
    one of them (a stranger who commits someone else's delta id cannot get it excluded)."""
    delta = DeltaFile(path)
    if delta.signer not in committers:
        raise UserInputError(f"signed by {delta.signer[:16]}, not by the participant that committed it")
    source = DeltaSource(delta, base)  # base id, shapes, every hash
    norm = delta_norm(source)  # decodes every tensor: non-finite values raise here
    if not math.isfinite(norm):
        raise UserInputError("non-finite norm")
    return norm
