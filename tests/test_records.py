"""DHT records (protocol/records.py): what every node accepts, and everything it must ignore.

A record is accepted only if it is canonical JSON of a signed manifest of a known kind,
signed by the owner its subkey names, with exactly the fields of its kind, stored under
the subkey its kind prescribes and (for open_record) under the key of its kind.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from msgpack import packb

from hivemerge.protocol import bounds, records
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.records import (
    EXPERTS_KEY,
    MAX_RECORD_BYTES,
    RecordError,
    is_valid_signed_value,
    make_record,
    open_record,
    providers_key,
)
from hivemerge.protocol.signing import sign_manifest

ALICE, BOB = Identity.generate(), Identity.generate()
DELTA, OTHER, BUNDLE, BASE, EXPERT, ARCH = (hashlib.sha256(n.encode()).hexdigest() for n in "dobeia")
PEER = "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua"


def owner_subkey(identity: Identity, qualifier: str = "") -> str:
    """The subkey a record must be stored under: its owner's public key, for an expert
    record followed by ``/<delta id>``."""
    return identity.public_hex + (f"/{qualifier}" if qualifier else "")


def expert_fields(**changes) -> dict:
    fields = {
        "domain": "math", "base_id": BASE, "architecture": ARCH, "expert_id": EXPERT, "delta_id": DELTA,
        "bundle_id": BUNDLE, "codecs": {"ternary": 4, "fp16": 2}, "size": 5335, "peer_id": PEER,
        "maddrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"], "issued_at": 1700000000.5,
        "expires_at": 1700000300.5,
    }
    fields.update(changes)
    return fields


def provider_fields(**changes) -> dict:
    fields = {"content": DELTA, "bundle_id": BUNDLE, "peer_id": PEER, "maddrs": [], "issued_at": 1700000000, "expires_at": 1700000300}
    fields.update(changes)
    return fields


def expert_record(identity=ALICE, **changes) -> tuple[str, str, bytes]:
    fields = expert_fields(**changes)
    return EXPERTS_KEY, owner_subkey(identity, fields["delta_id"]), make_record(identity, "record/expert", fields)


def provider_record(identity=ALICE, **changes) -> tuple[str, str, bytes]:
    fields = provider_fields(**changes)
    return providers_key(fields["content"]), owner_subkey(identity), make_record(identity, "record/provider", fields)


def rejected(key: str, subkey, value) -> str:
    """open_record refuses the record (a RecordError, or the SignatureError of the
    signature check: both are the UserInputError that readers skip); returns why."""
    with pytest.raises(UserInputError) as info:
        open_record(key, subkey, value)
    return str(info.value)


def refused_everywhere(key: str, subkey, value) -> str:
    """Refused by the DHT validator's check (so no node stores it) and by open_record."""
    assert not is_valid_signed_value(subkey, value)
    return rejected(key, subkey, value)


# -- what is accepted -------------------------------------------------------------------

def test_expiry_is_bounded_by_the_signed_expiry():
    _, subkey, value = expert_record()  # issued_at 1700000000.5, expires_at 1700000300.5
    assert is_valid_signed_value(subkey, value, 1700000300.5)
    assert is_valid_signed_value(subkey, value, 1700000000.5 + 10)  # a relay may keep it for less
    assert not is_valid_signed_value(subkey, value, 1700000300.5 + 0.5)  # a replay kept alive longer than signed


def test_signed_expiry_is_bounded_by_the_issue_time_or_deadline():
    latest = 1700000000.5 + bounds.MAX_LIFETIME
    assert is_valid_signed_value(expert_record(expires_at=latest)[1], expert_record(expires_at=latest)[2])
    for expires_at in (latest + 0.5, 1700000000.0):  # past the longest lifetime; before it was issued
        with pytest.raises(RecordError, match="expires_at"):
            make_record(ALICE, "record/expert", expert_fields(expires_at=expires_at))
    proposal = {
        "round_id": DELTA, "base_id": BASE, "recipe": {"merge_method": "linear"}, "select": {"domains": ["math"]},
        "deadline": 1700050000.0, "quorum": 0.5, "proposer": ALICE.public_hex, "issued_at": 1700000000.0,
    }
    p_subkey = f"{ALICE.public_hex}/{DELTA}"
    from_deadline = 1700050000.0 + bounds.MAX_LIFETIME
    assert is_valid_signed_value(p_subkey, make_record(ALICE, "record/proposal", {**proposal, "expires_at": from_deadline}))
    with pytest.raises(RecordError, match="expires_at"):
        make_record(ALICE, "record/proposal", {**proposal, "expires_at": from_deadline + 1})


def test_a_record_dated_in_the_future_is_refused_until_its_time():
    now = 1700000000.0
    ahead = now + bounds.MAX_CLOCK_SKEW + 1
    key, subkey, value = expert_record(issued_at=ahead, expires_at=ahead + 300)
    assert not is_valid_signed_value(subkey, value, now=now)
    with pytest.raises(RecordError, match="ahead"):
        open_record(key, subkey, value, now=now)
    assert is_valid_signed_value(subkey, value, now=ahead)  # within the skew allowance once its time comes
    _, subkey, value = expert_record(issued_at=now + bounds.MAX_CLOCK_SKEW - 1, expires_at=now + 300)
    assert is_valid_signed_value(subkey, value, now=now)


def test_genuine_records_open_with_their_publisher():
    key, subkey, value = expert_record()
    assert is_valid_signed_value(subkey, value)
    opened = open_record(key, subkey, value)
    assert opened == {**expert_fields(), "publisher": ALICE.public_hex}
    assert subkey == f"{ALICE.public_hex}/{DELTA}"
    assert len(value) <= MAX_RECORD_BYTES and value == canonical_json(json.loads(value))

    key, subkey, value = provider_record(BOB)
    assert key == f"hivemerge/providers/{DELTA}" and subkey == BOB.public_hex
    assert open_record(key, subkey, value) == {**provider_fields(), "publisher": BOB.public_hex}
    assert records.kind_for_key(key) == "record/provider" and records.kind_for_key(EXPERTS_KEY) == "record/expert"
    assert records.kind_for_key("hivemerge/providers/not-an-id") is None
    assert records.kind_for_key("hivemerge/other") is None


# -- flipped bytes ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [expert_record, provider_record], ids=["expert", "provider"])
def test_every_flipped_byte_is_refused(make):
    key, subkey, value = make()
    for position in range(len(value)):
        for mask in (0x01, 0x20):  # a low bit, and the bit that changes hex case
            forged = bytearray(value)
            forged[position] ^= mask
            assert not is_valid_signed_value(subkey, bytes(forged)), (position, mask)
            with pytest.raises(UserInputError):
                open_record(key, subkey, bytes(forged))


def test_truncated_and_extended_values_are_refused():
    key, subkey, value = expert_record()
    for forged in (value[:-1], value[1:], value + b" ", b" " + value, value + b"\n", b""):
        refused_everywhere(key, subkey, forged)


# -- who signed it ---------------------------------------------------------------------

def test_record_signed_by_another_key_than_its_subkey_owner_is_refused():
    # Bob signs a record about Alice's delta and stores it under Alice's subkey.
    _, _, by_bob = expert_record(BOB)
    alice_subkey = owner_subkey(ALICE, DELTA)
    why = refused_everywhere(EXPERTS_KEY, alice_subkey, by_bob)
    assert "other than the owner" in why
    _, _, bob_provider = provider_record(BOB)
    assert "other than the owner" in refused_everywhere(providers_key(DELTA), ALICE.public_hex, bob_provider)


def test_signer_field_naming_the_owner_over_another_keys_signature_is_refused():
    # Bob's signature, but the signer field claims Alice: the signature does not verify.
    signed = sign_manifest(BOB, "record/expert", expert_fields())
    signed["signer"] = ALICE.public_hex
    why = refused_everywhere(EXPERTS_KEY, owner_subkey(ALICE, DELTA), canonical_json(signed))
    assert "does not verify" in why


def test_signature_of_other_fields_is_refused():
    # Alice's genuine signature over other fields, spliced onto changed fields.
    genuine = json.loads(expert_record()[2])
    for change in ({"maddrs": ["/ip4/6.6.6.6/tcp/1"]}, {"peer_id": "12D3KooWevil"}, {"domain": "code"},
                   {"issued_at": 1800000000.5}):
        forged = {**genuine, "manifest": {**genuine["manifest"], **change}}
        refused_everywhere(EXPERTS_KEY, owner_subkey(ALICE, DELTA), canonical_json(forged))


def test_uppercase_hex_signer_or_signature_is_refused():
    genuine = json.loads(expert_record()[2])
    for field in ("signer", "signature"):
        forged = {**genuine, field: genuine[field].upper()}
        refused_everywhere(EXPERTS_KEY, owner_subkey(ALICE, DELTA), canonical_json(forged))
        refused_everywhere(EXPERTS_KEY, f"{genuine['signer'].upper()}/{DELTA}", canonical_json(forged))


def test_signature_from_another_domain_is_not_a_record():
    # A delta manifest signature (kind "delta") cannot be replayed as a record.
    fields = expert_fields()
    signed = sign_manifest(ALICE, "delta", fields)
    refused_everywhere(EXPERTS_KEY, owner_subkey(ALICE, DELTA), canonical_json(signed))
    relabelled = {**signed, "kind": "record/expert"}  # same signature, relabelled
    assert "does not verify" in refused_everywhere(EXPERTS_KEY, owner_subkey(ALICE, DELTA), canonical_json(relabelled))


# -- where it is stored -----------------------------------------------------------------

def test_expert_record_under_another_qualifier_or_bare_owner_is_refused():
    _, _, value = expert_record()
    for subkey in (ALICE.public_hex, owner_subkey(ALICE, OTHER), owner_subkey(ALICE, DELTA) + "/x",
                   owner_subkey(ALICE, DELTA.upper())):
        assert "must be stored under subkey" in refused_everywhere(EXPERTS_KEY, subkey, value)


def test_provider_record_with_a_qualified_subkey_is_refused():
    key, _, value = provider_record()
    refused_everywhere(key, owner_subkey(ALICE, DELTA), value)
    refused_everywhere(key, ALICE.public_hex + "/", value)


def test_non_string_subkeys_are_refused():
    key, _, value = expert_record()
    for subkey in (None, 7, ALICE.public_key, [ALICE.public_hex, DELTA]):
        assert not is_valid_signed_value(subkey, value)
        with pytest.raises(UserInputError):
            open_record(key, subkey, value)


def test_wrong_kind_for_its_key_is_ignored():
    # Each record is valid on its own (the DHT validator only sees a hash of the key, so
    # it cannot tell), but open_record, which every reader applies, refuses it.
    _, p_subkey, p_value = provider_record()
    assert is_valid_signed_value(p_subkey, p_value)
    assert "expected a signed record/expert" in rejected(EXPERTS_KEY, p_subkey, p_value)
    _, e_subkey, e_value = expert_record()
    assert is_valid_signed_value(e_subkey, e_value)
    assert "expected a signed record/provider" in rejected(providers_key(DELTA), e_subkey, e_value)
    assert "unknown record key" in rejected("hivemerge/elsewhere", e_subkey, e_value)


def test_provider_record_under_another_contents_key_is_ignored():
    _, subkey, value = provider_record()  # it provides DELTA
    assert is_valid_signed_value(subkey, value)
    assert "stored under another" in rejected(providers_key(OTHER), subkey, value)
    assert open_record(providers_key(DELTA), subkey, value)["content"] == DELTA


# -- encodings and schemas -----------------------------------------------------------------

def test_non_canonical_json_of_a_genuine_record_is_refused():
    key, subkey, value = expert_record()
    signed = json.loads(value)
    variants = [
        json.dumps(signed).encode(),  # spaces
        json.dumps(signed, indent=1, sort_keys=True).encode(),
        json.dumps(dict(reversed(list(signed.items()))), separators=(",", ":")).encode(),  # key order
        json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode().replace(b'"math"', b'"\\u006dath"'),
        value.replace(b"1700000000.5", b"1.7000000005e9"),  # the same number, spelled otherwise
    ]
    for forged in variants:
        assert forged != value
        assert json.loads(forged) == signed  # the same JSON value ...
        assert "not canonical" in refused_everywhere(key, subkey, forged)  # ... but not these bytes


def test_malformed_values_are_refused():
    key, subkey, value = expert_record()
    signed = json.loads(value)
    for forged in (
        value.decode(),  # str, not bytes
        json.loads(value),  # a dict
        None, 42,
        b"not json", b"[]", b"null", canonical_json([signed]),
        canonical_json({k: v for k, v in signed.items() if k != "signature"}),
        canonical_json({**signed, "extra": 1}),
        canonical_json({**signed, "kind": "record/unknown"}),
        canonical_json({**signed, "signature": "00" * 64}),
        canonical_json({**signed, "signer": "00" * 32}),
        canonical_json({**signed, "signer": signed["signer"][:-2]}),
        packb(value),  # what the DHT wraps it in, unwrapped once too few
    ):
        assert not is_valid_signed_value(subkey, forged)
        with pytest.raises(UserInputError):
            open_record(key, subkey, forged)


def test_oversized_values_are_refused_before_parsing():
    key, subkey, value = expert_record()
    padded = value + b" " * (MAX_RECORD_BYTES + 1 - len(value))
    assert "acceptable size" in refused_everywhere(key, subkey, padded)


def test_records_with_wrong_fields_are_refused_even_when_signed_by_the_owner():
    good = expert_fields()
    bad_fields = [
        {k: v for k, v in good.items() if k != "maddrs"},  # missing
        {**good, "extra": 1},  # unknown field
        {**good, "size": "5335"}, {**good, "size": True}, {**good, "size": 5335.0},
        {**good, "issued_at": True}, {**good, "issued_at": "now"},
        {**good, "maddrs": "/ip4/127.0.0.1/tcp/1"}, {**good, "maddrs": [1]},
        {**good, "codecs": []}, {**good, "domain": 3},
        {**good, "base_id": "xyz"}, {**good, "expert_id": BASE.upper()}, {**good, "bundle_id": BASE[:-1]},
    ]
    for fields in bad_fields:
        with pytest.raises(RecordError):  # make_record refuses to make it ...
            make_record(ALICE, "record/expert", fields)
        forged = canonical_json(sign_manifest(ALICE, "record/expert", fields))  # ... and nodes refuse a hand-made one
        subkey = owner_subkey(ALICE, fields["delta_id"])
        refused_everywhere(EXPERTS_KEY, subkey, forged)


def test_make_record_refuses_records_too_big_for_the_dht():
    reasons = {hashlib.sha256(str(i).encode()).hexdigest(): "x" * bounds.MAX_REASON_CHARS for i in range(40)}
    attestation = {"round_id": DELTA, "result_id": BASE, "bundle_id": BUNDLE, "included": [], "excluded": reasons,
                   "peer_id": PEER, "maddrs": [], "issued_at": 1700000000.0, "expires_at": 1700000300.0}
    with pytest.raises(RecordError, match="exceeds"):
        make_record(ALICE, "record/attestation", attestation)
