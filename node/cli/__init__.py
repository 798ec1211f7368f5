"""The ``hivemerge`` command line.

- app.py: builds the typer app, registers the command groups, ``main()`` (the console script)
- one module per command group: merge (merge, methods), search, demo (demo, eval), delta,
  fuse (fuse, pack), identity, charter (network new|show|add|remove|set|sign|publish),
  network (node start, publish, experts, fetch), round, store
- options.py: the options several commands share (--home, --peer, --json, ...), declared once
- connect.py: the node a network command talks to (the running one, or a client via --peer)

A command module imports at the top, except what would load the engine, hivemind or
transformers at start-up: those imports stand in the command's body, marked ``# heavy``.
"""
