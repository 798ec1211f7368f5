"""A hivemerge peer: identity, content store, network presence, publishing and fetching.

A :class:`Node` is used by the long-running ``hivemerge node start`` (which other
commands reach through its control endpoint) and, briefly, by a command given
``--peer`` with no node running. It re-announces what it published and every object it
stores while it runs, so its records expire soon after it leaves.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from hivemerge.merge.deltas.codecs import DEFAULT_CODEC
from hivemerge.merge.deltas.delta import DeltaFile, apply_delta, extract_delta
from hivemerge.merge.engine import run_merge
from hivemerge.merge.io.atomic import atomic_directory, link_or_copy
from hivemerge.merge.io.dtypes import dtype_name
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel, float_dtype
from hivemerge.merge.methods import METHODS
from hivemerge.merge.recipe import validate_params, validate_recipe
from hivemerge.node.charter_follower import FIND_TIMEOUT, CharterFollower
from hivemerge.node.coordinators.merge_rounds import POLL_SECONDS, RoundCoordinator
from hivemerge.node.coordinators.search_rounds import SearchCoordinator
from hivemerge.node.net.network import Network, is_bound
from hivemerge.node.net.transfer import BundleFetcher, BundleServer, FetchError
from hivemerge.node.storage.home import PUBLISHED_FILE, read_json, write_json
from hivemerge.node.storage.retention import record_fetched_consensus
from hivemerge.node.storage.store import DEFAULT_MAX_STORE, DELTA_SUFFIX, ContentStore
from hivemerge.protocol import bounds, charter_rules, records, rounds
from hivemerge.protocol.content import parse_content_ref
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity, fingerprint
from hivemerge.protocol.record_schemas import check_domain

DEFAULT_LISTEN = ["/ip4/0.0.0.0/tcp/0"]
RECORD_TTL = 300.0  # seconds a record lives unless refreshed
GONE_MARGIN = 0.1  # seconds a "gone" record outlives the live one it replaces
# Records announce() re-stores every record_ttl / 3: a failed store is repaired by the next refresh.
REFRESHED_KINDS = frozenset({"record/expert", "record/provider", "record/pack", "record/charter"})
STORE_ATTEMPTS = 3  # of every other record
STORE_RETRY_SECONDS = 0.5  # before the second attempt; twice that before the third
DAEMON_CHECK_SECONDS = 1.0  # how often a running node checks that its p2p daemon lives
CHARTER_POLL_SECONDS = 10.0  # how often a node looks for a newer version of its network charter

Progress = Callable[[int, int, str], None]


def adds_content(method):
    """Commands that bring content into the store hold the node's content lock, so that
    pruning inside the node (``keep_results``) never removes what they are about to use."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.content_lock:
            return method(self, *args, **kwargs)
    return locked


def with_base_dtype(document: dict, base: Path | None) -> dict:
    """A round recipe that names no ``out_dtype`` gets its base's (bf16 in, bf16 out: a
    float32 consensus of a bf16 base is twice the bytes to move and store). The proposer
    writes it into the signed proposal, so every participant merges alike."""
    if "out_dtype" in document or base is None:
        return document
    dtype = float_dtype(SafetensorsModel(base))
    return document if dtype is None else {**document, "out_dtype": dtype_name(dtype)}


class Node:
    def __init__(
        self, home: Path, listen: list[str] | None = None, peers: list[str] | None = None,
        client_mode: bool = False, record_ttl: float = RECORD_TTL, round_poll: float = POLL_SECONDS, device: str = "auto",
        keep_results: int | None = None, max_store: int = DEFAULT_MAX_STORE, network: dict | str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.home = Path(home)
        # The wall clock this node reads for deadlines and records' issued_at. Nodes' clocks
        # differ by seconds in the wild; tests give nodes offset clocks to show rounds agree anyway.
        self.clock = clock
        self.keep_results = keep_results  # prune the store after each round that ends (None: never)
        self.content_lock = threading.Lock()  # held by commands that add content (see adds_content)
        self.home.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(self.home)
        self.store = ContentStore(self.home, max_bytes=max_store)  # the quota bounds what peers make it store
        self.record_ttl = record_ttl
        self._live_until = 0.0  # DHT time the latest live record announced by this process expires
        self.client_mode = client_mode
        self.network = Network(self.identity, self.home, listen or DEFAULT_LISTEN, peers or [], client_mode)
        self._maddrs = self.network.maddrs()
        self.bytes_received = 0  # content bytes fetched from peers since start
        self.server = BundleServer(self.store)
        self.fetcher = BundleFetcher(self.network.p2p, self.store)
        self._refresher: asyncio.Task | None = None
        self._coordinator_task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        # Set when the p2p daemon dies: without it the node neither serves nor reaches the
        # DHT, so `node start` stops (exit 1) instead of running on deaf and mute.
        self.daemon_died = threading.Event()
        self.rounds = RoundCoordinator(self, poll=round_poll, device=device)
        self.searches = SearchCoordinator(self, poll=round_poll)
        self.charters: CharterFollower | None = None
        try:
            # the network's charter (None: a private test network where any key may take part)
            self.charters = CharterFollower(self, network) if network is not None else None
            self.run(self.server.register(self.network.p2p), 10)
            if self.charters is not None and self.charters.current is None:  # given by id: found on the DHT
                self.run(self.charters.find_genesis(), FIND_TIMEOUT + 10)
            if self.charters is not None and client_mode:  # a short-lived client: the newest version now, once
                self.run(self.charters.refresh(), 60)
            if not client_mode:
                self.run(self.announce(), 60)
                self._refresher = self.run(self._start(self._refresh_forever()), 5)
                self._coordinator_task = self.run(self._start(self._coordinate()), 5)
                self._watchdog = self.run(self._start(self._watch_daemon()), 5)
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------
    def run(self, coro, timeout: float):
        """Run ``coro`` on the node's event loop from another thread; waits at most ``timeout`` seconds."""
        return self.network.loop.run(coro, timeout)

    async def _start(self, coro) -> asyncio.Task:
        return asyncio.create_task(coro)

    async def _coordinate(self) -> None:
        await asyncio.gather(self.rounds.run_forever(), self.searches.run_forever(), self._follow_charter())

    async def _follow_charter(self) -> None:
        while self.charters is not None:
            try:
                await self.charters.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a DHT hiccup: the next look goes on
                self.log(f"charter: {type(exc).__name__}: {exc}"[:500])
            await asyncio.sleep(CHARTER_POLL_SECONDS)

    @property
    def charter(self) -> dict | None:
        """The signed charter version this node follows (None: no network charter)."""
        return self.charters.current if self.charters is not None else None

    def charter_status(self) -> dict:
        return self.charters.status() if self.charters is not None else {"genesis_id": None, "charter": None, "id": None, "version": None}

    def publish_charter(self, charter: dict) -> dict:
        """Store a version of this node's network charter (a maintainer's signed copy) and follow it if it counts."""
        if self.charters is None:
            raise UserInputError("this node runs without a network charter (start it with --network)")
        return self.run(self.charters.publish(charter), 60)

    async def _watch_daemon(self) -> None:
        while self.network.daemon_alive():
            await asyncio.sleep(DAEMON_CHECK_SECONDS)
        self.log(f"p2p daemon died (exit status {self.network.daemon_exit_status()}); stopping the node")
        self.daemon_died.set()

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.record_ttl / 3)
            try:
                await self.announce()
            except Exception:  # a flaky moment must not stop future refreshes
                pass

    @property
    def peer_id(self) -> str:
        return str(self.network.peer_id)

    def maddrs(self) -> list[str]:
        return self.network.maddrs()

    def published(self) -> list[dict]:
        return read_json(self.home / PUBLISHED_FILE, [])

    async def announce(self, gone: bool = False) -> None:
        """(Re)store every record this node owns. ``gone``: the same records with no
        addresses and a later expiry, which replaces the live ones (a DHT has no delete);
        readers skip them."""
        maddrs = [] if gone else [str(m) for m in await self.network.p2p.get_visible_maddrs()]
        if self.charters is not None and not gone:
            await self.charters.announce()  # every version followed, for nodes that join later
        for fields in self.published():
            await self._store_expert(fields, maddrs)
        await self.rounds.fusion.announce(maddrs)  # published logit packs
        for bundle_id in self.store.bundle_ids():
            bundle = self.store.bundle(bundle_id)
            if bundle and self.store.has(bundle["content"]):
                await self._store_provider(bundle["content"], bundle_id, maddrs)

    async def _store_expert(self, fields: dict, maddrs: list[str]) -> bool:
        fields = {**fields, "peer_id": self.peer_id, "maddrs": maddrs, "issued_at": self.clock()}
        return await self.store_record("record/expert", records.EXPERTS_KEY, fields, self.live_ttl(maddrs))

    async def _store_provider(self, content: str, bundle_id: str, maddrs: list[str]) -> bool:
        fields = {"content": content, "bundle_id": bundle_id, "peer_id": self.peer_id, "maddrs": maddrs, "issued_at": self.clock()}
        return await self.store_record("record/provider", records.providers_key(content), fields, self.live_ttl(maddrs))

    def contact(self) -> dict:
        """Where this node can be reached (addresses cached at start: callable from the loop)."""
        return {"peer_id": self.peer_id, "maddrs": self._maddrs}

    async def store_record(self, kind: str, key: str, fields: dict, ttl: float) -> bool:
        """Sign and store a record; whether some DHT node accepted it. A round's one-shot
        records (a commitment, scores, a tally, ...) are tried again after a failed or
        refused store, since nothing repairs them later: on a loaded machine a store can
        time out, and a lost commitment or tally changes what every node merges.
        Records that :meth:`announce` refreshes are tried once."""
        # The expiry is signed: no relay can keep this record alive longer (protocol/records.py).
        longest = bounds.longest_expiry(fields["issued_at"], fields.get("deadline", 0.0))
        fields = {**fields, "expires_at": math.floor(min(get_dht_time() + ttl, longest) * 1000) / 1000}  # ms, never past
        value = records.make_record(self.identity, kind, fields)
        subkey = records.owner_subkey(self.identity, kind, fields)
        attempts = 1 if kind in REFRESHED_KINDS else STORE_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                if await self.network.store_record(key, subkey, value, fields["expires_at"]):
                    return True
            except Exception as exc:
                if attempt == attempts:
                    raise
                self.log(f"storing a {kind} failed ({type(exc).__name__}: {exc}); trying again")
            if attempt < attempts:
                await asyncio.sleep(STORE_RETRY_SECONDS * attempt)
        self.log(f"storing a {kind} under {key} failed after {attempts} attempt(s): no DHT node accepted it")
        return False

    def live_ttl(self, maddrs: list[str]) -> float:
        """Seconds a record this node refreshes should live: ``record_ttl`` while it has
        addresses, else (a "gone" record) just past its latest live one."""
        now = get_dht_time()
        if maddrs:
            self._live_until = max(self._live_until, now + self.record_ttl)
            return self.record_ttl
        # A "gone" record replaces the live one only if it expires later (a DHT keeps the
        # later expiry), but only just later: a node restarted soon after must not be
        # hidden behind its own "gone" records until its first refresh.
        return max(self._live_until + GONE_MARGIN, now + 1.0) - now

    # -- publishing -------------------------------------------------------------------
    @adds_content
    def publish(self, model_dir: Path, domain: str, base_dir: Path, codec: str = DEFAULT_CODEC, progress: Progress | None = None) -> dict:
        """Extract the signed delta, store it, and advertise the expert."""
        if self.client_mode:
            raise UserInputError("publish needs a running node (hivemerge node start) to keep serving the delta")
        model_dir, base_dir = Path(model_dir), Path(base_dir)
        check_domain(domain)
        self.store.partial.mkdir(parents=True, exist_ok=True)
        scratch = self.store.partial / f"publish-{os.getpid()}{DELTA_SUFFIX}"
        try:
            report = extract_delta(base_dir, model_dir, scratch, self.identity, codec, progress=progress)
            delta_id = self.store.add_delta(scratch)
            self.store.add_model(base_dir)  # rounds merge against the base by its id
        finally:
            scratch.unlink(missing_ok=True)
        delta = DeltaFile(self.store.resolve(delta_id))
        summary = delta.summary()
        fields = {
            "domain": domain,
            "base_id": report.base_id,
            "architecture": summary["architecture"],
            "expert_id": report.expert_id,
            "delta_id": delta_id,
            "bundle_id": self.store.bundle_of(delta_id),
            "codecs": summary["codecs"],
            "size": summary["file_bytes"],
        }
        published = [p for p in self.published() if p["delta_id"] != delta_id] + [fields]
        write_json(self.home / PUBLISHED_FILE, published)
        self.run(self.announce(), 60)
        return {**fields, "publisher": self.identity.public_hex}

    def status(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "public_key": self.identity.public_hex,
            "fingerprint": self.identity.fingerprint,
            "maddrs": self.maddrs(),
            "published": [p["delta_id"] for p in self.published()],
            "stored": [self.store.bundle(b)["content"] for b in self.store.bundle_ids()],
            "home": str(self.home),
            "charter": {k: v for k, v in self.charter_status().items() if k != "charter"},
        }

    # -- discovery --------------------------------------------------------------------
    @adds_content
    def publish_pack(self, pack_file: str, probe_file: str, domain: str) -> dict:
        """Store a heterogeneous expert's logit pack and its probe set, and advertise the pack."""
        return self.rounds.fusion.publish_pack(Path(pack_file), Path(probe_file), domain)

    def packs(self, domain: str | None = None) -> list[dict]:
        return self.rounds.fusion.packs(domain)

    def experts(self, domain: str | None = None) -> list[dict]:
        found = self.run(self.network.get_records(records.EXPERTS_KEY), 30)
        rows = [r for r in found.values() if r["maddrs"] and is_bound(r) and (domain is None or r["domain"] == domain)]
        return sorted(rows, key=lambda r: (r["domain"], r["delta_id"]))

    def providers(self, content: str) -> list[dict]:
        return self.run(self._providers(content), 30)

    async def _providers(self, content: str) -> list[dict]:
        """Live provider records for ``content`` whose peer id is really their signer's key."""
        found = await self.network.get_records(records.providers_key(content))
        return [r for r in found.values() if r["maddrs"] and is_bound(r)]

    # -- fetching ---------------------------------------------------------------------
    @adds_content
    def fetch(self, ref: str | None = None, out: str | Path | None = None, base: str | Path | None = None,
              overwrite: bool = False, progress: Progress | None = None, trust: list[str] | None = None,
              verify: bool | None = None) -> dict:
        """Fetch a delta, expert or any content id into the store, then (with ``out``)
        export it: a model as a directory, a delta as a file, or with ``base`` the
        rebuilt expert. Without ``ref``: the latest final consensus model for ``base``
        (``trust``: only these keys' attestations count; ``verify``: recompute it)."""
        if ref is None:
            return self.fetch_latest(base, out, overwrite, progress, trust=trust, verify=verify)
        cid = parse_content_ref(ref)
        if cid is None:
            raise UserInputError(f"{ref}: not a content id (64 hex characters, optionally hm://)")
        content, size = cid, None
        if not self.store.has(cid):
            experts = self.experts()
            for expert in experts:  # an expert id names the expert: fetch its delta
                if cid == expert["expert_id"]:
                    content = expert["delta_id"]
                    break
            named = [r for r in experts if r["delta_id"] == content] or [r for r in self.packs() if r["pack_id"] == content]
            size = signed_size(named)
        report = self.run(self.fetch_async(content, progress=progress, expected_size=size), 3600)
        path = self.store.resolve(content)
        result = {"content": content, "stored": str(path)}
        if report is not None:
            result.update(
                bytes_received=report.bytes_received, chunks_by_provider=report.chunks_by_provider,
                liars=report.liars, failed=report.failed, resumed_chunks=report.resumed_chunks, refused=report.refused,
            )
        if out is not None:
            result["out"] = str(self._export(path, Path(out), Path(base) if base else None, overwrite))
        return result

    async def fetch_async(self, content: str, progress: Progress | None = None, expected_size: int | None = None):
        """Bring ``content`` into the store from its providers; None if it was there already.
        ``expected_size``: its bytes as a signed record states them (an expert's or a pack's
        ``size``), which bounds what the fetch accepts."""
        if self.store.has(content):
            return None
        found = await self._providers(content)
        if not found:
            raise FetchError(f"hm://{content}: no provider found on the network")
        offers = bundle_offers(found, resumable={p.name for p in self.store.resumable()})
        await self._connect(found)
        report = await self.fetcher.fetch(
            content, [(b, [PeerID.from_base58(r["peer_id"]) for r in rs]) for b, rs in offers], progress, expected_size)
        self.bytes_received += report.bytes_received
        if not self.client_mode:
            await self.announce()  # what it fetched, it serves
        return report

    # -- merge rounds -----------------------------------------------------------------
    @adds_content
    def propose(self, document: dict, base: str | None = None) -> dict:
        """Announce a merge round from a round recipe (docs/network.md)."""
        ref = document.get("base_model") or base
        if not isinstance(ref, str):
            raise UserInputError("base_model: required (a base model directory or hm://<id>)")
        base_id = parse_content_ref(ref) if ref.startswith("hm://") else model_id(SafetensorsModel(Path(ref)))
        if base_id is None:
            raise UserInputError(f"base_model: {ref!r} is not a content id")
        _check_round_template(document)
        local = Path(ref) if not ref.startswith("hm://") else self.store.resolve(base_id) if self.store.has(base_id) else None
        document = with_base_dtype(document, local)
        if "search" in document:  # a search round: its best recipe becomes a merge round
            if not ref.startswith("hm://") and not self.store.has(base_id):
                self.store.add_model(Path(ref))  # every node of the search builds the space from the base
            return self.searches.propose(document, base_id)
        if "fusion" in document:  # heterogeneous experts' packs, fused by one node (node/coordinators/fusion_rounds.py)
            # the rest of the recipe is checked first: its fuser may distil for minutes in prepare
            rounds.proposal_from_recipe({k: v for k, v in document.items() if k != "fusion"}, base_id, self.identity.public_hex, self.clock())
            document = self.rounds.fusion.prepare(document, ref, base_id)
        proposal = rounds.proposal_from_recipe(document, base_id, self.identity.public_hex, self.clock())
        self.run(self.rounds.publish_proposal(proposal), 30)
        return proposal

    def round_status(self) -> list[dict]:
        """Every round this node took part in, with live commitments and attestations."""
        rows = []
        for state in self.rounds.states():
            proposal = state["proposal"]
            commitments, attestations = self.run(self.rounds.round_records(proposal["round_id"], proposal["deadline"]), 30)
            result, attesters = self.rounds.final(proposal, commitments, attestations)
            rows.append({
                **state,
                "commitments": {k: v["delta_ids"] for k, v in commitments.items()},
                "attestations": {k: v["result_id"] for k, v in attestations.items()},
                "final": result is not None,
                "final_result": result,
                "attesters": attesters,
                # a round with a fusion step: fuser, fused delta, verdict (node/coordinators/fusion_rounds.py)
                "fusion": self.run(self.rounds.fusion.summary(proposal, commitments, attestations), 30),
                "ignored": self._ignored(state, attestations),
            })
        return rows

    def _ignored(self, state: dict, attestations: dict[str, dict]) -> dict[str, str]:
        """Under a charter, whose records of a round count for nothing, and why (not on the
        roster, wrong role, late, not in the proposer's list): ``"<kind> by <key>" -> reason``."""
        if self.charter is None:
            return {}
        found = {f"commitment by {key[:16]}": why for key, why in (state.get("ignored") or {}).items()}
        for key in attestations:
            why = charter_rules.ignored_reason(self.charter, "record/attestation", key)
            if why:
                found[f"attestation by {key[:16]}"] = why
        return found

    def latest(self, base_id: str, trust: list[str] | None = None) -> dict | None:
        """The newest final round for a base: proposal, commitments, attestations, result.
        Under a charter, final by its quorum of the roster's attesters; ``trust`` (public
        keys) narrows whose attestations count further."""
        proposals = self.run(self.rounds.proposals(base_id), 30)
        valid = [p for p in rounds.live_proposals(proposals) if p["deadline"] <= self.clock()]
        for proposal in sorted(valid, key=lambda p: (-p["deadline"], p["round_id"])):
            commitments, attestations = self.run(self.rounds.round_records(proposal["round_id"], proposal["deadline"]), 30)
            if trust is not None:
                attestations = {k: v for k, v in attestations.items() if k in trust}
            result, attesters = self.rounds.final(proposal, commitments, attestations)
            if result is not None:
                return {"proposal": proposal, "result_id": result, "attesters": attesters,
                        "commitments": commitments, "attestations": {k: attestations[k] for k in attesters}}
        return None

    def fetch_latest(self, base: str | Path | None, out: str | Path | None, overwrite: bool = False,
                     progress: Progress | None = None, trust: list[str] | None = None, verify: bool | None = None) -> dict:
        """The latest final consensus for ``base``. ``verify`` True: recompute the merge from
        the signed deltas and the round's recipe and refuse a result whose id differs; None
        (the default): do so when the deltas can be fetched; False: trust the attesters."""
        if base is None:
            raise UserInputError("--base: required to fetch the latest consensus model (its id names the network)")
        base_id = model_id(SafetensorsModel(Path(base)))
        final = self.latest(base_id, trust=trust)
        if final is None:
            raise UserInputError(f"no final consensus model for base {base_id[:12]} yet"
                                 + (" attested by the trusted keys" if trust is not None else ""))
        result_id = final["result_id"]
        attesters = set(final["attesters"])
        final["charter_id"] = self.charter_status()["id"]
        final["recomputed"] = False if verify is False else self._recompute(final, Path(base), required=bool(verify))
        report = self.run(self.fetch_async(result_id, progress=progress), 3600)  # served by the attesters
        path = self.store.resolve(result_id)  # the fetcher verified its content id
        proposal = final["proposal"]
        record_fetched_consensus(self.home, base_id, result_id, proposal["round_id"], proposal["deadline"])  # pruning keeps it
        summary = {
            "content": result_id, "round_id": proposal["round_id"], "attesters": sorted(attesters),
            "participants": sorted(final["commitments"]), "stored": str(path), "recomputed": final["recomputed"],
            "charter_id": final["charter_id"],
        }
        if report is not None:
            summary["bytes_received"] = report.bytes_received
        if out is not None:
            exported = self._export(path, Path(out), None, overwrite)
            write_consensus_card(exported, final)
            summary["out"] = str(exported)
        return summary

    def _recompute(self, final: dict, base: Path, required: bool) -> bool:
        """Merge the round again from its signed deltas (the attesters' included list) and
        compare ids: the merge is bitwise deterministic, so a result attested with another id
        is refused, naming the round and who signed it. Returns whether it was recomputed
        (False only when not ``required`` and a delta could not be fetched)."""
        proposal, result_id = final["proposal"], final["result_id"]
        included = final["attestations"][final["attesters"][0]]["included"]
        try:
            for delta_id in included:
                if not self.store.has(delta_id):
                    self.run(self.fetch_async(delta_id), 3600)
        except Exception as exc:
            if required:
                raise UserInputError(f"--verify: the round's deltas cannot be fetched ({type(exc).__name__}: {exc})") from None
            self.log(f"fetch: not recomputed (a delta cannot be fetched: {type(exc).__name__}: {exc})")
            return False
        out = self.store.partial / f"verify-{proposal['round_id']}"
        try:
            document = rounds.build_recipe(proposal, included, rounds.committed_domains(final["commitments"]))
            resolve = functools.partial(_resolve_with_base, self.store, proposal["base_id"], base)  # the user's base folder
            run_merge(validate_recipe(document, resolver=resolve), out, device=self.rounds.device, overwrite=True)
            recomputed = model_id(SafetensorsModel(out))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if recomputed != result_id:
            signers = ", ".join(fingerprint(bytes.fromhex(k)) for k in final["attesters"])
            raise UserInputError(f"round {proposal['round_id'][:12]}: the consensus {result_id[:12]} does not match the merge "
                                 f"recomputed from its signed deltas ({recomputed[:12]}); attested by {signers}: refused")
        return True

    async def _connect(self, peers: list[dict]) -> None:
        async def connect(r: dict) -> None:
            try:  # routing usually finds them; known addresses make it certain and quick
                await asyncio.wait_for(
                    self.network.p2p._client.connect(PeerID.from_base58(r["peer_id"]), [Multiaddr(m) for m in r["maddrs"]]), 5
                )
            except Exception:
                pass

        await asyncio.gather(*(connect(r) for r in peers))  # side by side: a dead address costs its 5 s once

    def _export(self, path: Path, out: Path, base: Path | None, overwrite: bool) -> Path:
        if path.is_file():  # a delta
            if base is not None:
                apply_delta(base, path, out, overwrite=overwrite)
                return out
            with atomic_directory(out, overwrite=overwrite) as staging:
                link_or_copy(path, staging / path.name)
            return out / path.name
        with atomic_directory(out, overwrite=overwrite) as staging:
            for item in path.iterdir():
                link_or_copy(item, staging / item.name)  # no second copy of the consensus where --out shares the disk
        if model_id(SafetensorsModel(out)) != path.name:
            raise FetchError(f"{out}: exported model does not hash to {path.name}")
        return out

    # -- leaving ----------------------------------------------------------------------
    def close(self) -> None:
        """Leave: stop refreshing, announce that this node is gone, stop the daemon."""
        try:
            for task in (self._coordinator_task, self._watchdog):
                if task is not None:
                    self.network.loop.loop.call_soon_threadsafe(task.cancel)
            if self._refresher is not None:
                self.network.loop.loop.call_soon_threadsafe(self._refresher.cancel)
                if self.network.daemon_alive():  # a dead daemon stores nothing: do not wait for it
                    self.run(self.announce(gone=True), 20)
        except Exception:
            pass  # leaving must not fail: the records expire anyway
        finally:
            self.network.close()


def bundle_offers(providers: list[dict], resumable: set[str] = frozenset()) -> list[tuple[str, list[dict]]]:
    """Provider records grouped by the bundle they name, in the order a fetch tries them:
    one it can resume first, then those most providers serve. Any record may be fake
    (anyone can sign one), so the order only saves time: every bundle is tried until one
    yields the content."""
    groups: dict[str, list[dict]] = {}
    for r in providers:
        groups.setdefault(r["bundle_id"], []).append(r)
    return sorted(groups.items(), key=lambda item: (item[0] not in resumable, -len(item[1]), item[0]))


def signed_size(found: list[dict]) -> int | None:
    """The size that signed expert or pack records (schema-checked: a count) state for one
    object: the largest, so that a forged record can loosen the bound (to the quota), never
    block an honest fetch."""
    return max((r["size"] for r in found), default=None)


def _check_round_template(document: dict) -> None:
    """The merge part of a round recipe is checked like any recipe, without its models."""
    method = METHODS.get(document.get("merge_method"))
    if method is None:
        raise UserInputError(f"merge_method: unknown method {document.get('merge_method')!r}; expected one of {sorted(METHODS)}")
    errors: list[str] = []
    validate_params(method, document.get("parameters"), [], None, -1, errors)
    for domain, params in (document.get("domain_parameters") or {}).items():
        for name, value in (params or {}).items():
            spec = next((s for s in method.model_params if s.name == name), None)
            if spec is None:
                errors.append(f"domain_parameters.{domain}.{name}: unknown parameter for {method.name}")
    if errors:
        raise UserInputError("; ".join(errors))


def _resolve_with_base(store: ContentStore, base_id: str, base: Path, cid: str) -> Path:
    return base if cid == base_id else store.resolve(cid)


def write_consensus_card(directory: Path, final: dict) -> None:
    proposal = final["proposal"]
    rows = [f"| {k[:16]} | {', '.join(d[:12] for d in v['delta_ids'])} | {'yes' if k in final['attesters'] else 'no'} |"
            for k, v in sorted(final["commitments"].items())]
    attestation = next(iter(final["attestations"].values()))
    excluded = [f"- `{d[:12]}`: {why}" for d, why in sorted(attestation["excluded"].items())] or ["- none"]
    card = "\n".join([
        "---", "library_name: transformers", "tags: [merge, hivemerge, consensus]", "---",
        f"# hivemerge consensus model, round {proposal['round_id'][:12]}", "",
        f"Content id `{final['result_id']}`, attested by {len(final['attesters'])} of {len(final['commitments'])} "
        f"participants" + (f" under network charter `{final['charter_id']}`" if final.get("charter_id")
                           else f" (quorum {proposal['quorum']:.2f})") + ".", "",
        "Recomputed by the fetcher from the signed deltas: " + ("yes, the same bytes." if final.get("recomputed") else "no."), "",
        f"Base `{proposal['base_id']}`; proposed by `{proposal['proposer'][:16]}`.", "",
        "## Participants", "", "| participant | deltas | attested |", "| --- | --- | --- |", *rows, "",
        "## Included deltas", "", *[f"- `{d}`" for d in attestation["included"]], "",
        "## Excluded", "", *excluded, "",
        "## Recipe", "", "```yaml", yaml.safe_dump(proposal["recipe"], sort_keys=False).strip(), "```", "",
    ])
    (directory / "README.md").write_text(card)

