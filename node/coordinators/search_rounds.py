"""The search coordinator: a node's part in search rounds (protocol/search.py).

Runs beside the round coordinator. An owner of matching experts commits its delta ids
to a search proposal before the deadline. After it, every node in the search (owners
and the proposer) fetches and screens the committed deltas as in a merge round, builds
the same start recipe (the template with the included deltas in id order) and the same
layer-wise space, and then for each generation draws the same candidates from the
combined scores of the earlier ones (merge/search/cmaes.py's ``next_candidates``). The
proposer publishes the candidates' content ids; each owner merges every candidate in
memory, scores it on its own validation data (``HOME/validation/<domain>.jsonl``, else
the built-in suite's validation split) and publishes only the scores. When the last
generation is combined, the proposer announces the best candidate as a normal merge
round (``select: {deltas: [...]}``, the searched per-layer tables as
``domain_parameters``). Local progress is kept in ``HOME/searches/<search id>.json``.
"""

from __future__ import annotations

import asyncio

from hivemerge.merge.deltas.screening import check_decodes
from hivemerge.merge.evaluation.fitness import ValidationFitness
from hivemerge.merge.evaluation.suites import NAMED_SUITES, read_suite_file, validation_suite
from hivemerge.merge.recipe import validate_recipe
from hivemerge.merge.search import cmaes  # called through the module: tests replace next_candidates
from hivemerge.merge.search.space import SearchSpace
from hivemerge.node.coordinators.base import Coordinator, NodeServices
from hivemerge.node.coordinators.merge_rounds import public_reason
from hivemerge.node.storage.home import SEARCHES_DIR, Phase
from hivemerge.protocol import bounds, charter_rules, rounds, search
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError

# Phases a restarted node takes up again once the deadline has passed.
RESUMABLE = (Phase.PROPOSED, Phase.COMMITTED, Phase.FETCHING, Phase.SEARCHING, Phase.AWAITING_FINAL)


class SearchCoordinator(Coordinator):
    label = "search coordinator"
    phase_dir = SEARCHES_DIR
    resumable = RESUMABLE
    max_active = bounds.MAX_ACTIVE_SEARCHES  # a stranger's proposals cannot queue more scoring than this
    settle_seconds = search.SETTLE_SECONDS

    def __init__(self, node: NodeServices, poll: float = 2.0):
        super().__init__(node, poll)

    # -- proposing (called from the node's thread, not its loop) -----------------------------
    def propose(self, document: dict, base_id: str) -> dict:
        settings = search.check_settings(document.get("search"))
        rest = {k: v for k, v in document.items() if k != "search"}
        rest.setdefault("deadline", 30)
        merge_part = rounds.proposal_from_recipe(rest, base_id, self.node.identity.public_hex, self.node.clock())
        proposal = {k: merge_part[k] for k in ("base_id", "recipe", "select", "deadline", "quorum", "proposer")}
        proposal["search"] = settings
        proposal["round_id"] = search.search_id(proposal)
        ttl = self.ttl(proposal)
        self.node.run(self.node.store_record("record/search", search.searches_key(base_id), {**proposal, "issued_at": self.node.clock()}, ttl), 30)
        self.save({"proposal": proposal, "phase": Phase.PROPOSED, "roles": ["proposer"]})
        return proposal

    # -- the lifecycle's search parts (node/coordinators/base.py) ---------------------------
    def span(self, proposal: dict) -> float:
        settings = proposal["search"]
        return settings["generations"] * settings["generation_seconds"] + rounds.FETCH_WINDOW

    async def joinable(self, base_id: str, now: float) -> list[dict]:
        return await self.proposals(base_id)

    def joined(self, state: dict | None) -> bool:
        return state is not None and "owner" in state["roles"]  # its proposer may join as an owner too

    def under_way(self) -> list[str]:
        return [s["proposal"]["round_id"] for s in self.states() if "owner" in s["roles"] and s["phase"] in RESUMABLE]

    def committed_state(self, proposal: dict, state: dict | None, domains: dict[str, str]) -> dict:
        roles = (state or {}).get("roles", []) + ["owner"]
        return {"proposal": _plain(proposal), "phase": Phase.COMMITTED, "roles": roles, "committed": domains}

    async def proposals(self, base_id: str) -> list[dict]:
        found = await self.node.network.get_records(search.searches_key(base_id))
        valid = []
        for p in found.values():
            try:
                # complete settings only: every node must run on the values the proposal states
                if p["round_id"] == search.search_id(p) and p["proposer"] == p["publisher"] \
                        and search.check_settings(p["search"]) == p["search"]:
                    valid.append(p)
            except UserInputError:
                continue
        charter = self.node.charter  # under a network charter: only its proposers, within its policy
        return valid if charter is None else [p for p in valid if charter_rules.keeps_to(charter, p)]

    # -- after the deadline ---------------------------------------------------------------
    async def run_round(self, state: dict) -> None:
        """The generations, then the final round (proposed by the proposer, or by the first
        owner standing in for a proposer that is gone)."""
        proposal = state["proposal"]
        window = float(proposal["recipe"].get("fetch_window", rounds.FETCH_WINDOW))
        if state["phase"] != Phase.AWAITING_FINAL:  # a restart while awaiting it keeps the finished search
            await self._search(proposal, state, window)
        included, owners = state["included"], state["owners"]
        params = state["best"]["domain_parameters"]
        if "proposer" in state["roles"]:
            # a backup owner's identical round may be out already (this node was slow): join it, add none
            existing = await self._final_round(proposal, included, params, proposer=None)
            state["final_round"] = existing or await self._propose_final(proposal, included, params)
        elif owners and owners[0] == self.node.identity.public_hex:
            state["phase"] = Phase.AWAITING_FINAL
            self.save(state)
            backup = await self._backup_final(proposal, included, params, window)
            if backup is not None:
                state.update(final_round=backup, final_by="backup")
        state["phase"] = Phase.DONE

    async def _search(self, proposal: dict, state: dict, window: float) -> None:
        """Screen the committed deltas, run (or go on with) the generations, and put the
        best candidate into ``state``."""
        loop = asyncio.get_running_loop()
        if state["phase"] != Phase.SEARCHING:  # a restart during the search keeps what was screened and combined
            commitments = await self.participants(proposal, state)  # under a charter: the proposer's list
            await self._screen(proposal, state, commitments)
        included, owners, domains = state["included"], state["owners"], state["domains"]
        if not included:
            raise RuntimeError("no committed delta passed screening")
        space, settings = await loop.run_in_executor(None, self._space, proposal, included, domains)
        fitness = await loop.run_in_executor(None, self._fitness, proposal, state, included)
        for generation in range(len(state["history"]), proposal["search"]["generations"]):
            entry = await self._generation(proposal, state["roles"], space, settings, fitness, owners, generation, window,
                                           [h["combined"] for h in state["history"]])
            state["history"].append(entry)
            self.save(state)
        g, i = search.best_candidate(state["history"])
        best = space.recipe(state["history"][g]["candidates"][i])
        state.update(best={"generation": g, "index": i, "score": state["history"][g]["combined"][i],
                           "candidate_id": state["history"][g]["candidate_ids"][i]})
        state["best"]["domain_parameters"] = {domains[d]: best["models"][k]["parameters"] for k, d in enumerate(included)}

    async def _screen(self, proposal: dict, state: dict, commitments: dict) -> None:
        """Fetch and screen the committed deltas as a merge round does; one delta per domain joins."""
        state["phase"] = Phase.FETCHING
        self.save(state)
        domains = {d: c["domains"].get(d, "") for _, c in sorted(commitments.items()) for d in c["delta_ids"]}
        norms, excluded = await self.node.rounds.gather_deltas(proposal, commitments)
        base = self.node.store.model(proposal["base_id"])
        for delta_id in sorted(d for d in norms if d not in excluded):  # every candidate decodes them: once here first
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, check_decodes, self.node.store.resolve(delta_id), base)
            except UserInputError as exc:
                excluded[delta_id] = f"failed verification: {public_reason(exc)}"[:300]
        excluded.update(rounds.norm_outliers({d: n for d, n in norms.items() if d not in excluded}))
        included = []
        for delta_id in sorted(d for d in norms if d not in excluded):
            if any(domains[d] == domains[delta_id] for d in included):  # searched values are per domain
                excluded[delta_id] = f"another delta of domain {domains[delta_id]!r} is in the search"
            else:
                included.append(delta_id)
        owners = sorted(o for o, c in commitments.items() if set(c["delta_ids"]) & set(included))
        state.update(participants=sorted(commitments), owners=owners, included=included, excluded=excluded,
                     domains={d: domains[d] for d in included}, phase=Phase.SEARCHING, history=[])
        self.save(state)

    async def _generation(self, proposal: dict, roles: list[str], space, settings, fitness, owners: list[str],
                          generation: int, window: float, earlier: list[list[float]]) -> dict:
        """One generation: draw the candidates from the earlier combined scores, publish
        their ids (proposer) and this owner's scores, then combine everyone's."""
        loop = asyncio.get_running_loop()
        sid = proposal["round_id"]
        xs = await loop.run_in_executor(None, cmaes.next_candidates, space, settings, earlier)
        documents = [space.recipe(x) for x in xs]
        ids = [content_id(d) for d in documents]
        key, ttl = rounds.round_key(sid), self.ttl(proposal)
        if "proposer" in roles:
            fields = {"round_id": sid, "generation": generation, "candidate_ids": ids, "issued_at": self.node.clock()}
            await self.node.store_record("record/candidates", key, fields, ttl)
        if fitness is not None and self.node.clock() < search.slot_end(proposal, generation, window):  # later scores would not count
            scores, examples = await loop.run_in_executor(None, _score_all, fitness, documents)
            fields = {"round_id": sid, "generation": generation, "candidate_ids": ids, "scores": scores,
                      "examples": examples, "issued_at": self.node.clock()}
            await self.node.store_record("record/scores", key, fields, ttl)
        combined, scorers, agrees, tallied = await self._combined(proposal, "proposer" in roles, generation, owners, ids, window)
        if combined is None:
            raise RuntimeError(f"generation {generation}: no owner published scores in time")
        return {"generation": generation, "candidates": xs, "candidate_ids": ids, "combined": combined,
                "scorers": scorers, "proposer_agrees": agrees, "tallied": tallied}

    def _space(self, proposal: dict, included: list[str], domains: dict[str, str]):
        settings = proposal["search"]
        document = rounds.build_recipe(proposal, included, domains)
        recipe = validate_recipe(document, resolver=self.node.store.resolve)
        space = SearchSpace(recipe, blocks=settings["blocks"], max_weight=settings["max_weight"])
        popsize, generations = settings["popsize"], settings["generations"]
        seed = settings.get("seed", int(proposal["round_id"][:7], 16))
        return space, cmaes.SearchSettings(budget=1 + popsize * generations, seed=seed, popsize=popsize, sigma=settings["sigma"])

    def _fitness(self, proposal: dict, state: dict, included: list[str]):
        """This owner's private validation data for its included experts' domains (None: not an owner here)."""
        settings = proposal["search"]
        suites = {}
        for delta_id, domain in sorted((state.get("committed") or {}).items()):
            if delta_id not in included:
                continue
            private = self.node.home / "validation" / f"{domain}.jsonl"
            if private.is_file():
                suites[domain] = read_suite_file(str(private))
            elif domain in NAMED_SUITES:
                suites[domain] = validation_suite(domain, int(settings["count"]))
        if not suites:
            return None
        return ValidationFitness(suites, settings["loss_weight"], resolver=self.node.store.resolve)

    async def generation_records(self, sid: str, generation: int) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
        """(score records, candidate records, tally records) of one generation, by the node that signed them."""
        found = (await self.node.network.get_records(rounds.round_key(sid))).values()
        mine = [r for r in found if r.get("generation") == generation]
        return ({r["publisher"]: r for r in mine if "scores" in r},
                {r["publisher"]: r for r in mine if "candidate_ids" in r and "scores" not in r and "scorers" not in r},
                {r["publisher"]: r for r in mine if "scorers" in r})

    async def _combined(self, proposal: dict, proposing: bool, generation: int, owners: list[str], ids: list[str], window: float):
        """(combined scores, scorers, whether the proposer drew these candidates, whether
        they follow the proposer's tally). The proposer combines once every owner scored,
        or at the slot's end, and publishes its tally; every other node combines exactly
        the tallied scores, so a record that reached it late cannot split the search
        (protocol/search.py)."""
        sid, proposer = proposal["round_id"], proposal["proposer"]
        slot_end, tally_end = search.slot_end(proposal, generation, window), search.tally_end(proposal, generation, window)
        while True:
            scores, candidates, tallies = await self.generation_records(sid, generation)
            published = candidates.get(proposer)
            agrees = None if published is None else published["candidate_ids"] == ids
            if proposing:
                combined, scorers = search.combine_scores(scores, owners, ids)
                if scorers == owners or self.node.clock() >= slot_end:
                    if scorers:
                        fields = {"round_id": sid, "generation": generation, "candidate_ids": ids, "scorers": scorers, "issued_at": self.node.clock()}
                        await self.node.store_record("record/tally", rounds.round_key(sid), fields, self.ttl(proposal))
                    return combined, scorers, agrees, bool(scorers)
            else:
                tallied = search.tallied_scorers(tallies.get(proposer), owners, ids)
                if tallied is not None:
                    missing = [o for o in tallied if o not in search.scored(scores, ids)]
                    if not missing:
                        return search.mean_scores(scores, tallied), tallied, agrees, True
                    if self.node.clock() >= tally_end:
                        raise RuntimeError(f"generation {generation}: the proposer's tally counts the scores of "
                                           f"{', '.join(o[:12] for o in missing)}, which never arrived here")
                elif self.node.clock() >= tally_end:  # no usable tally: the proposer is gone, or draws other candidates
                    combined, scorers = search.combine_scores(scores, owners, ids)
                    return combined, scorers, agrees, False
            await asyncio.sleep(self.poll)

    async def _backup_final(self, proposal: dict, included: list[str], domain_parameters: dict, window: float) -> str | None:
        """The first owner stands in for a proposer that is gone: if the proposer's final
        round (these deltas, these parameters) has not appeared by :func:`search.final_end`,
        it proposes that round itself and returns its id; else None."""
        ends = search.final_end(proposal, window)
        while True:
            if await self._final_round(proposal, included, domain_parameters, proposer=proposal["proposer"]):
                return None
            if self.node.clock() >= ends:
                charter = self.node.charter  # under a charter only its proposers' rounds count
                if charter is not None and not charter_rules.may_propose(charter, self.node.identity.public_hex):
                    self.node.log(f"{self.label}: search {proposal['round_id'][:12]}: its proposer is gone, and this "
                                  "node may not propose under the network's charter: no final round")
                    return None
                return await self._propose_final(proposal, included, domain_parameters)
            await asyncio.sleep(self.poll)

    async def _final_round(self, proposal: dict, included: list[str], domain_parameters: dict, proposer: str | None) -> str | None:
        """The id of a final round already proposed for this search's result (these deltas,
        these parameters; by ``proposer``, or by anyone when None), else None."""
        for final in await self.node.rounds.proposals(proposal["base_id"]):
            if (proposer is None or final["proposer"] == proposer) and final["select"] == {"deltas": included} \
                    and final["recipe"].get("domain_parameters") == domain_parameters:
                return final["round_id"]
        return None

    async def _propose_final(self, proposal: dict, included: list[str], domain_parameters: dict) -> str:
        template = {k: v for k, v in proposal["recipe"].items() if k != "domain_parameters"}
        document = {**template, "domain_parameters": domain_parameters, "select": {"deltas": included},
                    "deadline": proposal["search"]["final_deadline"], "quorum": proposal["quorum"]}
        final = rounds.proposal_from_recipe(document, proposal["base_id"], self.node.identity.public_hex, self.node.clock())
        await self.node.rounds.publish_proposal(final)
        return final["round_id"]


def _score_all(fitness, documents: list[dict]) -> tuple[list[float], int]:
    scores = [fitness(d).score for d in documents]
    return scores, sum(len(v) for v in fitness.suites.values())


def _plain(proposal: dict) -> dict:
    return {k: v for k, v in proposal.items() if k not in ("publisher", "issued_at", "expires_at")}
