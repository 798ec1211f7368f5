"""hivemerge: merge domain-expert language models over a peer-to-peer network.

The code lives in three subpackages (see DESIGN.md): ``hivemerge.protocol`` (what peers
agree on), ``hivemerge.merge`` (what a peer computes) and ``hivemerge.node`` (what a
peer does).
"""

__version__ = "0.1.0"

import os as _os

# torch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when
# this is set before torch is first imported (it is read once): a merge writes each
# tensor into fresh memory, and on a virtual machine first-touch page faults of 4 KB
# pages cost more than the merge's arithmetic (scripts/bench_scale.py; docs/benchmarks.md).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
