"""The round coordinator: a node's part in merge rounds.

Runs as a task on the node's loop. Every few seconds it looks at the proposals for
the bases of the experts this node published; it commits (a signed record of its
delta ids) to the winning open proposal its experts match. After the deadline it
fetches the committed deltas it lacks, screens them (merge/deltas/screening.py), excludes
the unavailable, the invalid and the norm outliers with the reason, merges the rest
locally with the engine (GPU when present) and attests the result's content id. Local
progress is kept in ``HOME/rounds/<round id>.json`` for ``round status``.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from hivemerge.merge.deltas.delta import DeltaError
from hivemerge.merge.deltas.screening import check_decodes, screen_delta
from hivemerge.merge.engine import run_merge
from hivemerge.merge.recipe import validate_recipe
from hivemerge.node.coordinators.base import Coordinator, NodeServices
from hivemerge.node.coordinators.fusion_rounds import FusionRounds
from hivemerge.node.storage.home import ROUNDS_DIR, Phase
from hivemerge.node.storage.retention import live_work, prune
from hivemerge.node.storage.store import DELTA_SUFFIX
from hivemerge.protocol import bounds, charter_rules, fusion, records, rounds
from hivemerge.protocol.errors import UserInputError

POLL_SECONDS = 2.0
SETTLE_SECONDS = 1.5  # after the deadline, for the last commitments to spread
SETTLE_EVERY = 10.0  # how often an attested round is checked for finality


class RoundCoordinator(Coordinator):
    label = "round coordinator"
    phase_dir = ROUNDS_DIR
    max_active = bounds.MAX_ACTIVE_ROUNDS
    settle_seconds = SETTLE_SECONDS

    def __init__(self, node: NodeServices, poll: float = POLL_SECONDS, device: str = "auto"):
        super().__init__(node, poll)
        self.device = device
        self.finality_window = rounds.RECORD_MARGIN  # how long after the deadline an attested round may still become final
        self._next_settle: dict[str, float] = {}  # round id -> when to check its finality again
        self.fusion = FusionRounds(self)  # the fusion step of rounds that have one (node/coordinators/fusion_rounds.py)

    async def publish_proposal(self, proposal: dict) -> None:
        """Store this node's ``record/proposal``. Under a charter its proposer is in the
        round from the start: it keeps the commitments it sees and lists them after the deadline."""
        fields = {**proposal, "issued_at": self.node.clock()}
        await self.node.store_record("record/proposal", rounds.rounds_key(proposal["base_id"]), fields, self.ttl(proposal))
        if self.node.charter is not None:
            self.save(self.committed_state(proposal, None, {}))

    # -- the lifecycle's merge-round parts (node/coordinators/base.py) ----------------------
    async def joinable(self, base_id: str, now: float) -> list[dict]:
        """The winning open proposal for ``base_id`` (one round per base at a time)."""
        proposals = rounds.live_proposals(await self.proposals(base_id))
        winner = rounds.winning_proposal([p for p in proposals if p["deadline"] > now])
        return [] if winner is None else [winner]

    def bases(self, published: list[dict]) -> set[str]:
        """Under a charter, an attester looks at every base of the network, experts or not."""
        charter, me = self.node.charter, self.node.identity.public_hex
        extra = set(charter["charter"]["base_ids"]) if charter is not None and charter_rules.may_attest(charter, me) else set()
        return super().bases(published) | extra

    def joins_without_experts(self, proposal: dict) -> bool:
        """Under a charter, its attesters merge every round whose base they hold (a
        proposer takes part in its own rounds from the start: Node.propose)."""
        charter, me = self.node.charter, self.node.identity.public_hex
        return charter is not None and charter_rules.may_attest(charter, me) and self.node.store.has(proposal["base_id"])

    def under_way(self) -> list[str]:
        """The rounds this node committed to that are not yet attested or failed."""
        return [s["proposal"]["round_id"] for s in self.states() if s["phase"] in (Phase.COMMITTED, Phase.MERGING)]

    async def after_tick(self, now: float) -> None:
        await self.fusion.tick(now)

    async def settle_state(self, state: dict, now: float) -> None:
        """Check an attested round for finality every ``SETTLE_EVERY`` seconds."""
        rid = state["proposal"]["round_id"]
        if state["phase"] == Phase.ATTESTED and "final" not in state and now >= self._next_settle.get(rid, 0.0):
            self._next_settle[rid] = now + SETTLE_EVERY
            if await self.settle(state, now) and self.node.keep_results is not None:
                await self.auto_prune()

    async def proposals(self, base_id: str) -> list[dict]:
        """The valid proposals for ``base_id``: under a charter, only those of its proposers
        that keep to its policy (a stranger's cannot even make an honest one lose)."""
        found = await self.node.network.get_records(rounds.rounds_key(base_id))
        valid = [p for p in found.values() if p["round_id"] == rounds.round_id(p) and p["proposer"] == p["publisher"]]
        charter = self.node.charter
        return valid if charter is None else [p for p in valid if charter_rules.keeps_to(charter, p)]

    def final(self, proposal: dict, commitments: dict[str, dict], attestations: dict[str, dict]) -> tuple[str | None, list[str]]:
        """(result id, its attesters) if the round is final, else (None, []): under a charter,
        its quorum of the roster's attesters; without one, the proposal's quorum of the committers."""
        charter = self.node.charter
        if charter is not None:
            return charter_rules.final_result_under(charter, attestations)
        return rounds.final_result(commitments, attestations, proposal["quorum"])

    async def settle(self, state: dict, now: float) -> bool:
        """Record whether an attested round became final with this node's result
        (``final``: true or false); True once it is known. Until then the store keeps
        everything the round used (node/storage/retention.py); a round still short of quorum when
        ``finality_window`` has passed since its deadline is taken as not final."""
        proposal = state["proposal"]
        try:
            commitments, attestations = await self.round_records(proposal["round_id"], proposal["deadline"])
        except Exception as exc:  # a DHT hiccup: check again later, and let this tick's other work go on
            self.node.log(f"round {proposal['round_id'][:12]}: finality check: {type(exc).__name__}: {exc}")
            return False
        result, _ = self.final(proposal, commitments, attestations)
        if result is not None:
            state["final"] = result == state["result_id"]
        elif now > proposal["deadline"] + self.finality_window:
            state["final"] = False
        else:
            return False
        self.save(state)
        return True

    async def auto_prune(self) -> None:
        """On a node started with ``--keep-results``, after an attested round settled:
        remove what the store no longer needs (node/storage/retention.py), unless a round, search
        or fusion is under way or a command is adding content (the next settled round
        tries again)."""
        busy = live_work(self.node.home)
        if busy is not None:
            self.node.log(f"store: not pruned now: {busy}")
            return
        if not self.node.content_lock.acquire(blocking=False):
            self.node.log("store: not pruned now: a command is adding content")
            return
        try:
            removed = await asyncio.get_running_loop().run_in_executor(None, prune, self.node.home, self.node.keep_results)
        finally:
            self.node.content_lock.release()
        if removed:
            self.node.log(f"store: pruned {len(removed)} object(s), {sum(i.size for i in removed):,} bytes")

    # -- after the deadline ---------------------------------------------------------------
    async def run_round(self, state: dict) -> None:
        """Fetch, screen and judge the committed deltas, merge the rest, attest the result's id."""
        proposal = state["proposal"]
        round_id = proposal["round_id"]
        state["phase"] = Phase.MERGING
        self.save(state)
        commitments = await self.participants(proposal, state)
        state["participants"] = sorted(commitments)
        charter, me = self.node.charter, self.node.identity.public_hex
        if charter is not None and not state["committed"] and not charter_rules.may_attest(charter, me):
            state["phase"] = Phase.LISTED  # a proposer only: its attestation would count for nothing
            return
        excluded = rounds.unselected(proposal["select"], rounds.committed_domains(commitments), frozenset({fusion.FUSED_DOMAIN}))
        norms, screened_out = await self.gather_deltas(proposal, commitments, skip=set(excluded))
        excluded.update(screened_out)
        fused = set(fusion.fused_deltas(commitments))
        excluded.update(rounds.norm_outliers({d: n for d, n in norms.items() if d not in fused}))
        kept = sorted(d for d in norms if d not in excluded and d not in fused)  # the expert deltas merged
        excluded.update(await self.fusion.judge(proposal, commitments, norms, kept))
        included = sorted(d for d in norms if d not in excluded)
        state.update(excluded=excluded, included=included)
        self.save(state)
        result_id = await asyncio.get_running_loop().run_in_executor(
            None, self.merge_screened, proposal, included, commitments, excluded)
        bundle_id = self.node.store.bundle_of(result_id)
        fields = {
            "round_id": round_id, "result_id": result_id, "bundle_id": bundle_id, "included": included,
            "excluded": {}, **self.node.contact(), "issued_at": self.node.clock(),
        }
        fields["excluded"] = records.fitting_reasons(excluded, fields)
        await self.node.store_record("record/attestation", rounds.round_key(round_id), fields, self.ttl(proposal))
        await self.node.announce()
        state.update(phase=Phase.ATTESTED, result_id=result_id)

    async def gather_deltas(self, proposal: dict, commitments: dict[str, dict], skip: set[str] = frozenset()
                            ) -> tuple[dict[str, float], dict[str, str]]:
        """Fetch what is missing, all at once within one fetch window (N slow deltas
        cost one window, not N), then screen every delta (those in ``skip``, already
        excluded, are neither fetched nor screened)."""
        norms: dict[str, float] = {}
        base = self.node.store.model(proposal["base_id"])
        window = float(proposal["recipe"].get("fetch_window", rounds.FETCH_WINDOW))
        committers: dict[str, set[str]] = {}
        for committer, commitment in sorted(commitments.items()):
            for delta_id in commitment["delta_ids"]:
                if delta_id not in skip:
                    committers.setdefault(delta_id, set()).add(committer)
        excluded = await self._fetch_all(sorted(d for d in committers if not self.node.store.has(d)), window)
        for delta_id, by in sorted(committers.items()):
            if delta_id not in excluded:
                path = self.node.store.objects / f"{delta_id}{DELTA_SUFFIX}"
                try:
                    norms[delta_id] = await asyncio.get_running_loop().run_in_executor(None, screen_delta, path, base, by)
                except UserInputError as exc:
                    excluded[delta_id] = f"failed verification: {public_reason(exc)}"[:300]
        return norms, excluded

    async def _fetch_all(self, delta_ids: list[str], window: float) -> dict[str, str]:
        """Fetch ``delta_ids`` side by side; returns delta id -> why it is excluded, for
        those that failed or had not arrived when ``window`` seconds were up."""
        # A few at a time: one provider may serve them all, and serves a peer a few streams at once.
        slots = asyncio.Semaphore(bounds.MAX_PARALLEL_FETCHES)

        async def fetch(delta_id: str) -> None:
            async with slots:
                await self.node.fetch_async(delta_id)

        tasks = {asyncio.ensure_future(fetch(d)): d for d in delta_ids}
        excluded: dict[str, str] = {}
        if not tasks:
            return excluded
        done, pending = await asyncio.wait(tasks, timeout=window)
        for task in pending:
            task.cancel()
            excluded[tasks[task]] = f"unavailable: not fetched within the round's fetch window of {window:g} s"
        if pending:
            await asyncio.wait(pending, timeout=10)  # let the cancelled fetches clean up before the store is read
        for task in pending:  # stored, but cut short after (announcing it): it arrived in time
            if self.node.store.has(tasks[task]):
                del excluded[tasks[task]]
        for task in done:
            exc = task.exception()
            if isinstance(exc, DeltaError):  # it arrived whole, but is not the delta it claims to be
                excluded[tasks[task]] = f"failed verification: {public_reason(exc)}"[:300]
            elif exc is not None:
                excluded[tasks[task]] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
        return excluded

    def merge_screened(self, proposal: dict, included: list[str], commitments: dict[str, dict], excluded: dict[str, str]) -> str:
        """:meth:`merge` the ``included`` deltas. Screening does not decode, so a delta
        whose decoded values overflow the base's dtype is found here. Then every included
        delta is decoded once to find all such (N of them cost one more merge, not N), they
        move from ``included`` to ``excluded`` (both changed in place) with the reason, and
        the merge runs again without them: every participant finds the same."""
        try:
            return self.merge(proposal, included, commitments)
        except DeltaError as exc:
            if exc.delta_id not in included:
                raise
        base = self.node.store.model(proposal["base_id"])
        for delta_id in list(included):
            try:
                check_decodes(self.node.store.resolve(delta_id), base)
            except DeltaError as failed:
                included.remove(delta_id)
                excluded[delta_id] = f"failed verification: {public_reason(failed)}"[:300]
        return self.merge(proposal, included, commitments)

    def merge(self, proposal: dict, included: list[str], commitments: dict[str, dict]) -> str:
        out = self.node.store.partial / f"round-{proposal['round_id']}"
        self.merge_to(rounds.build_recipe(proposal, included, rounds.committed_domains(commitments)), out)
        try:
            return self.node.store.add_model(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def merge_to(self, document: dict, out: Path) -> Path:
        """Run a round's merge recipe document (its ``hm://`` inputs from the store) into ``out``."""
        run_merge(validate_recipe(document, resolver=self.node.store.resolve), out, device=self.device, overwrite=True)
        return out


def public_reason(exc: Exception) -> str:
    """A delta error's reason without this node's file path: reasons go into public
    attestations, and every participant should state the same one."""
    head, sep, tail = str(exc).partition(f"{DELTA_SUFFIX}: ")
    return tail if sep and "/" in head else str(exc)
