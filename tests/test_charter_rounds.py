"""Rounds under a network charter, among real nodes on 127.0.0.1 (issue 20).

The charter (signed by its one maintainer, ``p``) names ``p`` the proposer and ``b``,
``c``, ``d`` attesters and contributors; each of them publishes one expert. ``m`` runs a
node of the same network but is on no roster, and four Sybil keys have no node at all.
``m`` proposes a round of its own delta, commits to it and attests a result; it and the
Sybils also commit to and attest the honest round. ``b``'s clock runs 2.5 s ahead and
``d``'s 2.5 s behind (5 s apart). The honest nodes ignore all of it:
the honest round merges exactly b, c and d's deltas, and the fetch-only node ``f``
returns the honest consensus, recomputed from the signed deltas. Then two roster
attesters sign a wrong result for a later round: ``fetch --verify`` refuses it and names
them, and ``--trust`` narrows whose attestations count.
"""

from __future__ import annotations

import json
import time

import pytest
from hivemind.utils import get_dht_time
from delta_fixtures import shared_runner
from network_fixtures import wait_until
from round_fixtures import ROUND_TIMEOUT, build_family, model_id_of, round_records

from hivemerge.node.cli.charter import write_charter
from hivemerge.node.local_network import LocalNetwork
from hivemerge.protocol import charter as charters
from hivemerge.protocol import charter_rules, records, rounds
from hivemerge.protocol.search import searches_key as search_key
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity

DOMAINS = ["math", "code", "logic"]
DEADLINE = 8  # seconds: commitments of three experts, and the attackers', on a busy machine
TEMPLATE = {"merge_method": "task_arithmetic", "parameters": {"weight": 1.0, "lambda": 0.9}, "dtype": "float32"}
EVIL = "e" * 64  # the result id the attackers attest
CLOCKS = {"b": 2.5, "d": -2.5}  # seconds off the true time: b's and d's clocks are 5 s apart


def store_as(node, identity: Identity, kind: str, key: str, fields: dict, ttl: float = 600.0) -> None:
    """Store a record signed by ``identity`` through ``node`` (an attacker's own key, or a
    roster key the test holds)."""
    fields = {**fields, "expires_at": round(get_dht_time() + ttl, 3)}
    value = records.make_record(identity, kind, fields)
    subkey = records.owner_subkey(identity, kind, fields)
    assert node.run(node.network.store_record(key, subkey, value, fields["expires_at"]), 30)


def attest_as(node, identity: Identity, round_id: str, result_id: str, included: list[str]) -> None:
    fields = {"round_id": round_id, "result_id": result_id, "bundle_id": result_id, "included": included, "excluded": {},
              "peer_id": node.peer_id, "maddrs": node.maddrs(), "issued_at": time.time()}
    store_as(node, identity, "record/attestation", rounds.round_key(round_id), fields)


def commit_as(node, identity: Identity, round_id: str, domains: dict[str, str], issued_at: float | None = None) -> None:
    fields = {"round_id": round_id, "delta_ids": sorted(domains), "domains": domains, "peer_id": node.peer_id,
              "maddrs": node.maddrs(), "issued_at": issued_at or time.time()}
    store_as(node, identity, "record/commitment", rounds.round_key(round_id), fields)


def wait_phase(node, round_id: str, phases: tuple[str, ...], timeout: float = ROUND_TIMEOUT) -> dict:
    def done():
        state = node.rounds.state(round_id)
        return state if state and state["phase"] in phases else None
    return wait_until(done, timeout, what=f"round {round_id[:12]} at {node.identity.fingerprint}")


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    root = tmp_path_factory.mktemp("charter-rounds")
    family = build_family(root / "models", [*DOMAINS, "evil"])
    base_id = model_id_of(family["base"])
    homes = {name: root / "nodes" / name for name in ["p", "b", "c", "d", "m", "f"]}
    keys = {name: Identity.load_or_create(home) for name, home in homes.items()}
    keys.update(late=Identity.generate(), backdated=Identity.generate())  # contributors without a node, held by the test
    roster = {keys["p"].public_hex: ["proposer"], keys["late"].public_hex: ["contributor"],
              keys["backdated"].public_hex: ["contributor"],
              **{keys[n].public_hex: ["attester", "contributor"] for n in ("b", "c", "d")}}
    genesis = charters.sign_charter(charters.new_charter(
        name="test-net", base_ids=[base_id], maintainers=[keys["p"].public_hex], methods=["task_arithmetic"],
        roster=roster, quorum=2 / 3, min_attesters=2), keys["p"])
    net = LocalNetwork(root / "nodes", record_ttl=60.0, round_poll=0.5, device="cpu", network=genesis)
    try:
        nodes = {name: net.start(name, clock=lambda off=CLOCKS.get(name, 0.0): time.time() + off)
                 for name in ["p", "b", "c", "d", "m", "f"]}
        published = {d: nodes[n].publish(family[d], d, family["base"]) for d, n in zip(DOMAINS, "bcd")}
        evil = nodes["m"].publish(family["evil"], "math", family["base"])
        sybils = [Identity.generate() for _ in range(4)]
        yield {"root": root, "family": family, "base_id": base_id, "nodes": nodes, "keys": keys, "genesis": genesis,
               "published": published, "evil": evil, "sybils": sybils}
    finally:
        net.close_all()


@pytest.fixture(scope="module")
def attacked(network):
    """Mallory's own round, and the honest round with Mallory and the Sybils in it."""
    nodes, family = network["nodes"], network["family"]
    m, evil = nodes["m"], network["evil"]
    # Mallory's round: a proposal of its own delta only, committed and attested by itself and the Sybils
    own = m.propose({**TEMPLATE, "base_model": str(family["base"]), "select": {"deltas": [evil["delta_id"]]},
                     "deadline": DEADLINE})
    commit_as(m, m.identity, own["round_id"], {evil["delta_id"]: "math"})
    for key in [m.identity, *network["sybils"]]:
        attest_as(m, key, own["round_id"], EVIL, [evil["delta_id"]])
    # the honest round, which Mallory joins by committing its delta and the Sybils by attesting
    honest = nodes["p"].propose({**TEMPLATE, "base_model": str(family["base"]), "select": {"domains": DOMAINS},
                                 "deadline": DEADLINE})
    commit_as(m, m.identity, honest["round_id"], {evil["delta_id"]: "math"})
    states = {n: wait_phase(nodes[n], honest["round_id"], ("attested", "failed")) for n in "bcd"}
    for key in [m.identity, *network["sybils"]]:
        attest_as(m, key, honest["round_id"], EVIL, [evil["delta_id"]])
    return {"own": own, "honest": honest, "states": states}


def test_the_honest_round_merges_exactly_the_rosters_deltas_and_is_final(network, attacked):
    states = attacked["states"]
    deltas = sorted(p["delta_id"] for p in network["published"].values())
    result_ids = {s["result_id"] for s in states.values()}
    assert [s["phase"] for s in states.values()] == ["attested"] * 3 and len(result_ids) == 1
    for state in states.values():
        assert state["included"] == deltas and network["evil"]["delta_id"] not in state["included"]
        assert state["ignored"][network["keys"]["m"].public_hex] == "not on the roster"
    # the proposer, no attester, listed the participants and merged nothing
    assert wait_phase(network["nodes"]["p"], attacked["honest"]["round_id"], ("listed",))["listed"] == sorted(
        network["keys"][n].public_hex for n in "bcd")
    final = network["nodes"]["f"].latest(network["base_id"])
    assert final["proposal"]["round_id"] == attacked["honest"]["round_id"] and final["result_id"] in result_ids
    row = next(r for r in network["nodes"]["b"].round_status() if r["proposal"]["round_id"] == attacked["honest"]["round_id"])
    m = network["keys"]["m"].public_hex[:16]
    assert row["ignored"][f"commitment by {m}"] == "not on the roster"  # what round status shows
    assert {row["ignored"][f"attestation by {k.public_hex[:16]}"] for k in [network["keys"]["m"], *network["sybils"]]} == {
        "not on the roster"}
    assert final["attesters"] == sorted(network["keys"][n].public_hex for n in "bcd")  # not Mallory, not a Sybil


def test_an_outsiders_round_is_ignored_by_every_honest_node(network, attacked):
    own = attacked["own"]["round_id"]
    for name in "pbcdf":
        assert network["nodes"][name].rounds.state(own) is None  # nobody joined it
    seen = round_records(network["nodes"]["f"], own)
    attesters = {r["publisher"] for r in seen.values() if "result_id" in r}
    assert len(attesters) == 5  # Mallory's and the four Sybils' attestations are there ...
    assert charter_rules.final_result_under(network["genesis"], {r["publisher"]: r for r in seen.values()
                                                                  if "result_id" in r}) == (None, [])  # ... and count for nothing
    for name in "pbcdf":  # its proposal is not even a candidate
        proposals = network["nodes"][name].run(network["nodes"][name].rounds.proposals(network["base_id"]), 30)
        assert own not in {p["round_id"] for p in proposals}


def test_fetch_verifies_the_consensus_by_recomputing_it(network, attacked, tmp_path):
    f = network["nodes"]["f"]
    summary = f.fetch(None, out=tmp_path / "consensus", base=network["family"]["base"], verify=True)
    assert summary["content"] == attacked["states"]["b"]["result_id"] != EVIL
    assert summary["recomputed"] is True and summary["charter_id"] == charters.charter_id(network["genesis"]["charter"])
    card = (tmp_path / "consensus" / "README.md").read_text()
    assert summary["charter_id"] in card and "Recomputed by the fetcher from the signed deltas: yes" in card


def test_a_peer_client_given_the_network_fetches_the_consensus_final_under_its_charter(network, attacked, tmp_path_factory):
    """``fetch --peer MADDR --network charter.json``: a short-lived client follows the
    charter (not a private network's rules) and recomputes the honest consensus."""
    cli, root = shared_runner(tmp_path_factory), tmp_path_factory.mktemp("peer-client")
    write_charter(root / "charter.json", network["genesis"])
    result = cli("fetch", "--peer", network["nodes"]["c"].maddrs()[0], "--network", root / "charter.json",
                 "--base", network["family"]["base"], "--out", root / "consensus", "--home", root / "home", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["content"] == attacked["states"]["b"]["result_id"] and summary["recomputed"] is True
    assert summary["charter_id"] == charters.charter_id(network["genesis"]["charter"])
    assert summary["attesters"] == sorted(network["keys"][n].public_hex for n in "bcd")
    assert "no network charter" not in result.stderr


def test_roster_attesters_that_sign_a_wrong_id_are_refused_by_verify_and_trust_narrows_the_count(network, attacked, tmp_path):
    nodes, keys = network["nodes"], network["keys"]
    b_delta = network["published"]["math"]["delta_id"]
    # a later round that nobody commits to, which b and c (their keys) attest with a made-up id
    later = nodes["p"].propose({**TEMPLATE, "base_model": str(network["family"]["base"]), "select": {"domains": ["none"]},
                                "deadline": DEADLINE})
    ended = [wait_phase(nodes[n], later["round_id"], ("attested", "failed")) for n in "bcd"]  # attesters join, merge nothing
    assert [s["phase"] for s in ended] == ["failed"] * 3
    for name in "bc":
        attest_as(nodes["m"], Identity.load_or_create(nodes[name].home), later["round_id"], EVIL, [b_delta])
    f = nodes["f"]
    wait_until(lambda: (f.latest(network["base_id"]) or {}).get("result_id") == EVIL, 30, what="the forged round as final")
    with pytest.raises(UserInputError) as refused:
        f.fetch(None, out=tmp_path / "wrong", base=network["family"]["base"], verify=True)
    message = str(refused.value)
    assert f"round {later['round_id'][:12]}" in message and "does not match the merge recomputed" in message
    assert keys["b"].fingerprint in message and keys["c"].fingerprint in message and not (tmp_path / "wrong").exists()
    # trusting c and d only: the forged round has one trusted attester, short of the quorum; the honest one has two
    trusted = [keys["c"].public_hex, keys["d"].public_hex]
    assert f.latest(network["base_id"], trust=trusted)["result_id"] == attacked["states"]["b"]["result_id"]


def test_clocks_5_s_apart_merge_the_same_list_and_a_late_or_backdated_commitment_stays_out(network, attacked):
    """b's clock is 5 s ahead of d's. Just after the deadline (the proposer's clock is
    true), two roster contributors commit: one dated honestly (late), one backdated to
    before the deadline. The proposer lists only what it had seen by its deadline, so
    neither enters, and b, c and d merge exactly the same three deltas."""
    nodes, keys, evil = network["nodes"], network["keys"], network["evil"]["delta_id"]
    assert nodes["b"].clock() - nodes["d"].clock() == pytest.approx(5.0, abs=0.1)
    proposal = nodes["p"].propose({**TEMPLATE, "base_model": str(network["family"]["base"]),
                                   "select": {"domains": DOMAINS}, "deadline": DEADLINE})
    rid, deadline = proposal["round_id"], proposal["deadline"]
    time.sleep(max(0.0, deadline + 0.2 - time.time()))  # past the proposer's deadline, before its list (settle 1.5 s)
    commit_as(nodes["m"], keys["backdated"], rid, {evil: "math"}, issued_at=deadline - 1.0)
    commit_as(nodes["m"], keys["late"], rid, {evil: "math"})
    states = {n: wait_phase(nodes[n], rid, ("attested", "failed")) for n in "bcd"}
    deltas = sorted(p["delta_id"] for p in network["published"].values())
    assert [s["phase"] for s in states.values()] == ["attested"] * 3
    assert len({s["result_id"] for s in states.values()}) == 1
    listed = wait_phase(nodes["p"], rid, ("listed",))["listed"]
    assert listed == sorted(keys[n].public_hex for n in "bcd")
    for state in states.values():
        assert state["included"] == deltas and state["participants"] == listed
        assert state["ignored"][keys["backdated"].public_hex] == "not in the proposer's participant list"
        assert state["ignored"][keys["late"].public_hex] == "late: signed after the deadline"


def test_a_search_round_proposed_off_the_roster_is_no_candidate_anywhere(network, attacked):
    """Search rounds follow the same rule: Mallory's search proposal is on the DHT, and no
    honest node counts it, so none commits to it or scores for it."""
    m, family = network["nodes"]["m"], network["family"]
    proposal = m.propose({**TEMPLATE, "base_model": str(family["base"]), "select": {"domains": DOMAINS}, "deadline": DEADLINE,
                          "search": {"generations": 1, "popsize": 2, "blocks": 1, "count": 4}})
    f = network["nodes"]["f"]
    found = f.run(f.network.get_records(search_key(network["base_id"])), 30)
    assert proposal["round_id"] in {r["round_id"] for r in found.values()}  # stored, and readable by all
    time.sleep(3)  # six polls of every coordinator: time enough to have committed, had they counted it
    for name in "pbcdf":
        node = network["nodes"][name]
        assert node.run(node.searches.proposals(network["base_id"]), 30) == []
        assert node.searches.state(proposal["round_id"]) is None

def test_a_charter_update_counts_only_when_its_maintainers_signed_it_and_a_removed_attester_stops_counting(network, attacked):
    """Runs last: it changes the roster. Mallory's update (adding itself as attester) is
    stored but ignored; the maintainer's update that takes b's attester role is followed
    by every node, and from then on b's attestations count for nothing."""
    nodes, keys, genesis = network["nodes"], network["keys"], network["genesis"]
    f, p = nodes["f"], nodes["p"]
    forged = charters.sign_charter(charters.propose_change(genesis, add={keys["m"].public_hex: ["attester"]}), keys["m"])
    answer = nodes["m"].publish_charter(forged)  # Mallory's node follows its own network: it stores it, and does not adopt it
    assert answer["adopted"] is False and "1 of its maintainers must sign it" in answer["reason"]
    assert nodes["m"].charter_status()["version"] == 0
    update = charters.sign_charter(charters.propose_change(genesis, remove={keys["b"].public_hex: ["attester"]}), keys["p"])
    assert p.publish_charter(update) == {"adopted": True, "id": charters.charter_id(update["charter"]), "version": 1}
    wait_until(lambda: f.charter_status()["version"] == 1, 40, what="the fetch-only node to follow version 1")
    assert f.charter_status()["id"] == charters.charter_id(update["charter"])
    assert charters.roles_of(f.charter, keys["b"].public_hex) == {"contributor"}
    assert charters.roles_of(f.charter, keys["m"].public_hex) == set()
    final = f.latest(network["base_id"], trust=[keys[n].public_hex for n in "bcd"])
    assert final["result_id"] == attacked["states"]["b"]["result_id"]
    assert final["attesters"] == sorted(keys[n].public_hex for n in "cd")  # b's attestation no longer counts
