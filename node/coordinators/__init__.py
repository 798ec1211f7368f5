"""A node's part in rounds: the shared lifecycle and the interface a node gives every
coordinator (base), merge rounds (merge_rounds), search rounds (search_rounds) and the
fusion step (fusion_rounds)."""
