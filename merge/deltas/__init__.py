"""Signed weight deltas: codecs (how expert - base is stored), delta files (extract,
verify, apply), the signed container layout they share with packs, and screening before
a round uses them."""
