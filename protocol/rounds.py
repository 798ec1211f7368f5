"""Round rules: what every node computes alike about merge rounds.

A round is a signed proposal (base, recipe template, which experts may join, commit
deadline, quorum). Nodes holding matching experts publish signed commitments of their
delta ids before the deadline; after it, every participant checks the committed
deltas, merges the ones that pass, and publishes a signed attestation of the result's
content id. These pure functions decide, from the records alone, which proposal wins,
which deltas are outliers, and whether a round is final, so that every node reaches
the same answer from the same records.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from hivemerge.protocol.content import content_id

DEFAULT_QUORUM = 2 / 3
OUTLIER_FACTOR = 5.0  # a delta norm beyond 5x (or below 1/5) of the median is excluded
ROUND_KEYS = {"base_id", "recipe", "select", "deadline", "quorum", "proposer"}
# A round recipe's keys that the weight merge's own recipe takes; with
# "domain_parameters" (each expert's parameters) they decide the merged bytes.
MERGE_KEYS = ("merge_method", "parameters", "dtype", "out_dtype", "seed")


def rounds_key(base_id: str) -> str:
    return f"hivemerge/rounds/{base_id}"  # proposals; subkey: <proposer>/<round id>


def round_key(round_id: str) -> str:
    return f"hivemerge/round/{round_id}"  # commitments and attestations; subkey: <node>/commit|attest


def round_id(proposal: dict) -> str:
    """A round is named by the hash of what it asks (not by when or how often it was announced)."""
    return content_id({k: proposal[k] for k in ROUND_KEYS})


def _precedence(proposal: dict) -> tuple[float, str]:
    return proposal["deadline"], proposal["round_id"]


def winning_proposal(proposals: list[dict]) -> dict | None:
    """Competing proposals for one base: the earliest deadline wins, ties by the lowest
    round id. Every node applies this to the proposals it sees."""
    if not proposals:
        return None
    return min(proposals, key=_precedence)


def live_proposals(proposals: list[dict]) -> list[dict]:
    """The proposals that did not lose to a competitor. Two proposals compete when their
    windows (``issued_at`` to ``deadline``) overlap; the one :func:`winning_proposal`
    prefers stays live and the other has lost, for good: nodes must not join it once the
    winner has closed. One announced after every live round closed is a new round."""
    live: list[dict] = []
    for proposal in sorted(proposals, key=_precedence):
        if not any(proposal["issued_at"] < earlier["deadline"] for earlier in live):
            live.append(proposal)
    return live


def matches(select: dict, expert: dict) -> bool:
    if "deltas" in select:
        return expert["delta_id"] in select["deltas"]
    return expert["domain"] in select.get("domains", [])


def committed_domains(commitments: dict[str, dict]) -> dict[str, str]:
    """delta id -> the domain it was committed under. Read in committer order (the last
    claim wins): a delta two nodes commit under different domains gets the same one at
    every node."""
    return {d: c["domains"].get(d, "") for _, c in sorted(commitments.items()) for d in c["delta_ids"]}


def unselected(select: dict, domains: dict[str, str], exempt: frozenset[str] = frozenset()) -> dict[str, str]:
    """delta id -> why the proposal's ``select`` leaves it out, for every committed delta
    it does not name. A commitment is the committer's own word: a delta of another domain
    (or not in the listed ids) does not join the merge because it was committed. Deltas
    committed under an ``exempt`` domain are judged by their own rule (the fused delta)."""
    reasons = {}
    for delta_id, domain in sorted(domains.items()):
        if domain in exempt or matches(select, {"delta_id": delta_id, "domain": domain}):
            continue
        if "deltas" in select:
            reasons[delta_id] = "not selected: the proposal lists other delta ids"
        else:
            reasons[delta_id] = f"not selected: domain {domain[:64]!r} is not among the proposal's {sorted(select.get('domains', []))}"[:300]
    return reasons


def on_time(commitments: dict[str, dict], deadline: float) -> dict[str, dict]:
    """The commitments signed by the deadline. One signed after it is ignored by every
    node, instead of joining the round only at the nodes that happened to read it."""
    return {node: c for node, c in commitments.items() if c["issued_at"] <= deadline}


def quorum_size(committed: int, quorum: float) -> int:
    return max(1, math.ceil(quorum * committed - 1e-9))


def final_result(commitments: dict[str, Any], attestations: dict[str, dict], quorum: float) -> tuple[str | None, list[str]]:
    """(result id, attesters) if at least ``quorum`` of the committed participants attest
    the same result, else (None, []). Only committed participants count."""
    votes: dict[str, list[str]] = {}
    for node, attestation in attestations.items():
        if node in commitments:
            votes.setdefault(attestation["result_id"], []).append(node)
    needed = quorum_size(len(commitments), quorum)
    for result, nodes in sorted(votes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(nodes) >= needed:
            return result, sorted(nodes)
    return None, []


def norm_outliers(norms: dict[str, float], factor: float = OUTLIER_FACTOR) -> dict[str, str]:
    """Deltas whose norm is far from the median norm of all committed deltas, with the reason."""
    if len(norms) < 3:
        return {}  # no majority to compare with
    median = statistics.median(norms.values())
    excluded = {}
    for delta_id, norm in norms.items():
        if median > 0 and (norm > factor * median or norm < median / factor):
            excluded[delta_id] = f"norm outlier: {norm:.4g} vs median {median:.4g} (allowed x{factor:g})"
    return excluded
