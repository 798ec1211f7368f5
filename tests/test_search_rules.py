"""Search-round rules (protocol/search.py) and their signed records (protocol/records.py)."""

from __future__ import annotations

import hashlib

import pytest

from hivemerge.protocol import records, search
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.records import RecordError, make_record, open_record
from hivemerge.protocol.rounds import round_key

ALICE, BOB = Identity.generate(), Identity.generate()
SID, BASE, C1, C2 = (hashlib.sha256(n.encode()).hexdigest() for n in ("search", "base", "c1", "c2"))


def scores_fields(**changes) -> dict:
    fields = {"round_id": SID, "generation": 1, "candidate_ids": [C1, C2], "scores": [0.5, -0.25], "examples": 100,
              "issued_at": 1700000000.0, "expires_at": 1700000300.0}
    fields.update(changes)
    return fields


def test_a_scores_record_round_trips_and_names_its_generation():
    value = make_record(ALICE, "record/scores", scores_fields())
    opened = open_record(round_key(SID), f"{ALICE.public_hex}/scores/1", value)
    assert opened["scores"] == [0.5, -0.25] and opened["publisher"] == ALICE.public_hex
    with pytest.raises(RecordError, match="must be stored under subkey"):
        open_record(round_key(SID), f"{ALICE.public_hex}/scores/2", value)  # another generation's slot
    with pytest.raises(RecordError, match="signed by a key other than"):
        open_record(round_key(SID), f"{BOB.public_hex}/scores/1", value)


@pytest.mark.parametrize("changes, message", [
    ({"scores": [0.5]}, "one finite number per candidate"),
    ({"scores": [0.5, float("nan")]}, "one finite number per candidate"),
    ({"scores": [0.5, True]}, "one finite number per candidate"),
    ({"candidate_ids": [C1, "not-an-id"]}, "candidate_ids must be content ids"),
    ({"generation": -1}, "generation must be non-negative"),
])
def test_malformed_scores_are_refused(changes, message):
    with pytest.raises(RecordError, match=message):
        make_record(ALICE, "record/scores", scores_fields(**changes))


def test_search_and_candidates_records():
    proposal = {"base_id": BASE, "recipe": {"merge_method": "ties"}, "select": {"domains": ["math"]},
                "search": search.check_settings({"generations": 2, "popsize": 4, "blocks": 2}), "deadline": 1700000100.0, "quorum": 1.0,
                "proposer": ALICE.public_hex}
    proposal["round_id"] = search.search_id(proposal)
    value = make_record(ALICE, "record/search", {**proposal, "issued_at": 1700000000.0, "expires_at": 1700000300.0})
    opened = open_record(search.searches_key(BASE), f"{ALICE.public_hex}/{proposal['round_id']}", value)
    assert search.search_id(opened) == proposal["round_id"]
    with pytest.raises(RecordError, match="another key"):
        open_record(search.searches_key(SID), f"{ALICE.public_hex}/{proposal['round_id']}", value)
    cand = make_record(ALICE, "record/candidates", {"round_id": SID, "generation": 0, "candidate_ids": [C1], "issued_at": 1.0, "expires_at": 2.0})
    assert open_record(round_key(SID), f"{ALICE.public_hex}/candidates/0", cand)["candidate_ids"] == [C1]
    assert records.kind_for_key(round_key(SID), f"{ALICE.public_hex}/commit") == "record/commitment"


def test_combined_scores_are_the_mean_over_owners_that_scored_these_candidates():
    a, b, c, outsider = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    found = {
        b: {"candidate_ids": [C1, C2], "scores": [0.25, 1.0]},
        a: {"candidate_ids": [C1, C2], "scores": [0.75, 0.0]},
        c: {"candidate_ids": [C2, C1], "scores": [9.0, 9.0]},  # diverged: other candidates, ignored
        outsider: {"candidate_ids": [C1, C2], "scores": [9.0, 9.0]},  # not a participant, ignored
    }
    combined, scorers = search.combine_scores(found, [a, b, c], [C1, C2])
    assert combined == [0.5, 0.5] and scorers == [a, b]
    assert search.combine_scores({}, [a], [C1]) == (None, [])


def tally_fields(**changes) -> dict:
    fields = {"round_id": SID, "generation": 0, "candidate_ids": [C1, C2],
              "scorers": sorted([ALICE.public_hex, BOB.public_hex]), "issued_at": 1.0, "expires_at": 2.0}
    fields.update(changes)
    return fields


def test_a_tally_record_round_trips_under_its_generation():
    value = make_record(ALICE, "record/tally", tally_fields())
    assert records.kind_for_key(round_key(SID), f"{ALICE.public_hex}/tally/0") == "record/tally"
    assert open_record(round_key(SID), f"{ALICE.public_hex}/tally/0", value)["scorers"] == tally_fields()["scorers"]
    with pytest.raises(RecordError):
        open_record(round_key(SID), f"{ALICE.public_hex}/tally/1", value)  # another generation's slot
    with pytest.raises(RecordError):
        open_record(round_key(SID), f"{BOB.public_hex}/tally/0", value)  # signed by another key


@pytest.mark.parametrize("scorers", [
    ["B" * 64],  # not lower-case hex
    ["b" * 63],  # too short
    ["b" * 64, "a" * 64],  # not sorted
    ["a" * 64, "a" * 64],  # twice
    [7],
])
def test_a_tally_names_sorted_distinct_keys(scorers):
    with pytest.raises(RecordError, match="scorers must be sorted, distinct public keys"):
        make_record(ALICE, "record/tally", tally_fields(scorers=scorers))


def test_a_tally_is_followed_only_for_these_candidates_and_committed_owners():
    a, b, outsider = "a" * 64, "b" * 64, "d" * 64
    tally = {"candidate_ids": [C1, C2], "scorers": [a, b]}
    assert search.tallied_scorers(tally, [a, b], [C1, C2]) == [a, b]
    assert search.tallied_scorers(tally, [a, b], [C2, C1]) is None  # the proposer drew other candidates
    assert search.tallied_scorers({**tally, "scorers": [a, outsider]}, [a, b], [C1, C2]) is None
    assert search.tallied_scorers({**tally, "scorers": []}, [a, b], [C1, C2]) is None
    assert search.tallied_scorers(None, [a, b], [C1, C2]) is None
    # the tallied scores are combined whatever else arrived: here a's alone, though b scored too
    found = {a: {"candidate_ids": [C1, C2], "scores": [0.75, 0.0]}, b: {"candidate_ids": [C1, C2], "scores": [0.25, 1.0]}}
    assert search.mean_scores(found, [a]) == [0.75, 0.0]
    assert search.mean_scores(found, [a, b]) == [0.5, 0.5]
    assert search.scored({**found, outsider: {"candidate_ids": [C2, C1], "scores": [1.0, 1.0]}}, [C1, C2]) == [a, b]


def test_best_candidate_prefers_the_earliest_of_equals():
    history = [{"combined": [0.1, 0.7, 0.3]}, {"combined": [0.7, 0.2]}, {"combined": [0.65]}]
    assert search.best_candidate(history) == (0, 1)
    assert search.best_candidate([]) is None


def test_slot_end():
    proposal = {"deadline": 1000.0, "search": {"generation_seconds": 30}}
    assert search.slot_end(proposal, 0, 60) == 1000 + 1.5 + 60 + 30
    assert search.slot_end(proposal, 2, 60) == 1000 + 1.5 + 60 + 90


@pytest.mark.parametrize("settings, message", [
    ([], "must be a mapping"),
    ({"generations": 2, "popsize": 4}, "search.blocks: required"),
    ({"generations": 0, "popsize": 4, "blocks": 1}, "search.generations: must be an integer in \\[1, 100\\], got 0"),
    ({"generations": 2, "popsize": 4.5, "blocks": 1}, "search.popsize: must be an integer"),
    ({"generations": 2.0, "popsize": 4, "blocks": 1}, "search.generations: must be an integer"),
    ({"generations": 2, "popsize": 4, "blocks": 1, "sigma": float("inf")}, "search.sigma"),
    ({"generations": 2, "popsize": 4, "blocks": 1, "speed": 3}, "search.speed: unknown setting"),
])
def test_settings_are_checked(settings, message):
    with pytest.raises(UserInputError, match=message):
        search.check_settings(settings)
    assert search.check_settings({"generations": 2, "popsize": 4, "blocks": 1, "sigma": 0.3}) == {
        "generations": 2, "popsize": 4, "blocks": 1, "sigma": 0.3, "max_weight": 2.0, "count": 100, "loss_weight": 0.25,
        "generation_seconds": 120.0, "final_deadline": 10.0}
