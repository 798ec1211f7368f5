"""Fuzzing the record validators (issue 18): thousands of mutations of valid records of
every kind, signed correctly by the attacker's own key, and byte-level damage to signed
values. Nothing escapes but a refusal, and nothing that breaks a field's type, a count's
range or the exact key set is accepted.

Seeded: a failure names its seed and mutation, and reruns the same way.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time

from hivemind.dht.crypto import DHTRecord
from hivemind.utils import MSGPackSerializer

from hivemerge.node.net.network import SignedRecordValidator
from hivemerge.protocol import fusion, records, rounds, search
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import sign_manifest

MALLORY = Identity.generate()
H = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(8)]
PEER = "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua"
NOW = time.time()
SIGNED = {"issued_at": NOW - 10, "expires_at": NOW + 300}
CONTACT = {"peer_id": PEER, "maddrs": ["/ip4/127.0.0.1/tcp/4001"]}


def valid_records() -> dict[str, tuple[str, dict]]:
    """kind -> (DHT key, fields) of one valid record each."""
    proposal = {"base_id": H[0], "recipe": {"merge_method": "ties", "parameters": {"density": [0.2, 0.8]},
                                            "domain_parameters": {"math": {"weight": [{"filter": "mlp", "value": 0.5}]}},
                                            "fetch_window": 60.0},
                "select": {"domains": ["math", "code"]}, "deadline": NOW + 60, "quorum": 0.5, "proposer": MALLORY.public_hex}
    proposal["round_id"] = rounds.round_id(proposal)
    settings = search.check_settings({"generations": 2, "popsize": 4, "blocks": 2})
    search_proposal = {**{k: v for k, v in proposal.items() if k != "round_id"}, "search": settings}
    search_proposal["round_id"] = search.search_id(search_proposal)
    block = fusion.check_fusion_block({"packs": {"ids": [H[5]]}, "probe": H[6], "fuser": MALLORY.public_hex}, resolved=True)
    fused = {**proposal, "recipe": {"merge_method": "linear", "fusion": block}}
    fused["round_id"] = rounds.round_id(fused)
    rk = rounds.round_key(H[1])
    return {
        "record/expert": (records.EXPERTS_KEY, {"domain": "math", "base_id": H[0], "architecture": H[2], "expert_id": H[3],
                                                "delta_id": H[4], "bundle_id": H[5], "codecs": {"ternary": 4}, "size": 5000,
                                                **CONTACT, **SIGNED}),
        "record/provider": (records.providers_key(H[4]), {"content": H[4], "bundle_id": H[5], **CONTACT, **SIGNED}),
        "record/proposal": (rounds.rounds_key(H[0]), {**proposal, **SIGNED}),
        "record/proposal+fusion": (rounds.rounds_key(H[0]), {**fused, **SIGNED}),
        "record/search": (search.searches_key(H[0]), {**search_proposal, **SIGNED}),
        "record/commitment": (rk, {"round_id": H[1], "delta_ids": sorted([H[2], H[3]]), "domains": {H[2]: "math", H[3]: "code"},
                                   **CONTACT, **SIGNED}),
        "record/attestation": (rk, {"round_id": H[1], "result_id": H[4], "bundle_id": H[5], "included": [H[2]],
                                    "excluded": {H[3]: "norm outlier"}, **CONTACT, **SIGNED}),
        "record/candidates": (rk, {"round_id": H[1], "generation": 1, "candidate_ids": [H[2], H[3]], **SIGNED}),
        "record/scores": (rk, {"round_id": H[1], "generation": 1, "candidate_ids": [H[2], H[3]], "scores": [0.5, 1.0],
                               "examples": 10, **SIGNED}),
        "record/tally": (rk, {"round_id": H[1], "generation": 1, "candidate_ids": [H[2]], "scorers": [MALLORY.public_hex],
                              **SIGNED}),
        "record/pack": (records.PACKS_KEY, {"domain": "rot", "pack_id": H[2], "probe_id": H[3], "model_id": H[4], "top_k": 8,
                                            "bundle_id": H[5], "probe_bundle_id": H[6], "size": 100, **CONTACT, **SIGNED}),
        "record/fusion": (rk, {"round_id": H[1], "delta_id": H[2], "packs": [H[3]], "probe_id": H[4], "replay_id": None,
                               "before": {"lm": 3.0, "fused": 2.5}, "after": {"lm": 2.0, "fused": 1.5}, **CONTACT, **SIGNED}),
    }


def category(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


HOSTILE = [None, True, False, -1, 0, 2**70, -1e308, 1e308, 0.5, "", "x", "../../etc/passwd", "/abs", "A" * 64, "a" * 63,
           [], {}, [None], {"a": 1}, [[[[[]]]]], {"": {"": {"": {}}}}, ["x"] * 40, list(range(300)), "é" * 64, "\x00",
           H[7], [H[7]], {H[7]: "x"}]


FIXED_NESTED = {"select", "domains", "codecs", "before", "after", "excluded", "delta_ids", "candidate_ids", "scores",
                "scorers", "included", "packs", "maddrs", "search"}


def paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indexes)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def mutate(fields: dict, rng: random.Random) -> tuple[dict, str, bool]:
    """(mutated fields, what was done, whether the result must be refused)."""
    out = copy.deepcopy(fields)
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "nested"])
    top = rng.choice(sorted(out))
    if op == "delete":
        del out[top]
        return out, f"delete {top}", True
    if op == "add":
        out[rng.choice(["extra", "publisher", "kind", "Issued_at"])] = rng.choice(HOSTILE)
        return out, "add a key", True
    if op == "replace":
        new = rng.choice(HOSTILE)
        must_refuse = category(new) != category(fields[top]) and not (top == "replay_id" and new is None or
                                                                      top == "replay_id" and isinstance(new, str))
        if top in ("size", "top_k", "examples", "generation") and isinstance(new, (int, float)) and not isinstance(new, bool) \
                and (new < 0 or new != int(new) or new > 2**50):
            must_refuse = True  # counts are non-negative integers within bounds
        if top.endswith("_id") and isinstance(new, str) and new != H[7] and top != "peer_id":
            must_refuse = True  # content ids are exactly 64 lowercase hex digits
        out[top] = new
        return out, f"replace {top} by {new!r:.40}", must_refuse
    # nested: replace something deep inside (recipe, select, domains, figures, lists)
    where = [p for p in paths(out) if len(p) >= 2]
    if not where:
        return out, "nothing nested", False
    path = rng.choice(where)
    parent, original = out, fields
    for part in path[:-1]:
        parent, original = parent[part], original[part]
    new = rng.choice(HOSTILE)
    parent[path[-1]] = new
    # Below these fields every value has one JSON type (ids and domains are strings, counts
    # and figures numbers): another type must be refused. (Recipes take unions: no oracle.)
    typed = path[0] in FIXED_NESTED and category(new) != category(original[path[-1]])
    return out, f"nested {path} = {new!r:.40}", typed


def subkey_for(kind: str, fields: dict, fallback: dict) -> str:
    try:
        return records.expected_subkey(kind, MALLORY.public_hex, fields)
    except Exception:
        return records.expected_subkey(kind, MALLORY.public_hex, fallback)


def hand_signed(kind: str, fields: dict) -> bytes | None:
    try:
        return canonical_json(sign_manifest(MALLORY, kind, fields))
    except (ValueError, TypeError):  # not canonical JSON at all (NaN): the byte fuzz covers such values
        return None


def check(key: str, subkey, value, expiration=None) -> bool:
    """The verdicts of the DHT validator and of open_record agree and neither raises anything but a refusal."""
    valid = records.is_valid_signed_value(subkey, value, expiration)
    assert isinstance(valid, bool)
    try:
        records.open_record(key, subkey, value)
        opened = True
    except UserInputError:
        opened = False
    assert not opened or valid  # whatever open_record accepts, the validator accepts
    return opened


def test_every_valid_record_is_accepted():
    for name, (key, fields) in valid_records().items():
        kind = name.split("+")[0]
        assert check(key, subkey_for(kind, fields, fields), hand_signed(kind, fields)), name


def test_thousands_of_signed_mutations_are_refused_or_still_valid():
    rng = random.Random(18)
    base = valid_records()
    counts = {"refused": 0, "accepted": 0}
    for i in range(4000):
        name = rng.choice(sorted(base))
        kind = name.split("+")[0]
        key, fields = base[name]
        mutated, what, must_refuse = mutate(fields, rng)
        value = hand_signed(kind, mutated)
        if value is None:
            continue
        opened = check(key, subkey_for(kind, mutated, fields), value)
        assert not (opened and must_refuse), f"seed 18, mutation {i} of {name}: {what} was accepted"
        counts["accepted" if opened else "refused"] += 1
    assert counts["refused"] > 3000  # the mutations mostly break a rule; the few that do not stay valid records


def test_damaged_bytes_of_signed_records_are_always_refused():
    rng = random.Random(1018)
    base = valid_records()
    for i in range(3000):
        name = rng.choice(sorted(base))
        kind = name.split("+")[0]
        key, fields = base[name]
        value = bytearray(hand_signed(kind, fields))
        subkey = subkey_for(kind, fields, fields)
        damage = rng.choice(["flip", "cut", "insert", "splice"])
        if damage == "flip":
            value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        elif damage == "cut":
            del value[rng.randrange(len(value)):]
        elif damage == "insert":
            value[rng.randrange(len(value)):rng.randrange(len(value))] = rng.choice([b"NaN", b"[" * 2000, b"\xff", b" ", b"1e999"])
        else:
            start = rng.randrange(len(value))
            value[start:start + 8] = bytes(rng.randrange(256) for _ in range(8))
        if bytes(value) == hand_signed(kind, fields):
            continue
        assert not check(key, subkey, bytes(value)), f"seed 1018, damage {i} ({damage}) of {name} was accepted"


def test_the_dht_validator_never_raises_on_arbitrary_stores():
    rng = random.Random(9)
    validator = SignedRecordValidator()
    key, fields = valid_records()["record/expert"]
    good = hand_signed("record/expert", fields)
    subkey = subkey_for("record/expert", fields, fields)
    junk = [b"", b"\xc1", MSGPackSerializer.dumps(None), MSGPackSerializer.dumps([good]), MSGPackSerializer.dumps({1: 2}),
            MSGPackSerializer.dumps("x" * 9000), MSGPackSerializer.dumps(good), MSGPackSerializer.dumps(subkey)]
    for _ in range(2000):
        record = DHTRecord(key=rng.randbytes(20), subkey=rng.choice(junk + [rng.randbytes(rng.randrange(40))]),
                           value=rng.choice(junk + [rng.randbytes(rng.randrange(200))]),
                           expiration_time=rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e300, NOW + 100]))
        assert validator.validate(record) in (True, False)
    accepted = DHTRecord(key=b"k", subkey=MSGPackSerializer.dumps(subkey), value=MSGPackSerializer.dumps(good),
                         expiration_time=fields["expires_at"])
    assert validator.validate(accepted) is True
    later = DHTRecord(key=b"k", subkey=accepted.subkey, value=accepted.value, expiration_time=fields["expires_at"] + 1)
    assert validator.validate(later) is False  # kept alive past its signed expiry
