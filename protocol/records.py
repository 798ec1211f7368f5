"""DHT records: schemas, signing and the validation every node applies.

A record lives under a DHT key with a subkey that names its owner: the owner's
Ed25519 public key (hex), optionally followed by ``/`` and a qualifier. Its value is
a signed manifest (:mod:`hivemerge.protocol.signing`) whose signer must be that
owner. A record that fails any check is ignored by every node, whoever relayed it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hivemerge.protocol.content import canonical_json, is_content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.packs import MAX_TOP_K
from hivemerge.protocol.signing import verify_signed

MAX_RECORD_BYTES = 8 * 1024
EXPERTS_KEY = "hivemerge/experts"  # subkey: <publisher>/<delta id>
PACKS_KEY = "hivemerge/packs"  # subkey: <publisher>/<pack id>


def providers_key(content: str) -> str:
    return f"hivemerge/providers/{content}"  # subkey: <provider>


# kind -> required fields and their types; the schema of every record type in one place.
RECORD_SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "record/expert": {
        "domain": str, "base_id": str, "architecture": str, "expert_id": str, "delta_id": str,
        "bundle_id": str, "codecs": dict, "size": int, "peer_id": str, "maddrs": list, "issued_at": (int, float),
    },
    "record/provider": {"content": str, "bundle_id": str, "peer_id": str, "maddrs": list, "issued_at": (int, float)},
    "record/proposal": {
        "round_id": str, "base_id": str, "recipe": dict, "select": dict, "deadline": (int, float), "quorum": (int, float),
        "proposer": str, "issued_at": (int, float),
    },
    "record/commitment": {
        "round_id": str, "delta_ids": list, "domains": dict, "peer_id": str, "maddrs": list, "issued_at": (int, float),
    },
    "record/attestation": {
        "round_id": str, "result_id": str, "bundle_id": str, "included": list, "excluded": dict,
        "peer_id": str, "maddrs": list, "issued_at": (int, float),
    },
    # search rounds (protocol/search.py): the proposal, each generation's candidates, each owner's scores,
    # and the proposer's tally (whose scores it combined), which every node then combines alike
    "record/search": {
        "round_id": str, "base_id": str, "recipe": dict, "select": dict, "search": dict, "deadline": (int, float),
        "quorum": (int, float), "proposer": str, "issued_at": (int, float),
    },
    "record/candidates": {"round_id": str, "generation": int, "candidate_ids": list, "issued_at": (int, float)},
    "record/scores": {
        "round_id": str, "generation": int, "candidate_ids": list, "scores": list, "examples": int, "issued_at": (int, float),
    },
    "record/tally": {"round_id": str, "generation": int, "candidate_ids": list, "scorers": list, "issued_at": (int, float)},
    # heterogeneous experts (protocol/packs.py) and a round's fusion step (protocol/fusion.py)
    "record/pack": {
        "domain": str, "pack_id": str, "probe_id": str, "model_id": str, "top_k": int, "bundle_id": str,
        "probe_bundle_id": str, "size": int, "peer_id": str, "maddrs": list, "issued_at": (int, float),
    },
    "record/fusion": {
        "round_id": str, "delta_id": str, "packs": list, "probe_id": str, "replay_id": (str, type(None)), "before": dict,
        "after": dict, "peer_id": str, "maddrs": list, "issued_at": (int, float),
    },
}
_ID_FIELDS = ("base_id", "architecture", "expert_id", "delta_id", "bundle_id", "content", "round_id", "result_id",
              "pack_id", "probe_id", "model_id", "probe_bundle_id")


class RecordError(UserInputError):
    pass


def kind_for_key(key: str, subkey: str = "") -> str | None:
    tail = key.rsplit("/", 1)[-1]
    if key == EXPERTS_KEY:
        return "record/expert"
    if key == PACKS_KEY:
        return "record/pack"
    if key.startswith("hivemerge/providers/") and is_content_id(tail):
        return "record/provider"
    if key.startswith("hivemerge/rounds/") and is_content_id(tail):
        return "record/proposal"
    if key.startswith("hivemerge/searches/") and is_content_id(tail):
        return "record/search"
    if key.startswith("hivemerge/round/") and is_content_id(tail):
        if "/scores/" in subkey:
            return "record/scores"
        if "/candidates/" in subkey:
            return "record/candidates"
        if "/tally/" in subkey:
            return "record/tally"
        if subkey.endswith("/fusion"):
            return "record/fusion"
        return "record/attestation" if subkey.endswith("/attest") else "record/commitment"
    return None


# The subkey each kind must be stored under, from its owner and fields.
def expected_subkey(kind: str, owner: str, fields: dict) -> str:
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
    }[kind]


def owner_subkey(identity: Identity, kind: str, fields: dict) -> str:
    return expected_subkey(kind, identity.public_hex, fields)


def make_record(identity: Identity, kind: str, fields: dict) -> bytes:
    from hivemerge.protocol.signing import sign_manifest

    _check_fields(kind, fields)
    value = canonical_json(sign_manifest(identity, kind, fields))
    if len(value) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(value)} bytes exceeds {MAX_RECORD_BYTES}")
    return value


def _check_fields(kind: str, fields: Any) -> None:
    schema = RECORD_SCHEMAS[kind]
    if not isinstance(fields, dict) or set(fields) != set(schema):
        raise RecordError(f"{kind}: fields {sorted(fields) if isinstance(fields, dict) else fields!r} != {sorted(schema)}")
    for name, typ in schema.items():
        if not isinstance(fields[name], typ) or isinstance(fields[name], bool):
            raise RecordError(f"{kind}: field {name} has the wrong type")
        if name in _ID_FIELDS and not is_content_id(fields[name]):
            raise RecordError(f"{kind}: field {name} is not a content id")
    if "maddrs" in fields and not all(isinstance(m, str) for m in fields["maddrs"]):
        raise RecordError(f"{kind}: maddrs must be strings")
    for name in ("delta_ids", "included", "candidate_ids", "packs"):
        if name in fields and not all(isinstance(d, str) and is_content_id(d) for d in fields[name]):
            raise RecordError(f"{kind}: {name} must be content ids")
    if "generation" in fields and fields["generation"] < 0:
        raise RecordError(f"{kind}: generation must be non-negative")
    if "scorers" in fields:
        scorers = fields["scorers"]
        if not all(isinstance(o, str) and re.fullmatch(r"[0-9a-f]{64}", o) for o in scorers) or scorers != sorted(set(scorers)):
            raise RecordError(f"{kind}: scorers must be sorted, distinct public keys (64 hex digits)")
    if "scores" in fields:
        scores = fields["scores"]
        if len(scores) != len(fields["candidate_ids"]) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores
        ):
            raise RecordError(f"{kind}: scores must be one finite number per candidate")
    if kind == "record/fusion":
        from hivemerge.protocol.fusion import check_figures

        replay = fields["replay_id"] is not None
        if replay and not is_content_id(fields["replay_id"]):
            raise RecordError(f"{kind}: field replay_id is not a content id")
        if not (check_figures(fields["before"], replay) and check_figures(fields["after"], replay)) or not fields["packs"]:
            raise RecordError(f"{kind}: before and after must be finite figures {{lm, fused}} (and replay exactly when "
                              "a replay set is named); packs not empty")
    if kind == "record/pack" and not 1 <= fields["top_k"] <= MAX_TOP_K:
        raise RecordError(f"{kind}: top_k must be in [1, {MAX_TOP_K}]")


def open_record(key: str, subkey: str, value: bytes) -> dict:
    """Check a record found under ``key``/``subkey``; returns its fields (plus
    ``publisher``), or raises RecordError."""
    kind = kind_for_key(key, subkey if isinstance(subkey, str) else "")
    if kind is None:
        raise RecordError(f"unknown record key {key!r}")
    fields = _open(subkey, value, kind)
    tail = key.rsplit("/", 1)[-1]
    home_field = {"record/provider": "content", "record/proposal": "base_id", "record/search": "base_id"}.get(kind, "round_id")
    if kind not in ("record/expert", "record/pack") and fields[home_field] != tail:
        raise RecordError(f"{kind} is stored under another key than its {home_field}")
    return fields


# The DHT's expiration time is not signed, so a record may be stored to live at most this
# long past the moment its owner signed it (or past its round's deadline): a relayed copy
# of an old genuine record cannot be kept alive, or outlive a newer one, at will.
MAX_LIFETIME = 2 * 24 * 3600.0


def latest_expiry(fields: dict) -> float:
    """The latest DHT expiration time a record with these (signed) fields may carry."""
    deadline = fields.get("deadline", 0)
    start = max(fields["issued_at"], deadline if isinstance(deadline, (int, float)) else 0)
    return start + MAX_LIFETIME


def is_valid_signed_value(subkey: str, value: Any, expiration_time: float | None = None) -> bool:
    """The key-independent part of :func:`open_record` (a DHT validator sees only a
    hash of the key): a well-formed record of a known kind, signed by the subkey's owner,
    stored to expire no later than :func:`latest_expiry` allows."""
    try:
        fields = _open(subkey, value, None)
    except UserInputError:
        return False
    return expiration_time is None or expiration_time <= latest_expiry(fields)


def _open(subkey: Any, value: Any, kind: str | None) -> dict:
    if not isinstance(value, (bytes, bytearray)) or len(value) > MAX_RECORD_BYTES:
        raise RecordError("record value is not bytes of an acceptable size")
    try:
        signed = json.loads(value)
    except ValueError:
        raise RecordError("record value is not JSON") from None
    if not isinstance(signed, dict) or canonical_json(signed) != bytes(value):
        raise RecordError("record value is not canonical")
    # Exactly the signed envelope: unsigned extra fields would let anyone alter a record's bytes.
    if set(signed) != {"kind", "manifest", "signer", "signature"}:
        raise RecordError("record value has fields other than kind, manifest, signer and signature")
    kind = kind or signed.get("kind")
    if kind not in RECORD_SCHEMAS:
        raise RecordError(f"unknown record kind {kind!r}")
    owner = subkey.split("/", 1)[0] if isinstance(subkey, str) else None
    fields = verify_signed(signed, kind)
    if signed["signer"] != owner:
        raise RecordError("record is signed by a key other than the owner its subkey names")
    _check_fields(kind, fields)
    want = expected_subkey(kind, owner, fields)
    if subkey != want:
        raise RecordError(f"{kind} must be stored under subkey {want}")
    return {**fields, "publisher": owner}
