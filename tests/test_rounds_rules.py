"""Round rules: the pure functions every node applies alike (protocol/rounds.py), the
round recipe checks, and competing proposals among real nodes on 127.0.0.1: every node
follows the same one."""

from __future__ import annotations

import math
import time

import pytest
from round_fixtures import RoundNet, build_family, model_id_of, round_records, store_proposal, wait_round_done

from hivemerge.protocol import rounds
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.rounds import build_recipe, proposal_from_recipe

A, B, C = "a" * 64, "b" * 64, "c" * 64


def prop(round_id: str, deadline: float) -> dict:
    return {"round_id": round_id, "deadline": deadline}


# -- winning_proposal ---------------------------------------------------------------------

def test_no_proposal_no_winner():
    assert rounds.winning_proposal([]) is None


def test_the_earliest_deadline_wins_whatever_the_round_ids():
    late_low_id, early_high_id = prop(A, 200.0), prop(C, 100.0)
    assert rounds.winning_proposal([late_low_id, early_high_id]) is early_high_id
    assert rounds.winning_proposal([early_high_id, late_low_id]) is early_high_id


def test_equal_deadlines_go_to_the_lowest_round_id_in_any_order():
    ps = [prop(C, 100.0), prop(A, 100.0), prop(B, 100.0), prop("0" * 64, 100.5)]
    for order in (ps, ps[::-1], ps[1:] + ps[:1]):
        assert rounds.winning_proposal(order)["round_id"] == A


def issued(round_id: str, issued_at: float, deadline: float) -> dict:
    return {"round_id": round_id, "issued_at": issued_at, "deadline": deadline}


def live_ids(proposals) -> list[str]:
    return [p["round_id"] for p in rounds.live_proposals(proposals)]


def test_a_competing_proposal_stays_lost_after_the_winner_closes():
    winner, loser = issued(C, 0.0, 100.0), issued(A, 10.0, 101.0)  # announced while the winner was open
    assert live_ids([loser, winner]) == [C]
    # so once the winner closed there is nothing to join (the loser is still open)
    now = 100.5
    assert rounds.winning_proposal([p for p in rounds.live_proposals([loser, winner]) if p["deadline"] > now]) is None


def test_an_earlier_closing_proposal_announced_later_still_wins():
    first, second = issued(A, 0.0, 100.0), issued(C, 50.0, 60.0)
    assert live_ids([first, second]) == [C]


def test_a_proposal_announced_after_the_last_round_closed_is_a_new_round():
    old, new = issued(C, 0.0, 100.0), issued(A, 100.0, 160.0)
    assert live_ids([new, old]) == [C, A]


def test_losing_to_a_loser_does_not_count():
    # q loses to w; r overlaps only q (announced after w closed): r starts a new round
    w, q, r = issued(B, 0.0, 100.0), issued(A, 10.0, 150.0), issued(C, 120.0, 200.0)
    assert live_ids([r, q, w]) == [B, C]


def test_equal_deadlines_compete():
    assert live_ids([issued(C, 0.0, 100.0), issued(B, 5.0, 100.0)]) == [B]


# -- quorum_size ----------------------------------------------------------------------------

@pytest.mark.parametrize("committed, quorum, needed", [
    (3, 2 / 3, 2),  # 2/3 * 3 is 2.0000000000000004 in floating point: still 2
    (6, 2 / 3, 4),
    (4, 2 / 3, 3),
    (3, 1.0, 3),
    (4, 0.5, 2),
    (5, 0.5, 3),
    (1, 0.01, 1),
    (0, 2 / 3, 1),  # never zero: a round without attesters is never final
    (100, 0.999, 100),
])
def test_quorum_size(committed, quorum, needed):
    assert rounds.quorum_size(committed, quorum) == needed


# -- final_result ----------------------------------------------------------------------------

def commits(*nodes):
    return {n: {"delta_ids": []} for n in nodes}


def attests(**by_node):
    return {n: {"result_id": r} for n, r in by_node.items()}


def test_final_when_a_quorum_attests_the_same_result():
    assert rounds.final_result(commits("n1", "n2", "n3"), attests(n1=A, n3=A), 2 / 3) == (A, ["n1", "n3"])


def test_not_final_below_quorum():
    assert rounds.final_result(commits("n1", "n2", "n3"), attests(n1=A, n2=A), 1.0) == (None, [])
    assert rounds.final_result(commits("n1", "n2", "n3"), attests(n1=A), 2 / 3) == (None, [])


def test_split_votes_are_not_a_quorum():
    assert rounds.final_result(commits("n1", "n2", "n3"), attests(n1=A, n2=B, n3=C), 2 / 3) == (None, [])


def test_the_majority_result_wins_over_a_dissenter():
    result = rounds.final_result(commits("n1", "n2", "n3", "n4"), attests(n1=B, n2=A, n3=B, n4=B), 2 / 3)
    assert result == (B, ["n1", "n3", "n4"])


def test_only_committed_participants_count():
    # outsiders attesting cannot make a round final, nor does their number raise the quorum
    outsiders = attests(x1=A, x2=A, x3=A, n1=A)
    assert rounds.final_result(commits("n1", "n2", "n3"), outsiders, 2 / 3) == (None, [])
    assert rounds.final_result(commits("n1", "n2", "n3"), {**outsiders, "n2": {"result_id": A}}, 2 / 3) == (A, ["n1", "n2"])


def test_two_results_both_at_quorum_resolve_alike_everywhere():
    # a low quorum lets two results qualify: the larger vote wins, then the lower id
    c = commits("n1", "n2", "n3", "n4", "n5")
    assert rounds.final_result(c, attests(n1=B, n2=B, n3=A, n4=A, n5=A), 0.4)[0] == A
    assert rounds.final_result(c, attests(n1=B, n2=B, n3=A, n4=A), 0.4) == (A, ["n3", "n4"])


def test_nothing_attested_is_not_final():
    assert rounds.final_result(commits("n1"), {}, 2 / 3) == (None, [])
    assert rounds.final_result({}, {}, 2 / 3) == (None, [])


# -- norm_outliers --------------------------------------------------------------------------

def test_fewer_than_three_deltas_have_no_outliers():
    assert rounds.norm_outliers({}) == {}
    assert rounds.norm_outliers({A: 1.0, B: 1000.0}) == {}


def test_a_scaled_delta_is_an_outlier_with_its_reason():
    norms = {A: 1.0, B: 1.2, C: 0.9, "d" * 64: 50.0}
    out = rounds.norm_outliers(norms)
    assert list(out) == ["d" * 64]
    # median of (0.9, 1, 1.2, 50) is 1.1; 50 > 5 * 1.1
    assert out["d" * 64] == "norm outlier: 50 vs median 1.1 (allowed x5)"


def test_a_vanishing_delta_is_an_outlier_too():
    out = rounds.norm_outliers({A: 1.0, B: 1.0, C: 0.1})
    assert list(out) == [C] and out[C].startswith("norm outlier: 0.1 vs median 1")


def test_the_bounds_themselves_are_allowed():
    assert rounds.norm_outliers({A: 1.0, B: 5.0, C: 0.2}) == {}
    assert rounds.norm_outliers({A: 1.0, B: 5.0 * (1 + 1e-9), C: 0.2}).keys() == {B}
    assert rounds.norm_outliers({A: 2.0, B: 2.0, C: 1.0}, factor=1.5).keys() == {C}


def test_all_zero_norms_exclude_nothing():
    assert rounds.norm_outliers({A: 0.0, B: 0.0, C: 0.0}) == {}


def test_a_majority_of_outliers_moves_the_median():
    # the rule protects against a minority: three scaled deltas out of five become the norm
    out = rounds.norm_outliers({A: 1.0, B: 1.0, C: 50.0, "d" * 64: 50.0, "e" * 64: 50.0})
    assert out.keys() == {A, B}


# -- proposals and recipes --------------------------------------------------------------------

TEMPLATE = {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}, "select": {"domains": ["math"]}}


def test_round_id_names_what_is_asked_not_when_it_was_announced():
    p = proposal_from_recipe(TEMPLATE, A, B, 1000.0)
    assert p["round_id"] == rounds.round_id({**p, "issued_at": 5.0})
    assert p["deadline"] == 1060.0 and math.isclose(p["quorum"], 2 / 3)
    assert proposal_from_recipe(TEMPLATE, A, B, 1000.0)["round_id"] == p["round_id"]
    assert proposal_from_recipe(TEMPLATE, A, B, 1000.5)["round_id"] != p["round_id"]
    assert proposal_from_recipe({**TEMPLATE, "quorum": 1.0}, A, B, 1000.0)["round_id"] != p["round_id"]


@pytest.mark.parametrize("change, message", [
    ({"select": None}, "select"),
    ({"select": {"domains": "math"}}, "select"),
    ({"deadline": 0}, "deadline"),
    ({"deadline": True}, "deadline"),
    ({"quorum": 0}, "quorum"),
    ({"quorum": 1.5}, "quorum"),
    ({"models": []}, "models: unknown key"),
])
def test_bad_round_recipes_are_refused(change, message):
    document = {k: v for k, v in {**TEMPLATE, **change}.items() if v is not None}
    with pytest.raises(UserInputError, match=message):
        proposal_from_recipe(document, A, B, 1000.0)


def test_unselected_names_every_delta_the_proposal_leaves_out():
    commitments = {
        "n1": {"delta_ids": [A, B], "domains": {A: "math", B: "chem"}},
        "n2": {"delta_ids": [C], "domains": {C: "fused"}},
    }
    domains = rounds.committed_domains(commitments)
    assert domains == {A: "math", B: "chem", C: "fused"}
    by_domain = {"domains": ["math", "logic"]}
    assert rounds.unselected(by_domain, domains, frozenset({"fused"})) == {
        B: "not selected: domain 'chem' is not among the proposal's ['logic', 'math']"}
    assert rounds.unselected(by_domain, domains) == {
        B: "not selected: domain 'chem' is not among the proposal's ['logic', 'math']",
        C: "not selected: domain 'fused' is not among the proposal's ['logic', 'math']"}
    by_id = {"deltas": [B]}
    assert rounds.unselected(by_id, domains, frozenset({"fused"})) == {A: "not selected: the proposal lists other delta ids"}
    assert rounds.unselected({"domains": ["math", "chem"]}, domains, frozenset({"fused"})) == {}


def test_committed_domains_read_in_committer_order_agree_everywhere():
    # two committers name the same delta under different domains: the later one in key order wins, at every node
    one = {"n1": {"delta_ids": [A], "domains": {A: "math"}}, "n2": {"delta_ids": [A], "domains": {A: "chem"}}}
    other_order = dict(reversed(list(one.items())))
    assert rounds.committed_domains(one) == rounds.committed_domains(other_order) == {A: "chem"}
    assert rounds.committed_domains({"n1": {"delta_ids": [B], "domains": {}}}) == {B: ""}


def test_build_recipe_lists_deltas_in_id_order_with_their_domain_parameters():
    template = {**TEMPLATE, "domain_parameters": {"code": {"weight": 0.5}}, "fetch_window": 10, "deadline": 5}
    p = proposal_from_recipe(template, A, B, 1000.0)
    document = build_recipe(p, [B, C], {C: "code", B: "math"})
    assert document["base_model"] == f"hm://{A}"
    assert document["models"] == [{"model": f"hm://{B}"}, {"model": f"hm://{C}", "parameters": {"weight": 0.5}}]
    assert document["merge_method"] == "ties" and document["parameters"] == TEMPLATE["parameters"]
    assert "fetch_window" not in document and "domain_parameters" not in document
    assert document["name"] == f"hivemerge round {p['round_id'][:12]}"


# -- competing proposals on the network -------------------------------------------------------

DOMAINS = ["math", "code", "logic"]


@pytest.fixture
def net(tmp_path):
    pool = RoundNet(tmp_path / "nodes")
    yield pool
    pool.close_all()


def competing_proposals(base_id: str, proposer: str, window: float) -> tuple[dict, dict, dict]:
    """Three proposals for one base: two with the same deadline (the lower round id must win)
    and one closing a second later whose round id is the lowest of all (so 'lowest id'
    alone would pick it)."""
    now = time.time()
    for i in range(500):  # a fresh triple each time (a fixed pair's lower id could be too low to beat)
        doc = {**TEMPLATE, "select": {"domains": DOMAINS}, "deadline": window}
        tie1 = proposal_from_recipe({**doc, "parameters": {"weight": 1.0, "density": 0.5 - i / 10_000}}, base_id, proposer, now)
        tie2 = proposal_from_recipe({**doc, "parameters": {"weight": 0.75, "density": 0.5 - i / 10_000}}, base_id, proposer, now)
        late = proposal_from_recipe({**doc, "deadline": window + 1, "parameters": {"weight": 1.0, "density": 0.3 + i / 1000}},
                                    base_id, proposer, now)
        if late["round_id"] < min(tie1["round_id"], tie2["round_id"]):
            winner, loser = sorted([tie1, tie2], key=lambda p: p["round_id"])
            assert winner["deadline"] == loser["deadline"] < late["deadline"]
            return winner, loser, late
    raise AssertionError("no ordering of round ids found")


def test_every_node_follows_the_same_of_competing_proposals(net, tmp_path):
    family = build_family(tmp_path / "models", DOMAINS, base_seed=5)
    a, b, c, d = net.start_many(["a", "b", "c", "d"])
    base_id = model_id_of(family["base"])
    winner, tie_loser, late = competing_proposals(base_id, a.identity.public_hex, window=6)
    # all three are on the DHT before any node holds an expert of this base, so every
    # participant chooses among the same three
    for proposal in (late, tie_loser, winner):
        store_proposal(a, proposal)
    participants = {"math": b, "code": c, "logic": d}
    for dom, node in participants.items():
        node.publish(family[dom], dom, family["base"])
    assert time.time() < winner["deadline"], "publishing took longer than the round's window"

    states = wait_round_done(list(participants.values()), winner["round_id"])
    assert all(s["phase"] == "attested" for s in states), [s.get("error") for s in states]
    assert len({s["result_id"] for s in states}) == 1
    keys = sorted(n.identity.public_hex for n in participants.values())
    for node in participants.values():
        rows = node.round_status()
        assert [r["proposal"]["round_id"] for r in rows] == [winner["round_id"]]
        assert rows[0]["final"] and rows[0]["attesters"] == keys
        assert node.rounds.state(tie_loser["round_id"]) is None and node.rounds.state(late["round_id"]) is None
    # nobody committed to the losers
    assert round_records(a, tie_loser["round_id"]) == {}
    assert round_records(a, late["round_id"]) == {}
    # the losers close, never final: the latest consensus is the winner's
    time.sleep(max(0.0, late["deadline"] - time.time()))  # bounded: at most a second past the winner's deadline
    latest = a.latest(base_id)
    assert latest["proposal"]["round_id"] == winner["round_id"] and latest["result_id"] == states[0]["result_id"]


def test_commitments_signed_after_the_deadline_count_nowhere():
    commitments = {
        "early": {"issued_at": 99.0}, "at": {"issued_at": 100.0}, "late": {"issued_at": 100.001},
    }
    assert sorted(rounds.on_time(commitments, 100.0)) == ["at", "early"]
    assert rounds.on_time(commitments, 50.0) == {}
    # so a late committer can neither join the merge nor move the quorum
    attestations = {n: {"result_id": "r"} for n in ("early", "late")}
    assert rounds.final_result(rounds.on_time(commitments, 100.0), attestations, 1.0) == (None, [])
    assert rounds.final_result(rounds.on_time(commitments, 100.0), attestations, 0.5) == ("r", ["early"])


# -- learning whether an attested round became final (what the store keeps, node/storage/retention.py)


def _settling_coordinator(tmp_path, answers):
    """A round coordinator over a stub node; ``round_records`` returns (or raises) the
    next of ``answers`` and counts its calls."""
    from types import SimpleNamespace

    from hivemerge.node.coordinators.merge_rounds import RoundCoordinator

    logged = []
    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, published=lambda: [], log=logged.append, keep_results=None,
                           identity=SimpleNamespace(public_hex="aa" * 32))
    coordinator = RoundCoordinator(node, poll=0.01)
    calls = []

    async def round_records(round_id, deadline):
        calls.append(round_id)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    coordinator.round_records = round_records
    return coordinator, calls, logged


def _attested(deadline: float, result: str = "r1") -> dict:
    return {"proposal": {"round_id": "ef" * 32, "base_id": "12" * 32, "deadline": deadline, "quorum": 0.5},
            "phase": "attested", "result_id": result}


def _records(votes: dict[str, str]):
    return {k: {"delta_ids": []} for k in votes}, {k: {"result_id": r} for k, r in votes.items()}


@pytest.mark.parametrize("votes, final", [
    ({"a": "r1", "b": "r1", "c": "r2"}, True),   # a quorum with this node's result
    ({"a": "r2", "b": "r2", "c": "r1"}, False),  # final, with another result
])
def test_settle_records_whether_the_round_became_final_with_this_result(tmp_path, votes, final):
    import asyncio

    coordinator, _, _ = _settling_coordinator(tmp_path, [_records(votes)])
    state = _attested(time.time() - 10)
    coordinator.save(state)
    asyncio.run(coordinator.settle(state, time.time()))
    assert coordinator.state(state["proposal"]["round_id"])["final"] is final


def test_settle_waits_for_quorum_until_the_window_ends(tmp_path):
    import asyncio

    short = _records({"a": "r1", "b": "r2", "c": "r3"})  # no quorum
    coordinator, _, _ = _settling_coordinator(tmp_path, [short, short])
    state = _attested(time.time() - 10)
    coordinator.save(state)
    asyncio.run(coordinator.settle(state, time.time()))
    assert "final" not in coordinator.state(state["proposal"]["round_id"])  # may still become final
    asyncio.run(coordinator.settle(state, state["proposal"]["deadline"] + coordinator.finality_window + 1))
    assert coordinator.state(state["proposal"]["round_id"])["final"] is False


def test_a_failed_finality_check_is_logged_and_retried_later(tmp_path):
    """A DHT error does not stop the tick; the round is checked again after SETTLE_EVERY,
    not at every poll."""
    import asyncio

    from hivemerge.node.coordinators import merge_rounds as node_rounds

    coordinator, calls, logged = _settling_coordinator(
        tmp_path, [RuntimeError("dht down"), _records({"a": "r1", "b": "r1", "c": "r1"})])
    state = _attested(time.time() - 10)
    coordinator.save(state)
    asyncio.run(coordinator.tick())
    asyncio.run(coordinator.tick())  # within SETTLE_EVERY: no second check
    assert len(calls) == 1 and logged == [f"round {'ef' * 6}: finality check: RuntimeError: dht down"]
    assert "final" not in coordinator.state(state["proposal"]["round_id"])
    coordinator._next_settle[state["proposal"]["round_id"]] -= node_rounds.SETTLE_EVERY
    asyncio.run(coordinator.tick())
    assert len(calls) == 2 and coordinator.state(state["proposal"]["round_id"])["final"] is True
