"""Hostile records (issue 18, findings 2, 8, 9 and 10): what a stranger with a free key
can sign, and what it must not reach.

Every hostile record here is signed correctly by the test's own key (by hand, past
make_record's checks), so only the schema, the bounds and the storage rules stand in its
way. Outcomes: the DHT validator refuses it and never raises, every reader refuses it,
one bad record or round never stops a coordinator's tick, what a proposal can make a node
fetch, compute and store is bounded, and an owner's newer record always wins.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer

from hivemerge.merge.deltas.delta import DeltaError
from hivemerge.node.coordinators.merge_rounds import RoundCoordinator
from hivemerge.node.net.dht_storage import BoundedRecordStorage
from hivemerge.protocol import bounds, fusion, records, rounds, search
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.records import EXPERTS_KEY, RecordError, is_valid_signed_value, make_record, open_record
from hivemerge.protocol.rounds import proposal_from_recipe
from hivemerge.protocol.signing import sign_manifest

MALLORY, ALICE = Identity.generate(), Identity.generate()
ROUND, BASE, DELTA, OTHER, BUNDLE = (hashlib.sha256(n.encode()).hexdigest() for n in ("r", "b", "d", "o", "u"))
PEER = "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua"
NOW = 1700000000.0


def hand_signed(identity: Identity, kind: str, fields: dict) -> bytes:
    """A record signed correctly by ``identity`` whatever its fields (make_record would refuse)."""
    return canonical_json(sign_manifest(identity, kind, fields))


def proposal_fields(**changes) -> dict:
    proposal = {"base_id": BASE, "recipe": {"merge_method": "linear"}, "select": {"domains": ["math"]},
                "deadline": NOW + 60, "quorum": 0.5, "proposer": MALLORY.public_hex}
    proposal.update(changes)
    proposal["round_id"] = rounds.round_id(proposal)
    return {**proposal, "issued_at": NOW, "expires_at": NOW + 3600}


def commitment_fields(**changes) -> dict:
    fields = {"round_id": ROUND, "delta_ids": [DELTA], "domains": {DELTA: "math"}, "peer_id": PEER, "maddrs": [],
              "issued_at": NOW, "expires_at": NOW + 300}
    fields.update(changes)
    return fields


def expert_fields(delta_id: str = DELTA, **changes) -> dict:
    fields = {"domain": "math", "base_id": BASE, "architecture": BASE, "expert_id": OTHER, "delta_id": delta_id,
              "bundle_id": BUNDLE, "codecs": {"ternary": 4}, "size": 5335, "peer_id": PEER, "maddrs": [],
              "issued_at": NOW, "expires_at": NOW + 300}
    fields.update(changes)
    return fields


def refused(key: str, subkey: str, value: bytes) -> str:
    assert is_valid_signed_value(subkey, value, now=NOW) is False
    with pytest.raises(RecordError) as info:
        open_record(key, subkey, value, now=NOW)
    return str(info.value)


# -- finding 2: exact nested schemas --------------------------------------------------------

def test_the_proposal_that_halted_every_round_tick_is_refused():
    fields = proposal_fields(select={"deltas": 5})  # rounds.matches raised TypeError on it at every node
    value = hand_signed(MALLORY, "record/proposal", fields)
    assert "select" in refused(rounds.rounds_key(BASE), f"{MALLORY.public_hex}/{fields['round_id']}", value)


@pytest.mark.parametrize("changes, field", [
    ({"domains": {DELTA: 5}}, "domains"),  # made every participant's execute fail
    ({"domains": {}}, "domains name exactly them"),
    ({"domains": {DELTA: "math", OTHER: "code"}}, "domains name exactly them"),
    ({"delta_ids": [OTHER, DELTA], "domains": {DELTA: "m", OTHER: "c"}}, "sorted"),
    ({"delta_ids": [DELTA, DELTA]}, "sorted"),
    ({"delta_ids": []}, "delta_ids"),
    ({"delta_ids": sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(bounds.MAX_COMMITTED + 1))}, "delta_ids"),
    ({"domains": {DELTA: "../etc"}}, "domains"),
    ({"maddrs": ["x" * 10]}, "maddrs"),
    ({"peer_id": "QmPeer"}, "peer_id"),
    ({"issued_at": float("inf")}, "not JSON"),
])
def test_malformed_commitments_are_refused(changes, field):
    fields = commitment_fields(**changes)
    try:
        value = hand_signed(MALLORY, "record/commitment", fields)
    except ValueError:  # canonical JSON has no infinity: the attacker writes the bytes by hand
        value = json.dumps(sign_manifest(MALLORY, "record/commitment", {**fields, "issued_at": 1.5}), sort_keys=True,
                           separators=(",", ":")).replace('"issued_at":1.5', '"issued_at":Infinity').encode()
    assert field in refused(rounds.round_key(ROUND), f"{MALLORY.public_hex}/commit", value)


@pytest.mark.parametrize("changes, field", [
    ({"deadline": NOW + bounds.MAX_DEADLINE_SECONDS + 1}, "deadline"),
    ({"quorum": 0.0}, "quorum"), ({"quorum": 1.5}, "quorum"), ({"quorum": True}, "quorum"),
    ({"recipe": {"merge_method": "linear", "fetch_window": 1e9}}, "fetch_window"),
    ({"recipe": {"merge_method": "linear", "fetch_window": "60"}}, "fetch_window"),
    ({"recipe": {"merge_method": "linear", "evil": 1}}, "evil"),
    ({"recipe": {"merge_method": "../x"}}, "merge_method"),
    ({"recipe": {"merge_method": "linear", "parameters": {"weight": {"a": 1}}}}, "parameters"),
    ({"recipe": {"merge_method": "linear", "parameters": {"weight": [0.5] * (bounds.MAX_LAYERS + 1)}}}, "parameters"),
    ({"recipe": {"merge_method": "linear", "domain_parameters": {"math": {"weight": "1"}}}}, "domain_parameters"),
    ({"select": {"domains": ["math"], "deltas": [DELTA]}}, "either domains or deltas"),
    ({"select": {}}, "either domains or deltas"),
    ({"select": {"domains": []}}, "select"),
])
def test_values_a_proposer_chooses_are_range_checked_by_every_reader(changes, field):
    fields = proposal_fields(**changes)
    value = hand_signed(MALLORY, "record/proposal", fields)
    assert field in refused(rounds.rounds_key(BASE), f"{MALLORY.public_hex}/{fields['round_id']}", value)


def test_fusion_and_search_sizes_past_the_protocol_bounds_are_refused():
    block = {"packs": {"ids": [DELTA]}, "probe": OTHER, "fuser": ALICE.public_hex}
    assert fusion.check_fusion_block({**block, "steps": 1000, "batch": 16}, resolved=True)["steps"] == 1000
    for sizes in ({"steps": 100_000, "batch": 16}, {"steps": 100, "batch": 4096}, {"steps": 10_000, "batch": 512}):
        with pytest.raises(UserInputError):  # the fuser would distil 1.6M to 5M examples
            fusion.check_fusion_block({**block, **sizes}, resolved=True)
    # hand-signed, the same block is refused by every reader of the proposal
    oversized = {**fusion.check_fusion_block(block, resolved=True), "steps": 100_000}
    fields = proposal_fields(recipe={"merge_method": "linear", "fusion": oversized})
    assert "fusion" in refused(rounds.rounds_key(BASE), f"{MALLORY.public_hex}/{fields['round_id']}",
                               hand_signed(MALLORY, "record/proposal", fields))
    assert search.check_settings({"generations": 16, "popsize": 64, "blocks": 2})["popsize"] == 64
    for settings in ({"generations": 100, "popsize": 64, "blocks": 2},  # 6400 merges asked of every owner
                     {"generations": 10, "popsize": 8, "blocks": 2, "generation_seconds": 86400.0}):
        with pytest.raises(UserInputError, match="search"):
            search.check_settings(settings)


def test_deep_nesting_and_nan_make_the_validator_say_no_not_raise():
    deep = b'{"kind":"record/expert","manifest":' + b"[" * 3000 + b"]" * 3000 + b',"signer":"x","signature":"y"}'
    nan = hand_signed(MALLORY, "record/expert", expert_fields(size=1)).replace(b'"size":1', b'"size":NaN')
    for value in (deep, nan, b"\xff\xfe", b'{"kind":[1]}', b'{"kind":{"a":1},"manifest":1,"signer":1,"signature":1}'):
        assert is_valid_signed_value(f"{MALLORY.public_hex}/{DELTA}", value) is False
        with pytest.raises(RecordError):
            open_record(EXPERTS_KEY, f"{MALLORY.public_hex}/{DELTA}", value)


# -- finding 2: one bad record or round never stops a tick ----------------------------------------

def stub_coordinator(tmp_path, published: list[dict], proposals_by_base: dict):
    logged, committed = [], []
    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, published=lambda: published, log=logged.append, keep_results=None,
                           identity=SimpleNamespace(public_hex=ALICE.public_hex))
    coordinator = RoundCoordinator(node, poll=0.01)

    async def proposals(base_id):
        answer = proposals_by_base[base_id]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def commit(proposal, state, domains):  # the lifecycle's commit (node/coordinators/base.py)
        committed.append((proposal["round_id"], domains))
        coordinator.save({"proposal": proposal, "phase": "committed", "committed": sorted(domains)})

    async def no_fusion(now):
        return None

    coordinator.proposals, coordinator.commit, coordinator.fusion.tick = proposals, commit, no_fusion
    return coordinator, logged, committed


def test_a_base_whose_records_break_the_tick_does_not_stop_the_others(tmp_path):
    bad_base, good_base = "1" * 64, "2" * 64
    published = [{"base_id": bad_base, "delta_id": DELTA, "domain": "math"},
                 {"base_id": good_base, "delta_id": OTHER, "domain": "math"}]
    good = {**proposal_fields(base_id=good_base, deadline=time.time() + 60), "issued_at": time.time()}
    coordinator, logged, committed = stub_coordinator(tmp_path, published, {bad_base: TypeError("bad record"), good_base: [good]})
    asyncio.run(coordinator.tick())
    assert committed == [(good["round_id"], {OTHER: "math"})]
    assert len(logged) == 1 and "TypeError: bad record" in logged[0] and bad_base[:12] in logged[0]


def test_a_damaged_round_state_does_not_stop_the_others(tmp_path):
    coordinator, logged, _ = stub_coordinator(tmp_path, [], {})
    started = []

    async def execute(rid):
        started.append(rid)

    coordinator.execute = execute
    coordinator.save({"proposal": {"round_id": "3" * 64}, "phase": "committed"})  # no deadline: advance raises
    coordinator.save({"proposal": {"round_id": "4" * 64, "deadline": time.time() - 1}, "phase": "committed"})
    asyncio.run(coordinator.tick())
    assert started == ["4" * 64]
    assert len(logged) == 1 and "KeyError" in logged[0] and ("3" * 12) in logged[0]


# -- finding 8: what a stranger's proposals can make a node do ------------------------------------

def test_a_node_joins_no_more_rounds_than_the_cap(tmp_path):
    base = "5" * 64
    published = [{"base_id": base, "delta_id": DELTA, "domain": "math"}]
    proposal = {**proposal_fields(base_id=base, deadline=time.time() + 60), "issued_at": time.time()}
    coordinator, logged, committed = stub_coordinator(tmp_path, published, {base: [proposal]})
    for i in range(bounds.MAX_ACTIVE_ROUNDS):  # rounds committed to, not yet merged
        coordinator.save({"proposal": {"round_id": f"{i}" * 64, "deadline": time.time() + 60}, "phase": "committed"})
    asyncio.run(coordinator.tick())
    assert committed == [] and "not joined" in logged[-1]
    coordinator.save({"proposal": {"round_id": "0" * 64, "deadline": time.time() - 60}, "phase": "attested"})
    asyncio.run(coordinator.tick())  # one of them done: room for the new round
    assert [rid for rid, _ in committed] == [proposal["round_id"]]


def test_a_node_scores_no_more_searches_and_distils_no_more_fusions_than_the_caps(tmp_path):
    from hivemerge.node.coordinators.search_rounds import SearchCoordinator

    base = "6" * 64
    published = [{"base_id": base, "delta_id": DELTA, "domain": "math"}]
    logged = []
    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, published=lambda: published, log=logged.append)
    searches = SearchCoordinator(node, poll=0.01)
    committed = []

    async def commit(proposal, state, domains):
        committed.append(proposal["round_id"])

    searches.commit = commit
    for i in range(bounds.MAX_ACTIVE_SEARCHES):
        searches.save({"proposal": {"round_id": f"{i}" * 64, "deadline": time.time() + 60}, "phase": "committed",
                       "roles": ["owner"]})
    proposal = {**proposal_fields(base_id=base, deadline=time.time() + 60), "search": {}}
    asyncio.run(searches.join(proposal, published, time.time()))
    assert committed == [] and "not joined" in logged[-1]

    (tmp_path / "f").mkdir()
    coordinator, logged, _ = stub_coordinator(tmp_path / "f", [], {})
    fusions = coordinator.fusion
    block = fusion.check_fusion_block({"packs": {"ids": [DELTA]}, "probe": OTHER, "fuser": ALICE.public_hex}, resolved=True)
    winner = {**proposal_fields(base_id=base, deadline=time.time() + 60, recipe={"merge_method": "linear", "fusion": block}),
              "issued_at": time.time()}

    async def proposals(base_id):
        return [winner]

    coordinator.proposals = proposals
    fusions._running = {"busy" * 16: None}
    asyncio.run(fusions._take_part(base, ALICE.public_hex, time.time()))
    assert list(fusions._running) == ["busy" * 16] and "not started" in logged[-1]


def test_a_rounds_deltas_are_fetched_side_by_side_under_one_window(tmp_path):
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)]
    slow, forged, fine = ids[:3], ids[3], ids[4]

    async def fetch_async(delta_id):
        if delta_id in slow:
            await asyncio.sleep(60)
        if delta_id == forged:
            raise DeltaError("the delta's signature does not verify")

    coordinator, _, _ = stub_coordinator(tmp_path, [], {})
    coordinator.node.fetch_async = fetch_async
    coordinator.node.store = SimpleNamespace(has=lambda delta_id: False)
    started = time.monotonic()
    excluded = asyncio.run(coordinator._fetch_all(ids, window=1.0))
    took = time.monotonic() - started
    assert took < 2.5  # one window for all, not one per slow delta (one by one: 3 windows)
    assert set(excluded) == {*slow, forged} and fine not in excluded
    assert all("not fetched within the round's fetch window of 1 s" in excluded[d] for d in slow)
    assert excluded[forged].startswith("failed verification")


def test_a_delta_stored_before_the_window_ends_is_not_excluded(tmp_path):
    """fetch_async stores the delta, then announces it: a window that ends during the
    announcement must not exclude a delta this node holds (others would include it)."""
    stored = set()

    async def fetch_async(delta_id):
        stored.add(delta_id)
        await asyncio.sleep(60)  # announcing what it fetched, slowly

    coordinator, _, _ = stub_coordinator(tmp_path, [], {})
    coordinator.node.fetch_async = fetch_async
    coordinator.node.store = SimpleNamespace(has=lambda delta_id: delta_id in stored)
    assert asyncio.run(coordinator._fetch_all([DELTA], window=0.5)) == {}


def test_an_attestation_fits_one_record_however_many_deltas_strangers_commit():
    """Three free keys commit 16 made-up delta ids each: every honest participant excludes
    them as unavailable with a long reason. The attestation must still be a record."""
    fake = ids(48, "fake")
    excluded = {d: f"unavailable: FetchError: hm://{d}: no provider found on the network" for d in fake}
    included = ids(20, "real")
    fields = {"round_id": ROUND, "result_id": BASE, "bundle_id": BUNDLE, "included": sorted(included), "excluded": {},
              "peer_id": PEER, "maddrs": ["/ip4/127.0.0.1/tcp/4001"] * 4, "issued_at": NOW}
    with pytest.raises(RecordError, match="exceeds"):
        make_record(ALICE, "record/attestation", {**fields, "excluded": excluded, "expires_at": NOW + 60})
    fitted = records.fitting_reasons(excluded, fields)
    value = make_record(ALICE, "record/attestation", {**fields, "excluded": fitted, "expires_at": NOW + 60})
    assert len(value) <= bounds.MAX_RECORD_BYTES
    assert fitted == {d: "unavailable" for d in excluded}  # each reduced to its kind
    many = {d: f"unavailable: FetchError: hm://{d}: no provider" for d in ids(120, "more")}
    cut = records.fitting_reasons(many, fields)
    assert 0 < len(cut) < len(many) and list(cut) == sorted(many)[:len(cut)]  # the same first ones at every node
    assert len(make_record(ALICE, "record/attestation", {**fields, "excluded": cut, "expires_at": NOW + 60})) \
        <= bounds.MAX_RECORD_BYTES
    few = dict(list(excluded.items())[:3])
    assert records.fitting_reasons(few, fields) == few  # whole while they fit


def test_a_stranger_committing_someone_elses_delta_cannot_get_it_excluded(tmp_path):
    from delta_fixtures import tiny_pair

    from hivemerge.merge.deltas.delta import extract_delta
    from hivemerge.merge.deltas.screening import screen_delta
    from hivemerge.merge.io.sources import SafetensorsModel

    base, expert = tiny_pair(tmp_path)
    delta = extract_delta(base, expert, tmp_path / "x.delta.safetensors", ALICE, "lossless").path
    # MALLORY's key sorts first in this test or not: either way ALICE, who signed it, committed it too
    norm = screen_delta(delta, SafetensorsModel(base), {MALLORY.public_hex, ALICE.public_hex})
    assert norm > 0
    with pytest.raises(UserInputError, match="not by the participant"):
        screen_delta(delta, SafetensorsModel(base), {MALLORY.public_hex})


def test_proposal_from_recipe_refuses_sizes_past_the_bounds():
    base = {"merge_method": "linear", "select": {"domains": ["math"]}}
    for changes, message in (({"deadline": bounds.MAX_DEADLINE_SECONDS + 1}, "deadline"),
                             ({"fetch_window": bounds.MAX_FETCH_WINDOW + 1}, "fetch_window"),
                             ({"fetch_window": float("nan")}, "fetch_window"), ({"quorum": float("nan")}, "quorum")):
        with pytest.raises(UserInputError, match=message):
            proposal_from_recipe({**base, **changes}, BASE, ALICE.public_hex, time.time())


# -- findings 9 and 10: the DHT storage a node keeps for others --------------------------------------

def stored_value(identity: Identity, kind: str, fields: dict) -> bytes:
    return MSGPackSerializer.dumps(make_record(identity, kind, fields))


def even_stamp() -> float:
    """Now, with a fixed number of digits: a record's JSON carries its timestamps, so
    records stamped this way all have the same size (``time.time()``'s repr varies by a
    digit or two, and the fair-share rule compares bytes)."""
    return float(int(time.time())) + 0.5


def store_expert(storage, identity, delta_id, issued_at=None, expiration=None) -> bool:
    now = even_stamp()
    fields = expert_fields(delta_id, issued_at=issued_at or now, expires_at=(issued_at or now) + 300)
    value = stored_value(identity, "record/expert", fields)
    return storage.store(DHTID.generate(source=EXPERTS_KEY), value, expiration or now + 200,
                         subkey=f"{identity.public_hex}/{delta_id}")


def ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_one_owner_keeps_at_most_its_share_under_a_key_and_a_refresh_always_fits():
    storage = BoundedRecordStorage()
    results = [store_expert(storage, MALLORY, d) for d in ids(bounds.MAX_RECORDS_PER_OWNER_KEY + 5)]
    assert results == [True] * bounds.MAX_RECORDS_PER_OWNER_KEY + [False] * 5
    assert store_expert(storage, ALICE, DELTA)  # another owner still fits
    first = ids(1)[0]
    assert store_expert(storage, MALLORY, first, issued_at=time.time() + 1, expiration=time.time() + 250)  # a refresh
    held = storage.get(DHTID.generate(source=EXPERTS_KEY)).value
    assert len(held) == bounds.MAX_RECORDS_PER_OWNER_KEY + 1


def record_cost() -> int:
    """The bytes one expert record of these tests adds under its key (all have the same size)."""
    now = even_stamp()
    value = stored_value(ALICE, "record/expert", expert_fields(DELTA, issued_at=now, expires_at=now + 300))
    return len(value) + len(f"{ALICE.public_hex}/{DELTA}") + 16


def held_by(storage, identity) -> int:
    held = storage.get(DHTID.generate(source=EXPERTS_KEY)).value
    return sum(1 for s, _ in held.items() if s.startswith(identity.public_hex))


def test_a_full_key_is_shared_fairly_not_frozen(monkeypatch):
    """A key holds MAX_KEY_BYTES. One stranger who filled it gives up its records as others
    arrive (it keeps more than any newcomer); a key full of many owners' single records
    takes no more, and the node-wide total counts every key."""
    monkeypatch.setattr(bounds, "MAX_KEY_BYTES", 6 * record_cost() + 50)  # room for 6, not 7
    storage = BoundedRecordStorage()
    assert [store_expert(storage, MALLORY, d) for d in ids(8)] == [True] * 6 + [False] * 2  # its own records: no eviction
    honest = [Identity.generate() for _ in range(3)]
    assert [store_expert(storage, h, DELTA) for h in honest] == [True] * 3  # the stranger makes room
    assert held_by(storage, MALLORY) == 3 and all(held_by(storage, h) == 1 for h in honest)
    assert storage.evicted == 3
    fourth = Identity.generate()
    assert store_expert(storage, fourth, DELTA)  # Mallory still holds the most (3 > 1): one more of its goes
    assert held_by(storage, MALLORY) == 2
    sybils = [Identity.generate() for _ in range(3)]
    assert [store_expert(storage, s, DELTA) for s in sybils] == [True, False, False]  # 1 each: nobody holds more
    assert len(storage.get(DHTID.generate(source=EXPERTS_KEY)).value) == 6

    monkeypatch.setattr(bounds, "MAX_KEY_BYTES", 3 * 1024 * 1024)
    monkeypatch.setattr(bounds, "MAX_STORED_RECORDS", 9)
    key_b = DHTID.generate(source="hivemerge/packs")  # another key: the node-wide total counts them all
    now = time.time()
    stored = []
    for s in [Identity.generate() for _ in range(8)]:
        fields = {"domain": "x", "pack_id": OTHER, "probe_id": OTHER, "model_id": OTHER, "top_k": 8, "bundle_id": OTHER,
                  "probe_bundle_id": OTHER, "size": 1, "peer_id": PEER, "maddrs": [], "issued_at": now, "expires_at": now + 60}
        stored.append(storage.store(key_b, stored_value(s, "record/pack", fields), now + 60, subkey=f"{s.public_hex}/{OTHER}"))
    assert stored == [True] * 3 + [False] * 5  # 6 + 3 = 9 records in all


def test_a_store_refused_by_another_cap_evicts_nothing(monkeypatch):
    """Making room under a full key evicts a record: only for a store every other cap allows."""
    monkeypatch.setattr(bounds, "MAX_KEY_BYTES", 3 * record_cost() + 50)
    storage = BoundedRecordStorage()
    assert [store_expert(storage, MALLORY, d) for d in ids(3)] == [True] * 3  # the key is full
    monkeypatch.setattr(bounds, "MAX_RECORDS_PER_OWNER", 1)
    assert store_expert(storage, ALICE, ids(1, "a")[0])  # Alice's first: Mallory gives up one
    assert storage.evicted == 1 and held_by(storage, MALLORY) == 2
    assert not store_expert(storage, ALICE, ids(2, "a")[1])  # over Alice's own total: refused ...
    assert storage.evicted == 1 and held_by(storage, MALLORY) == 2  # ... and nothing evicted for it


def test_one_owner_keeps_at_most_its_total_across_keys(monkeypatch):
    monkeypatch.setattr(bounds, "MAX_RECORDS_PER_OWNER", 5)
    storage = BoundedRecordStorage()
    now = time.time()
    results = []
    for round_id in ids(8, "round"):  # round keys are any content id: a flood across keys
        fields = commitment_fields(round_id=round_id, issued_at=now, expires_at=now + 60)
        results.append(storage.store(DHTID.generate(source=rounds.round_key(round_id)),
                                     stored_value(MALLORY, "record/commitment", fields), now + 60,
                                     subkey=f"{MALLORY.public_hex}/commit"))
    assert results == [True] * 5 + [False] * 3


def test_an_owners_newer_record_wins_whatever_the_expiries_say():
    storage = BoundedRecordStorage()
    key = DHTID.generate(source=EXPERTS_KEY)
    subkey = f"{ALICE.public_hex}/{DELTA}"
    now = time.time()
    old_live = stored_value(ALICE, "record/expert", expert_fields(maddrs=["/ip4/127.0.0.1/tcp/1"], issued_at=now - 100,
                                                                  expires_at=now + 200))
    gone = stored_value(ALICE, "record/expert", expert_fields(issued_at=now - 10, expires_at=now + 50))
    assert storage.store(key, old_live, now + 200, subkey=subkey)
    assert storage.store(key, gone, now + 50, subkey=subkey)  # newer, though it expires sooner: it replaces
    assert storage.get(key).value.get(subkey).value == gone
    assert not storage.store(key, old_live, now + 200, subkey=subkey)  # the relayed old record: refused
    assert storage.get(key).value.get(subkey).value == gone
    assert not storage.store(key, b"\x00not a record", now + 60, subkey=subkey)
    assert not storage.store(key, gone, now + 60)  # no subkey: no hivemerge record has none


def test_a_large_record_counts_as_many_as_its_size_would_take(monkeypatch):
    """A charter record may be 40 KiB where every other kind is at most MAX_RECORD_BYTES:
    it counts as one record per started MAX_RECORD_BYTES against the per-owner and the
    node-wide caps, so those caps bound memory, not only counts."""
    monkeypatch.setattr(bounds, "MAX_STORED_RECORDS", 12)
    storage = BoundedRecordStorage()
    now = time.time()

    def value(size: int) -> bytes:  # the storage reads only the signed issued_at (the validator checked the rest)
        return MSGPackSerializer.dumps(json.dumps({"manifest": {"issued_at": now, "pad": "x" * size}}))

    big = value(4 * bounds.MAX_RECORD_BYTES + 100)  # five records' worth
    owners = [Identity.generate().public_hex for _ in range(4)]
    key = DHTID.generate(source="hivemerge/charters/" + "ab" * 32)
    stored = [storage.store(key, big, now + 60, subkey=f"{o}/{'cd' * 32}") for o in owners[:3]]
    assert stored == [True, True, False]  # 5 + 5 = 10 of 12; a third would make 15
    assert storage.store(key, value(100), now + 60, subkey=f"{owners[3]}/{'ef' * 32}")  # 11
    assert storage.store(key, value(100), now + 60, subkey=f"{owners[2]}/{'ef' * 32}")  # 12
    assert not storage.store(key, value(100), now + 60, subkey=f"{owners[3]}/{'12' * 32}")  # full


def test_a_round_joined_with_nothing_committed_still_takes_the_nodes_matching_experts(tmp_path):
    """Under a charter a proposer is in its own round from the start (a state with nothing
    committed): it must still commit its own matching expert, once; an attester's state
    with nothing to commit stays as it is."""
    published = [{"base_id": BASE, "delta_id": DELTA, "domain": "math"}]
    proposal = {**proposal_fields(deadline=time.time() + 60), "issued_at": time.time()}
    coordinator, logged, committed = stub_coordinator(tmp_path, published, {BASE: [proposal]})
    coordinator.save({"proposal": proposal, "phase": "committed", "committed": []})  # Node.propose under a charter
    asyncio.run(coordinator.tick())
    asyncio.run(coordinator.tick())  # committed now: not twice
    assert committed == [(proposal["round_id"], {DELTA: "math"})]
    other = {**proposal_fields(base_id=OTHER, deadline=time.time() + 60), "issued_at": time.time()}
    (tmp_path / "w").mkdir()
    watcher, _, nothing = stub_coordinator(tmp_path / "w", [], {OTHER: [other]})
    watcher.save({"proposal": other, "phase": "committed", "committed": []})
    asyncio.run(watcher.tick())
    assert nothing == [] and watcher.state(other["round_id"])["committed"] == []


def test_a_delta_that_overflows_the_base_when_decoded_is_excluded_in_the_merge(tmp_path):
    """Screening reads a delta's parts without decoding (issue 21). A signed ternary delta
    whose parts are finite but whose decoded values overflow float32 (one block's mean
    magnitude, 2.9e38, lands on a base entry of 3e38) passes screening with a finite norm;
    the merge finds it, excludes it with the reason, and merges the honest delta alone."""
    from conftest import write_tensors

    from hivemerge.merge.deltas.delta import extract_delta
    from hivemerge.merge.deltas.screening import screen_delta
    from hivemerge.merge.io.manifest import model_id
    from hivemerge.merge.io.sources import SafetensorsModel
    from hivemerge.node.storage.store import ContentStore

    config = {"num_hidden_layers": 1}
    w = torch.zeros(4, 8)
    w[0, 0] = 3.0e38
    base = write_tensors(tmp_path / "base", {"w": w}, config)
    honest = write_tensors(tmp_path / "honest", {"w": w + 0.25}, config)
    big = w.clone()
    big[0, 0] += 3.0e37  # 3.3e38: finite
    big[0, 1:] = 3.3e38  # the block of 8 entries is all large: its mean magnitude is about 2.9e38
    overflowing = write_tensors(tmp_path / "overflowing", {"w": big}, config)
    store = ContentStore(tmp_path / "home")
    base_id = store.add_model(base)
    ids = {}
    for name, expert, codec in (("honest", honest, "ternary"), ("overflowing", overflowing, "ternary:block=8,threshold=0")):
        made = extract_delta(base, expert, tmp_path / f"{name}.delta.safetensors", ALICE, codec)
        ids[name] = store.add_delta(made.path)
        norm = screen_delta(store.resolve(ids[name]), SafetensorsModel(base), {ALICE.public_hex})
        assert math.isfinite(norm)  # both pass screening
    node = SimpleNamespace(store=store, home=tmp_path / "home", charter=None, clock=time.time, log=print)
    coordinator = RoundCoordinator(node, poll=0.01, device="cpu")
    proposal = {"round_id": "ab" * 32, "base_id": base_id, "recipe": {"merge_method": "task_arithmetic", "dtype": "float32",
                                                                      "parameters": {"weight": 1.0}}}
    commitments = {ALICE.public_hex: {"delta_ids": sorted(ids.values()), "domains": {ids["honest"]: "math", ids["overflowing"]: "code"}}}
    included, excluded = sorted(ids.values()), {}
    result_id = coordinator.merge_screened(proposal, included, commitments, excluded)
    assert included == [ids["honest"]] and list(excluded) == [ids["overflowing"]]
    assert excluded[ids["overflowing"]].startswith("failed verification: ") and "NaN or Inf" in excluded[ids["overflowing"]]
    alone = coordinator.merge_to(rounds.build_recipe(proposal, [ids["honest"]], rounds.committed_domains(commitments)),
                                 tmp_path / "alone")
    assert result_id == model_id(SafetensorsModel(alone))
