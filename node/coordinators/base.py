"""What every coordinator (merge, search and fusion rounds) shares: the interface a node
gives them, and the polling loop that drives them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from hivemerge.node.storage.home import JsonStates, Phase
from hivemerge.protocol import charter_rules, rounds

PARTICIPANTS_WAIT = 30.0  # how long participants wait for the proposer's list (and the commitments it names)
LAST_LOOK = 0.05  # seconds before its deadline a proposer reads its round's commitments a last time


async def guarded(node, what: str, work) -> None:
    """Await one record's or one round's work: whatever it raises is logged (by ``node``)
    and skipped, so one malformed record or damaged round never stops a coordinator's other work."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        node.log(f"{what}: {type(exc).__name__}: {exc}"[:500])


class NodeServices(Protocol):
    """What a node gives its coordinators (rounds, searches, fusions): node/node.py's
    :class:`Node` implements it. Coordinators use only this, never a node's internals."""

    home: Path
    identity: Any  # protocol.identity.Identity
    store: Any  # node.store.ContentStore
    network: Any  # node.network.Network: get_records
    record_ttl: float
    keep_results: int | None
    content_lock: Any  # threading.Lock held by commands that add content
    client_mode: bool
    charter: Any  # the signed network charter it follows, or None (a private test network)
    rounds: Any  # the node's RoundCoordinator (searches reuse its fetching and screening)
    peer_id: str
    clock: Any  # () -> float: the node's wall clock, for deadlines and records' issued_at


    def log(self, message: str) -> None: ...
    def run(self, coro, timeout: float) -> Any: ...
    def published(self) -> list[dict]: ...
    def contact(self) -> dict: ...
    def experts(self, domain: str | None = None) -> list[dict]: ...
    def live_ttl(self, maddrs: list[str]) -> float: ...
    async def store_record(self, kind: str, key: str, fields: dict, ttl: float) -> bool: ...
    async def fetch_async(self, content: str, progress=None, expected_size: int | None = None) -> Any: ...
    async def announce(self, gone: bool = False) -> None: ...


def commitments_of(found) -> dict[str, dict]:
    """The commitments among a round's records, by the node that signed them."""
    return {r["publisher"]: r for r in found if "delta_ids" in r}


class Coordinator(JsonStates):
    """The lifecycle every round kind shares, as Flower's strategies share theirs: a
    subclass says only what differs.

    - **join** (every ``poll`` seconds, before a proposal's deadline, by the node's own
      clock; nodes' clocks may differ by seconds): for each base of the
      experts this node published, the proposals it may join (:meth:`joinable`); when some
      of its experts match one and fewer than ``max_active`` rounds of this kind are under
      way, it **commits** their delta ids (one signed ``record/commitment``, the same for
      every kind) and saves the state file in ``Phase.COMMITTED``. While a round it is in
      is open, :meth:`while_open` runs each poll.
    - **execute** (after the deadline and ``settle_seconds`` for the last commitments to
      spread): :meth:`run_round` does the kind's work on the commitments
      :meth:`participants` gives (under a charter, the proposer's signed list); whatever
      it raises ends the round in ``Phase.FAILED`` with the error. A state in one of ``resumable`` phases with no task
      in this process (a restart cut it short) is taken up again.
    - **settle** (merge rounds: :meth:`settle_state`): after the work, anything checked later.

    Records live as long as :func:`rounds.records_ttl` says for the round (``ttl``), plus
    the kind's own span (:meth:`span`). Coordinators use only :class:`NodeServices`.
    """

    label: str
    phase_dir: str  # the state files' folder in the home (storage/home.py)
    resumable: tuple[Phase, ...] = (Phase.COMMITTED,)
    max_active: int
    settle_seconds: float

    def __init__(self, node: NodeServices, poll: float):
        self.node = node
        self.poll = poll
        self.dir = node.home / self.phase_dir
        self.dir.mkdir(exist_ok=True)
        self._running: dict[str, asyncio.Task] = {}
        self._last_looks: dict[str, asyncio.Task] = {}  # round id -> the proposer's reading just before its deadline

    # -- what a kind says ---------------------------------------------------------------
    async def joinable(self, base_id: str, now: float) -> list[dict]:
        """The open proposals for ``base_id`` this node may commit to."""
        raise NotImplementedError

    def joined(self, state: dict | None) -> bool:
        """Whether this node has committed to the round of ``state`` already."""
        return state is not None

    def committed_state(self, proposal: dict, state: dict | None, domains: dict[str, str]) -> dict:
        return {"proposal": proposal, "phase": Phase.COMMITTED, "committed": sorted(domains)}

    def under_way(self) -> list[str]:
        """The rounds of this kind this node committed to whose work has not ended."""
        return [s["proposal"]["round_id"] for s in self.states() if s["phase"] in self.resumable]

    def span(self, proposal: dict) -> float:
        """How long the kind's work runs after the deadline (its records must outlive it)."""
        return 0.0

    async def run_round(self, state: dict) -> None:
        raise NotImplementedError

    def bases(self, published: list[dict]) -> set[str]:
        """The bases whose proposals this node looks at: those of its experts."""
        return {p["base_id"] for p in published}

    def joins_without_experts(self, proposal: dict) -> bool:
        """Whether this node takes part in ``proposal`` with nothing to commit (none by default)."""
        return False

    def may_commit(self) -> bool:
        """Under a network charter, only its contributors' commitments count."""
        charter = self.node.charter
        return charter is None or charter_rules.may_contribute(charter, self.node.identity.public_hex)

    async def while_open(self, state: dict, now: float) -> None:
        """The proposer of a round under a charter keeps the on-time commitments it has seen
        by each poll, and once more just before its deadline: its participant list names
        only those, so a commitment that first appears after its deadline cannot enter,
        whatever ``issued_at`` it claims (backdated)."""
        proposal = state["proposal"]
        if self.node.charter is None or proposal["proposer"] != self.node.identity.public_hex:
            return
        await self._look(state)
        rid = proposal["round_id"]
        if proposal["deadline"] - self.node.clock() <= self.poll and rid not in self._last_looks:
            self._last_looks[rid] = asyncio.create_task(self._last_look(rid))

    async def _look(self, state: dict) -> None:
        """One reading of the round's commitments, kept if it began before the deadline (by
        this node's clock, read now: a tick's ``now`` is older); per signer the latest signed."""
        proposal = state["proposal"]
        if self.node.clock() >= proposal["deadline"]:
            return
        found = (await self.node.network.get_records(rounds.round_key(proposal["round_id"]))).values()
        on_time = dict(state.get("on_time", {}))
        for publisher, commitment in rounds.on_time(commitments_of(found), proposal["deadline"]).items():
            if publisher not in on_time or commitment["issued_at"] > on_time[publisher]["issued_at"]:
                on_time[publisher] = commitment  # a replacement (a fuser adds its fused delta late)
        if on_time != state.get("on_time"):
            state["on_time"] = on_time
            self.save(state)

    async def _last_look(self, round_id: str) -> None:
        state = self.state(round_id)
        await asyncio.sleep(max(0.0, state["proposal"]["deadline"] - LAST_LOOK - self.node.clock()))
        await self._look(state)

    async def settle_state(self, state: dict, now: float) -> None:
        """Work on a round whose own work has ended (none by default)."""

    async def after_tick(self, now: float) -> None:
        """Work of the kind beside its rounds (merge rounds: the fusion step)."""

    # -- the lifecycle ------------------------------------------------------------------
    def ttl(self, proposal: dict) -> float:
        return rounds.records_ttl(proposal["deadline"], self.node.clock(), self.node.record_ttl, self.span(proposal))

    async def tick(self) -> None:
        now = self.node.clock()
        published = self.node.published()
        for base_id in sorted(self.bases(published)):
            try:
                proposals = await self.joinable(base_id, now)
            except Exception as exc:  # a DHT hiccup or a damaged record: the other bases go on
                self.node.log(f"{self.label}: proposals for base {base_id[:12]}: {type(exc).__name__}: {exc}"[:500])
                continue
            for proposal in proposals:
                await self.guarded(f"round {proposal['round_id'][:12]}", self.join(proposal, published, now))
        for state in self.states():
            await self.guarded(f"round {str(state.get('proposal', {}).get('round_id'))[:12]}", self.advance(state, now))
        await self.after_tick(now)

    async def join(self, proposal: dict, published: list[dict], now: float) -> None:
        """Commit this node's matching experts to ``proposal``, within the cap on rounds at once."""
        rid = proposal["round_id"]
        state = self.state(rid)
        if proposal["deadline"] <= now:
            return
        mine = {p["delta_id"]: p["domain"] for p in published
                if p["base_id"] == proposal["base_id"] and rounds.matches(proposal["select"], p)} if self.may_commit() else {}
        if self.joined(state) and (state.get("committed") or not mine):
            return  # in already (a state with nothing committed yet, its proposer's or an attester's, may still commit)
        if not mine and not self.joins_without_experts(proposal):
            return
        under_way = self.under_way()
        if state is None and len(under_way) >= self.max_active:  # a stranger's proposals cannot queue more work than this
            self.node.log(f"{self.label}: round {rid[:12]}: not joined: {len(under_way)} under way already")
            return
        if mine:
            await self.commit(proposal, state, mine)
        else:  # an attester (or the proposer) of the network: it merges and attests what others committed
            self.save(self.committed_state(proposal, state, {}))

    async def commit(self, proposal: dict, state: dict | None, domains: dict[str, str]) -> None:
        fields = {
            "round_id": proposal["round_id"], "delta_ids": sorted(domains), "domains": dict(sorted(domains.items())),
            **self.node.contact(), "issued_at": self.node.clock(),
        }
        await self.node.store_record("record/commitment", rounds.round_key(proposal["round_id"]), fields, self.ttl(proposal))
        self.save(self.committed_state(proposal, state, domains))

    async def advance(self, state: dict, now: float) -> None:
        rid = state["proposal"]["round_id"]
        if state["phase"] in self.resumable and now >= state["proposal"]["deadline"] and rid not in self._running:
            self._running[rid] = asyncio.create_task(self.execute(rid))
        elif state["phase"] in self.resumable and now < state["proposal"]["deadline"]:
            await self.while_open(state, now)
        else:
            await self.settle_state(state, now)

    async def execute(self, round_id: str) -> None:
        state = self.state(round_id)
        try:
            await asyncio.sleep(max(0.0, state["proposal"]["deadline"] + self.settle_seconds - self.node.clock()))
            await self.run_round(state)
        except Exception as exc:
            state.update(phase=Phase.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.save(state)
            self._running.pop(round_id, None)

    async def participants(self, proposal: dict, state: dict) -> dict[str, dict]:
        """The commitments a round takes in (merges, or searches over). Without a charter: those signed by the
        deadline. Under one: the proposer (this node, or another) lists the commitments of
        contributors it had seen by its deadline (:meth:`while_open`); every participant
        merges exactly that list, so nodes whose clocks differ, or that saw a backdated
        commitment arrive late, merge the same set (protocol/charter_rules.py)."""
        charter = self.node.charter
        if charter is None:
            return (await self.round_records(proposal["round_id"], proposal["deadline"]))[0]
        rid, me = proposal["round_id"], self.node.identity.public_hex
        if proposal["proposer"] == me and not state.get("listed"):
            if rid in self._last_looks:  # its reading just before the deadline, saved to the state file
                await self._last_looks.pop(rid)
                state["on_time"] = (self.state(rid) or state).get("on_time", {})
            fields = charter_rules.participants_record_fields(charter, proposal, state.get("on_time", {}), self.node.clock())
            await self.node.store_record("record/participants", rounds.round_key(rid), fields, self.ttl(proposal))
            state["listed"] = sorted(fields["participants"])
            self.save(state)
        ends = self.node.clock() + PARTICIPANTS_WAIT
        while True:
            found = (await self.node.network.get_records(rounds.round_key(rid))).values()
            listing = next((r for r in found if "participants" in r and r["publisher"] == proposal["proposer"]), None)
            commitments = commitments_of(found)
            verdicts = charter_rules.commitment_verdicts(charter, proposal, commitments, listing)
            waiting = listing is None or charter_rules.NOT_SEEN in verdicts.values()
            if not waiting or self.node.clock() >= ends:
                state["ignored"] = {k: v for k, v in verdicts.items() if v}  # for round status
                return {k: commitments[k] for k, v in verdicts.items() if v is None}  # accepted_commitments, from the verdicts
            await asyncio.sleep(self.poll)

    async def round_records(self, round_id: str, deadline: float) -> tuple[dict[str, dict], dict[str, dict]]:
        """(commitments signed by the deadline, attestations) of a round, by the node that signed them."""
        found = (await self.node.network.get_records(rounds.round_key(round_id))).values()
        return (rounds.on_time(commitments_of(found), deadline),
                {r["publisher"]: r for r in found if "result_id" in r})

    async def guarded(self, what: str, work) -> None:
        await guarded(self.node, f"{self.label}: {what}", work)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad moment must not end participation
                self.node.log(f"{self.label}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(self.poll)
