"""Bundle transfer over libp2p streams: serving from the store, fetching from many peers.

The fetcher takes the bundle manifest from any provider and checks it against the
bundle id from a signed record; then one worker per provider pulls chunks from a
shared queue, so faster providers serve more. Every chunk is checked against the
manifest before it is written. A provider that sends a bad chunk is a liar and is
dropped for the rest of the fetch; one that fails (killed, timed out) is dropped and
its chunk goes back to the queue for the others. Verified chunks are recorded in a
partial folder, so a fetch that fails resumes later without fetching them again. The
finished object is verified as a whole and moved into the store in one step.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.p2p import P2P, PeerID

from hivemerge.merge.atomic import fsync_path
from hivemerge.merge.manifest import model_files, model_id
from hivemerge.merge.sources import SafetensorsModel
from hivemerge.node.store import ContentStore, verify_file_object
from hivemerge.protocol import wire
from hivemerge.protocol.bundles import MAX_CHUNK_SIZE, check_bundle, chunk_span, object_suffix
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError

REQUEST_TIMEOUT = 30.0  # per request: a stalled provider is dropped after this long
IDLE_TIMEOUT = 120.0

Progress = Callable[[int, int, str], None]


class FetchError(UserInputError):
    pass


class BundleServer:
    """Serves the store's bundles to any peer that asks (content is public)."""

    def __init__(self, store: ContentStore):
        self.store = store
        self.read_chunk = store.read_chunk  # replaceable, e.g. by a test's lying provider

    async def register(self, p2p: P2P) -> None:
        await p2p.add_binary_stream_handler(wire.BUNDLE_PROTOCOL, self._serve)

    async def _serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                if not line:
                    break
                try:
                    request = wire.parse_request(line)
                    bundle = self.store.bundle(request["bundle"])
                    if bundle is None:
                        raise wire.WireError("unknown bundle")
                    if request["op"] == "bundle":
                        payload = canonical_json(bundle)
                    else:
                        f, c = request["file"], request["chunk"]
                        if f >= len(bundle["files"]) or c >= len(bundle["files"][f]["chunks"]):
                            raise wire.WireError("no such chunk")
                        payload = await loop.run_in_executor(None, self.read_chunk, bundle, f, c)
                except (wire.WireError, UserInputError, OSError) as exc:
                    writer.write(wire.encode_header(error=str(exc)))
                    await writer.drain()
                    continue
                writer.write(wire.encode_header(size=len(payload)))
                writer.write(payload)
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class _Connection:
    def __init__(self, p2p: P2P, peer: PeerID):
        self.p2p, self.peer = p2p, peer
        self.reader = self.writer = None

    async def request(self, message: bytes, max_size: int) -> bytes:
        if self.writer is None:
            _, self.reader, self.writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.peer, wire.BUNDLE_PROTOCOL), REQUEST_TIMEOUT
            )
        self.writer.write(message)
        await self.writer.drain()
        size = wire.parse_header(await asyncio.wait_for(self.reader.readline(), REQUEST_TIMEOUT), max_size)
        return await asyncio.wait_for(self.reader.readexactly(size), REQUEST_TIMEOUT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class FetchReport:
    content: str
    path: Path | None = None
    bytes_received: int = 0
    chunks_by_provider: dict[str, int] = field(default_factory=dict)
    liars: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    resumed_chunks: int = 0


class BundleFetcher:
    def __init__(self, p2p: P2P, store: ContentStore):
        self.p2p, self.store = p2p, store

    async def fetch(self, content: str, bundle_id: str, providers: list[PeerID], progress: Progress | None = None) -> FetchReport:
        if self.store.has(content):
            return FetchReport(content, self.store.resolve(content))
        providers = [p for p in dict.fromkeys(providers) if p != self.p2p.peer_id]
        if not providers:
            raise FetchError(f"hm://{content}: no provider is known")
        report = FetchReport(content)
        bundle = await self._manifest(bundle_id, providers, report)
        if bundle["content"] != content:
            raise FetchError(f"bundle {bundle_id[:12]} holds {bundle['content'][:12]}, not {content[:12]}")
        staging = self.store.partial / bundle_id
        done = self._resume(staging, bundle, report)
        pending: collections.deque = collections.deque()
        total = sum(len(f["chunks"]) for f in bundle["files"])
        for i, entry in enumerate(bundle["files"]):
            for j in range(len(entry["chunks"])):
                if (i, j) not in done:
                    pending.append((i, j))
        state = {"done": len(done), "in_flight": 0}
        settled = asyncio.Event()  # set when an in-flight chunk is done or back in the queue

        async def take() -> tuple[int, int] | None:
            # A worker with nothing queued waits while others hold chunks in flight: one of
            # those may fail and come back, and must not be left with no worker to take it.
            while not pending:
                if state["in_flight"] == 0:
                    return None
                settled.clear()
                await settled.wait()
            state["in_flight"] += 1
            return pending.popleft()

        def settle(chunk: tuple[int, int], ok: bool) -> None:
            state["in_flight"] -= 1
            if not ok:
                pending.append(chunk)
            settled.set()

        async def worker(peer: PeerID) -> None:
            conn = _Connection(self.p2p, peer)
            try:
                while True:
                    chunk = await take()
                    if chunk is None:
                        return
                    i, j = chunk
                    entry = bundle["files"][i]
                    try:
                        data = await conn.request(wire.encode_request("chunk", bundle_id, i, j), MAX_CHUNK_SIZE)
                    except (Exception, asyncio.CancelledError) as exc:  # killed, stalled, refused
                        settle(chunk, ok=False)
                        report.failed[str(peer)] = f"{type(exc).__name__}: {exc}"[:200]
                        if isinstance(exc, asyncio.CancelledError):
                            raise
                        return
                    if hashlib.sha256(data).hexdigest() != entry["chunks"][j]:
                        settle(chunk, ok=False)
                        report.liars[str(peer)] = f"chunk {j} of {entry['path']} failed its hash check"
                        return  # avoided for the rest of this fetch
                    try:
                        self._write_chunk(staging, bundle, i, j, data)
                    except BaseException:
                        settle(chunk, ok=False)
                        raise
                    settle(chunk, ok=True)
                    done.add((i, j))
                    report.bytes_received += len(data)
                    report.chunks_by_provider[str(peer)] = report.chunks_by_provider.get(str(peer), 0) + 1
                    state["done"] += 1
                    if progress:
                        progress(state["done"], total, entry["path"])
            finally:
                conn.close()

        await asyncio.gather(*(worker(p) for p in providers if str(p) not in report.liars))
        self._save_done(staging, done)
        if len(done) < total:
            raise FetchError(
                f"hm://{content}: {total - len(done)} of {total} chunks could not be fetched "
                f"(liars: {sorted(report.liars) or 'none'}; failed: {sorted(report.failed) or 'none'}); "
                "verified chunks are kept and a new fetch resumes from them"
            )
        report.path = await asyncio.get_running_loop().run_in_executor(None, self._finish, staging, bundle)
        self.store.write_bundle(content)
        return report

    async def _manifest(self, bundle_id: str, providers: list[PeerID], report: FetchReport) -> dict:
        cached = self.store.bundle(bundle_id)
        if cached is not None:
            return cached
        for peer in providers:
            conn = _Connection(self.p2p, peer)
            try:
                raw = await conn.request(wire.encode_request("bundle", bundle_id), 16 * 1024 * 1024)
                return check_bundle(json.loads(raw), bundle_id)
            except UserInputError as exc:
                report.liars[str(peer)] = str(exc)
            except Exception as exc:
                report.failed[str(peer)] = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                conn.close()
        raise FetchError(f"no provider served bundle {bundle_id[:12]} (failed: {report.failed}, liars: {report.liars})")

    # -- staging ----------------------------------------------------------------------
    def _resume(self, staging: Path, bundle: dict, report: FetchReport) -> set[tuple[int, int]]:
        """Chunks a previous attempt verified and wrote (re-hashed: the disk is not trusted either)."""
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "bundle.json").write_bytes(canonical_json(bundle))
        done: set[tuple[int, int]] = set()
        marker = staging / "done.json"
        claimed = json.loads(marker.read_text()) if marker.is_file() else []
        for i, j in claimed:
            entry = bundle["files"][i]
            path = staging / "files" / entry["path"]
            begin, end = chunk_span(entry["size"], bundle["chunk_size"], j)
            if path.is_file():
                with path.open("rb") as f:
                    f.seek(begin)
                    if hashlib.sha256(f.read(end - begin)).hexdigest() == entry["chunks"][j]:
                        done.add((i, j))
        report.resumed_chunks = len(done)
        for entry in bundle["files"]:
            path = staging / "files" / entry["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as f:
                f.truncate(entry["size"])
        return done

    def _write_chunk(self, staging: Path, bundle: dict, i: int, j: int, data: bytes) -> None:
        entry = bundle["files"][i]
        begin, _ = chunk_span(entry["size"], bundle["chunk_size"], j)
        fd = os.open(staging / "files" / entry["path"], os.O_WRONLY)
        try:
            os.pwrite(fd, data, begin)
        finally:
            os.close(fd)

    def _save_done(self, staging: Path, done: set[tuple[int, int]]) -> None:
        (staging / "done.json").write_text(json.dumps(sorted(done)))

    def _finish(self, staging: Path, bundle: dict) -> Path:
        """Verify the whole object, then move it into the store in one rename. An object
        that fails is removed with its staging: its chunks matched the bundle, so the
        bundle itself is bad and fetching it again would not help."""
        try:
            return self._verify_and_store(staging, bundle)
        except UserInputError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise FetchError(f"hm://{bundle['content']}: {exc}") from None

    def _verify_and_store(self, staging: Path, bundle: dict) -> Path:
        content, files = bundle["content"], staging / "files"
        suffix = object_suffix(bundle)
        for entry in bundle["files"]:  # on disk before the rename names them (a crash leaves no torn object)
            fsync_path(files / entry["path"])
        if suffix is not None:  # a delta, a logit pack or a probe set
            path = files / bundle["files"][0]["path"]
            found = verify_file_object(path, suffix)
            if found != content:
                raise FetchError(f"fetched {suffix.split('.')[1]} is {found[:12]}, not {content[:12]}")
            self.store.objects.mkdir(parents=True, exist_ok=True)
            target = self.store.objects / f"{content}{suffix}"
            os.replace(path, target)
            fsync_path(self.store.objects)
        else:
            model = SafetensorsModel(files)
            # Exactly the files the id covers: nothing unverified (code, filler, folders)
            # is stored, served again or exported.
            present, covered = sorted(p.name for p in files.iterdir()), model_files(model)
            if present != covered:
                extra = sorted(set(present) - set(covered))[:5]
                raise FetchError(f"fetched model holds files its content id does not cover: {extra}")
            if model_id(model) != content:
                raise FetchError(f"fetched model does not hash to {content[:12]}")
            self.store.models.mkdir(parents=True, exist_ok=True)
            target = self.store.models / content
            os.replace(files, target)
            fsync_path(self.store.models)
        shutil.rmtree(staging, ignore_errors=True)
        return target
