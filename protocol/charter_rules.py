"""Round rules under a charter: who may do what, which proposals the policy allows, which
commitments a round merges, and when its result is final.

Pure functions of a charter (a document or a signed charter) and the records a node sees,
so every node answers alike. The proposal never sets its own quorum or bounds: they come
from the charter. The participant set is the proposer's signed list of the on-time
commitments it accepted (``record/participants``, published after the deadline): every
attester merges exactly that list, so nodes whose clocks differ merge the same deltas, and
a commitment the list does not name (signed after the deadline, or backdated after the
proposer read the round) never enters.
"""

from __future__ import annotations

from typing import Any

from hivemerge.protocol import bounds, rounds
from hivemerge.protocol.charter import document_of, roles_of
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import fingerprint
from hivemerge.protocol.records import ENVELOPE_BYTES

# The role a record's publisher needs for the record to count (other kinds: anyone's).
NEEDED_ROLE = {
    "record/proposal": "proposer", "record/search": "proposer", "record/participants": "proposer",
    "record/candidates": "proposer", "record/tally": "proposer",
    "record/commitment": "contributor", "record/scores": "contributor", "record/fusion": "contributor",
    "record/attestation": "attester",
}


NOT_SEEN = "listed by the proposer, but its commitment is not seen here"  # a participant waits for it a while


class PolicyError(UserInputError):
    """A proposal (or a participant list) breaks the charter's round policy."""


def may_propose(charter: dict, key: str) -> bool:
    return "proposer" in roles_of(charter, key)


def may_contribute(charter: dict, key: str) -> bool:
    return document_of(charter)["open_contribution"] or "contributor" in roles_of(charter, key)


def may_attest(charter: dict, key: str) -> bool:
    return "attester" in roles_of(charter, key)


def ignored_reason(charter: dict, kind: str, publisher: str) -> str | None:
    """Why the charter makes a record of ``kind`` by ``publisher`` not count (None: it counts)."""
    role = NEEDED_ROLE.get(kind)
    roles = roles_of(charter, publisher)
    if role is None or role in roles or (role == "contributor" and may_contribute(charter, publisher)):
        return None
    return f"wrong role (needs {role})" if roles else "not on the roster"


def check_proposal_against(charter: dict, proposal: dict) -> None:
    """Raises PolicyError with the reason unless the proposal (a record/proposal's or
    record/search's fields as opened, ``issued_at`` and ``publisher`` included) keeps to
    the charter's policy. Its ``quorum`` is not checked: under a charter no node reads it."""
    document = document_of(charter)
    policy = document["policy"]
    who = proposal["proposer"]
    if proposal.get("publisher", who) != who:  # anyone can sign a proposal that names a roster proposer
        raise PolicyError(f"the proposal names proposer {who[:16]} but is signed by {proposal['publisher'][:16]}")
    if not may_propose(document, who):
        raise PolicyError(f"proposer {fingerprint(bytes.fromhex(who))}: {ignored_reason(document, 'record/proposal', who)}")
    if proposal["base_id"] not in document["base_ids"]:
        raise PolicyError(f"base {proposal['base_id'][:12]} is not a base of network {document['name']!r}")
    recipe = proposal["recipe"]
    if recipe["merge_method"] not in policy["methods"]:
        raise PolicyError(f"merge_method {recipe['merge_method']!r} is not allowed by the charter ({policy['methods']})")
    window = proposal["deadline"] - proposal["issued_at"]
    if not policy["min_deadline"] <= window <= policy["max_deadline"]:
        raise PolicyError(f"deadline: {window:g} s after the proposal, outside the charter's "
                          f"[{policy['min_deadline']:g}, {policy['max_deadline']:g}]")
    fetch_window = recipe.get("fetch_window", rounds.FETCH_WINDOW)
    if not bounds.finite_number(fetch_window) or fetch_window > policy["max_fetch_window"]:
        raise PolicyError(f"fetch_window: {fetch_window!r}, over the charter's {policy['max_fetch_window']:g} s")
    selected = len(proposal["select"].get("deltas") or ())
    if selected > policy["max_deltas"]:
        raise PolicyError(f"select names {selected} deltas, more than the charter's {policy['max_deltas']}")
    settings = proposal.get("search") or {}
    for name, cap in (("generations", "max_generations"), ("popsize", "max_popsize")):
        if name in settings and settings[name] > policy[cap]:
            raise PolicyError(f"search.{name}: {settings[name]}, more than the charter's {policy[cap]}")
    block = recipe.get("fusion") or {}
    if block.get("steps", 0) > policy["max_fusion_steps"]:
        raise PolicyError(f"fusion.steps: {block['steps']}, more than the charter's {policy['max_fusion_steps']}")
    if "fuser" in block and not may_contribute(document, block["fuser"]):
        raise PolicyError(f"fusion.fuser {block['fuser'][:16]}: may not contribute (its fused delta could never count)")


def keeps_to(charter: dict, proposal: dict) -> bool:
    """Whether a proposal counts under the charter (:func:`check_proposal_against` passes)."""
    try:
        check_proposal_against(charter, proposal)
        return True
    except UserInputError:
        return False


# -- finality ---------------------------------------------------------------------------

def attesters(charter: dict) -> list[str]:
    return sorted(key for key, roles in document_of(charter)["roster"].items() if "attester" in roles)


def needed_attestations(charter: dict) -> int:
    """How many of the roster's attesters must attest one result for it to be final: the
    charter's quorum of them, at least its minimum, and always more than half of them, so
    two results can never both be final (whatever the float rounding of the quorum)."""
    policy, count = document_of(charter)["policy"], len(attesters(charter))
    return max(policy["min_attesters"], rounds.quorum_size(count, policy["quorum"]), count // 2 + 1)


def final_result_under(charter: dict, attestations: dict[str, dict]) -> tuple[str | None, list[str]]:
    """(result id, its attesters) when enough of the roster's attesters attest the same
    result (:func:`needed_attestations`), else (None, []). ``attestations``: publisher ->
    its attestation of this round. Anyone else's attestation counts for nothing, and no
    tie-break ever makes a result final: a split short of the quorum is final for none."""
    votes: dict[str, list[str]] = {}
    for publisher, attestation in attestations.items():
        if may_attest(charter, publisher):
            votes.setdefault(attestation["result_id"], []).append(publisher)
    needed = needed_attestations(charter)
    final = [(result, sorted(nodes)) for result, nodes in votes.items() if len(nodes) >= needed]
    return final[0] if final else (None, [])  # at most one: needed is over half the attesters


# -- the participant set ----------------------------------------------------------------

def _commitment_reason(charter: dict, proposal: dict, publisher: str, commitment: dict) -> str | None:
    """Why a commitment cannot be in a round's participant set, by its own signed fields."""
    if commitment["round_id"] != proposal["round_id"]:
        return "a commitment to another round"
    if commitment["issued_at"] > proposal["deadline"]:
        return "late: signed after the deadline"
    return ignored_reason(charter, "record/commitment", publisher)


def participants_record_fields(charter: dict, proposal: dict, commitments: dict[str, dict], now: float) -> dict:
    """The proposer's ``record/participants`` fields (the node adds ``expires_at``), from
    after the deadline: the on-time commitments of keys that may contribute, roster
    contributors first, then by signing time and key, while they fit the charter's
    ``max_deltas`` and one record."""
    if now < proposal["deadline"]:
        raise PolicyError("a round's participant list is published after its deadline")
    fields = {"round_id": proposal["round_id"], "participants": {}, "issued_at": now}
    budget = bounds.MAX_RECORD_BYTES - ENVELOPE_BYTES - len(canonical_json(fields))
    deltas = document_of(charter)["policy"]["max_deltas"]
    eligible = [(publisher, c) for publisher, c in commitments.items()
                if _commitment_reason(charter, proposal, publisher, c) is None]
    eligible.sort(key=lambda pc: ("contributor" not in roles_of(charter, pc[0]), pc[1]["issued_at"], pc[0]))
    for publisher, commitment in eligible:
        cost = len(canonical_json({publisher: commitment["domains"]}))  # with the comma, at most this
        if cost > budget or len(commitment["domains"]) > deltas:
            break  # full: later commitments wait for the next round
        fields["participants"][publisher] = dict(sorted(commitment["domains"].items()))
        budget -= cost
        deltas -= len(commitment["domains"])
    fields["participants"] = dict(sorted(fields["participants"].items()))
    return fields


def _list_reason(charter: dict, proposal: dict, participants: dict | None) -> str | None:
    """Why a participant list cannot be used at all (then the round merges nothing)."""
    if participants is None:
        return "no participant list from the proposer"
    if participants["publisher"] != proposal["proposer"] or participants["round_id"] != proposal["round_id"]:
        return "the participant list is not the round proposer's"
    if participants["issued_at"] < proposal["deadline"]:
        return "the participant list was signed before the deadline"
    listed = sum(len(domains) for domains in participants["participants"].values())
    if listed > document_of(charter)["policy"]["max_deltas"]:
        return f"the participant list names {listed} deltas, more than the charter's {document_of(charter)['policy']['max_deltas']}"
    return None


def commitment_verdicts(charter: dict, proposal: dict, commitments: dict[str, dict],
                        participants: dict | None) -> dict[str, str | None]:
    """Every committer seen or listed -> why its commitment is not in the round's merge
    (None: it is). ``participants``: the proposer's record/participants (opened, with its
    publisher), or None if none was found."""
    problem = _list_reason(charter, proposal, participants)
    listed: dict[str, Any] = {} if problem else participants["participants"]
    verdicts = {}
    for publisher in sorted(set(commitments) | set(listed)):
        commitment = commitments.get(publisher)
        if commitment is None:
            verdicts[publisher] = NOT_SEEN
            continue
        verdicts[publisher] = problem or _commitment_reason(charter, proposal, publisher, commitment)
        if verdicts[publisher] is None and publisher not in listed:
            verdicts[publisher] = "not in the proposer's participant list"
        elif verdicts[publisher] is None and commitment["domains"] != listed[publisher]:
            verdicts[publisher] = "its commitment differs from the one the proposer listed"
    return verdicts


def accepted_commitments(charter: dict, proposal: dict, commitments: dict[str, dict],
                         participants: dict | None) -> dict[str, dict]:
    """The commitments a round merges: those the proposer listed, as listed, that this
    node sees, signed by the deadline by keys that may contribute."""
    verdicts = commitment_verdicts(charter, proposal, commitments, participants)
    return {publisher: commitments[publisher] for publisher, reason in verdicts.items() if reason is None}
