"""Merge rounds with participants that fail or misbehave, among real nodes on 127.0.0.1.

- a participant that leaves after committing: its delta is excluded as unavailable and
  the round still finalizes when the rest make a quorum;
- a participant whose delta is tampered with (served consistently, so the transfer
  itself succeeds) and one whose delta is scaled 50x: both excluded, with the reason,
  and the consensus is the honest participants' merge;
- a participant that commits, besides its own, a delta of a domain the proposal did not
  select: that delta is excluded at every node, without being fetched;
- a round that cannot reach its quorum ends without a consensus model.
"""

from __future__ import annotations

import time

import pytest
from round_fixtures import (
    RoundNet,
    build_family,
    model_id_of,
    offline_merge,
    round_document,
    round_records,
    scaled_expert,
    tamper_stored_delta,
    wait_committed,
    wait_round_done,
)

from hivemerge.protocol import rounds
from hivemerge.protocol.errors import UserInputError

TEMPLATE = {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}
HONEST = ["math", "code", "logic"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-models")
    models = build_family(root, HONEST + ["chem", "bio"], base_seed=3)
    models["bio-x50"] = scaled_expert(models["base"], models["bio"], root / "bio-x50", 50.0)
    return models


@pytest.fixture
def net(tmp_path):
    pool = RoundNet(tmp_path / "nodes")
    yield pool
    pool.close_all()


def start_round(net, family, domains, publishers: dict[str, str], **document_extra):
    """Starts ``a`` (the proposer, no expert) and one node per domain publishing the model
    ``publishers[domain]`` names; proposes a round over ``domains``."""
    nodes = net.start_many(["a", *domains])
    a, participants = nodes[0], dict(zip(domains, nodes[1:]))
    published = {dom: participants[dom].publish(family[publishers.get(dom, dom)], dom, family["base"]) for dom in domains}
    return a, participants, published


def leave_after_committing(net, observer, proposal, participants: dict, leaver) -> None:
    wait_committed(observer, proposal["round_id"], [n.identity.public_hex for n in participants.values()])
    net.close(leaver)
    # the point of the test: it committed, then vanished before the deadline
    assert time.time() < proposal["deadline"], "the participant left after the deadline: the test ran too slowly"


def test_a_participant_that_leaves_after_committing_is_excluded_and_the_round_finalizes(net, family, tmp_path):
    a, participants, published = start_round(net, family, HONEST, {})
    proposal = a.propose({**round_document(family["base"], HONEST, deadline=5), **TEMPLATE})
    rid = proposal["round_id"]
    gone = participants["logic"]
    gone_delta = published["logic"]["delta_id"]
    leave_after_committing(net, a, proposal, participants, gone)
    b, c = participants["math"], participants["code"]
    states = wait_round_done([b, c], rid)
    for state in states:
        assert state["phase"] == "attested", state.get("error")
        assert state["excluded"].keys() == {gone_delta}
        assert state["excluded"][gone_delta].startswith("unavailable: ")
        assert state["included"] == sorted(published[d]["delta_id"] for d in ("math", "code"))
    assert states[0]["result_id"] == states[1]["result_id"]
    result_id = states[0]["result_id"]

    # 3 committed, 2 attested, quorum 2/3 -> 2 needed: final
    row = b.round_status()[0]
    assert len(row["commitments"]) == 3 and sorted(row["attestations"]) == sorted(
        n.identity.public_hex for n in (b, c))
    assert row["final"] and row["final_result"] == result_id

    latest = a.latest(model_id_of(family["base"]))
    assert latest["result_id"] == result_id and latest["proposal"]["round_id"] == rid
    assert sorted(latest["attesters"]) == sorted(n.identity.public_hex for n in (b, c))
    assert gone.identity.public_hex in latest["commitments"]  # it did commit
    for attestation in latest["attestations"].values():  # the signed records say why
        assert attestation["excluded"][gone_delta].startswith("unavailable: ")
        assert "no provider" in attestation["excluded"][gone_delta]

    files = {published[d]["delta_id"]: participants[d].store.resolve(published[d]["delta_id"]) for d in ("math", "code")}
    assert offline_merge(tmp_path / "honest", family["base"], files, TEMPLATE) == result_id

    e = net.start("e", peers=a.maddrs(), client_mode=True)
    summary = e.fetch(None, out=tmp_path / "consensus", base=family["base"])
    assert summary["content"] == result_id and summary["round_id"] == rid
    card = (tmp_path / "consensus" / "README.md").read_text()
    assert "attested by 2 of 3 participants" in card
    assert f"`{gone_delta[:12]}`: unavailable: " in card


def test_tampered_and_scaled_deltas_are_excluded_and_the_consensus_is_the_honest_merge(net, family, tmp_path):
    domains = HONEST + ["chem", "bio"]
    a, participants, published = start_round(net, family, domains, {"bio": "bio-x50"})
    tampered = published["chem"]["delta_id"]
    scaled = published["bio"]["delta_id"]
    tamper_stored_delta(participants["chem"], tampered)
    proposal = a.propose({**round_document(family["base"], domains, deadline=4), **TEMPLATE})
    rid = proposal["round_id"]
    nodes = list(participants.values())
    states = wait_round_done(nodes, rid)
    honest = sorted(published[d]["delta_id"] for d in HONEST)
    for dom, state in zip(participants, states):
        assert state["phase"] == "attested", (dom, state.get("error"))
        assert state["included"] == honest, dom
        assert state["excluded"].keys() == {tampered, scaled}, dom
        assert state["excluded"][tampered].startswith("failed verification: "), (dom, state["excluded"][tampered])
        assert "fails its hash check" in state["excluded"][tampered]
        assert state["excluded"][scaled].startswith("norm outlier: "), (dom, state["excluded"][scaled])
    # every participant states the same reasons (no local paths in them)
    assert len({tuple(sorted(s["excluded"].items())) for s in states}) == 1
    assert "/" not in states[0]["excluded"][tampered]
    result_ids = {s["result_id"] for s in states}
    assert len(result_ids) == 1
    result_id = result_ids.pop()

    # the other nodes received the tampered delta intact, chunk for chunk: the transfer
    # succeeded and only the delta's own verification rejected it (it never entered their store)
    for dom in HONEST:
        assert not participants[dom].store.has(tampered)
        assert participants[dom].store.has(scaled)

    latest = a.latest(model_id_of(family["base"]))
    assert latest["result_id"] == result_id
    assert sorted(latest["attesters"]) == sorted(n.identity.public_hex for n in nodes)

    files = {published[d]["delta_id"]: participants[d].store.resolve(published[d]["delta_id"]) for d in HONEST}
    assert offline_merge(tmp_path / "honest", family["base"], files, TEMPLATE) == result_id
    # and the scaled delta would have changed it
    with_scaled = {**files, scaled: participants["bio"].store.resolve(scaled)}
    assert offline_merge(tmp_path / "with-scaled", family["base"], with_scaled, TEMPLATE) != result_id


def test_a_delta_of_a_domain_the_proposal_did_not_select_is_excluded_unfetched(net, family, tmp_path):
    a, participants, published = start_round(net, family, HONEST, {})
    rogue = participants["logic"]
    chem = rogue.publish(family["chem"], "chem", family["base"])["delta_id"]
    proposal = a.propose({**round_document(family["base"], HONEST, deadline=6), **TEMPLATE})
    rid = proposal["round_id"]
    wait_committed(a, rid, [rogue.identity.public_hex])
    # the rogue restates its commitment with its chem delta added, under its true domain
    own = published["logic"]["delta_id"]
    fields = {"round_id": rid, "delta_ids": sorted([own, chem]), "domains": {own: "logic", chem: "chem"},
              **rogue.contact(), "issued_at": time.time()}
    # (an expiry later than its first commitment's, or the DHT keeps the first)
    assert rogue.run(rogue.store_record("record/commitment", rounds.round_key(rid), fields, rogue.rounds.ttl(proposal) + 60), 30)
    assert time.time() < proposal["deadline"], "the rogue commitment came after the deadline: the test ran too slowly"
    seen = [r for r in round_records(a, rid).values() if r.get("publisher") == rogue.identity.public_hex]
    assert seen and chem in seen[0]["delta_ids"]

    nodes = list(participants.values())
    states = wait_round_done(nodes, rid)
    want = "not selected: domain 'chem' is not among the proposal's ['code', 'logic', 'math']"
    honest = sorted(published[d]["delta_id"] for d in HONEST)
    for dom, state in zip(participants, states):
        assert state["phase"] == "attested", (dom, state.get("error"))
        assert state["excluded"] == {chem: want}, dom
        assert state["included"] == honest, dom
    assert len({s["result_id"] for s in states}) == 1
    for dom in ("math", "code"):
        assert not participants[dom].store.has(chem)  # never fetched
    files = {published[d]["delta_id"]: participants[d].store.resolve(published[d]["delta_id"]) for d in HONEST}
    assert offline_merge(tmp_path / "honest", family["base"], files, TEMPLATE) == states[0]["result_id"]


def test_a_round_without_quorum_gives_no_consensus(net, family, tmp_path):
    a, participants, published = start_round(net, family, HONEST, {})
    proposal = a.propose({**round_document(family["base"], HONEST, deadline=5, quorum=1.0), **TEMPLATE})
    rid = proposal["round_id"]
    leave_after_committing(net, a, proposal, participants, participants["logic"])
    b, c = participants["math"], participants["code"]
    states = wait_round_done([b, c], rid)
    assert all(s["phase"] == "attested" for s in states)
    assert states[0]["result_id"] == states[1]["result_id"]  # they agree, but 2 of 3 is not 1.0
    for node in (b, c):
        row = node.round_status()[0]
        assert len(row["commitments"]) == 3 and len(row["attestations"]) == 2
        assert not row["final"] and row["final_result"] is None and row["attesters"] == []

    base_id = model_id_of(family["base"])
    assert a.latest(base_id) is None
    e = net.start("e", peers=a.maddrs(), client_mode=True)
    assert e.latest(base_id) is None
    with pytest.raises(UserInputError, match="no final consensus model"):
        e.fetch(None, out=tmp_path / "consensus", base=family["base"])
    assert not (tmp_path / "consensus").exists()
