"""The fusion step's pure rules (protocol/fusion.py) and its two DHT records (protocol/records.py)."""

from __future__ import annotations

import hashlib

import pytest

from hivemerge.protocol import fusion
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.records import PACKS_KEY, is_valid_signed_value, make_record, open_record
from hivemerge.protocol.rounds import round_key

ALICE, BOB = Identity.generate(), Identity.generate()
PACK, PROBE, MODEL, BUNDLE, ROUND, DELTA = (hashlib.sha256(n.encode()).hexdigest() for n in "pqmbrd")
PEER = "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua"


def pack_fields(**changes) -> dict:
    fields = {"domain": "rotate", "pack_id": PACK, "probe_id": PROBE, "model_id": MODEL, "top_k": 8, "bundle_id": BUNDLE,
              "probe_bundle_id": BUNDLE, "size": 4096, "peer_id": PEER, "maddrs": [], "issued_at": 1700000000.0}
    return {**fields, **changes}


def fusion_fields(**changes) -> dict:
    fields = {"round_id": ROUND, "delta_id": DELTA, "packs": [PACK], "probe_id": PROBE,
              "before": {"lm": 3.5, "fused": 3.25}, "after": {"lm": 2.0, "fused": 1.5}, "peer_id": PEER, "maddrs": [],
              "issued_at": 1700000000.0}
    return {**fields, **changes}


def block(**changes) -> dict:
    return fusion.check_fusion_block({"packs": {"ids": [PACK]}, "probe": PROBE, "fuser": ALICE.public_hex, **changes},
                                     resolved=True)


def test_pack_and_fusion_records_open_under_their_keys():
    value = make_record(ALICE, "record/pack", pack_fields())
    opened = open_record(PACKS_KEY, f"{ALICE.public_hex}/{PACK}", value)
    assert opened["pack_id"] == PACK and opened["publisher"] == ALICE.public_hex
    value = make_record(ALICE, "record/fusion", fusion_fields())
    opened = open_record(round_key(ROUND), f"{ALICE.public_hex}/fusion", value)
    assert opened["after"] == {"lm": 2.0, "fused": 1.5} and opened["publisher"] == ALICE.public_hex


def test_pack_and_fusion_records_under_other_subkeys_keys_or_signers_are_refused():
    pack = make_record(ALICE, "record/pack", pack_fields())
    assert not is_valid_signed_value(ALICE.public_hex, pack)  # no pack id in the subkey
    assert not is_valid_signed_value(f"{BOB.public_hex}/{PACK}", pack)  # signed by another key
    record = make_record(ALICE, "record/fusion", fusion_fields())
    with pytest.raises(UserInputError):
        open_record(round_key(DELTA), f"{ALICE.public_hex}/fusion", record)  # another round's key
    with pytest.raises(UserInputError):
        open_record(round_key(ROUND), f"{ALICE.public_hex}/commit", record)  # read as a commitment


@pytest.mark.parametrize("kind,fields", [
    ("record/fusion", fusion_fields(after={"lm": float("nan"), "fused": 1.0})),
    ("record/fusion", fusion_fields(before={"lm": 1.0})),
    ("record/fusion", fusion_fields(packs=[])),
    ("record/fusion", fusion_fields(packs=["not an id"])),
    ("record/pack", pack_fields(top_k=0)),
    ("record/pack", pack_fields(probe_id="x" * 64)),
])
def test_malformed_pack_and_fusion_records_are_refused(kind, fields):
    with pytest.raises(UserInputError):
        make_record(ALICE, kind, fields)


def test_a_block_is_filled_with_defaults_and_every_bad_value_is_named():
    full = block()
    assert full["method"] == "mince" and full["lambda"] == 0.5 and full["steps"] == 100 and full["tolerance"] == 1e-3
    assert fusion.check_fusion_block({"packs": {"domains": ["rotate"]}})["packs"] == {"domains": ["rotate"]}
    for bad, key in [({"lambda": 1.5}, "fusion.lambda"), ({"steps": 0}, "fusion.steps"), ({"lr": 0}, "fusion.lr"),
                     ({"method": "max"}, "fusion.method"), ({"batch": True}, "fusion.batch"), ({"probe": "abc"}, "fusion.probe"),
                     ({"fuser": "abc"}, "fusion.fuser"), ({"replay": 1}, "fusion.replay"), ({"packs": {}}, "fusion.packs")]:
        with pytest.raises(UserInputError, match=key.replace(".", r"\.")):
            block(**bad)
    with pytest.raises(UserInputError, match="by id"):
        fusion.check_fusion_block({"packs": {"domains": ["rotate"]}, "probe": PROBE, "fuser": ALICE.public_hex}, resolved=True)


def test_judge_keeps_an_honest_improvement_and_names_every_other_verdict():
    b = block(**{"lambda": 0.5, "tolerance": 0.01})
    record = fusion_fields()
    assert fusion.judge(b, record, {"lm": 3.5, "fused": 3.25}, {"lm": 2.005, "fused": 1.5}) is None
    assert fusion.judge(b, record, {"lm": 3.5, "fused": 3.25}, {"lm": 2.5, "fused": 1.5}) == (
        "fusion: reported fused model probe loss lm=2 differs from the recomputed 2.5 (tolerance 0.01)")
    assert fusion.judge(b, record, {"lm": 3.5, "fused": 3.3}, {"lm": 2.0, "fused": 1.5}).startswith(
        "fusion: reported base probe loss fused=3.25")
    worse = fusion_fields(after={"lm": 3.5, "fused": 3.5})  # probe loss 3.375 -> 3.5
    assert fusion.judge(b, worse, {"lm": 3.5, "fused": 3.25}, {"lm": 3.5, "fused": 3.5}) == (
        "fusion: no improvement on the probe: probe loss 3.375 (base) -> 3.5 (fused)")
    assert fusion.probe_loss({"lm": 2.0, "fused": 1.0}, 0.25) == pytest.approx(1.25)


def test_record_reason_checks_the_fuser_the_delta_and_the_inputs():
    b = block()
    record = {**fusion_fields(), "publisher": ALICE.public_hex}
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, record) is None
    assert "not by the designated fuser" in fusion.record_reason(b, BOB.public_hex, DELTA, record)
    assert fusion.record_reason(b, ALICE.public_hex, DELTA, None) == "fusion: no fusion record from the designated fuser"
    assert "names delta" in fusion.record_reason(b, ALICE.public_hex, PACK, record)
    assert "other packs" in fusion.record_reason(b, ALICE.public_hex, DELTA, {**record, "probe_id": MODEL})
    commitments = {"n1": {"delta_ids": [DELTA, PACK], "domains": {DELTA: "fused", PACK: "math"}},
                   "n2": {"delta_ids": [MODEL], "domains": {MODEL: "fused"}}}
    assert fusion.fused_deltas(commitments) == {DELTA: "n1", MODEL: "n2"}
