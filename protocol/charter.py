"""Network charters: signed, content-addressed, versioned definitions of a network.

A charter names the network, its base model(s), its maintainers and their threshold k,
its roster (public key -> roles) and its round policy (schema: ``Charter`` in
:mod:`hivemerge.protocol.record_schemas`). Its id is the content id of the document.
A signed charter is ``{"charter": document, "signatures": {maintainer: signature}}``,
each signature over the charter id (domain-separated, so it is never valid as anything
else). The genesis (version 0) counts when k of its own maintainers signed it; version
n+1 names version n's id and counts when k of version n's maintainers signed it, so the
maintainers of a version decide the next one, even one that removes them. A node starts
from a genesis its user gives and :func:`follow`\\ s the highest valid version it learns.
The rules of rounds under a charter are in :mod:`hivemerge.protocol.charter_rules`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from hivemerge.protocol import bounds
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity, verify_signature
from hivemerge.protocol.keys import charters_key  # noqa: F401  (a network's key, named with its rules)
from hivemerge.protocol.record_schemas import ROLES, SignedCharter, describe
from hivemerge.protocol.rounds import DEFAULT_QUORUM
from hivemerge.protocol.signing import signing_message

SIGNATURE_KIND = "charter"  # the domain tag of a maintainer's signature (signing.signing_message)
# Policy defaults: the protocol's own bounds, which a charter may only narrow.
DEFAULT_POLICY = {
    "quorum": DEFAULT_QUORUM, "min_attesters": 1, "min_deadline": 1.0, "max_deadline": bounds.MAX_DEADLINE_SECONDS,
    "max_fetch_window": bounds.MAX_FETCH_WINDOW, "max_deltas": bounds.MAX_ROUND_DELTAS,
    "max_generations": bounds.MAX_GENERATIONS, "max_popsize": bounds.MAX_POPSIZE,
    "max_fusion_steps": bounds.MAX_FUSION_STEPS,
}
POLICY_FIELDS = (*DEFAULT_POLICY, "methods")
SETTINGS = ("name", "base_ids", "maintainers", "threshold", "open_contribution", *POLICY_FIELDS)  # what a change may set


class CharterError(UserInputError):
    """A charter (or a change to one) is malformed; the message says where."""


def charter_id(document: dict) -> str:
    return content_id(document)


def document_of(charter: dict) -> dict:
    """The charter document of a signed charter, or the document itself."""
    return charter["charter"] if "signatures" in charter else charter


def check_charter(signed: Any) -> dict:
    """A signed charter against the schema (signatures only in form: :func:`signers`
    verifies them); returns it, or raises CharterError naming the field."""
    if not isinstance(signed, dict):
        raise CharterError("charter: expected {charter: ..., signatures: {...}}")
    try:
        SignedCharter.model_validate(signed)
    except ValidationError as exc:
        raise CharterError(describe(exc.errors())[:300]) from None
    return signed


def _message(cid: str) -> bytes:
    return signing_message(SIGNATURE_KIND, {"charter_id": cid})


def sign_charter(signed: dict, identity: Identity) -> dict:
    """The signed charter with ``identity``'s signature added (whether it counts is decided
    by whoever checks: the version's own maintainers for a genesis, else the previous one's)."""
    check_charter(signed)
    signature = identity.sign(_message(charter_id(signed["charter"]))).hex()
    signatures = {**signed["signatures"], identity.public_hex: signature}
    if len(signatures) > bounds.MAX_MAINTAINERS:
        raise CharterError(f"charter: at most {bounds.MAX_MAINTAINERS} signatures")
    return check_charter({"charter": signed["charter"], "signatures": dict(sorted(signatures.items()))})


def signers(signed: dict, keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` whose signature on this charter verifies (sorted)."""
    cid = charter_id(signed["charter"])
    return sorted(key for key in set(keys) if key in signed["signatures"] and _verifies(key, cid, signed["signatures"][key]))


@functools.lru_cache(maxsize=1 << 14)
def _verifies(key: str, cid: str, signature: str) -> bool:
    # Remembered: a node follows the same DHT records again and again, and a stranger can
    # fill its network's key with versions carrying a bad signature for every maintainer
    # (~15,000 signatures in MAX_KEY_BYTES, seconds of CPU to verify each time).
    return verify_signature(bytes.fromhex(key), _message(cid), bytes.fromhex(signature))


def _valid(signed: Any) -> bool:
    try:
        check_charter(signed)
        return True
    except UserInputError:
        return False


def genesis_ok(signed: Any) -> bool:
    """A version 0 that at least k of its own maintainers signed."""
    if not _valid(signed) or signed["charter"]["version"] != 0:
        return False
    document = signed["charter"]
    return len(signers(signed, document["maintainers"])) >= document["threshold"]


def successor_ok(current: dict, candidate: Any) -> bool:
    """``candidate`` is the next version of ``current``: it names current's id, its version
    is one more, and at least current's k of current's maintainers signed it (anyone
    else's signature is ignored)."""
    if not _valid(candidate):
        return False
    old, new = current["charter"], candidate["charter"]
    if new["previous"] != charter_id(old) or new["version"] != old["version"] + 1:
        return False
    return len(signers(candidate, old["maintainers"])) >= old["threshold"]


def follow(current: dict, candidates: Iterable[Any]) -> dict:
    """The highest valid version reachable from ``current`` through ``candidates`` (any
    order; forks, garbage and replays of older versions among them), or ``current``.

    Copies of one version are combined: the signatures of current's maintainers from all
    of them count together, so maintainers may publish their signatures separately. The
    result carries exactly the signatures that counted. A fork (two valid versions with
    the same previous) needs k maintainers to sign both; then the higher chain wins, and
    between versions of equal height the lowest charter id, so every node that sees the
    same candidates follows the same one. Never returns an older version: a candidate
    counts only as a successor of a version reached from ``current``."""
    copies: dict[str, dict[str, list[dict]]] = {}  # previous id -> charter id -> copies
    for candidate in candidates:
        if _valid(candidate) and candidate["charter"]["previous"] is not None:
            cid = charter_id(candidate["charter"])
            copies.setdefault(candidate["charter"]["previous"], {}).setdefault(cid, []).append(candidate)
    check_charter(current)  # the node's own: trusted, but a malformed one is a bug to report
    best, frontier, seen = current, [current], {charter_id(current["charter"])}
    while frontier:  # one version per step: each candidate is examined once, as the child of its previous
        reached = []
        for parent in frontier:
            for cid, versions in sorted(copies.get(charter_id(parent["charter"]), {}).items()):
                merged = None if cid in seen else _combined(parent, versions)
                if merged is not None:
                    seen.add(cid)
                    reached.append(merged)
        if reached:
            best = min(reached, key=lambda signed: charter_id(signed["charter"]))  # equal height: lowest id
        frontier = reached
    return best


def _combined(parent: dict, versions: list[dict]) -> dict | None:
    """One version from its (schema-checked) copies, with the signatures of ``parent``'s
    maintainers that verify on any copy; None unless it is a valid successor of ``parent``
    (:func:`successor_ok`'s rules, each signature verified once)."""
    old = parent["charter"]
    if versions[0]["charter"]["version"] != old["version"] + 1:
        return None  # its previous is parent's id: only the version remains to check
    merged = _merged(versions, old["maintainers"])
    return merged if len(merged["signatures"]) >= old["threshold"] else None


def _merged(copies: list[dict], keys: Iterable[str]) -> dict:
    """Copies of one charter as one, with the signatures of ``keys`` that verify on any copy."""
    signatures: dict[str, str] = {}
    for copy_ in copies:
        for key in signers(copy_, set(keys) - set(signatures)):
            signatures[key] = copy_["signatures"][key]
    return {"charter": copies[0]["charter"], "signatures": dict(sorted(signatures.items()))}


def find_genesis(genesis_id: str, candidates: Iterable[Any]) -> dict | None:
    """The genesis named ``genesis_id`` among ``candidates`` (copies combined, as in
    :func:`follow`), if k of its own maintainers signed it; else None."""
    copies = [c for c in candidates if _valid(c) and charter_id(c["charter"]) == genesis_id]
    found = _merged(copies, copies[0]["charter"]["maintainers"]) if copies else None
    return found if found is not None and genesis_ok(found) else None


def record_fields(signed: dict, genesis_id: str, now: float) -> dict:
    """The fields of a ``record/charter`` publishing this version (the node adds ``expires_at``)."""
    return {"genesis_id": genesis_id, "charter_id": charter_id(check_charter(signed)["charter"]), "charter": signed,
            "issued_at": now}


def roles_of(charter: dict, key: str) -> set[str]:
    """The roles the roster gives ``key`` (an empty set if it is not on it)."""
    return set(document_of(charter)["roster"].get(key, ()))


def _roles(roles: Any) -> list[str]:
    roles = [roles] if isinstance(roles, str) else list(roles)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise CharterError(f"role {unknown[0]!r}: expected one of {list(ROLES)}")
    return sorted(set(roles))


def _only(settings: Mapping, allowed: Iterable[str]) -> None:
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise CharterError(f"{unknown[0]}: not a charter setting; expected one of {sorted(allowed)}")


def _document(fields: dict) -> dict:
    """A charter document from its fields: lists sorted, roles named, the policy nested."""
    fields["policy"] = {**fields["policy"], **{key: fields.pop(key) for key in POLICY_FIELDS if key in fields}}
    for key in ("base_ids", "maintainers"):
        fields[key] = sorted(set(fields[key]))
    fields["policy"]["methods"] = sorted(set(fields["policy"]["methods"]))
    fields["roster"] = {key: _roles(roles) for key, roles in sorted(fields["roster"].items())}
    return fields


def new_charter(*, name: str, base_ids: Iterable[str], maintainers: Iterable[str], methods: Iterable[str],
                threshold: int | None = None, roster: Mapping[str, Iterable[str] | str] | None = None,
                open_contribution: bool = False, **policy: Any) -> dict:
    """An unsigned genesis (version 0). ``threshold`` defaults to a majority of the
    maintainers; ``policy``: any of DEFAULT_POLICY's keys."""
    _only(policy, DEFAULT_POLICY)
    maintainers = sorted(set(maintainers))
    fields = {"name": name, "base_ids": list(base_ids), "maintainers": maintainers,
              "threshold": len(maintainers) // 2 + 1 if threshold is None else threshold,
              "roster": dict(roster or {}), "open_contribution": open_contribution,
              "policy": {**DEFAULT_POLICY, "methods": list(methods)}, "version": 0, "previous": None, **policy}
    return check_charter({"charter": _document(fields), "signatures": {}})


def propose_change(current: dict, add: Mapping[str, Iterable[str] | str] | None = None,
                   remove: Iterable[str] | Mapping[str, Iterable[str] | str] | None = None, **changes: Any) -> dict:
    """The unsigned next version of ``current``: ``add`` gives keys roles (added to those
    they hold), ``remove`` takes keys off the roster (a list) or takes roles from them (a
    mapping; a key left with none leaves the roster); ``changes`` replace other fields
    (name, base_ids, maintainers, threshold, open_contribution, or a policy field)."""
    _only(changes, SETTINGS)
    fields = copy.deepcopy(document_of(current))
    roster = fields["roster"]
    for key, roles in (add or {}).items():
        roster[key] = sorted(set(roster.get(key, [])) | set(_roles(roles)))
    taken = remove.items() if isinstance(remove, Mapping) else ((key, ROLES) for key in remove or ())
    for key, roles in taken:
        if key not in roster:
            raise CharterError(f"{key[:16]}: not on the roster")
        roster[key] = sorted(set(roster[key]) - set(_roles(roles)))
        if not roster[key]:
            del roster[key]
    fields.update(changes, version=fields["version"] + 1, previous=charter_id(document_of(current)))
    return check_charter({"charter": _document(fields), "signatures": {}})
