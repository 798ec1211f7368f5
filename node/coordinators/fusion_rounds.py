"""A node's part in the fusion step of merge rounds (rules: protocol/fusion.py).

Publishing: a heterogeneous expert's node stores its logit pack and the probe set in
the content store and announces a ``record/pack`` (kept in ``HOME/packs.json`` and
refreshed like expert records).

Proposing: :meth:`FusionRounds.prepare` resolves the round recipe's ``fusion`` block
to what every node must agree on (pack ids, probe id, replay set id, the fuser's key,
every distillation setting), so the proposal, not the DHT of the moment, says what is
fused. A replay set given as a file is stored by the proposer, which serves it like a
probe set (the same format, store suffix and transfer).

The fuser (designated by the proposal; the proposer by default) fetches the packs and
the probe, distils them into the round's base (with ``pivot: merge``, into the weight
merge of the deltas the proposal pinned, fetched and merged first; with the replay set,
if named) and stores the signed fused delta (always against the base). When it sees the
winning proposal it stores a signed ``record/fusion`` with the probe losses (and the
replay figure) and commits the fused delta under the domain ``fused`` before the
deadline. A proposer that is its own fuser distils in :meth:`FusionRounds.prepare`,
before the proposal exists (the result kept under :func:`ahead_key`), so the commitment
window need not cover the distillation; a fuser named by key distils when it sees the
proposal, within the window.

Every participant, after the deadline: :meth:`FusionRounds.judge` recomputes the
probe losses of every delta committed as fused and excludes it, with the reason, when
the record is missing or does not match (packs, probe, replay set), or when the
figures are off, show no improvement, or show more drift on the replay set than the
proposal allows. With ``pivot: merge`` it builds the same weight merge from the
proposal, measures against it, and also excludes the fused delta when the round does
not merge exactly the pinned deltas. Fused deltas are left out of the norm-outlier
comparison: a distilled delta has another scale than a fine-tune, and its quality is
judged on the probe.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path
from typing import Protocol

from hivemerge.merge.deltas.codecs import parse_codec
from hivemerge.merge.fusion import check as fusion_check  # called through the module: tests replace its functions
from hivemerge.merge.fusion.packs import PackFile
from hivemerge.merge.fusion.probe import load_probe
from hivemerge.node.coordinators.base import NodeServices, guarded
from hivemerge.node.net.network import is_bound
from hivemerge.node.storage.home import FUSIONS_DIR, PACKS_FILE, WATCH_FILE, Phase, read_json, write_json
from hivemerge.node.storage.store import PACK_SUFFIX, PROBE_SUFFIX
from hivemerge.protocol import bounds, fusion, records, rounds
from hivemerge.protocol.content import canonical_json, is_content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.record_schemas import check_domain


class RoundHost(Protocol):
    """What the fusion step uses of the round coordinator (node/coordinators/merge_rounds.py) it belongs to."""

    node: NodeServices

    async def proposals(self, base_id: str) -> list[dict]: ...
    def ttl(self, proposal: dict) -> float: ...
    def state(self, round_id: str) -> dict | None: ...
    def save(self, state: dict) -> None: ...
    def merge_to(self, document: dict, out: Path) -> Path: ...


COMMIT_MARGIN = 0.5  # seconds before the deadline a fused delta must be committed by
AHEAD_FETCH_WINDOW = 60.0  # per input fetched when distilling before proposing
AHEAD_TIMEOUT = 7 * 24 * 3600.0  # distilling before proposing takes what it takes; it reports its own errors


class FusionRounds:
    def __init__(self, coordinator: "RoundHost"):
        self.coordinator = coordinator
        self.node = coordinator.node
        self.dir = self.node.home / FUSIONS_DIR
        self.dir.mkdir(exist_ok=True)
        self._running: dict[str, asyncio.Task] = {}

    # -- local state --------------------------------------------------------------------
    def state(self, round_id: str) -> dict | None:
        return read_json(self.dir / f"{round_id}.json", None)

    def _save(self, round_id: str, state: dict) -> None:
        write_json(self.dir / f"{round_id}.json", state)

    def watched_bases(self) -> set[str]:
        return set(read_json(self.node.home / WATCH_FILE, []))

    # -- publishing packs ------------------------------------------------------------------
    def published_packs(self) -> list[dict]:
        return read_json(self.node.home / PACKS_FILE, [])

    def publish_pack(self, pack_file: Path, probe_file: Path, domain: str) -> dict:
        if self.node.client_mode:
            raise UserInputError("publishing a pack needs a running node (hivemerge node start) to keep serving it")
        check_domain(domain)
        probe = load_probe(probe_file)
        pack = PackFile(pack_file)
        pack.check_probe(probe)
        pack_id = self.node.store.add_pack(Path(pack_file))  # verifies every hash
        probe_id = self.node.store.add_probe(Path(probe_file))
        fields = {
            "domain": domain, "pack_id": pack_id, "probe_id": probe_id, "model_id": pack.manifest["model"],
            "top_k": pack.manifest["top_k"], "bundle_id": self.node.store.bundle_of(pack_id),
            "probe_bundle_id": self.node.store.bundle_of(probe_id), "size": Path(pack_file).stat().st_size,
        }
        published = [p for p in self.published_packs() if p["pack_id"] != pack_id] + [fields]
        write_json(self.node.home / PACKS_FILE, published)
        self.node.run(self.node.announce(), 60)  # the pack record, and provider records of both files
        return {**fields, "publisher": self.node.identity.public_hex}

    async def announce(self, maddrs: list[str]) -> None:
        for fields in self.published_packs():
            fields = {**fields, "peer_id": self.node.peer_id, "maddrs": maddrs, "issued_at": self.node.clock()}
            await self.node.store_record("record/pack", records.PACKS_KEY, fields, self.node.live_ttl(maddrs))

    def packs(self, domain: str | None = None) -> list[dict]:
        return self.node.run(self._packs(domain), 30)

    async def _packs(self, domain: str | None = None) -> list[dict]:
        found = await self.node.network.get_records(records.PACKS_KEY)
        rows = [r for r in found.values() if r["maddrs"] and is_bound(r) and (domain is None or r["domain"] == domain)]
        return sorted(rows, key=lambda r: (r["domain"], r["pack_id"]))

    # -- proposing ------------------------------------------------------------------------
    def prepare(self, document: dict, base_ref: str, base_id: str) -> dict:
        """The round recipe with its ``fusion`` block resolved (see the module docstring)."""
        block = fusion.check_fusion_block(document["fusion"])
        try:
            parse_codec(block["codec"])
        except (UserInputError, ValueError) as exc:
            raise UserInputError(f"fusion.codec: {exc}") from None
        fusion_check.distill_config(block)
        live = self.packs()
        if "domains" in block["packs"]:
            ids = set()
            for domain in block["packs"]["domains"]:
                mine = {r["pack_id"] for r in live if r["domain"] == domain}
                if not mine:
                    raise UserInputError(f"fusion.packs: no pack of domain {domain!r} is published on the network")
                ids |= mine
            block["packs"] = {"ids": sorted(ids)}
        probes = {r["probe_id"] for r in live if r["pack_id"] in block["packs"]["ids"]}
        if block.get("probe") is None:
            if len(probes) != 1:
                raise UserInputError(f"fusion.probe: required (the packs' records name {len(probes)} probe sets)")
            block["probe"] = probes.pop()
        elif probes - {block["probe"]}:
            raise UserInputError("fusion.probe: some of the packs were made for another probe set")
        if block.get("replay") is not None and not is_content_id(block["replay"]):
            block["replay"] = self._store_replay(Path(block["replay"]).expanduser())
        block.setdefault("fuser", None)
        if block["fuser"] is None:
            block["fuser"] = self.node.identity.public_hex
        if block["pivot"] == "merge":
            block["pivot_deltas"] = self._pin_experts(document.get("select"), base_id)
        block = fusion.check_fusion_block(block, resolved=True)
        if block["fuser"] == self.node.identity.public_hex:
            if self.node.client_mode:
                raise UserInputError("fusion: this node would be the round's fuser, which must keep serving the fused delta; "
                                     "propose from a running node (hivemerge node start) or name another node as fusion.fuser")
            if not base_ref.startswith("hm://") and not self.node.store.has(base_id):
                self.node.store.add_model(Path(base_ref))  # the fuser distils into the base
            if not self.node.store.has(base_id):
                raise UserInputError("base_model: this node is the fuser and needs the base; give its directory")
            write_json(self.node.home / WATCH_FILE, sorted(self.watched_bases() | {base_id}))
            # Distil now, before the proposal exists: the commitment window then needs to
            # cover only the commitments, however long the distillation takes here.
            self.node.run(self._fuse_ahead({**document, "fusion": block}, base_id), AHEAD_TIMEOUT)
        return {**document, "fusion": block}

    def _pin_experts(self, select, base_id: str) -> dict[str, str]:
        """delta id -> domain of the live experts the round's ``select`` takes: the weight
        merge a ``pivot: merge`` fusion step distils into is fixed when proposed."""
        if not isinstance(select, dict):
            raise UserInputError("select: required; {domains: [NAME, ...]} or {deltas: [ID, ...]}")
        pinned = {r["delta_id"]: r["domain"] for r in self.node.experts()
                  if r["base_id"] == base_id and rounds.matches(select, r)}
        if not pinned:
            raise UserInputError("fusion.pivot: merge needs experts on the network that the round's select takes; none are")
        return pinned

    async def _pivot(self, proposal: dict, scratch: Path, window: float) -> Path:
        """The round's weight merge of the pinned deltas (fetched if missing), built in ``scratch``."""
        scratch.mkdir(parents=True, exist_ok=True)
        for delta_id in sorted(proposal["recipe"]["fusion"]["pivot_deltas"]):
            if not self.node.store.has(delta_id):
                await asyncio.wait_for(self.node.fetch_async(delta_id), max(1.0, window))
        return await asyncio.get_running_loop().run_in_executor(
            None, self.coordinator.merge_to, rounds.pivot_recipe(proposal), scratch / "pivot")

    def _store_replay(self, path: Path) -> str:
        """Store a replay file (the probe format) so this node serves it; returns its id."""
        if self.node.client_mode:
            raise UserInputError("fusion.replay: a replay file needs a running node (hivemerge node start) to serve it; "
                                 "or name a stored replay set by id")
        if not path.is_file():
            raise UserInputError(f"fusion.replay: {str(path)!r} is neither a replay set id nor a file")
        replay_id = self.node.store.add_probe(path)  # checks the format; canonical bytes under the id
        self.node.run(self.node.announce(), 60)  # its provider record
        return replay_id

    # -- the fuser ------------------------------------------------------------------------
    async def tick(self, now: float) -> None:
        me = self.node.identity.public_hex
        bases = {p["base_id"] for p in self.node.published()} | self.watched_bases()
        for base_id in sorted(bases):
            await guarded(self.node, f"fusion for base {base_id[:12]}", self._take_part(base_id, me, now))

    async def _take_part(self, base_id: str, me: str, now: float) -> None:
        """Distil for, or commit to, the winning open proposal for ``base_id`` that names this node its fuser."""
        proposals = rounds.live_proposals(await self.coordinator.proposals(base_id))
        winner = rounds.winning_proposal([p for p in proposals if p["deadline"] > now])
        if winner is None or (winner["recipe"].get("fusion") or {}).get("fuser") != me:
            return
        rid = winner["round_id"]
        state = self.state(rid)
        if state is None:
            state = await self._adopt_ahead(winner)  # distilled before it was proposed
        # "fusing" with no task in this process: a restart cut the fusion short; start over
        if (state is None or state["phase"] == Phase.FUSING) and rid not in self._running:
            if len(self._running) >= bounds.MAX_ACTIVE_FUSIONS:  # a stranger's proposals cannot queue more distillation
                self.node.log(f"fusion for round {rid[:12]}: not started: {len(self._running)} fusion(s) under way already")
                return
            self._running[rid] = asyncio.create_task(self._fuse(winner))
        elif state and state["phase"] == Phase.FUSED:
            await self._commit(winner, state)

    async def _fuse(self, proposal: dict) -> None:
        """Fetch, distil, store the delta and the fusion record; the next tick commits it."""
        rid = proposal["round_id"]
        state = {"phase": Phase.FUSING, "started": self.node.clock()}
        self._save(rid, state)
        try:
            fused = await self._distil(proposal, rid, proposal["deadline"] - self.node.clock())
            await self._store_fusion_record(proposal, fused)
            state.update(phase=Phase.FUSED, **fused)
        except Exception as exc:
            state.update(phase=Phase.FAILED, error=f"{type(exc).__name__}: {exc}"[:500])
            self.node.log(f"fusion for round {rid[:12]}: {state['error']}")
        finally:
            state["seconds"] = round(self.node.clock() - state["started"], 3)
            self._save(rid, state)
            self._running.pop(rid, None)

    async def _distil(self, proposal: dict, label: str, window: float) -> dict:
        """Fetch the inputs (each within ``window`` seconds), distil, and store the signed
        fused delta: ``{"delta_id", "before", "after"}``. ``proposal`` needs only its
        ``base_id`` and ``recipe`` (a round not yet proposed has no id or deadline)."""
        block = fusion.check_fusion_block(proposal["recipe"]["fusion"], resolved=True)
        scratch = self.node.store.partial / f"fusion-{label}"
        try:
            packs, probe, replay = await self._inputs(block, window)
            base_dir = self.node.store.resolve(proposal["base_id"])
            scratch.mkdir(parents=True, exist_ok=True)
            pivot_dir = None
            if fusion.merges_pivot(block):  # distil into the round's weight merge, not its base
                pivot_dir = await self._pivot(proposal, scratch, window)
            delta_out = scratch / "fused.delta.safetensors"
            before, after = await asyncio.get_running_loop().run_in_executor(
                None, fusion_check.run_fusion, base_dir, packs, probe, block, self.node.identity, delta_out, scratch, replay, pivot_dir)
            return {"delta_id": self.node.store.add_delta(delta_out), "before": before, "after": after}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _store_fusion_record(self, proposal: dict, fused: dict) -> None:
        block = proposal["recipe"]["fusion"]
        fields = {
            "round_id": proposal["round_id"], "delta_id": fused["delta_id"], "packs": block["packs"]["ids"],
            "probe_id": block["probe"], "replay_id": block["replay"], "before": fused["before"], "after": fused["after"],
            **self.node.contact(), "issued_at": self.node.clock(),
        }
        await self.node.store_record("record/fusion", rounds.round_key(proposal["round_id"]), fields, self.coordinator.ttl(proposal))

    # -- distilling before proposing --------------------------------------------------------
    async def _fuse_ahead(self, document: dict, base_id: str) -> None:
        """The proposer that is its own fuser distils before the round exists; the result
        is kept under :func:`ahead_key`, which the proposal's fusion block and merge
        settings determine, and adopted when that proposal wins."""
        started = self.node.clock()
        key = ahead_key(base_id, document)
        if self._ahead(key) is not None:
            return
        try:
            fused = await self._distil({"base_id": base_id, "recipe": document, "round_id": f"ahead-{key}"},
                                       f"ahead-{key[:16]}", AHEAD_FETCH_WINDOW)
        except UserInputError as exc:
            raise UserInputError(f"fusion (this node is the fuser and distils before proposing): {exc}") from None
        except (Exception, asyncio.TimeoutError) as exc:
            raise UserInputError(f"fusion (this node is the fuser and distils before proposing) failed: "
                                 f"{type(exc).__name__}: {exc}") from None
        write_json(self.dir / f"ahead-{key}.json", {**fused, "seconds": round(self.node.clock() - started, 3)})

    def _ahead(self, key: str) -> dict | None:
        fused = read_json(self.dir / f"ahead-{key}.json", None)
        return fused if fused is not None and self.node.store.has(fused["delta_id"]) else None

    async def _adopt_ahead(self, proposal: dict) -> dict | None:
        """The "fused" state of a round this node distilled before proposing (None if it did not)."""
        fused = self._ahead(ahead_key(proposal["base_id"], proposal["recipe"]))
        if fused is None:
            return None
        await self._store_fusion_record(proposal, {k: fused[k] for k in ("delta_id", "before", "after")})
        state = {"phase": Phase.FUSED, "ahead": True, **fused}
        self._save(proposal["round_id"], state)
        return state

    async def _commit(self, proposal: dict, state: dict) -> None:
        """Commit the fused delta with this node's own matching deltas (one commitment per node)."""
        rid = proposal["round_id"]
        if self.node.clock() > proposal["deadline"] - COMMIT_MARGIN:
            state.update(phase=Phase.FAILED, error="fusion finished after the commitment deadline")
            self._save(rid, state)
            return
        published = {p["delta_id"]: p["domain"] for p in self.node.published()}
        committed = (self.coordinator.state(rid) or {}).get("committed", [])
        domains = {d: published[d] for d in committed if d in published}
        domains[state["delta_id"]] = fusion.FUSED_DOMAIN
        await self.node.announce()  # the fused delta and the fetched packs are served from here
        fields = {
            "round_id": rid, "delta_ids": sorted(domains), "domains": domains, **self.node.contact(), "issued_at": self.node.clock(),
        }
        # A second commitment of this node replaces its first only if it expires later.
        await self.node.store_record("record/commitment", rounds.round_key(rid), fields, self.coordinator.ttl(proposal) + 1.0)
        self.coordinator.save({"proposal": proposal, "phase": Phase.COMMITTED, "committed": sorted(domains)})
        state["phase"] = Phase.COMMITTED
        self._save(rid, state)

    async def _inputs(self, block: dict, window: float):
        """(packs, probe, replay set or None) of a fusion block, fetched if missing and checked."""
        window = max(1.0, window)
        replay_id = block.get("replay")
        for cid in [block["probe"], *block["packs"]["ids"], *([replay_id] if replay_id else [])]:
            if not self.node.store.has(cid):
                await asyncio.wait_for(self.node.fetch_async(cid), window)
        probe_path = self.node.store.objects / f"{block['probe']}{PROBE_SUFFIX}"
        replay_path = self.node.store.objects / f"{replay_id}{PROBE_SUFFIX}" if replay_id else None
        pack_paths = [self.node.store.objects / f"{p}{PACK_SUFFIX}" for p in block["packs"]["ids"]]
        if not probe_path.is_file() or not all(p.is_file() for p in pack_paths) or (replay_path and not replay_path.is_file()):
            raise UserInputError("fusion: the probe, the replay set or a pack id names another kind of object")
        probe = load_probe(probe_path)
        packs = [PackFile(p) for p in pack_paths]
        for pack in packs:
            pack.check_probe(probe)
        return packs, probe, load_probe(replay_path) if replay_path else None

    # -- every participant ------------------------------------------------------------------
    async def judge(self, proposal: dict, commitments: dict[str, dict], norms: dict[str, float], kept: list[str]) -> dict[str, str]:
        """The exclusions among the fused deltas that passed screening (those in ``norms``),
        with the reason. ``kept``: the expert deltas the round merges (a ``pivot: merge``
        fused delta stands only for exactly the merge it was distilled into)."""
        committed = fusion.fused_deltas(commitments)
        raw = proposal["recipe"].get("fusion")
        excluded: dict[str, str] = {}
        pending = {d: c for d, c in committed.items() if d in norms}
        if not pending:
            return excluded
        if raw is None:
            return {d: "fusion: committed as fused in a round without a fusion step" for d in pending}
        try:
            block = fusion.check_fusion_block(raw, resolved=True)
        except UserInputError as exc:
            return {d: f"fusion: the proposal's fusion block is malformed: {exc}"[:300] for d in pending}
        found = (await self.node.network.get_records(rounds.round_key(proposal["round_id"]))).values()
        record = next((r for r in found if "before" in r and r["publisher"] == block["fuser"]), None)
        window = float(proposal["recipe"].get("fetch_window", rounds.FETCH_WINDOW))
        for delta_id, committer in sorted(pending.items()):
            reason = fusion.record_reason(block, committer, delta_id, record)
            if reason is None and fusion.merges_pivot(block):
                reason = fusion.pivot_reason(block, kept, rounds.committed_domains(commitments))
            if reason is None:
                try:
                    packs, probe, replay = await self._inputs(block, window)
                except UserInputError as exc:
                    reason = f"fusion: a pack, the probe or the replay set failed verification: {_without_path(exc)}"
                except (Exception, asyncio.TimeoutError) as exc:
                    reason = f"fusion: a pack, the probe or the replay set is unavailable: {type(exc).__name__}: {exc}"
            if reason is None:
                base_dir = self.node.store.resolve(proposal["base_id"])
                delta_path = self.node.store.resolve(delta_id)
                scratch = self.node.store.partial / f"fusion-check-{proposal['round_id']}-{os.getpid()}"
                try:
                    pivot_dir = await self._pivot(proposal, scratch, window) if fusion.merges_pivot(block) else None
                    before, after = await asyncio.get_running_loop().run_in_executor(
                        None, fusion_check.measure_fused, base_dir, delta_path, packs, probe, block, scratch / "applied", replay, pivot_dir)
                    reason = fusion.judge(block, record, before, after)
                except UserInputError as exc:
                    reason = f"fusion: the probe losses could not be measured: {_without_path(exc)}"
                except Exception as exc:  # verified inputs that still break the measurement: not trusted, not fatal
                    reason = f"fusion: the probe losses could not be measured: {type(exc).__name__}: {_without_path(exc)}"
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            if reason is not None:
                excluded[delta_id] = reason[:300]
        return excluded

    # -- round status ----------------------------------------------------------------------
    async def summary(self, proposal: dict, commitments: dict[str, dict], attestations: dict[str, dict]) -> dict | None:
        """The fusion step of a round as its records tell it (None: the round has none):
        the fuser, the fused delta it committed, its fusion record's figures and the
        verdict, ``kept`` or ``excluded: REASON`` as the attesters agree (``split`` when
        they do not; ``pending`` before any attestation; ``none committed`` after the
        deadline without a fused delta)."""
        block = proposal["recipe"].get("fusion")
        if not isinstance(block, dict):
            return None
        rid = proposal["round_id"]
        found = (await self.node.network.get_records(rounds.round_key(rid))).values()
        record = next((r for r in found if "before" in r and r["publisher"] == block.get("fuser")), None)
        committed = sorted(fusion.fused_deltas(commitments))
        delta_id = committed[0] if committed else (record or {}).get("delta_id")
        verdicts = {}
        for attester, att in sorted(attestations.items()):
            if delta_id in att["excluded"]:
                verdicts[attester] = f"excluded: {att['excluded'][delta_id]}"
            elif delta_id in att["included"]:
                verdicts[attester] = "kept"
        if verdicts:
            distinct = sorted(set(verdicts.values()))
            verdict = distinct[0] if len(distinct) == 1 else "split: " + "; ".join(
                f"{sum(v == d for v in verdicts.values())} {d}" for d in distinct)
        elif delta_id is None and self.node.clock() > proposal["deadline"]:
            verdict = "none committed"
        else:
            verdict = "pending"
        local = self.state(rid) or {}
        return {
            "fuser": block.get("fuser"), "delta_id": delta_id, "replay_id": block.get("replay"),
            "record": None if record is None else {k: record[k] for k in ("delta_id", "replay_id", "before", "after")},
            "verdict": verdict, "verdicts": verdicts, "fuser_phase": local.get("phase"),
        }


def ahead_key(base_id: str, recipe: dict) -> str:
    """What a fused delta depends on: the base, the resolved fusion block and the merge
    settings of the pivot (a round recipe or a proposal's template: the same keys)."""
    merge = {k: recipe[k] for k in (*rounds.MERGE_KEYS, "domain_parameters") if k in recipe}
    return hashlib.sha256(canonical_json({"base_id": base_id, "fusion": recipe["fusion"], "merge": merge})).hexdigest()



def _without_path(exc: Exception) -> str:
    head, sep, tail = str(exc).partition(": ")
    return tail if sep and "/" in head else str(exc)
