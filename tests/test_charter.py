"""Network charters (issue 20): the signed, versioned document that says who decides a
network's consensus (protocol/charter.py), and the round rules under it
(protocol/charter_rules.py).

Every hostile input is signed correctly by the test's own keys: only the charter's
signature rules, its schema and the round rules stand in its way.
"""

from __future__ import annotations

import copy
import hashlib
import random

import pytest
from test_fuzz_records import check, mutate

from hivemerge.protocol import bounds, records, rounds
from hivemerge.protocol.charter import (
    CharterError,
    charter_id,
    check_charter,
    find_genesis,
    follow,
    genesis_ok,
    new_charter,
    propose_change,
    record_fields,
    roles_of,
    sign_charter,
    successor_ok,
)
from hivemerge.protocol.charter_rules import (
    PolicyError,
    accepted_commitments,
    check_proposal_against,
    commitment_verdicts,
    final_result_under,
    ignored_reason,
    may_attest,
    may_contribute,
    may_propose,
    needed_attestations,
    participants_record_fields,
)
from hivemerge.protocol.content import canonical_json, content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.keys import charters_key, kind_for_key, round_key
from hivemerge.protocol.signing import sign_manifest

M = [Identity.generate() for _ in range(3)]  # maintainers
PROPOSER = Identity.generate()
HONEST = [Identity.generate() for _ in range(3)]  # roster attesters and contributors
CONTRIBUTOR = Identity.generate()  # contributes, does not attest
SYBILS = [Identity.generate() for _ in range(4)]  # free keys, on no roster
OUTSIDER = Identity.generate()
H = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
BASE = H[0]
PEER = "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua"
NOW = 1_700_000_000.0
ROSTER = {PROPOSER.public_hex: ["proposer"], CONTRIBUTOR.public_hex: ["contributor"],
          **{h.public_hex: ["attester", "contributor"] for h in HONEST}}


def genesis_doc(k: int = 2, roster: dict | None = None, **changes) -> dict:
    return new_charter(name="testnet", base_ids=[BASE], maintainers=[m.public_hex for m in M], threshold=k,
                       methods=["linear", "ties"], roster=ROSTER if roster is None else roster, **changes)


def signed(charter: dict, *signers: Identity) -> dict:
    for identity in signers:
        charter = sign_charter(charter, identity)
    return charter


GENESIS = signed(genesis_doc(), M[0], M[1])


def cid(charter: dict) -> str:
    return charter_id(charter["charter"])


def flip(signature: str) -> str:
    """The signature with one byte changed."""
    raw = bytearray.fromhex(signature)
    raw[10] ^= 0x01
    return raw.hex()


# -- versions and signatures --------------------------------------------------------------

def test_the_genesis_counts_with_k_of_its_own_maintainers():
    unsigned = genesis_doc(k=2)
    assert cid(unsigned) == content_id(unsigned["charter"]) and len(cid(unsigned)) == 64
    assert [genesis_ok(signed(unsigned, *M[:n])) for n in range(4)] == [False, False, True, True]
    # Who signed, and in which order, is not part of what the charter is.
    assert cid(signed(unsigned, M[1], M[0])) == cid(signed(unsigned, M[0], M[2])) == cid(unsigned)
    assert not genesis_ok(signed(unsigned, M[0], OUTSIDER, *SYBILS))  # only its maintainers count
    assert genesis_ok(signed(genesis_doc(k=3), *M)) and not genesis_ok(signed(genesis_doc(k=3), M[0], M[1]))


def test_a_forged_signature_does_not_count():
    good = signed(genesis_doc(k=2), M[0], M[1])
    forged = {**good, "signatures": {**good["signatures"], M[1].public_hex: flip(good["signatures"][M[1].public_hex])}}
    assert genesis_ok(good) and not genesis_ok(forged)
    # A maintainer's signature made for something else (no domain tag, another kind, another version) is no signature here.
    message = cid(good).encode()
    for other in (M[1].sign(message), M[1].sign(bytes.fromhex(cid(good))),
                  bytes.fromhex(sign_manifest(M[1], "record/charter", {"charter_id": cid(good)})["signature"])):
        assert not genesis_ok({**good, "signatures": {**good["signatures"], M[1].public_hex: other.hex()}})
    update = signed(propose_change(GENESIS, add={OUTSIDER.public_hex: ["attester"]}), M[0], M[1])
    replayed = {**update, "signatures": {M[0].public_hex: update["signatures"][M[0].public_hex],
                                         M[1].public_hex: GENESIS["signatures"][M[1].public_hex]}}  # the genesis's signature
    assert successor_ok(GENESIS, update) and not successor_ok(GENESIS, replayed)
    assert cid(follow(GENESIS, [replayed])) == cid(GENESIS)
    flipped = {**update, "signatures": {k: flip(s) if k == M[0].public_hex else s for k, s in update["signatures"].items()}}
    assert cid(follow(GENESIS, [flipped])) == cid(GENESIS)


def test_an_update_signed_by_fewer_than_k_maintainers_is_ignored():
    change = propose_change(GENESIS, add={SYBILS[0].public_hex: ["attester", "proposer"]})
    assert change["charter"]["version"] == 1 and change["charter"]["previous"] == cid(GENESIS)
    one = signed(change, M[2])
    strangers = signed(change, M[2], OUTSIDER, *SYBILS)  # five signatures, one of a maintainer
    assert not successor_ok(GENESIS, one) and not successor_ok(GENESIS, strangers)
    assert cid(follow(GENESIS, [one, strangers, signed(change, *SYBILS)])) == cid(GENESIS)
    assert cid(follow(GENESIS, [one, signed(change, M[0])])) == cid(change)  # copies combine: M[2] + M[0] is k


def test_an_update_by_k_maintainers_of_the_previous_version_is_followed_even_if_it_removes_them():
    handover = propose_change(GENESIS, maintainers=[OUTSIDER.public_hex], threshold=1)
    v1 = signed(handover, M[0], M[1])
    assert successor_ok(GENESIS, v1)
    assert not successor_ok(GENESIS, signed(handover, OUTSIDER))  # the new maintainer cannot install itself
    v2_by_old = signed(propose_change(v1, open_contribution=True), M[0], M[1])
    v2 = signed(propose_change(v1, open_contribution=True), OUTSIDER)
    assert not successor_ok(v1, v2_by_old) and successor_ok(v1, v2)
    for order in ([v2, v1, v2_by_old], [v2_by_old, v1, v2], [v1, v2]):
        reached = follow(GENESIS, order)
        assert cid(reached) == cid(v2) and reached["charter"]["version"] == 2
        assert reached["signatures"] == v2["signatures"]  # exactly the signatures that counted
    assert cid(follow(GENESIS, [v2])) == cid(GENESIS)  # v1 unseen: v2 is not reachable


def test_forks_garbage_and_replays_never_make_follow_go_back():
    a = signed(propose_change(GENESIS, add={OUTSIDER.public_hex: "attester"}), M[0], M[1])
    b = signed(propose_change(GENESIS, quorum=0.8), M[1], M[2])  # a fork: k maintainers signed two versions
    low, high = sorted([a, b], key=cid)
    on_high = signed(propose_change(high, name="testnet2"), M[0], M[2])
    skipping = signed({"charter": {**on_high["charter"], "version": 3}, "signatures": {}}, M[0], M[1], M[2])
    nan = copy.deepcopy(a)
    nan["charter"]["policy"]["quorum"] = float("nan")
    garbage = [None, "x", 7, {}, [], {"charter": {}, "signatures": {}}, nan, skipping,
               {**a, "signatures": {M[0].public_hex: "zz" * 64}}]
    assert cid(follow(GENESIS, [a, b])) == cid(low)  # equal height: the lowest charter id, whatever the order
    assert cid(follow(GENESIS, [b, a])) == cid(low)
    rng = random.Random(20)
    pool = [a, b, on_high, GENESIS, *garbage]
    for _ in range(20):
        rng.shuffle(pool)
        assert cid(follow(GENESIS, pool)) == cid(on_high)  # the higher chain, even through the higher id
        assert cid(follow(on_high, pool)) == cid(on_high)  # replays of older versions: never back
        assert cid(follow(low, pool)) == cid(low)  # another branch's versions do not descend from low
    assert cid(follow(high, [GENESIS, low])) == cid(high)
    assert not successor_ok(high, skipping) and cid(follow(high, [skipping])) == cid(high)  # version 3 after 1


def test_schema_refusals_name_the_field():
    doc = GENESIS["charter"]

    def refused(change) -> str:
        bad = copy.deepcopy(GENESIS)
        change(bad["charter"])
        with pytest.raises(CharterError) as info:
            check_charter(bad)
        assert isinstance(info.value, UserInputError)
        assert not genesis_ok(bad) and cid(follow(GENESIS, [bad])) == cid(GENESIS)
        return str(info.value)

    over_cap = {hashlib.sha256(b"m%d" % i).hexdigest(): ["contributor"] for i in range(bounds.MAX_ROSTER + 1)}
    assert "roster" in refused(lambda d: d.update(roster={**over_cap, **doc["roster"]}))
    assert "quorum" in refused(lambda d: d["policy"].update(quorum=0.5))
    assert "quorum" in refused(lambda d: d["policy"].update(quorum=float("nan")))
    assert "quorum" in refused(lambda d: d["policy"].update(quorum=True))
    assert "max_deadline" in refused(lambda d: d["policy"].update(max_deadline=float("inf")))
    for name in ("a/b", "..", "../etc", "", "x" * 65, "é"):
        assert "name" in refused(lambda d, name=name: d.update(name=name))
    assert "methods" in refused(lambda d: d["policy"].update(methods=["ties", "x/y"]))
    assert "threshold 4 exceeds" in refused(lambda d: d.update(threshold=4))
    assert "previous" in refused(lambda d: d.update(previous=H[1]))
    assert "maintainers must be sorted" in refused(lambda d: d.update(maintainers=sorted(d["maintainers"], reverse=True)))
    assert "maintainers" in refused(lambda d: d.update(maintainers=[k.upper() for k in d["maintainers"]]))
    assert "maintainers" in refused(lambda d: d.update(maintainers=sorted(H[:bounds.MAX_MAINTAINERS + 1])))
    assert "roster" in refused(lambda d: d["roster"].update({OUTSIDER.public_hex: ["admin"]}))
    assert "roster" in refused(lambda d: d["roster"].update({OUTSIDER.public_hex: []}))
    assert "min_attesters 4 exceeds the roster's 3 attesters" in refused(lambda d: d["policy"].update(min_attesters=4))
    assert "extra" in refused(lambda d: d.update(extra=1))
    with pytest.raises(CharterError):
        check_charter([GENESIS])
    with pytest.raises(CharterError):
        check_charter({**GENESIS, "signatures": {H[i]: "00" * 64 for i in range(bounds.MAX_MAINTAINERS + 1)}})
    for change in ({"roster": {}}, {"version": 7}, {"previous": H[1]}):
        with pytest.raises(CharterError, match="not a charter setting"):
            propose_change(GENESIS, **change)
    with pytest.raises(CharterError, match="version: not a charter setting"):
        genesis_doc(version=3)
    with pytest.raises(CharterError, match="role 'admin'"):
        propose_change(GENESIS, add={OUTSIDER.public_hex: "admin"})


def test_propose_change_edits_roles_and_chains():
    change = propose_change(GENESIS, add={CONTRIBUTOR.public_hex: ["attester"], OUTSIDER.public_hex: "proposer"},
                            remove={HONEST[0].public_hex: ["attester"]}, quorum=0.75, methods=["ties"])
    doc = change["charter"]
    assert change["signatures"] == {} and doc["version"] == 1 and doc["previous"] == cid(GENESIS)
    assert roles_of(doc, CONTRIBUTOR.public_hex) == {"attester", "contributor"}
    assert roles_of(doc, OUTSIDER.public_hex) == {"proposer"}
    assert roles_of(doc, HONEST[0].public_hex) == {"contributor"}
    assert doc["policy"]["quorum"] == 0.75 and doc["policy"]["methods"] == ["ties"]
    gone = propose_change(GENESIS, remove=[HONEST[0].public_hex, PROPOSER.public_hex])["charter"]
    assert HONEST[0].public_hex not in gone["roster"] and roles_of(gone, PROPOSER.public_hex) == set()
    with pytest.raises(CharterError, match="not on the roster"):
        propose_change(GENESIS, remove=[OUTSIDER.public_hex])
    with pytest.raises(CharterError, match="min_attesters"):  # a change is checked whole
        propose_change(GENESIS, remove=[h.public_hex for h in HONEST])


# -- records: record/charter and record/participants ---------------------------------------

def charter_fields(charter: dict, genesis: dict = GENESIS, **changes) -> dict:
    return {**record_fields(charter, cid(genesis), NOW), "expires_at": NOW + 300, **changes}


def test_a_node_given_a_genesis_id_finds_it_only_with_k_signatures():
    unsigned = genesis_doc()
    by_each = [signed(unsigned, m) for m in M[:2]]
    forged = {**unsigned, "signatures": {M[2].public_hex: flip(signed(unsigned, M[2])["signatures"][M[2].public_hex])}}
    other = signed(genesis_doc(open_contribution=True), M[0], M[1])
    assert find_genesis(cid(unsigned), [other, by_each[0], forged, None]) is None
    found = find_genesis(cid(unsigned), [other, *by_each, forged])  # the two maintainers' copies combine
    assert found["charter"] == unsigned["charter"] and sorted(found["signatures"]) == sorted(m.public_hex for m in M[:2])
    assert find_genesis(cid(other), [other]) == other and find_genesis(H[1], [other]) is None


def test_a_charter_record_is_stored_under_its_network_and_its_id():
    key = charters_key(cid(GENESIS))
    assert kind_for_key(key, f"{M[0].public_hex}/{cid(GENESIS)}") == "record/charter"
    v1 = signed(propose_change(GENESIS, open_contribution=True), M[0], M[1])
    for charter in (GENESIS, v1):
        fields = charter_fields(charter)
        subkey = records.owner_subkey(OUTSIDER, "record/charter", fields)  # anyone may relay a version
        assert subkey == f"{OUTSIDER.public_hex}/{cid(charter)}"
        opened = records.open_record(key, subkey, records.make_record(OUTSIDER, "record/charter", fields), now=NOW)
        assert opened["charter"] == charter and opened["publisher"] == OUTSIDER.public_hex
    bad_name = {**GENESIS, "charter": {**GENESIS["charter"], "name": "a/b"}}
    hostile = [
        (key, charter_fields(GENESIS, charter_id=cid(v1))),  # names another charter's id
        (charters_key(H[5]), charter_fields(GENESIS, genesis_id=H[5])),  # a genesis under another network's id
        (charters_key(cid(bad_name)), {**charter_fields(GENESIS), "charter": bad_name, "charter_id": cid(bad_name),
                                       "genesis_id": cid(bad_name)}),  # refused for its name alone
    ]
    for where, fields in hostile:
        value = canonical_json(sign_manifest(OUTSIDER, "record/charter", fields))
        subkey = f"{OUTSIDER.public_hex}/{fields['charter_id']}"
        assert not records.is_valid_signed_value(subkey, value, now=NOW)
        with pytest.raises(UserInputError):
            records.open_record(where, subkey, value, now=NOW)
    good = records.make_record(OUTSIDER, "record/charter", charter_fields(GENESIS))
    with pytest.raises(UserInputError, match="subkey"):  # stored under another version's id
        records.open_record(key, f"{OUTSIDER.public_hex}/{cid(v1)}", good, now=NOW)
    with pytest.raises(UserInputError, match="another key"):
        records.open_record(charters_key(H[5]), f"{OUTSIDER.public_hex}/{cid(GENESIS)}", good, now=NOW)


def test_the_largest_charter_fits_one_record_and_only_charters_are_that_large():
    maintainers = [Identity.generate() for _ in range(bounds.MAX_MAINTAINERS)]
    roster = {hashlib.sha256(b"r%d" % i).hexdigest(): ["attester", "contributor", "proposer"] for i in range(bounds.MAX_ROSTER)}
    biggest = new_charter(name="n" * 64, base_ids=H[:bounds.MAX_CHARTER_BASES], maintainers=[m.public_hex for m in maintainers],
                          threshold=bounds.MAX_MAINTAINERS, roster=roster,
                          methods=[f"m{i:02d}" + "x" * 61 for i in range(bounds.MAX_CHARTER_METHODS)],
                          quorum=0.6666666666666666, max_deadline=12345.678901234567, min_deadline=1.0000000000000002,
                          max_fetch_window=3599.9999999999995, max_deltas=1023, max_generations=99, max_popsize=63,
                          max_fusion_steps=9999)
    biggest = signed(biggest, *maintainers)
    assert genesis_ok(biggest)
    fields = charter_fields(biggest, biggest, issued_at=99_999_999_999.99998, expires_at=99_999_999_999.99998)
    value = records.make_record(OUTSIDER, "record/charter", fields)
    assert bounds.MAX_RECORD_BYTES * 4 < len(value) <= bounds.MAX_CHARTER_RECORD_BYTES
    opened = records.open_record(charters_key(cid(biggest)), f"{OUTSIDER.public_hex}/{cid(biggest)}", value, now=fields["issued_at"])
    assert cid(opened["charter"]) == cid(biggest)
    # Past the charter cap, or charter-sized under another kind's key: refused.
    padded = value[:-1] + b" " * (bounds.MAX_CHARTER_RECORD_BYTES + 1 - len(value)) + b"}"
    assert not records.is_valid_signed_value(f"{OUTSIDER.public_hex}/{cid(biggest)}", padded, now=NOW)
    with pytest.raises(UserInputError, match="acceptable size"):
        records.open_record(charters_key(cid(biggest)), f"{OUTSIDER.public_hex}/{cid(biggest)}", padded, now=NOW)
    with pytest.raises(UserInputError, match="exceeds"):
        records.open_record(round_key(H[3]), f"{OUTSIDER.public_hex}/commit", value, now=NOW)


def participants_fields(entries: dict, **changes) -> dict:
    return {"round_id": H[3], "participants": entries, "issued_at": NOW, "expires_at": NOW + 300, **changes}


def test_a_participant_list_is_a_bounded_record_under_the_round():
    key, subkey = round_key(H[3]), f"{PROPOSER.public_hex}/participants"
    assert kind_for_key(key, subkey) == "record/participants"
    fields = participants_fields({HONEST[0].public_hex: {H[4]: "math", H[5]: "code"}})
    assert records.owner_subkey(PROPOSER, "record/participants", fields) == subkey
    assert records.open_record(key, subkey, records.make_record(PROPOSER, "record/participants", fields), now=NOW)["participants"] \
        == fields["participants"]
    too_many = {hashlib.sha256(b"p%d" % i).hexdigest(): {H[4]: "math"} for i in range(bounds.MAX_ROUND_DELTAS + 1)}
    hostile = [
        participants_fields({HONEST[0].public_hex: {H[i]: "math" for i in range(bounds.MAX_COMMITTED + 1)}}),
        participants_fields({HONEST[0].public_hex: {}}),
        participants_fields({HONEST[0].public_hex: {H[4]: "../x"}}),
        participants_fields({"alice": {H[4]: "math"}}),
        participants_fields({HONEST[0].public_hex: [H[4]]}),
        participants_fields(too_many),
    ]
    sixteen = {f"{i:064x}": {hashlib.sha256(b"%d/%d" % (i, j)).hexdigest(): "math" for j in range(bounds.MAX_COMMITTED)}
               for i in range(bounds.MAX_ROUND_DELTAS // bounds.MAX_COMMITTED + 1)}  # 65 entries, 1,040 deltas
    with pytest.raises(records.RecordError, match=f"at most {bounds.MAX_ROUND_DELTAS} deltas"):
        records.make_record(PROPOSER, "record/participants", participants_fields(sixteen))
    for bad in hostile:
        with pytest.raises(records.RecordError):
            records.make_record(PROPOSER, "record/participants", bad)
        value = canonical_json(sign_manifest(PROPOSER, "record/participants", bad))
        assert not records.is_valid_signed_value(subkey, value, now=NOW)


def test_signed_mutations_of_the_new_record_kinds_are_refused_or_still_valid():
    rng = random.Random(2020)
    base = {"record/charter": (charters_key(cid(GENESIS)), charter_fields(GENESIS, issued_at=NOW, expires_at=NOW + 300)),
            "record/participants": (round_key(H[3]), participants_fields({HONEST[0].public_hex: {H[4]: "math"}}))}
    refused = 0
    for i in range(600):
        kind = rng.choice(sorted(base))
        key, fields = base[kind]
        mutated, what, must_refuse = mutate(fields, rng)
        try:
            value = canonical_json(sign_manifest(OUTSIDER, kind, mutated))
            subkey = records.expected_subkey(kind, OUTSIDER.public_hex, mutated)
        except (ValueError, TypeError):
            continue
        opened = check(key, subkey, value)
        assert not (opened and must_refuse), f"seed 2020, mutation {i} of {kind}: {what} was accepted"
        refused += not opened
    assert refused > 400


# -- round rules ------------------------------------------------------------------------------

def test_roles_decide_who_may_do_what():
    doc = GENESIS["charter"]
    assert may_propose(doc, PROPOSER.public_hex) and not may_propose(doc, HONEST[0].public_hex)
    assert may_attest(GENESIS, HONEST[0].public_hex) and not may_attest(doc, CONTRIBUTOR.public_hex)
    assert may_contribute(doc, CONTRIBUTOR.public_hex) and not may_contribute(doc, OUTSIDER.public_hex)
    assert ignored_reason(doc, "record/attestation", SYBILS[0].public_hex) == "not on the roster"
    assert ignored_reason(doc, "record/attestation", CONTRIBUTOR.public_hex) == "wrong role (needs attester)"
    assert ignored_reason(doc, "record/proposal", HONEST[0].public_hex) == "wrong role (needs proposer)"
    assert ignored_reason(doc, "record/participants", OUTSIDER.public_hex) == "not on the roster"
    assert ignored_reason(doc, "record/commitment", PROPOSER.public_hex) == "wrong role (needs contributor)"
    assert ignored_reason(doc, "record/attestation", HONEST[1].public_hex) is None
    assert ignored_reason(doc, "record/expert", OUTSIDER.public_hex) is None  # anyone may publish an expert
    opened = genesis_doc(open_contribution=True)["charter"]
    assert may_contribute(opened, OUTSIDER.public_hex) and ignored_reason(opened, "record/commitment", OUTSIDER.public_hex) is None
    assert not may_attest(opened, OUTSIDER.public_hex) and not may_propose(opened, OUTSIDER.public_hex)


def proposal(**changes) -> dict:
    fields = {"base_id": BASE, "recipe": {"merge_method": "ties", "fetch_window": 60.0}, "select": {"domains": ["math"]},
              "deadline": NOW + 60, "quorum": 0.01, "proposer": PROPOSER.public_hex}
    fields.update(changes)
    fields["round_id"] = rounds.round_id(fields)
    return {**fields, "issued_at": NOW, "expires_at": NOW + 3600}


def test_a_proposal_keeps_to_the_charters_policy():
    doc = genesis_doc(max_deadline=120.0, min_deadline=5.0, max_fetch_window=90.0, max_deltas=2, max_popsize=8,
                      max_fusion_steps=50)["charter"]
    check_proposal_against(doc, proposal())  # its quorum of 0.01 is not read: the charter's applies
    check_proposal_against(doc, proposal() | {"publisher": PROPOSER.public_hex})
    search = {"generations": 2, "popsize": 8, "blocks": 2}
    check_proposal_against(doc, proposal(search=search))
    fusion_block = {"steps": 50, "fuser": HONEST[0].public_hex}
    check_proposal_against(doc, proposal(recipe={"merge_method": "linear", "fusion": fusion_block}))
    refused = {
        "not on the roster": proposal(proposer=OUTSIDER.public_hex),
        "names proposer .* but is signed by": proposal() | {"publisher": OUTSIDER.public_hex},
        "wrong role (needs proposer)": proposal(proposer=HONEST[0].public_hex),
        "not a base of network 'testnet'": proposal(base_id=H[9]),
        "'slerp' is not allowed": proposal(recipe={"merge_method": "slerp"}),
        "deadline: 121 s": proposal(deadline=NOW + 121),
        "deadline: 4 s": proposal(deadline=NOW + 4),
        "fetch_window: 90.5": proposal(recipe={"merge_method": "ties", "fetch_window": 90.5}),
        "fetch_window: None": proposal(recipe={"merge_method": "ties", "fetch_window": None}),
        "select names 3 deltas": proposal(select={"deltas": H[1:4]}),
        "search.popsize: 9": proposal(search={**search, "popsize": 9}),
        "fusion.steps: 51": proposal(recipe={"merge_method": "linear", "fusion": {**fusion_block, "steps": 51}}),
        "may not contribute": proposal(recipe={"merge_method": "linear", "fusion": {**fusion_block, "fuser": OUTSIDER.public_hex}}),
    }
    for reason, bad in refused.items():
        with pytest.raises(PolicyError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            check_proposal_against(doc, bad)
    narrow = genesis_doc(max_fetch_window=30.0)["charter"]
    with pytest.raises(PolicyError, match="fetch_window: 60.0"):  # an unstated window is the 60 s default
        check_proposal_against(narrow, proposal(recipe={"merge_method": "ties"}))


def attest(*identities: Identity, result: str) -> dict[str, dict]:
    return {i.public_hex: {"result_id": result, "round_id": H[3]} for i in identities}


GOOD, EVIL = H[30], H[1]  # EVIL has the lower id: no tie-break by id may favour it


def test_sybil_attesters_off_the_roster_count_for_nothing():
    votes = {**attest(*SYBILS, result=EVIL), **attest(*HONEST, result=GOOD)}
    assert final_result_under(GENESIS, votes) == (GOOD, sorted(h.public_hex for h in HONEST))
    sybils_only = {**attest(*SYBILS, result=EVIL), **attest(CONTRIBUTOR, PROPOSER, OUTSIDER, result=EVIL)}
    assert final_result_under(GENESIS, sybils_only) == (None, [])
    assert final_result_under(GENESIS, {**sybils_only, **attest(HONEST[0], result=EVIL)}) == (None, [])


def test_a_roster_attester_signing_a_wrong_id_alone_does_not_make_it_final():
    assert needed_attestations(GENESIS) == 2  # 2/3 of 3 attesters
    assert final_result_under(GENESIS, attest(HONEST[0], result=EVIL)) == (None, [])
    assert final_result_under(GENESIS, {**attest(HONEST[0], result=EVIL), **attest(HONEST[1], result=GOOD)}) == (None, [])
    wrong_one = {**attest(HONEST[0], result=EVIL), **attest(HONEST[1], HONEST[2], result=GOOD)}
    assert final_result_under(GENESIS, wrong_one) == (GOOD, sorted([HONEST[1].public_hex, HONEST[2].public_hex]))


def test_exactly_the_threshold_is_final_and_one_less_is_not():
    strict = signed(genesis_doc(min_attesters=3), M[0], M[1])
    assert needed_attestations(strict) == 3
    assert final_result_under(strict, attest(*HONEST[:2], result=GOOD)) == (None, [])
    assert final_result_under(strict, attest(*HONEST, result=GOOD))[0] == GOOD
    seven = {hashlib.sha256(b"a%d" % i).hexdigest(): ["attester"] for i in range(7)}
    doc = genesis_doc(roster=seven, quorum=0.7)["charter"]  # 0.7 x 7 = 4.9: 5 needed
    assert needed_attestations(doc) == 5
    keys = sorted(seven)
    assert final_result_under(doc, {k: {"result_id": GOOD} for k in keys[:4]}) == (None, [])
    assert final_result_under(doc, {k: {"result_id": GOOD} for k in keys[:5]}) == (GOOD, keys[:5])


def test_an_even_split_is_final_for_neither_result():
    four = {hashlib.sha256(b"f%d" % i).hexdigest(): ["attester"] for i in range(4)}
    keys = sorted(four)
    for quorum in (2 / 3, 0.5000000001):  # the second: ceil(q x 4) would be 2 without the majority floor
        doc = genesis_doc(roster=four, quorum=quorum)["charter"]
        assert needed_attestations(doc) == 3
        for first, second in ((GOOD, EVIL), (EVIL, GOOD)):
            split = {keys[0]: {"result_id": first}, keys[1]: {"result_id": first},
                     keys[2]: {"result_id": second}, keys[3]: {"result_id": second}}
            assert final_result_under(doc, split) == (None, [])
            assert final_result_under(doc, dict(reversed(split.items()))) == (None, [])


def test_a_removed_attester_stops_counting_from_the_version_that_removed_it():
    v1 = signed(propose_change(GENESIS, remove=[HONEST[2].public_hex]), M[0], M[1])
    votes = {**attest(HONEST[2], result=EVIL), **attest(HONEST[0], result=EVIL), **attest(HONEST[1], result=GOOD)}
    assert final_result_under(GENESIS, votes)[0] == EVIL
    assert final_result_under(follow(GENESIS, [v1]), votes) == (None, [])  # 1 of 2 attesters each: no quorum


# -- the participant set -------------------------------------------------------------------

ROUND_PROPOSAL = proposal()
DEADLINE = ROUND_PROPOSAL["deadline"]


def commitment(identity: Identity, deltas: dict[str, str], issued_at: float, round_id: str | None = None) -> dict:
    """A commitment as a node reads it: signed by ``identity``, opened from the DHT."""
    fields = {"round_id": round_id or ROUND_PROPOSAL["round_id"], "delta_ids": sorted(deltas), "domains": deltas,
              "peer_id": PEER, "maddrs": [], "issued_at": issued_at, "expires_at": issued_at + 3600}
    return records.open_record(round_key(fields["round_id"]), f"{identity.public_hex}/commit",
                               records.make_record(identity, "record/commitment", fields), now=issued_at)


def participant_list(fields: dict, by: Identity = PROPOSER) -> dict:
    fields = {**fields, "expires_at": fields["issued_at"] + 3600}
    return records.open_record(round_key(fields["round_id"]), f"{by.public_hex}/participants",
                               records.make_record(by, "record/participants", fields), now=fields["issued_at"])


def test_only_listed_on_time_commitments_of_contributors_enter_the_merge():
    on_time = commitment(HONEST[0], {H[10]: "math"}, DEADLINE - 5)
    unlisted = commitment(HONEST[1], {H[11]: "math"}, DEADLINE - 1)
    late = commitment(HONEST[2], {H[12]: "math"}, DEADLINE + 0.001)
    stranger = commitment(OUTSIDER, {H[13]: "math"}, DEADLINE - 5)
    replaced = commitment(CONTRIBUTOR, {H[14]: "code"}, DEADLINE - 2)  # the proposer listed it as math
    seen = {c["publisher"]: c for c in (on_time, unlisted, late, stranger, replaced)}
    # A hostile proposer lists the late and the stranger's commitments too.
    hostile = participant_list({"round_id": ROUND_PROPOSAL["round_id"], "issued_at": DEADLINE + 2, "participants": {
        HONEST[0].public_hex: {H[10]: "math"}, HONEST[2].public_hex: {H[12]: "math"}, OUTSIDER.public_hex: {H[13]: "math"},
        CONTRIBUTOR.public_hex: {H[14]: "math"}, SYBILS[0].public_hex: {H[15]: "math"}}})
    assert list(accepted_commitments(GENESIS, ROUND_PROPOSAL, seen, hostile)) == [HONEST[0].public_hex]
    assert commitment_verdicts(GENESIS, ROUND_PROPOSAL, seen, hostile) == {
        HONEST[0].public_hex: None,
        HONEST[1].public_hex: "not in the proposer's participant list",
        HONEST[2].public_hex: "late: signed after the deadline",
        OUTSIDER.public_hex: "not on the roster",
        CONTRIBUTOR.public_hex: "its commitment differs from the one the proposer listed",
        SYBILS[0].public_hex: "listed by the proposer, but its commitment is not seen here",
    }
    # Under open contribution the stranger's listed, on-time commitment enters.
    opened = genesis_doc(open_contribution=True)
    assert sorted(accepted_commitments(opened, ROUND_PROPOSAL, seen, hostile)) == sorted([HONEST[0].public_hex, OUTSIDER.public_hex])


def test_the_proposers_list_is_what_everyone_merges():
    on_time = [commitment(h, {H[20 + i]: "math"}, DEADLINE - 3 + i) for i, h in enumerate(HONEST)]
    late = commitment(CONTRIBUTOR, {H[25]: "math"}, DEADLINE + 1)
    stranger = commitment(OUTSIDER, {H[26]: "math"}, DEADLINE - 10)
    other_round = commitment(SYBILS[0], {H[27]: "math"}, DEADLINE - 10, round_id=H[2])
    seen = {c["publisher"]: c for c in (*on_time, late, stranger, other_round)}
    with pytest.raises(PolicyError, match="after its deadline"):
        participants_record_fields(GENESIS, ROUND_PROPOSAL, seen, now=DEADLINE - 0.5)
    fields = participants_record_fields(GENESIS, ROUND_PROPOSAL, seen, now=DEADLINE + 1.5)
    assert fields["participants"] == {h.public_hex: {H[20 + i]: "math"} for i, h in enumerate(HONEST)}
    listed = participant_list(fields)
    expected = sorted(h.public_hex for h in HONEST)
    # An attester that also saw only two of them, or more records, merges the list's intersection with what it sees.
    assert sorted(accepted_commitments(GENESIS, ROUND_PROPOSAL, seen, listed)) == expected
    two = {k: seen[k] for k in expected[:2]}
    assert sorted(accepted_commitments(GENESIS, ROUND_PROPOSAL, two, listed)) == expected[:2]
    # No list, a list by someone else, an early list, one over the charter's size: nothing is merged.
    forged = participant_list(fields, by=HONEST[0])
    early = participant_list({**fields, "issued_at": DEADLINE - 0.001})
    small = genesis_doc(max_deltas=2)
    for charter, found, reason in ((GENESIS, None, "no participant list from the proposer"),
                                   (GENESIS, forged, "the participant list is not the round proposer's"),
                                   (GENESIS, early, "the participant list was signed before the deadline"),
                                   (small, listed, "the participant list names 3 deltas, more than the charter's 2")):
        assert accepted_commitments(charter, ROUND_PROPOSAL, seen, found) == {}
        assert commitment_verdicts(charter, ROUND_PROPOSAL, seen, found)[expected[0]] == reason


def test_the_proposers_list_keeps_to_the_charter_and_one_record():
    crowd = {}
    for i in range(200):  # more on-time commitments than one record holds
        identity = Identity.generate()
        crowd[identity.public_hex] = commitment(identity, {hashlib.sha256(b"d%d" % i).hexdigest(): "math"}, DEADLINE - 30 + i / 10)
    member = commitment(HONEST[0], {H[30]: "math", H[31]: "code"}, DEADLINE - 0.1)  # the latest, but on the roster
    crowd[HONEST[0].public_hex] = member
    opened = genesis_doc(open_contribution=True)
    fields = participants_record_fields(opened, ROUND_PROPOSAL, crowd, now=DEADLINE + 1)
    value = records.make_record(PROPOSER, "record/participants", {**fields, "expires_at": DEADLINE + 3601})
    assert len(value) <= bounds.MAX_RECORD_BYTES and 40 <= len(fields["participants"]) < 200
    assert fields["participants"][HONEST[0].public_hex] == member["domains"]  # roster contributors first
    earliest = sorted(crowd.values(), key=lambda c: c["issued_at"])[:len(fields["participants"]) - 1]
    assert set(fields["participants"]) == {HONEST[0].public_hex, *(c["publisher"] for c in earliest)}
    capped = participants_record_fields(genesis_doc(open_contribution=True, max_deltas=3), ROUND_PROPOSAL, crowd, now=DEADLINE + 1)
    assert sum(map(len, capped["participants"].values())) == 3
