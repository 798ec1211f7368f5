"""Fusion of experts that do not share a base: probe sets (probe), logit packs (packs),
token alignment (align), fusing distributions (fuse), distilling into the pivot (distill),
and a round's fusion run and check (check)."""
