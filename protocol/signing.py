"""Signed manifests: a manifest, its signer's public key and an Ed25519 signature.

The signed message is a domain tag plus the manifest's canonical JSON, so a signature
made for one kind of object (a delta) can never be replayed as another (a record).
"""

from __future__ import annotations

from hivemerge.protocol.content import canonical_json, content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity, fingerprint, verify_signature

DOMAIN = b"hivemerge/v1/"


class SignatureError(UserInputError):
    """A signature is missing, malformed, or does not verify."""


def signing_message(kind: str, manifest: dict) -> bytes:
    return DOMAIN + kind.encode() + b"\x00" + canonical_json(manifest)


def sign_manifest(identity: Identity, kind: str, manifest: dict) -> dict:
    signature = identity.sign(signing_message(kind, manifest))
    return {"kind": kind, "manifest": manifest, "signer": identity.public_hex, "signature": signature.hex()}


def verify_signed(signed: dict, kind: str, expected_signer: str | None = None) -> dict:
    """Check a signed manifest; returns the manifest. ``expected_signer`` is a public key
    (hex) or fingerprint that must have signed it."""
    try:
        if signed.get("kind") != kind:
            raise SignatureError(f"expected a signed {kind}, got {signed.get('kind')!r}")
        manifest = signed["manifest"]
        public_key = bytes.fromhex(signed["signer"])
        signature = bytes.fromhex(signed["signature"])
        # Only the canonical (lowercase) hex: fromhex also takes upper case, which would let
        # a changed file or record carry the same signature.
        if public_key.hex() != signed["signer"] or signature.hex() != signed["signature"]:
            raise ValueError("non-canonical hex")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SignatureError(f"malformed signed {kind}") from None
    if len(public_key) != 32 or not verify_signature(public_key, signing_message(kind, manifest), signature):
        raise SignatureError(f"the {kind}'s signature does not verify (signer {fingerprint(public_key)})")
    if expected_signer and expected_signer not in (public_key.hex(), fingerprint(public_key)):
        raise SignatureError(f"the {kind} is signed by {fingerprint(public_key)}, not by {expected_signer}")
    return manifest


def signed_id(signed: dict) -> str:
    """The content id of a signed object is the id of its manifest (who signed it is not part of what it is)."""
    return content_id(signed["manifest"])
