"""What a node keeps on disk: the verified content store (store), what it must keep and
pruning the rest (retention), and its own files and per-round state files (home)."""
