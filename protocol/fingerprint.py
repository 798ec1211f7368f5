"""Architecture fingerprints: who is homogeneous with whom.

Two models can be merged in weight space exactly when they have the same tensor names
with the same shapes. The fingerprint is a hash of that list, independent of dtype
(an fp16 and a bf16 copy of one architecture are homogeneous) and of tensor order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence


def architecture_fingerprint(shapes: Mapping[str, Sequence[int]]) -> str:
    """Hex SHA-256 of the canonical JSON list of ``[name, shape]`` pairs, sorted by name."""
    canonical = json.dumps(
        [[name, [int(d) for d in shapes[name]]] for name in sorted(shapes)],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe_mismatch(a: Mapping[str, Sequence[int]], b: Mapping[str, Sequence[int]], limit: int = 3) -> str:
    """A short human-readable reason why two architectures differ ('' when they match)."""
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    reshaped = sorted(n for n in set(a) & set(b) if list(a[n]) != list(b[n]))
    parts = []
    if only_a:
        parts.append(f"missing tensors {only_a[:limit]}" + (" ..." if len(only_a) > limit else ""))
    if only_b:
        parts.append(f"extra tensors {only_b[:limit]}" + (" ..." if len(only_b) > limit else ""))
    for n in reshaped[:limit]:
        parts.append(f"{n} has shape {list(b[n])}, expected {list(a[n])}")
    return "; ".join(parts)
