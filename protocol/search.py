"""Search-round rules: what every node computes alike about a distributed recipe search.

A search round is a signed proposal (base, a round recipe template as the start point,
which experts may join, the search settings, a commit deadline). The owners of matching
experts commit their delta ids as in a merge round. Then, generation after generation,
every node draws the same candidate recipes from the combined scores of the earlier
generations (CMA-ES seeded by the proposal: merge/search/cmaes.py), the proposer publishes
the candidates' content ids, and each owner scores the candidates on its own private
validation data and publishes only the scores, signed. The combined score of a
candidate is the mean of the owners' scores, in a fixed order; the best candidate of
the whole search becomes a normal merge round.

Which owners' scores a generation combines must be the same at every node, or the next
generation's candidates differ. A score record may reach one node before the slot's
end and another after it, so the proposer publishes a tally (the owners whose scores
it combined) and every node combines exactly the tallied scores, waiting for any it
has not yet received (until :func:`tally_end`). A node that sees no usable tally by
then (the proposer gone, or drawing other candidates) combines what it has. Should the
proposer be gone at the end, the first owner (in key order) proposes the final merge
round instead, after :func:`final_end`.
"""

from __future__ import annotations

import math

from hivemerge.protocol import bounds
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.keys import searches_key  # noqa: F401  (a search's key, named with its rules)

SEARCH_KEYS = {"base_id", "recipe", "select", "search", "deadline", "quorum", "proposer"}
# settings -> (type, low, high); every node reads them the same way
SETTINGS = {
    "generations": (int, 1, bounds.MAX_GENERATIONS),
    "popsize": (int, 2, bounds.MAX_POPSIZE),
    "blocks": (int, 1, bounds.MAX_LAYERS),
    "seed": (int, 0, 2**31 - 1),
    "sigma": (float, 1e-6, 1.0),
    "max_weight": (float, 1e-6, 100.0),
    "count": (int, 1, bounds.MAX_VALIDATION_COUNT),  # validation examples per owner and domain (built-in suites)
    "loss_weight": (float, 0.0, 100.0),
    "generation_seconds": (float, 1.0, bounds.MAX_SEARCH_SECONDS),  # how long owners have to score a generation
    "final_deadline": (float, 1.0, bounds.MAX_DEADLINE_SECONDS),  # commit window of the final merge round
}
# Filled in by check_settings, so a proposal states every value the nodes must agree on
# (the seed, when absent, comes from the search id: see node/coordinators/search_rounds.py).
DEFAULTS = {"sigma": 0.2, "max_weight": 2.0, "count": 100, "loss_weight": 0.25, "generation_seconds": 120.0, "final_deadline": 10.0}
SETTLE_SECONDS = 1.5


def search_id(proposal: dict) -> str:
    return content_id({k: proposal[k] for k in SEARCH_KEYS})


def check_settings(settings: object) -> dict:
    """The search settings of a proposal, checked (raises UserInputError naming the key)."""
    if not isinstance(settings, dict):
        raise UserInputError("search: must be a mapping of settings")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise UserInputError(f"search.{sorted(unknown)[0]}: unknown setting; expected {sorted(SETTINGS)}")
    missing = {"generations", "popsize", "blocks"} - set(settings)
    if missing:
        raise UserInputError(f"search.{sorted(missing)[0]}: required")
    for name, value in settings.items():
        kind, low, high = SETTINGS[name]
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if ok and kind is int:
            ok = isinstance(value, int)  # 3.0 would pass a range check but break range() and the strategy
        if not ok or not low <= value <= high:
            raise UserInputError(f"search.{name}: must be {'an integer' if kind is int else 'a number'} in [{low}, {high}], got {value!r}")
    settings = {**DEFAULTS, **settings}
    # What a proposal can make every owner compute, and how long its records must live.
    merges = settings["generations"] * settings["popsize"]
    if merges > bounds.MAX_SEARCH_CANDIDATES:
        raise UserInputError(f"search: generations x popsize is {merges}, more than the {bounds.MAX_SEARCH_CANDIDATES} "
                             "candidates a search may ask every owner to merge and score")
    span = settings["generations"] * settings["generation_seconds"] + settings["final_deadline"]
    if span > bounds.MAX_SEARCH_SECONDS:
        raise UserInputError(f"search: generations x generation_seconds + final_deadline is {span:g} s, more than "
                             f"{bounds.MAX_SEARCH_SECONDS:g} s")
    return settings


def slot_end(proposal: dict, generation: int, fetch_window: float) -> float:
    """When generation ``generation``'s scores are due: the commit deadline, the time to
    fetch the deltas, then one slot of ``generation_seconds`` per generation."""
    seconds = float(proposal["search"]["generation_seconds"])
    return proposal["deadline"] + SETTLE_SECONDS + fetch_window + (generation + 1) * seconds


def tally_end(proposal: dict, generation: int, fetch_window: float) -> float:
    """How long a node waits for the proposer's tally of a generation and for the score
    records it names: half a slot past the slot's end."""
    return slot_end(proposal, generation, fetch_window) + float(proposal["search"]["generation_seconds"]) / 2


def final_end(proposal: dict, fetch_window: float) -> float:
    """When the first owner stops waiting for the proposer's final merge round and
    proposes it itself: the last generation's tally wait, then ``final_deadline``."""
    last = int(proposal["search"]["generations"]) - 1
    return tally_end(proposal, last, fetch_window) + float(proposal["search"]["final_deadline"])


def scored(score_records: dict[str, dict], candidate_ids: list[str]) -> list[str]:
    """The owners, sorted, whose score record is for exactly these candidates (a record
    for other candidates comes from a diverging node)."""
    return sorted(o for o, r in score_records.items() if r["candidate_ids"] == candidate_ids and len(r["scores"]) == len(candidate_ids))


def mean_scores(score_records: dict[str, dict], scorers: list[str]) -> list[float]:
    """Each candidate's mean score over ``scorers``, summed in their (sorted) order."""
    count = len(score_records[scorers[0]]["scores"])
    return [math.fsum(score_records[o]["scores"][i] for o in scorers) / len(scorers) for i in range(count)]


def combine_scores(score_records: dict[str, dict], participants: list[str], candidate_ids: list[str]) -> tuple[list[float] | None, list[str]]:
    """(the mean score of each candidate over the owners that scored exactly these
    candidates, those owners in sorted order). Only committed participants count; a
    record for other candidates (a diverging node) is ignored. None when nobody scored."""
    scorers = [o for o in scored(score_records, candidate_ids) if o in participants]
    if not scorers:
        return None, []
    return mean_scores(score_records, scorers), scorers


def tallied_scorers(tally: dict | None, participants: list[str], candidate_ids: list[str]) -> list[str] | None:
    """The owners the proposer's tally says it combined, when the tally is for these
    candidates and names only committed participants; else None (the tally is not usable)."""
    if tally is None or tally["candidate_ids"] != candidate_ids or not tally["scorers"]:
        return None
    if not set(tally["scorers"]) <= set(participants):
        return None
    return list(tally["scorers"])


def best_candidate(history: list[dict]) -> tuple[int, int] | None:
    """(generation, index) of the highest combined score; ties go to the earliest."""
    best, where = -math.inf, None
    for g, generation in enumerate(history):
        for i, score in enumerate(generation["combined"]):
            if score > best:
                best, where = score, (g, i)
    return where
