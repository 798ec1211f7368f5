"""A whole merge round among real nodes on 127.0.0.1.

Four nodes: ``a`` proposes (it holds no expert), ``b``, ``c`` and ``d`` each publish one
expert of the same tiny base (math, code: full fine-tunes; logic: a LoRA adapter, which
travels as its low-rank factors). Every participant commits, fetches
the others' deltas, merges locally and attests; the round is final. A fifth node that
took no part fetches the latest consensus, checks it and loads it in transformers; the
result equals an offline merge of the three delta files with the same recipe.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from round_fixtures import (
    RoundNet, build_family, lora_expert, model_id_of, offline_merge, round_document, wait_committed, wait_round_done,
)

from hivemerge.merge.deltas.delta import DeltaFile
from hivemerge.protocol.errors import UserInputError

DOMAINS = ["math", "code", "logic"]
# task arithmetic with per-domain weights: a participant that paired a delta with the
# wrong domain (or the wrong order) would compute another result
TEMPLATE = {
    "merge_method": "task_arithmetic",
    "parameters": {"weight": 1.0, "lambda": 0.9},
    "domain_parameters": {"math": {"weight": 1.0}, "code": {"weight": 0.5}, "logic": {"weight": 0.75}},
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def first_round(tmp_path_factory):
    root = tmp_path_factory.mktemp("consensus")
    family = build_family(root / "models", DOMAINS)
    family["logic"] = lora_expert(family["base"], root / "models" / "logic-lora", seed=7)
    net = RoundNet(root / "nodes")
    try:
        a, b, c, d = net.start_many(["a", "b", "c", "d"])
        participants = {"math": b, "code": c, "logic": d}
        published = {dom: n.publish(family[dom], dom, family["base"]) for dom, n in participants.items()}
        document = {k: v for k, v in TEMPLATE.items()}
        document.update(round_document(family["base"], DOMAINS, method=TEMPLATE["merge_method"],
                                       parameters=TEMPLATE["parameters"]))
        decodes: list[tuple[str, str]] = []  # (delta id, tensor) of every decode while the round runs
        decode = DeltaFile.decode
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DeltaFile, "decode", lambda self, name, base, **how: decodes.append((self.id, name)) or decode(self, name, base, **how))
            proposal = a.propose(document)
            states = wait_round_done([b, c, d], proposal["round_id"])
        yield {
            "root": root, "family": family, "net": net, "a": a, "participants": participants,
            "published": published, "proposal": proposal, "states": states, "decodes": decodes,
        }
    finally:
        net.close_all()


def test_every_participant_attests_the_same_content_id(first_round):
    rid = first_round["proposal"]["round_id"]
    deltas = sorted(p["delta_id"] for p in first_round["published"].values())
    keys = sorted(n.identity.public_hex for n in first_round["participants"].values())
    result_ids = set()
    for node in first_round["participants"].values():
        rows = node.round_status()
        assert [r["proposal"]["round_id"] for r in rows] == [rid]
        row = rows[0]
        assert row["phase"] == "attested", row.get("error")
        assert row["included"] == deltas and row["excluded"] == {}
        assert sorted(row["participants"]) == keys
        assert sorted(row["commitments"]) == keys
        assert sorted(row["attestations"]) == keys
        assert row["final"] and row["final_result"] == row["result_id"]
        assert row["attesters"] == keys
        result_ids.add(row["result_id"])
        # every participant holds the result under its id
        assert model_id_of(node.store.resolve(row["result_id"])) == row["result_id"]
    assert len(result_ids) == 1
    # the proposer took no part: it has no round state
    assert first_round["a"].round_status() == []


def test_each_participant_decodes_each_delta_once(first_round):
    """Screening reads a delta's parts without decoding it (issue 21): each of the three
    participants decodes every tensor of every delta once, in its merge."""
    tensors = DeltaFile(first_round["participants"]["math"].store.resolve(
        first_round["published"]["math"]["delta_id"])).shapes()
    counts = Counter(first_round["decodes"])
    assert counts == {(p["delta_id"], name): 3 for p in first_round["published"].values() for name in tensors}


def test_a_node_that_took_no_part_fetches_and_verifies_the_consensus(first_round):
    from transformers import AutoModelForCausalLM

    net, family, proposal = first_round["net"], first_round["family"], first_round["proposal"]
    result_id = first_round["states"][0]["result_id"]
    keys = sorted(n.identity.public_hex for n in first_round["participants"].values())
    e = net.start("e", peers=first_round["a"].maddrs(), client_mode=True)
    try:
        latest = e.latest(model_id_of(family["base"]))
        assert latest["result_id"] == result_id and latest["proposal"]["round_id"] == proposal["round_id"]
        out = first_round["root"] / "fetched-consensus"
        summary = e.fetch(None, out=out, base=family["base"])
        stored = e.store.resolve(result_id)
    finally:
        net.close(e)
    # one copy of the consensus: --out hard-links the store's files (issue 21)
    assert (out / "model.safetensors").stat().st_ino == (stored / "model.safetensors").stat().st_ino
    assert summary["content"] == result_id
    assert summary["round_id"] == proposal["round_id"]
    assert summary["attesters"] == keys and summary["participants"] == keys
    assert summary["bytes_received"] > 0  # it came over the network, from the attesters
    assert model_id_of(out) == result_id  # what it wrote is what the quorum attested
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    card = (out / "README.md").read_text()
    assert f"round {proposal['round_id'][:12]}" in card
    assert "attested by 3 of 3 participants" in card
    for key in keys:
        assert f"| {key[:16]} |" in card
    for delta_id in (p["delta_id"] for p in first_round["published"].values()):
        assert f"- `{delta_id}`" in card


def test_the_consensus_equals_an_offline_merge_of_the_deltas(first_round):
    result_id = first_round["states"][0]["result_id"]
    published = first_round["published"]
    files = {p["delta_id"]: first_round["participants"][dom].store.resolve(p["delta_id"]) for dom, p in published.items()}
    domain_of = {p["delta_id"]: dom for dom, p in published.items()}
    merged = offline_merge(first_round["root"] / "offline", first_round["family"]["base"], files, TEMPLATE, domain_of)
    assert merged == result_id
    # the per-domain weights matter: the same deltas with the domains swapped give another model
    swapped = {d: {"math": "code", "code": "math", "logic": "logic"}[dom] for d, dom in domain_of.items()}
    assert offline_merge(first_round["root"] / "offline-swapped", first_round["family"]["base"], files, TEMPLATE,
                         swapped) != result_id


def test_a_lora_expert_travels_as_its_factors_and_merges_as_the_adapter_does_offline(first_round):
    """The logic expert was published from its adapter: its delta holds the factors
    (lowrank) and unchanged tensors, and the round's consensus equals an offline merge
    that reads the adapter itself (BASE+ADAPTER) where the round had its delta."""
    published, family = first_round["published"], first_round["family"]
    assert published["logic"]["codecs"] == {"lowrank": 6, "same": 15}
    files = {p["delta_id"]: first_round["participants"][dom].store.resolve(p["delta_id"]) for dom, p in published.items()}
    domain_of = {p["delta_id"]: dom for dom, p in published.items()}
    files[published["logic"]["delta_id"]] = f"{family['base']}+{family['logic']}"
    merged = offline_merge(first_round["root"] / "offline-adapter", family["base"], files, TEMPLATE, domain_of)
    assert merged == first_round["states"][0]["result_id"]


def test_a_later_round_without_quorum_keeps_the_previous_consensus(first_round):
    """Quorum 1.0 and a participant that leaves after committing: the round ends without a
    result, and the latest consensus is still the first round's."""
    net, family, a = first_round["net"], first_round["family"], first_round["a"]
    b, c, d = (first_round["participants"][dom] for dom in DOMAINS)
    first_result = first_round["states"][0]["result_id"]
    document = round_document(family["base"], DOMAINS, method="ties", quorum=1.0, deadline=5)
    proposal = a.propose(document)
    rid = proposal["round_id"]
    wait_committed(a, rid, [n.identity.public_hex for n in (b, c, d)])
    net.close(d)
    assert proposal["deadline"] > time.time(), "d left after the deadline: the test is too slow"
    states = wait_round_done([b, c], rid)
    assert all(s["phase"] == "attested" for s in states)
    assert states[0]["result_id"] == states[1]["result_id"]
    # b and c still hold d's delta from the first round, so it is merged even though d left:
    # what d lacks is its attestation
    assert states[0]["excluded"] == {} and len(states[0]["included"]) == 3
    for node in (b, c):
        row = next(r for r in node.round_status() if r["proposal"]["round_id"] == rid)
        assert len(row["commitments"]) == 3 and len(row["attestations"]) == 2
        assert not row["final"] and row["final_result"] is None and row["attesters"] == []
    e = net.start("e2", peers=a.maddrs(), client_mode=True)
    try:
        latest = e.latest(model_id_of(family["base"]))
        assert latest["result_id"] == first_result
        assert latest["proposal"]["round_id"] == first_round["proposal"]["round_id"]
        summary = e.fetch(None, out=first_round["root"] / "still-first", base=family["base"])
        assert summary["content"] == first_result
    finally:
        net.close(e)


def test_fetch_without_id_needs_a_base(first_round):
    e = first_round["net"].start("e3", peers=first_round["a"].maddrs(), client_mode=True)
    try:
        with pytest.raises(UserInputError, match="--base"):
            e.fetch(None, out=first_round["root"] / "nowhere")
    finally:
        first_round["net"].close(e)


def test_pruning_keeps_the_final_consensus_where_fetch_finds_it(first_round):
    """b, running with keep_results 1 (``node start --keep-results 1``), learns that the
    first round became final and that the later one (no quorum) did not: its finality
    window is shortened here, an hour by default. It then prunes its own store: the later
    result and the other experts' deltas go, the first result stays, and a new node
    fetches that result from b alone."""
    from hivemerge.node.storage.retention import prune

    net, family, a = first_round["net"], first_round["family"], first_round["a"]
    b, c = first_round["participants"]["math"], first_round["participants"]["code"]
    first_rid, first_result = first_round["proposal"]["round_id"], first_round["states"][0]["result_id"]
    later = next(s for s in b.rounds.states() if s["proposal"]["round_id"] != first_rid)
    others = {p["delta_id"] for dom, p in first_round["published"].items() if dom != "math"}
    assert all(b.store.has(cid) for cid in others | {later["result_id"], first_result})
    b.keep_results = 1
    b.rounds.finality_window = 0.0
    deadline = time.time() + 60
    while b.store.has(later["result_id"]) or any(b.store.has(cid) for cid in others):
        assert time.time() < deadline, b.rounds.states()
        time.sleep(0.5)
    assert b.rounds.state(first_rid)["final"] is True
    assert b.rounds.state(later["proposal"]["round_id"])["final"] is False
    for cid in (first_result, first_round["published"]["math"]["delta_id"], model_id_of(family["base"])):
        assert b.store.has(cid)
    assert prune(b.home) == []  # the node left nothing that pruning would remove

    net.close(c)  # d left earlier: b is the only node that still holds the consensus
    e = net.start("e4", peers=a.maddrs(), client_mode=True)
    try:
        summary = e.fetch(None, out=first_round["root"] / "after-prune", base=family["base"])
    finally:
        net.close(e)
    assert summary["content"] == first_result and summary["bytes_received"] > 0
    assert model_id_of(first_round["root"] / "after-prune") == first_result
