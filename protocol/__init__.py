"""What peers agree on, and nothing else: pure rules, no sockets, no model math.

Imports nothing from ``merge/`` or ``node/``.

- identity, signing: ed25519 keys (``HOME/identity.key``, 0600) and signed manifests
- content: content ids (sha256 of a canonical manifest); fingerprint: architecture ids
- manifests: model manifests and the allow-list of side-file names; bundles: what a bundle holds
- keys: every DHT key and subkey, and the record kind stored under each
- records, record_schemas: signed records, one strict schema per kind, the DHT validator
- rounds, search, fusion, packs: the rules of merge rounds, search rounds, fusion and logit packs
- charter, charter_rules: a network's signed, versioned charter, and the round rules under it
- bounds: every cap on what one peer can make a node store, fetch, compute or keep open
- wire: the framing of transfer streams; errors: the one user-facing error type
"""
