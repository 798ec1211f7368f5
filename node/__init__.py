"""What a peer does: it joins the network, stores and serves content, and takes part in rounds.

- node.py: a peer (identity, store, network presence, publish and fetch); control.py: the
  local endpoint commands use to reach a running node; demo.py: ``hivemerge demo``;
  ui.py: progress, tables and JSON output; charter_follower.py: the network charter a
  node follows (protocol/charter.py), from its genesis over the DHT
- net/: the libp2p daemon and DHT on one event loop, the bounded record storage, transfers
- storage/: the content store, retention (what to keep), the home's own files and state files
- coordinators/: one lifecycle (base.py) and the merge, search and fusion rounds
- cli/: the ``hivemerge`` command line, one module per command group (app.py registers them)
- demo_models/: the demo's trained tiny base and experts, shipped with the package
"""
