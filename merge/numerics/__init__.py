"""Numbers that are the same on every device and thread count: exact reductions and
selections (exact), a keyed counter RNG (rng), bit packing (bits)."""
