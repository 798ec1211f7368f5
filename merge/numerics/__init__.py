"""Numbers that are the same on every device and thread count: exact reductions and
selections (exact), a keyed counter RNG (rng), bit packing (bits), the merge's worker
threads (threads), fused CPU loops that write what the torch operations write (kernels),
and which of these ways a device takes (placement)."""
