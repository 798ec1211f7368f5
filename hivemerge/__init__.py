"""hivemerge: merge domain-expert language models over a peer-to-peer network.

The code lives in three subpackages (see DESIGN.md): ``hivemerge.protocol`` (what peers
agree on), ``hivemerge.merge`` (what a peer computes) and ``hivemerge.node`` (what a
peer does).
"""

__version__ = "0.1.0"
