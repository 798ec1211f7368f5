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

from hivemerge.protocol import bounds, fusion
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.keys import round_key, rounds_key  # noqa: F401  (a round's keys, named with its rules)

DEFAULT_QUORUM = 2 / 3
OUTLIER_FACTOR = 5.0  # a delta norm beyond 5x (or below 1/5) of the median is excluded
ROUND_KEYS = {"base_id", "recipe", "select", "deadline", "quorum", "proposer"}
# A round recipe's keys that the weight merge's own recipe takes; with
# "domain_parameters" (each expert's parameters) they decide the merged bytes.
MERGE_KEYS = ("merge_method", "parameters", "dtype", "out_dtype", "seed")
FETCH_WINDOW = 60.0  # default: how long a round's committed deltas, all together, may take to arrive
RECORD_MARGIN = 3600.0  # a round's records outlive its deadline (and its work) by this much


def records_ttl(deadline: float, now: float, floor: float, span: float = 0.0) -> float:
    """Seconds a round's (or a search's) records must live, stored at ``now``: until
    ``span`` seconds of work past the deadline plus RECORD_MARGIN, so late readers can still
    check it; never less than the node's own record TTL, ``floor``."""
    return max(floor, deadline - now + span + RECORD_MARGIN)


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


# -- a round's recipes: the proposal from a round recipe file, the merge every participant runs --

def build_recipe(proposal: dict, included: list[str], domains: dict[str, str]) -> dict:
    """The merge recipe of a round: the proposal's template with the included deltas, in
    delta-id order (every participant builds the same document). A kept fused delta of a
    fusion step with ``pivot: merge`` already holds the weight merge it was distilled
    into: the result is then the base plus that delta alone."""
    template = proposal["recipe"]
    fused = sorted(d for d in included if domains.get(d) == fusion.FUSED_DOMAIN)
    if fusion.merges_pivot(template.get("fusion")) and fused:
        document = {k: v for k, v in template.items() if k in ("dtype", "out_dtype")}
        document.update(merge_method="task_arithmetic", base_model=f"hm://{proposal['base_id']}",
                        models=[{"model": f"hm://{fused[0]}", "parameters": {"weight": 1.0}}],
                        name=f"hivemerge round {proposal['round_id'][:12]}")
        return document
    return weight_merge_recipe(proposal, included, domains)


def pivot_recipe(proposal: dict) -> dict:
    """The weight merge a ``pivot: merge`` fusion step distils into: the pinned deltas, as
    the round would merge them without the fusion step."""
    pinned = proposal["recipe"]["fusion"]["pivot_deltas"]
    return weight_merge_recipe(proposal, sorted(pinned), pinned)


def weight_merge_recipe(proposal: dict, included: list[str], domains: dict[str, str]) -> dict:
    template = proposal["recipe"]
    per_domain = template.get("domain_parameters", {})
    models = []
    for delta_id in included:
        params = per_domain.get(domains.get(delta_id, ""), {})
        models.append({"model": f"hm://{delta_id}", "parameters": dict(params)} if params else {"model": f"hm://{delta_id}"})
    document = {k: v for k, v in template.items() if k in MERGE_KEYS}
    document.update(base_model=f"hm://{proposal['base_id']}", models=models, name=f"hivemerge round {proposal['round_id'][:12]}")
    return document


def proposal_from_recipe(document: dict, base_id: str, proposer: str, now: float) -> dict:
    """A proposal's fields from a round recipe file (docs/network.md: Merge rounds)."""
    select = document.get("select")
    if not isinstance(select, dict) or not (
        isinstance(select.get("domains"), list) or isinstance(select.get("deltas"), list)
    ):
        raise UserInputError("select: required; {domains: [NAME, ...]} or {deltas: [ID, ...]}")
    deadline = document.get("deadline", 60)
    if not bounds.finite_number(deadline) or not 1 <= deadline <= bounds.MAX_DEADLINE_SECONDS:
        raise UserInputError(f"deadline: seconds from now until commitments close, 1..{bounds.MAX_DEADLINE_SECONDS:g}, "
                             f"got {deadline!r}")
    window = document.get("fetch_window", FETCH_WINDOW)
    if not bounds.finite_number(window) or not 1 <= window <= bounds.MAX_FETCH_WINDOW:
        raise UserInputError(f"fetch_window: seconds the round's deltas have to arrive, 1..{bounds.MAX_FETCH_WINDOW:g}, "
                             f"got {window!r}")
    quorum = document.get("quorum", DEFAULT_QUORUM)
    if not bounds.finite_number(quorum) or not 0 < quorum <= 1:
        raise UserInputError(f"quorum: a fraction in (0, 1], got {quorum!r}")
    allowed = {*MERGE_KEYS, "domain_parameters", "fetch_window", "fusion"}
    template = {k: v for k, v in document.items() if k in allowed}
    if "fusion" in template:  # resolved by FusionRounds.prepare: pack ids, probe id, fuser
        template["fusion"] = fusion.check_fusion_block(template["fusion"], resolved=True)
    unknown = set(document) - allowed - {"select", "deadline", "quorum", "base_model"}
    if unknown:
        raise UserInputError(f"{sorted(unknown)[0]}: unknown key in a round recipe; expected {sorted(allowed | {'select', 'deadline', 'quorum', 'base_model'})}")
    proposal = {
        "base_id": base_id, "recipe": template, "select": select, "deadline": round(now + deadline, 3),
        "quorum": float(quorum), "proposer": proposer,
    }
    proposal["round_id"] = round_id(proposal)
    return proposal
