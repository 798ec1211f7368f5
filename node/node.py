"""A hivemerge peer: identity, content store, network presence, publishing and fetching.

A :class:`Node` is used by the long-running ``hivemerge node start`` (which other
commands reach through its control endpoint) and, briefly, by a command given
``--peer`` with no node running. It re-announces what it published and every object it
stores while it runs, so its records expire soon after it leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from hivemerge.merge.atomic import atomic_directory
from hivemerge.merge.codecs import DEFAULT_CODEC
from hivemerge.merge.delta import DeltaFile, apply_delta, extract_delta
from hivemerge.merge.manifest import model_id
from hivemerge.merge.sources import SafetensorsModel
from hivemerge.node.network import Network, peer_id_of
from hivemerge.node.store import DELTA_SUFFIX, ContentStore
from hivemerge.node.transfer import BundleFetcher, BundleServer, FetchError
from hivemerge.protocol import records
from hivemerge.protocol.content import parse_content_ref
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity

DEFAULT_LISTEN = ["/ip4/0.0.0.0/tcp/0"]
RECORD_TTL = 300.0  # seconds a record lives unless refreshed
PUBLISHED_FILE = "published.json"

Progress = Callable[[int, int, str], None]


class Node:
    def __init__(
        self, home: Path, listen: list[str] | None = None, peers: list[str] | None = None,
        client_mode: bool = False, record_ttl: float = RECORD_TTL,
    ):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(self.home)
        self.store = ContentStore(self.home)
        self.record_ttl = record_ttl
        self.client_mode = client_mode
        self.network = Network(self.identity, self.home, listen or DEFAULT_LISTEN, peers or [], client_mode)
        self.server = BundleServer(self.store)
        self.fetcher = BundleFetcher(self.network.p2p, self.store)
        self._refresher: asyncio.Task | None = None
        try:
            self._run(self.server.register(self.network.p2p), 10)
            if not client_mode:
                self._run(self._announce_all(), 60)
                self._refresher = self._run(self._start_refresher(), 5)
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------
    def _run(self, coro, timeout: float):
        return self.network.loop.run(coro, timeout)

    async def _start_refresher(self) -> asyncio.Task:
        return asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.record_ttl / 3)
            try:
                await self._announce_all()
            except Exception:  # a flaky moment must not stop future refreshes
                pass

    @property
    def peer_id(self) -> str:
        return str(self.network.peer_id)

    def maddrs(self) -> list[str]:
        return self.network.maddrs()

    def _published(self) -> list[dict]:
        path = self.home / PUBLISHED_FILE
        return json.loads(path.read_text()) if path.is_file() else []

    async def _announce_all(self, gone: bool = False) -> None:
        """(Re)store every record this node owns. ``gone``: the same records with no
        addresses and a later expiry, which replaces the live ones (a DHT has no delete);
        readers skip them."""
        maddrs = [] if gone else [str(m) for m in await self.network.p2p.get_visible_maddrs()]
        for fields in self._published():
            await self._store_expert(fields, maddrs)
        for bundle_id in self.store.bundle_ids():
            bundle = self.store.bundle(bundle_id)
            if bundle and self.store.has(bundle["content"]):
                await self._store_provider(bundle["content"], bundle_id, maddrs)

    async def _store_expert(self, fields: dict, maddrs: list[str]) -> bool:
        fields = {**fields, "peer_id": self.peer_id, "maddrs": maddrs, "issued_at": time.time()}
        value = records.make_record(self.identity, "record/expert", fields)
        subkey = records.owner_subkey(self.identity, fields["delta_id"])
        return await self.network.store_record(records.EXPERTS_KEY, subkey, value, self._ttl(maddrs))

    async def _store_provider(self, content: str, bundle_id: str, maddrs: list[str]) -> bool:
        fields = {"content": content, "bundle_id": bundle_id, "peer_id": self.peer_id, "maddrs": maddrs, "issued_at": time.time()}
        value = records.make_record(self.identity, "record/provider", fields)
        return await self.network.store_record(
            records.providers_key(content), records.owner_subkey(self.identity), value, self._ttl(maddrs)
        )

    def _ttl(self, maddrs: list[str]) -> float:
        return self.record_ttl if maddrs else self.record_ttl + 5  # a "gone" record must outlive the live one

    # -- publishing -------------------------------------------------------------------
    def publish(self, model_dir: Path, domain: str, base_dir: Path, codec: str = DEFAULT_CODEC, progress: Progress | None = None) -> dict:
        """Extract the signed delta, store it, and advertise the expert."""
        if self.client_mode:
            raise UserInputError("publish needs a running node (hivemerge node start) to keep serving the delta")
        model_dir, base_dir = Path(model_dir), Path(base_dir)
        if not domain or len(domain) > 64 or not domain.replace("-", "").replace("_", "").isalnum():
            raise UserInputError(f"--domain: {domain!r} must be 1-64 letters, digits, - or _")
        self.store.partial.mkdir(parents=True, exist_ok=True)
        scratch = self.store.partial / f"publish-{os.getpid()}{DELTA_SUFFIX}"
        try:
            report = extract_delta(base_dir, model_dir, scratch, self.identity, codec, progress=progress)
            delta_id = self.store.add_delta(scratch)
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
        published = [p for p in self._published() if p["delta_id"] != delta_id] + [fields]
        tmp = self.home / f".{PUBLISHED_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(published, indent=2))
        os.replace(tmp, self.home / PUBLISHED_FILE)
        self._run(self._announce_all(), 60)
        return {**fields, "publisher": self.identity.public_hex}

    def status(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "public_key": self.identity.public_hex,
            "fingerprint": self.identity.fingerprint,
            "maddrs": self.maddrs(),
            "published": [p["delta_id"] for p in self._published()],
            "stored": [self.store.bundle(b)["content"] for b in self.store.bundle_ids()],
            "home": str(self.home),
        }

    # -- discovery --------------------------------------------------------------------
    def experts(self, domain: str | None = None) -> list[dict]:
        found = self._run(self.network.get_records(records.EXPERTS_KEY), 30)
        rows = [r for r in found.values() if r["maddrs"] and (domain is None or r["domain"] == domain)]
        return sorted(rows, key=lambda r: (r["domain"], r["delta_id"]))

    def providers(self, content: str) -> list[dict]:
        """Provider records for ``content`` whose peer id is really their signer's key."""
        found = self._run(self.network.get_records(records.providers_key(content)), 30)
        return [r for r in found.values() if r["maddrs"] and _bound(r)]

    # -- fetching ---------------------------------------------------------------------
    def fetch(self, ref: str, out: str | Path | None = None, base: str | Path | None = None, overwrite: bool = False,
              progress: Progress | None = None) -> dict:
        """Fetch a delta, expert or any content id into the store, then (with ``out``)
        export it: a model as a directory, a delta as a file, or with ``base`` the
        rebuilt expert."""
        cid = parse_content_ref(ref)
        if cid is None:
            raise UserInputError(f"{ref}: not a content id (64 hex characters, optionally hm://)")
        content = cid
        for expert in self.experts():  # an expert id names the expert: fetch its delta
            if cid == expert["expert_id"]:
                content = expert["delta_id"]
                break
        report = None
        if not self.store.has(content):
            found = self.providers(content)
            if not found:
                raise FetchError(f"hm://{content}: no provider found on the network")
            bundle_ids = {r["bundle_id"] for r in found}
            if len(bundle_ids) > 1:  # providers disagree on the chunking: take the most common
                bundle_id = max(bundle_ids, key=lambda b: sum(r["bundle_id"] == b for r in found))
            else:
                bundle_id = bundle_ids.pop()
            peers = [r for r in found if r["bundle_id"] == bundle_id]
            self._run(self._connect(peers), 30)
            report = self._run(
                self.fetcher.fetch(content, bundle_id, [PeerID.from_base58(r["peer_id"]) for r in peers], progress), 3600
            )
            if not self.client_mode:
                self._run(self._announce_all(), 60)  # what it fetched, it serves
        path = self.store.resolve(content)
        result = {"content": content, "stored": str(path)}
        if report is not None:
            result.update(
                bytes_received=report.bytes_received, chunks_by_provider=report.chunks_by_provider,
                liars=report.liars, failed=report.failed, resumed_chunks=report.resumed_chunks,
            )
        if out is not None:
            result["out"] = str(self._export(path, Path(out), Path(base) if base else None, overwrite))
        return result

    async def _connect(self, peers: list[dict]) -> None:
        for r in peers:
            try:  # routing usually finds them; known addresses make it certain and quick
                await asyncio.wait_for(
                    self.network.p2p._client.connect(PeerID.from_base58(r["peer_id"]), [Multiaddr(m) for m in r["maddrs"]]), 5
                )
            except Exception:
                pass

    def _export(self, path: Path, out: Path, base: Path | None, overwrite: bool) -> Path:
        if path.is_file():  # a delta
            if base is not None:
                apply_delta(base, path, out, overwrite=overwrite)
                return out
            with atomic_directory(out, overwrite=overwrite) as staging:
                shutil.copyfile(path, staging / path.name)
            return out / path.name
        with atomic_directory(out, overwrite=overwrite) as staging:
            for item in path.iterdir():
                shutil.copyfile(item, staging / item.name)
        if model_id(SafetensorsModel(out)) != path.name:
            raise FetchError(f"{out}: exported model does not hash to {path.name}")
        return out

    # -- leaving ----------------------------------------------------------------------
    def close(self) -> None:
        """Leave: stop refreshing, announce that this node is gone, stop the daemon."""
        try:
            if self._refresher is not None:
                self.network.loop.loop.call_soon_threadsafe(self._refresher.cancel)
                self._run(self._announce_all(gone=True), 20)
        except Exception:
            pass  # leaving must not fail: the records expire anyway
        finally:
            self.network.close()


def _bound(record: dict) -> bool:
    """A provider's libp2p peer id must be the one its signing key derives."""
    try:
        return str(peer_id_of(bytes.fromhex(record["publisher"]))) == record["peer_id"]
    except (ValueError, KeyError):
        return False
