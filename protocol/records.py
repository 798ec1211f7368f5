"""DHT records: schemas, signing and the validation every node applies.

A record lives under a DHT key with a subkey that names its owner: the owner's
Ed25519 public key (hex), optionally followed by ``/`` and a qualifier. Its value is
a signed manifest (:mod:`hivemerge.protocol.signing`) whose signer must be that
owner. A record that fails any check is ignored by every node, whoever relayed it.
"""

from __future__ import annotations

import json
from typing import Any

from hivemerge.protocol.content import canonical_json, is_content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import verify_signed

MAX_RECORD_BYTES = 8 * 1024
EXPERTS_KEY = "hivemerge/experts"  # subkey: <publisher>/<delta id>


def providers_key(content: str) -> str:
    return f"hivemerge/providers/{content}"  # subkey: <provider>


# kind -> required fields and their types; the schema of every record type in one place.
RECORD_SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "record/expert": {
        "domain": str, "base_id": str, "architecture": str, "expert_id": str, "delta_id": str,
        "bundle_id": str, "codecs": dict, "size": int, "peer_id": str, "maddrs": list, "issued_at": (int, float),
    },
    "record/provider": {"content": str, "bundle_id": str, "peer_id": str, "maddrs": list, "issued_at": (int, float)},
}
_ID_FIELDS = ("base_id", "architecture", "expert_id", "delta_id", "bundle_id", "content")


class RecordError(UserInputError):
    pass


def kind_for_key(key: str) -> str | None:
    if key == EXPERTS_KEY:
        return "record/expert"
    if key.startswith("hivemerge/providers/") and is_content_id(key.rsplit("/", 1)[-1]):
        return "record/provider"
    return None


def owner_subkey(identity: Identity, qualifier: str = "") -> str:
    return identity.public_hex + (f"/{qualifier}" if qualifier else "")


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
    if not all(isinstance(m, str) for m in fields["maddrs"]):
        raise RecordError(f"{kind}: maddrs must be strings")


def open_record(key: str, subkey: str, value: bytes) -> dict:
    """Check a record found under ``key``/``subkey``; returns its fields (plus
    ``publisher``), or raises RecordError."""
    kind = kind_for_key(key)
    if kind is None:
        raise RecordError(f"unknown record key {key!r}")
    fields = _open(subkey, value, kind)
    if kind == "record/provider" and key != providers_key(fields["content"]):
        raise RecordError("provider record is stored under another content's key")
    return fields


def is_valid_signed_value(subkey: str, value: Any) -> bool:
    """The key-independent part of :func:`open_record` (a DHT validator sees only a
    hash of the key): a well-formed record of a known kind, signed by the subkey's owner."""
    try:
        _open(subkey, value, None)
        return True
    except UserInputError:
        return False


def _open(subkey: Any, value: Any, kind: str | None) -> dict:
    if not isinstance(value, (bytes, bytearray)) or len(value) > MAX_RECORD_BYTES:
        raise RecordError("record value is not bytes of an acceptable size")
    try:
        signed = json.loads(value)
    except ValueError:
        raise RecordError("record value is not JSON") from None
    if not isinstance(signed, dict) or canonical_json(signed) != bytes(value):
        raise RecordError("record value is not canonical")
    kind = kind or signed.get("kind")
    if kind not in RECORD_SCHEMAS:
        raise RecordError(f"unknown record kind {kind!r}")
    owner = subkey.split("/", 1)[0] if isinstance(subkey, str) else None
    fields = verify_signed(signed, kind)
    if signed["signer"] != owner:
        raise RecordError("record is signed by a key other than the owner its subkey names")
    _check_fields(kind, fields)
    expected_subkey = f"{owner}/{fields['delta_id']}" if kind == "record/expert" else owner
    if subkey != expected_subkey:
        raise RecordError(f"{kind} must be stored under subkey {expected_subkey}")
    return {**fields, "publisher": owner}
