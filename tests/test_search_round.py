"""A search round among real nodes on 127.0.0.1.

Three nodes: ``a`` proposes the search (it holds no expert), ``b`` publishes a math
expert and ``c`` a logic expert of the same tiny base. Both owners commit, score every
candidate of every generation on their own domain's validation data, and publish only
the scores; every node combines them alike and draws the same next generation; ``a``
then proposes the best recipe as a normal merge round, which ``b`` and ``c`` merge and
attest. The main search runs under a network charter (``a`` proposes, ``b`` and ``c``
contribute and attest): ``a`` lists the search's participants, and the owners take
exactly that list.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from network_fixtures import wait_until
from round_fixtures import RoundNet, model_id_of, round_records, wait_round_done
from search_fixtures import char_family

from hivemerge.merge.evaluation.fitness import ValidationFitness
from hivemerge.merge.recipe import validate_recipe
from hivemerge.merge.search.cmaes import SearchSettings, next_candidates
from hivemerge.merge.search.space import SearchSpace
from hivemerge.merge.toy import tasks
from hivemerge.protocol import charter as charters
from hivemerge.protocol import search
from hivemerge.protocol.content import content_id
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.rounds import build_recipe

SETTINGS = {"generations": 2, "popsize": 3, "blocks": 2, "count": 6, "seed": 3, "loss_weight": 0.25,
            "generation_seconds": 60, "final_deadline": 4}
SEARCH_TIMEOUT = 240.0  # past the last tally wait (about 160 s with these settings): a bound, not a pace


def owners_charter(family: dict, homes: Path) -> dict:
    """A network where ``a`` proposes (and maintains the charter) and ``b``, ``c`` contribute and attest."""
    keys = {name: Identity.load_or_create(homes / name) for name in "abc"}
    roster = {keys["a"].public_hex: ["proposer"], **{keys[n].public_hex: ["attester", "contributor"] for n in "bc"}}
    return charters.sign_charter(charters.new_charter(
        name="search-net", base_ids=[model_id_of(family["base"])], maintainers=[keys["a"].public_hex],
        methods=["task_arithmetic"], roster=roster, quorum=1.0, min_attesters=2), keys["a"])


@contextmanager
def owners_network(root, charter: bool = False) -> Iterator[tuple[dict, RoundNet, tuple, dict]]:
    """(models, network, nodes, expert records by domain): ``a`` holds no expert, ``b`` a
    math expert and ``c`` a logic expert of one tiny base; every node is closed after.
    ``charter``: the nodes follow :func:`owners_charter` (else a private test network)."""
    family = char_family(root / "models")
    net = RoundNet(root / "nodes", network=owners_charter(family, root / "nodes") if charter else None)
    try:
        a, b, c = net.start_many(["a", "b", "c"])
        published = {"math": b.publish(family["a"], "math", family["base"]),
                     "logic": c.publish(family["b"], "logic", family["base"])}
        yield family, net, (a, b, c), published
    finally:
        net.close_all()


def search_document(family: dict, settings: dict, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "select": {"domains": ["math", "logic"]},
            "parameters": {"weight": 0.5}, "dtype": "float32", "deadline": 4, "quorum": 1.0, "search": settings, **extra}


def wait_search_end(nodes, sid: str) -> list[dict]:
    """Every node's state of the search, once each is done or failed."""
    def finished():
        states = [n.searches.state(sid) for n in nodes]
        return states if all(s and s["phase"] in ("done", "failed") for s in states) else None

    return wait_until(finished, SEARCH_TIMEOUT, what=f"the search to end at {len(nodes)} node(s)")


@pytest.fixture(scope="module")
def search_round(tmp_path_factory):
    with owners_network(tmp_path_factory.mktemp("search-round"), charter=True) as (family, net, (a, b, c), published):
        proposal = a.propose(search_document(family, SETTINGS, fetch_window=LATE_WINDOW))
        states = wait_search_end((a, b, c), proposal["round_id"])
        yield {"family": family, "nodes": (a, b, c), "published": published, "proposal": proposal, "states": states}


def test_every_node_draws_and_combines_alike(search_round):
    a, b, c = search_round["nodes"]
    states = search_round["states"]
    assert [s["phase"] for s in states] == ["done"] * 3, [s.get("error") for s in states]
    owners = sorted([b.identity.public_hex, c.identity.public_hex])
    included = sorted(p["delta_id"] for p in search_round["published"].values())
    for s in states:
        assert s["owners"] == owners and s["included"] == included and s["excluded"] == {}
        assert len(s["history"]) == 2 and all(len(h["candidate_ids"]) == 3 for h in s["history"])
        assert [h["scorers"] for h in s["history"]] == [owners, owners]
        assert [h["proposer_agrees"] for h in s["history"]] == [True, True]  # the proposer drew the same candidates
        assert [h["tallied"] for h in s["history"]] == [True, True]  # and every node combined its tally
    reference = [(h["candidate_ids"], h["combined"]) for h in states[0]["history"]]
    for s in states[1:]:
        assert [(h["candidate_ids"], h["combined"]) for h in s["history"]] == reference
    assert states[0]["best"] == states[1]["best"] == states[2]["best"]
    assert "final_round" in states[0] and "final_round" not in states[1]
    assert states[0]["listed"] == owners  # under the charter: the proposer's signed participant list ...
    assert states[1]["ignored"] == states[2]["ignored"] == {}  # ... which the owners took whole


def test_scores_are_each_owners_own_and_the_rule_is_reproducible(search_round):
    """Offline, from the records alone: each owner's published scores are its candidates'
    fitness on its own domain's validation data, the combined score is their mean, and
    the candidates of generation 2 follow from generation 1's combined scores."""
    a, b, c = search_round["nodes"]
    proposal = search_round["proposal"]
    sid = proposal["round_id"]
    records = round_records(a, sid)
    scores = {(r["publisher"], r["generation"]): r for r in records.values() if "scores" in r}
    candidates = {r["generation"]: r for r in records.values() if "candidate_ids" in r and not {"scores", "scorers"} & set(r)}
    tallies = {(r["publisher"], r["generation"]): r for r in records.values() if "scorers" in r}
    owners = sorted(n.identity.public_hex for n in (b, c))
    assert {k: t["scorers"] for k, t in tallies.items()} == {(a.identity.public_hex, g): owners for g in (0, 1)}
    assert sorted(scores) == sorted((n.identity.public_hex, g) for n in (b, c) for g in (0, 1))
    for record in scores.values():  # scores only: no prompts, answers or outputs travel
        assert set(record) == {"round_id", "generation", "candidate_ids", "scores", "examples", "issued_at", "expires_at", "publisher"}
        assert record["examples"] == SETTINGS["count"]

    included = sorted(p["delta_id"] for p in search_round["published"].values())
    domains = {p["delta_id"]: p["domain"] for p in search_round["published"].values()}
    recipe = validate_recipe(build_recipe(proposal, included, domains), resolver=b.store.resolve)
    space = SearchSpace(recipe, blocks=SETTINGS["blocks"])
    settings = SearchSettings(budget=7, seed=SETTINGS["seed"], popsize=3)
    history = search_round["states"][0]["history"]
    for generation in (0, 1):
        xs = next_candidates(space, settings, [h["combined"] for h in history[:generation]])
        documents = [space.recipe(x) for x in xs]
        ids = [content_id(d) for d in documents]
        assert ids == history[generation]["candidate_ids"] == candidates[generation]["candidate_ids"]
        for node, domain in ((b, "math"), (c, "logic")):
            own = ValidationFitness({domain: tasks.validation(domain, SETTINGS["count"])}, 0.25, resolver=node.store.resolve)
            assert scores[(node.identity.public_hex, generation)]["scores"] == [own(d).score for d in documents]
        both = [scores[(n.identity.public_hex, generation)]["scores"] for n in sorted((b, c), key=lambda n: n.identity.public_hex)]
        assert history[generation]["combined"] == pytest.approx([(x + y) / 2 for x, y in zip(*both)], abs=1e-12)
    g, i = search.best_candidate(history)
    assert search_round["states"][0]["best"]["score"] == max(max(h["combined"]) for h in history) == history[g]["combined"][i]


def test_the_best_recipe_runs_as_a_merge_round(search_round):
    a, b, c = search_round["nodes"]
    state = search_round["states"][0]
    final_id = state["final_round"]
    states = wait_round_done([b, c], final_id)
    assert [s["phase"] for s in states] == ["attested", "attested"], [s.get("error") for s in states]
    final_proposal = states[0]["proposal"]
    assert final_proposal["select"] == {"deltas": state["included"]}
    assert final_proposal["recipe"]["domain_parameters"] == state["best"]["domain_parameters"]
    weights = state["best"]["domain_parameters"]["math"]["weight"]
    assert set(weights) == {"per_layer", "default"} and len(weights["per_layer"]) == 4
    assert states[0]["result_id"] == states[1]["result_id"]
    final = wait_until(lambda: a.latest(final_proposal["base_id"]), 30, what="the final round to be final")
    assert final["result_id"] == states[0]["result_id"] and final["proposal"]["round_id"] == final_id


# -- a score record that reaches one node late ------------------------------------------

LATE_SETTINGS = {**SETTINGS, "generation_seconds": 12}
LATE_WINDOW = 5.0  # the recipe's fetch_window: the deltas are on loopback


@pytest.fixture(scope="module")
def late_score_round(tmp_path_factory):
    """As above, but ``c`` receives ``b``'s generation-0 scores only after that slot has
    ended (2 s late). Combining what it had at the slot's end would give ``c`` other
    combined scores than ``a`` and ``b``, and so other candidates in generation 1."""
    with owners_network(tmp_path_factory.mktemp("late-score-round")) as (family, net, (a, b, c), _):
        proposal = a.propose(search_document(family, LATE_SETTINGS, fetch_window=LATE_WINDOW))
        hidden_until = search.slot_end(proposal, 0, LATE_WINDOW) + 2.0
        seen_by_c = c.searches.generation_records

        async def late(search_id, generation):
            scores, candidates, tallies = await seen_by_c(search_id, generation)
            if generation == 0 and time.time() < hidden_until:
                scores.pop(b.identity.public_hex, None)
            return scores, candidates, tallies

        c.searches.generation_records = late
        states = wait_search_end((a, b, c), proposal["round_id"])
        yield {"nodes": (a, b, c), "states": states, "hidden_until": hidden_until}


def test_a_late_score_record_does_not_split_the_search(late_score_round):
    a, b, c = late_score_round["nodes"]
    states = late_score_round["states"]
    assert [s["phase"] for s in states] == ["done"] * 3, [s.get("error") for s in states]
    owners = sorted([b.identity.public_hex, c.identity.public_hex])
    reference = [(h["candidate_ids"], h["combined"], h["scorers"]) for h in states[0]["history"]]
    for s in states[1:]:
        assert [(h["candidate_ids"], h["combined"], h["scorers"]) for h in s["history"]] == reference
    assert [h["scorers"] for h in states[2]["history"]] == [owners, owners]  # c waited for b's scores
    assert all(h["tallied"] for s in states for h in s["history"])
    assert states[0]["best"] == states[1]["best"] == states[2]["best"]


# -- a node restarted during a search ------------------------------------------------------

def test_a_search_cut_short_by_a_restart_goes_on_from_its_last_generation(tmp_path):
    """A state file left in phase "searching" (the node stopped after generation 0) is
    taken up again by the next tick: generations 1 and 2 run, each drawn from the combined
    scores before it, and nothing is screened or scored twice."""
    import asyncio
    from types import SimpleNamespace

    from hivemerge.node.coordinators.search_rounds import SearchCoordinator

    me, delta = "ab" * 32, "cd" * 32

    def refetch(*args):
        raise AssertionError("a resumed search must not fetch and screen again")

    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, identity=SimpleNamespace(public_hex=me), published=lambda: [], record_ttl=60.0,
                           rounds=SimpleNamespace(round_records=refetch, gather_deltas=refetch))
    coordinator = SearchCoordinator(node, poll=0.01)
    proposal = {"round_id": "ef" * 32, "base_id": "12" * 32, "deadline": time.time() - 100, "proposer": "34" * 32,
                "recipe": {"fetch_window": 5.0}, "select": {}, "quorum": 1.0,
                "search": {"generations": 3, "popsize": 2, "blocks": 1, "generation_seconds": 10.0}}
    first = {"generation": 0, "candidates": [[0.1], [0.9]], "candidate_ids": ["c0", "c1"], "combined": [0.5, 0.25]}
    coordinator.save({"proposal": proposal, "phase": "searching", "roles": ["owner"], "included": [delta], "owners": ["01" * 32, me],
                      "domains": {delta: "math"}, "excluded": {}, "history": [first]})
    space = SimpleNamespace(recipe=lambda x: {"models": [{"parameters": {"weight": x[0]}}]})
    coordinator._space = lambda proposal, included, domains: (space, "settings")
    coordinator._fitness = lambda proposal, state, included: None
    drawn = []

    async def generation(proposal, roles, space, settings, fitness, owners, g, window, earlier):
        drawn.append((g, earlier))
        return {"generation": g, "candidates": [[0.2 * g], [0.3 * g]], "candidate_ids": [f"g{g}a", f"g{g}b"], "combined": [0.1 * g, 0.6]}

    coordinator._generation = generation

    async def tick():
        await coordinator.tick()
        await asyncio.gather(*coordinator._running.values())

    asyncio.run(tick())
    assert drawn == [(1, [[0.5, 0.25]]), (2, [[0.5, 0.25], [0.1, 0.6]])]
    state = coordinator.state(proposal["round_id"])
    assert state["phase"] == "done", state.get("error")
    assert [h["generation"] for h in state["history"]] == [0, 1, 2]
    # the best of all three generations: 0.6 first drawn in generation 1, candidate [0.3]
    assert (state["best"]["generation"], state["best"]["index"], state["best"]["score"]) == (1, 1, 0.6)
    assert state["best"]["domain_parameters"] == {"math": {"weight": 0.3}}
    asyncio.run(tick())  # a finished search is not run again
    assert len(drawn) == 2


def final_round_stub(tmp_path, me: str, existing: list[dict]):
    """A search coordinator whose node records stored records and knows ``existing`` proposals."""
    from types import SimpleNamespace

    from hivemerge.node.coordinators.search_rounds import SearchCoordinator

    stored = []

    async def store_record(kind, key, fields, ttl):
        stored.append((kind, fields))

    async def proposals(base_id):
        return existing

    async def publish_proposal(proposal):  # as the round coordinator stores one (no charter: no state of its own)
        await store_record("record/proposal", "rounds-key", {**proposal, "issued_at": time.time()}, 60.0)

    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, identity=SimpleNamespace(public_hex=me), published=lambda: [], record_ttl=60.0,
                           store_record=store_record, rounds=SimpleNamespace(proposals=proposals, publish_proposal=publish_proposal))
    return SearchCoordinator(node, poll=0.01), stored


FINISHED_SEARCH = {
    "proposal": {"round_id": "ef" * 32, "base_id": "12" * 32, "deadline": time.time() - 1000, "proposer": "34" * 32,
                 "recipe": {"merge_method": "ties", "fetch_window": 5.0}, "select": {"domains": ["math"]}, "quorum": 1.0,
                 "search": {"generations": 1, "popsize": 2, "blocks": 1, "generation_seconds": 10.0, "final_deadline": 30}},
    "included": ["cd" * 32], "domains": {"cd" * 32: "math"}, "excluded": {}, "history": [],
    "best": {"generation": 0, "index": 0, "score": 0.5, "candidate_id": "c0", "domain_parameters": {"math": {"weight": 0.5}}},
}


def run_ticks(coordinator) -> None:
    import asyncio

    async def tick():
        await coordinator.tick()
        await asyncio.gather(*coordinator._running.values())

    asyncio.run(tick())


def test_a_first_owner_restarted_while_awaiting_the_final_round_still_stands_in(tmp_path):
    """A state left in "awaiting final round" is taken up again: the search is not rerun,
    and with no final round from the proposer past its wait the owner proposes it."""
    me = "01" * 32
    coordinator, stored = final_round_stub(tmp_path, me, existing=[])

    async def rerun(*args):
        raise AssertionError("a finished search must not run again")

    coordinator._search = rerun
    coordinator.save({**FINISHED_SEARCH, "phase": "awaiting final round", "roles": ["owner"], "owners": [me, "02" * 32]})
    run_ticks(coordinator)
    state = coordinator.state(FINISHED_SEARCH["proposal"]["round_id"])
    assert state["phase"] == "done", state.get("error")
    assert [kind for kind, _ in stored] == ["record/proposal"]
    final = stored[0][1]
    assert (final["proposer"], final["select"]) == (me, {"deltas": ["cd" * 32]})
    assert final["recipe"]["domain_parameters"] == {"math": {"weight": 0.5}}
    assert state["final_by"] == "backup" and state["final_round"] == final["round_id"]


def test_a_late_proposer_joins_the_backup_owners_final_round_instead_of_adding_one(tmp_path):
    """The proposer finishing after the first owner stood in finds that owner's identical
    final round and proposes none; a final round of other parameters does not count."""
    proposer = FINISHED_SEARCH["proposal"]["proposer"]
    backup = {"round_id": "99" * 32, "proposer": "01" * 32, "select": {"deltas": ["cd" * 32]},
              "recipe": {"domain_parameters": {"math": {"weight": 0.5}}}}
    other = {**backup, "round_id": "98" * 32, "recipe": {"domain_parameters": {"math": {"weight": 0.75}}}}
    for existing, proposes in (([other, backup], False), ([other], True)):
        home = tmp_path / ("proposes" if proposes else "joins")
        home.mkdir()
        coordinator, stored = final_round_stub(home, proposer, existing=existing)

        async def search_done(proposal, state, window):
            state["best"] = FINISHED_SEARCH["best"]

        coordinator._search = search_done
        coordinator.save({**FINISHED_SEARCH, "phase": "searching", "roles": ["proposer"], "owners": ["01" * 32]})
        run_ticks(coordinator)
        state = coordinator.state(FINISHED_SEARCH["proposal"]["round_id"])
        assert state["phase"] == "done", state.get("error")
        assert [kind for kind, _ in stored] == (["record/proposal"] if proposes else [])
        assert state["final_round"] == (stored[0][1]["round_id"] if proposes else backup["round_id"])


# -- a proposer that is gone after the deadline --------------------------------------------

def test_a_search_whose_proposer_is_gone_ends_in_the_first_owners_final_round(tmp_path):
    """``a`` proposes and leaves once both owners have committed, before the deadline:
    it publishes no candidates and no tally. ``b`` and ``c`` search on
    (no candidates or tallies come: each combines what it has when the tally wait ends, and
    both have both scores), and the first owner in key order proposes the final merge round
    itself; both owners merge and attest it."""
    with owners_network(tmp_path) as (family, net, (a, b, c), _):
        sid = a.propose(search_document(family, {**LATE_SETTINGS, "generation_seconds": 8}, fetch_window=LATE_WINDOW))["round_id"]
        wait_until(lambda: all((n.searches.state(sid) or {}).get("phase") == "committed" for n in (b, c)), 30,
                   what="the owners to commit")
        net.close(a)
        states = wait_search_end((b, c), sid)
        assert [s["phase"] for s in states] == ["done", "done"], [s.get("error") for s in states]
        assert [(h["candidate_ids"], h["combined"]) for h in states[0]["history"]] == \
               [(h["candidate_ids"], h["combined"]) for h in states[1]["history"]]
        assert all(h["tallied"] is False and h["proposer_agrees"] is None for s in states for h in s["history"])
        first = min((b, c), key=lambda n: n.identity.public_hex)
        backup, other = (states[0], states[1]) if first is b else (states[1], states[0])
        assert backup["final_by"] == "backup" and "final_round" not in other
        finals = wait_round_done([b, c], backup["final_round"])
        assert [s["phase"] for s in finals] == ["attested", "attested"], [s.get("error") for s in finals]
        assert finals[0]["proposal"]["proposer"] == first.identity.public_hex
        assert finals[0]["proposal"]["recipe"]["domain_parameters"] == backup["best"]["domain_parameters"]
        assert finals[0]["result_id"] == finals[1]["result_id"]


def test_an_owner_does_not_score_a_generation_whose_slot_has_passed(tmp_path, monkeypatch):
    """A resumed owner reaching a generation after its slot's end publishes no scores
    (they could not count) and combines from the records; within the slot it scores."""
    import asyncio
    from types import SimpleNamespace

    from hivemerge.merge.search import cmaes as merge_search
    from hivemerge.node.coordinators.search_rounds import SearchCoordinator

    stored = []

    async def store_record(kind, key, fields, ttl):
        stored.append((kind, fields["generation"]))

    node = SimpleNamespace(charter=None, clock=time.time, home=tmp_path, store_record=store_record, record_ttl=60.0)
    coordinator = SearchCoordinator(node, poll=0.01)

    async def combined(proposal, proposing, generation, owners, ids, window):
        return [0.5], ["ab" * 32], None, True

    coordinator._combined = combined
    monkeypatch.setattr(merge_search, "next_candidates", lambda space, settings, earlier: [[0.25]])
    space = SimpleNamespace(recipe=lambda x: {"models": [{"parameters": {"weight": x[0]}}]})
    scored = []

    def fitness(document):
        scored.append(document)
        return SimpleNamespace(score=0.75)

    fitness.suites = {"math": [1, 2, 3]}  # what _score_all counts as examples
    now = time.time()
    for deadline, expected in ((now - 100, []), (now + 100, [("record/scores", 0)])):
        stored.clear()
        proposal = {"round_id": "ef" * 32, "deadline": deadline, "proposer": "34" * 32,
                    "search": {"generations": 1, "generation_seconds": 10.0}}
        entry = asyncio.run(coordinator._generation(proposal, ["owner"], space, "settings", fitness, ["ab" * 32], 0, 5.0, []))
        assert stored == expected and entry["combined"] == [0.5] and entry["tallied"] is True
    assert scored == [{"models": [{"parameters": {"weight": 0.25}}]}]  # scored once: within the slot only
