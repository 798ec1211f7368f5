"""DHT records: schemas, signing and the validation every node applies.

A record lives under a DHT key with a subkey that names its owner: the owner's
Ed25519 public key (hex), optionally followed by ``/`` and a qualifier. Its value is
a signed manifest (:mod:`hivemerge.protocol.signing`) whose signer must be that
owner. A record that fails any check is ignored by every node, whoever relayed it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import ValidationError

from hivemerge.protocol import bounds
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.keys import EXPERTS_KEY, PACKS_KEY, expected_subkey, key_field, kind_for_key, providers_key  # noqa: F401  (readers of records name keys through here too)
from hivemerge.protocol.record_schemas import RECORD_SCHEMAS, describe
from hivemerge.protocol.signing import sign_manifest, verify_signed

MAX_RECORD_BYTES = bounds.MAX_RECORD_BYTES

class RecordError(UserInputError):
    pass


def owner_subkey(identity: Identity, kind: str, fields: dict) -> str:
    return expected_subkey(kind, identity.public_hex, fields)


def make_record(identity: Identity, kind: str, fields: dict) -> bytes:
    _check_fields(kind, fields)
    value = canonical_json(sign_manifest(identity, kind, fields))
    if len(value) > bounds.max_record_bytes(kind):
        raise RecordError(f"record of {len(value)} bytes exceeds {bounds.max_record_bytes(kind)}")
    return value


def _check_fields(kind: str, fields: Any) -> None:
    """The fields against their kind's strict schema (protocol/record_schemas.py)."""
    if not isinstance(fields, dict):
        raise RecordError(f"{kind}: fields must be a mapping")
    try:
        RECORD_SCHEMAS[kind].model_validate(fields)
    except ValidationError as exc:
        raise RecordError(f"{kind}: {describe(exc.errors())}"[:300]) from None


# What the signed envelope adds to a record's fields: kind, signer (64 hex), signature (128 hex),
# the keys around them, and expires_at (added when the record is stored).
ENVELOPE_BYTES = 400


def fitting_reasons(excluded: dict[str, str], fields: dict) -> dict[str, str]:
    """An attestation's exclusion reasons, cut to fit one record: whole while they fit,
    else each reduced to its kind (``unavailable``, ``failed verification``, ...), else the
    first ones by delta id. Strangers can commit many made-up delta ids, and a round must
    still attest (the reasons inform; the result id is what counts). ``fields``: the rest
    of the attestation. The node's round state keeps every reason."""
    budget = MAX_RECORD_BYTES - ENVELOPE_BYTES - len(canonical_json({**fields, "excluded": {}}))
    kinds = {d: why.split(":", 1)[0][:40] for d, why in excluded.items()}  # "unavailable", "failed verification", ...
    for reasons in (excluded, kinds):
        if len(canonical_json(reasons)) <= budget:
            return dict(reasons)
    kept: dict[str, str] = {}
    for delta_id in sorted(excluded):
        entry = {delta_id: kinds[delta_id]}
        if len(canonical_json({**kept, **entry})) > budget:
            break
        kept.update(entry)
    return kept


def open_record(key: str, subkey: str, value: bytes, now: float | None = None) -> dict:
    """Check a record found under ``key``/``subkey``; returns its fields (plus
    ``publisher``), or raises RecordError (a UserInputError) and nothing else."""
    kind = kind_for_key(key, subkey if isinstance(subkey, str) else "")
    if kind is None:
        raise RecordError(f"unknown record key {key!r}")
    fields = _open(subkey, value, kind, now)
    field = key_field(kind)
    if field is not None and fields[field] != key.rsplit("/", 1)[-1]:
        raise RecordError(f"{kind} is stored under another key than its {field}")
    return fields


def is_valid_signed_value(subkey: str, value: Any, expiration_time: float | None = None, now: float | None = None) -> bool:
    """The key-independent part of :func:`open_record` (a DHT validator sees only a
    hash of the key): a well-formed record of a known kind, signed by the subkey's owner,
    not dated ahead of ``now`` by more than the clock skew allowed, and stored to expire
    no later than its signed ``expires_at``: a relayed copy of a genuine record cannot
    be kept alive longer, nor outlive the owner's newer record. Never raises."""
    try:
        fields = _open(subkey, value, None, now)
    except Exception:  # whatever the bytes, the answer is no
        return False
    return expiration_time is None or expiration_time <= fields["expires_at"]


def _claimed_kind(value: Any) -> str:
    """The kind a value's first bytes claim, read before parsing it: canonical JSON of the
    envelope opens with its kind (keys sorted), so only a value that opens as a charter
    record may be charter-sized, and any other is refused unparsed past MAX_RECORD_BYTES."""
    return "record/charter" if bytes(value[:len(_CHARTER_OPENING)]) == _CHARTER_OPENING else ""


_CHARTER_OPENING = b'{"kind":"record/charter",'


def _open(subkey: Any, value: Any, kind: str | None, now: float | None = None) -> dict:
    if not isinstance(value, (bytes, bytearray)) or len(value) > bounds.max_record_bytes(_claimed_kind(value)):
        raise RecordError("record value is not bytes of an acceptable size")
    try:
        signed = json.loads(value)
        canonical = isinstance(signed, dict) and canonical_json(signed) == bytes(value)
    except (ValueError, RecursionError):  # not JSON, NaN (not canonical), nesting past the parser's stack
        raise RecordError("record value is not JSON") from None
    if not canonical:
        raise RecordError("record value is not canonical")
    # Exactly the signed envelope: unsigned extra fields would let anyone alter a record's bytes.
    if set(signed) != {"kind", "manifest", "signer", "signature"}:
        raise RecordError("record value has fields other than kind, manifest, signer and signature")
    kind = kind or signed.get("kind")
    if not isinstance(kind, str) or kind not in RECORD_SCHEMAS:
        raise RecordError(f"unknown record kind {kind!r}")
    if len(value) > bounds.max_record_bytes(kind):  # a charter-sized value under a key of another kind
        raise RecordError(f"{kind} of {len(value)} bytes exceeds {bounds.max_record_bytes(kind)}")
    owner = subkey.split("/", 1)[0] if isinstance(subkey, str) else None
    fields = verify_signed(signed, kind)
    if signed["signer"] != owner:
        raise RecordError("record is signed by a key other than the owner its subkey names")
    _check_fields(kind, fields)
    if fields["issued_at"] > (time.time() if now is None else now) + bounds.MAX_CLOCK_SKEW:
        raise RecordError(f"{kind} is dated more than {bounds.MAX_CLOCK_SKEW:g} s ahead (issued_at in the future)")
    want = expected_subkey(kind, owner, fields)
    if subkey != want:
        raise RecordError(f"{kind} must be stored under subkey {want}")
    return {**fields, "publisher": owner}
