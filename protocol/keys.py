"""DHT keys: every key and subkey hivemerge stores records under, and which kind each holds.

A key is a fixed name (experts, packs) or a family prefix plus a content id (providers of
a content, proposals for a base, a round's records). Under a key, each record's subkey
names its owner (the signer's public key, hex), optionally followed by ``/`` and a
qualifier that the record's kind and fields decide, so one owner holds one record per
slot. Builders, the parser and the subkey rule below share these declarations.
"""

from __future__ import annotations

from hivemerge.protocol.content import is_content_id

EXPERTS_KEY = "hivemerge/experts"  # subkey: <publisher>/<delta id>
PACKS_KEY = "hivemerge/packs"  # subkey: <publisher>/<pack id>
PROVIDERS = "hivemerge/providers/"  # + content id; subkey: <provider>
PROPOSALS = "hivemerge/rounds/"  # + base id; subkey: <proposer>/<round id>
SEARCHES = "hivemerge/searches/"  # + base id; subkey: <proposer>/<search id>
ROUND = "hivemerge/round/"  # + round or search id: commitments, participants, attestations, fusion reports, generations
CHARTERS = "hivemerge/charters/"  # + a network's genesis charter id; subkey: <publisher>/<charter id>


def providers_key(content: str) -> str:
    return PROVIDERS + content


def rounds_key(base_id: str) -> str:
    return PROPOSALS + base_id


def searches_key(base_id: str) -> str:
    return SEARCHES + base_id


def round_key(round_id: str) -> str:
    return ROUND + round_id


def charters_key(genesis_id: str) -> str:
    return CHARTERS + genesis_id


# family prefix -> (the kind of record it holds, the field that must equal the key's id)
FAMILIES = {
    PROVIDERS: ("record/provider", "content"),
    PROPOSALS: ("record/proposal", "base_id"),
    SEARCHES: ("record/search", "base_id"),
    CHARTERS: ("record/charter", "genesis_id"),
}
# under a round's key, the kind of a record by its subkey's qualifier (the rest are commitments)
ROUND_SLOTS = (("/scores/", "record/scores"), ("/candidates/", "record/candidates"), ("/tally/", "record/tally"))
ROUND_ENDINGS = (("/fusion", "record/fusion"), ("/attest", "record/attestation"), ("/participants", "record/participants"))


def kind_for_key(key: str, subkey: str = "") -> str | None:
    """The record kind a key (and, under a round's key, a subkey) holds; None if none."""
    if key == EXPERTS_KEY:
        return "record/expert"
    if key == PACKS_KEY:
        return "record/pack"
    prefix, _, tail = key.rpartition("/")
    if not is_content_id(tail):
        return None
    if prefix + "/" in FAMILIES:
        return FAMILIES[prefix + "/"][0]
    if prefix + "/" == ROUND:
        slot = next((kind for mark, kind in ROUND_SLOTS if mark in subkey), None)
        return slot or next((kind for end, kind in ROUND_ENDINGS if subkey.endswith(end)), "record/commitment")
    return None


def key_field(kind: str) -> str | None:
    """The field whose value a record's key ends with (None for the fixed keys)."""
    if kind in ("record/expert", "record/pack"):
        return None
    return next((field for k, field in FAMILIES.values() if k == kind), "round_id")


def expected_subkey(kind: str, owner: str, fields: dict) -> str:
    """The subkey a record of ``kind`` with these fields must be stored under by ``owner``."""
    return {
        "record/expert": f"{owner}/{fields.get('delta_id')}",
        "record/provider": owner,
        "record/proposal": f"{owner}/{fields.get('round_id')}",
        "record/commitment": f"{owner}/commit",
        "record/attestation": f"{owner}/attest",
        "record/search": f"{owner}/{fields.get('round_id')}",
        "record/candidates": f"{owner}/candidates/{fields.get('generation')}",
        "record/scores": f"{owner}/scores/{fields.get('generation')}",
        "record/tally": f"{owner}/tally/{fields.get('generation')}",
        "record/pack": f"{owner}/{fields.get('pack_id')}",
        "record/fusion": f"{owner}/fusion",
        "record/participants": f"{owner}/participants",
        "record/charter": f"{owner}/{fields.get('charter_id')}",
    }[kind]
