"""The ``hivemerge`` command line: app.py builds the app and registers the command groups,
one module each (delta, identity, network, round, search, fuse, store, demo)."""
