"""Protocol bounds: how much any one peer can make another node read, store or compute.

Every value here is checked by every reader of what arrives from the network (a record,
a proposal's settings), so a proposer cannot raise them, and every node refuses the same
inputs. The reasons for each number are in docs/security.md.
"""

from __future__ import annotations

import math
from typing import Any


def finite_number(value: Any) -> bool:
    """A real number as JSON carries one: int or float, finite, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- records ---------------------------------------------------------------------------
MAX_RECORD_BYTES = 8 * 1024  # one signed record (a DHT value): a few KB by design
MAX_CLOCK_SKEW = 120.0  # seconds a record's issued_at may lie ahead of the reader's clock
MAX_LIFETIME = 2 * 24 * 3600.0  # a record's signed expiry, past its issued_at (or its round's deadline)


def longest_expiry(issued_at: float, deadline: float = 0.0) -> float:
    """The latest ``expires_at`` a record signed at ``issued_at`` (for a round closing at ``deadline``) may carry."""
    return max(issued_at, deadline) + MAX_LIFETIME
MAX_MADDRS = 16  # addresses in one record
MAX_MADDR_CHARS = 256
MAX_REASON_CHARS = 300  # an exclusion reason in an attestation
MAX_CODECS = 16  # distinct codecs named by one expert record
MAX_TENSORS = 1_000_000  # tensors of one model (a codec count cannot exceed it)
MAX_OBJECT_BYTES = 2**40  # a delta, pack or model a record may announce (1 TiB)

# -- rounds ----------------------------------------------------------------------------
MAX_DEADLINE_SECONDS = 86_400.0  # a commit window: from the proposal to its deadline
MAX_FETCH_WINDOW = 3_600.0  # the longest a round may give its deltas to arrive, all together
MAX_PARALLEL_FETCHES = 4  # a round's deltas fetched at once
# Bundle streams one peer may hold open at a node: room for the fetches of MAX_ACTIVE_ROUNDS
# rounds from one provider (2 x MAX_PARALLEL_FETCHES) beside a fusion's and a user's own.
MAX_STREAMS_PER_PEER = 16
MAX_STREAMS = 128  # all peers together: each stream may hold a chunk in memory
MAX_SELECTED = 256  # domains or delta ids a proposal's select names
MAX_COMMITTED = 16  # deltas one node commits to one round
MAX_ROUND_DELTAS = 1_024  # deltas an attestation lists as included or excluded
MAX_PARAMETERS = 64  # parameters in one recipe mapping
MAX_DOMAINS = 64  # domains with their own parameters in one round recipe
MAX_LAYERS = 1_024  # entries of a per-layer gradient or table (and layer blocks of a search)
MAX_FILTERS = 64  # {filter, value} entries in one parameter
MAX_FILTER_CHARS = 256

# -- search and fusion sizes (what a proposal can make every owner or its fuser compute) --
MAX_GENERATIONS = 100
MAX_POPSIZE = 64
MAX_SEARCH_CANDIDATES = 1_024  # generations x popsize: merges (each scored) a search asks of every owner
MAX_VALIDATION_COUNT = 10_000  # validation examples per owner and domain a search may ask to score
MAX_SEARCH_SECONDS = 86_400.0  # generations x generation_seconds + final_deadline: a search's records must outlive it
MAX_SCORERS = 256  # owners one tally names
MAX_EXAMPLES = 10_000_000  # validation examples one score record counts
MAX_FUSION_STEPS = 10_000  # distillation steps a fusion block may ask of its fuser
MAX_FUSION_BATCH = 512  # examples per distillation step
MAX_FUSION_EXAMPLES = 1_000_000  # steps x batch: the distillation work one proposal may ask for
MAX_PACKS = 64  # logit packs one fusion names

# -- charters (docs/charters.md) --------------------------------------------------------
MAX_ROSTER = 256  # members a charter names (contributors need none under open contribution)
MAX_MAINTAINERS = 16  # maintainers of one version, so also the signatures one version counts
MAX_CHARTER_BASES = 8  # base models one network merges on
MAX_CHARTER_METHODS = 32  # merge method names a round policy allows (the registry has ~10)
MAX_CHARTER_VERSION = 2**31 - 1
# A record/charter carries a whole signed charter: the largest the caps above allow is
# ~34 KiB of JSON (256 members with every role, 16 maintainers and signatures: see
# tests/test_charter.py), more than MAX_RECORD_BYTES; this kind alone may be that large.
MAX_CHARTER_RECORD_BYTES = 40 * 1024


def max_record_bytes(kind: str) -> int:
    """The largest signed record of ``kind``."""
    return MAX_CHARTER_RECORD_BYTES if kind == "record/charter" else MAX_RECORD_BYTES


# -- what one node takes part in at once (a stranger's proposals cannot queue more) --------
MAX_ACTIVE_ROUNDS = 2  # merge rounds committed to and not yet attested or failed
MAX_ACTIVE_SEARCHES = 1  # searches this node scores as an owner
MAX_ACTIVE_FUSIONS = 1  # fusions this node distils as a designated fuser

# -- the DHT storage a node keeps for others -------------------------------------------
MAX_KEY_BYTES = 3 * 1024 * 1024  # records under one key: a lookup reply stays under p2pd's 4 MiB cap (~3,000 experts)
MAX_RECORDS_PER_OWNER_KEY = 64  # records one owner keeps under one key with a content-id qualifier
MAX_RECORDS_PER_OWNER = 1_000  # records one owner keeps on this node, all keys together
MAX_STORED_RECORDS = 20_000  # all records a node stores or caches for others (<= 160 MiB)
