"""Bundle transfer over libp2p streams: serving from the store, fetching from many peers.

A fetch is offered one or more bundles of the content (each named by signed provider
records) and tries them in turn until one yields the content: a fake record can cost a
fetch some time, never the object. For each bundle the fetcher takes the manifest from
any of its providers and checks it against the bundle id; it refuses a bundle that
describes more bytes than the size a signed record states (when the caller knows it),
than a protocol cap, or than the store's quota allows, before writing a byte. Then up to
MAX_PARALLEL_PROVIDERS workers pull chunks from a shared queue, so faster providers serve
more. Every chunk is checked against the manifest before it is written. A provider that
sends a bad chunk is a liar; one that fails (killed, timed out) is dropped and its chunk
goes back to the queue for the others; either is dropped for the rest of the fetch.
Verified chunks are recorded in a staging folder, so a fetch that fails resumes later
without fetching them again (staging is kept only within the quota, and removed when it
holds nothing or its bundle proved bad). The finished object is verified as a whole and
moved into the store in one step.

The server bounds what a peer can hold open: a deadline on every read and write, at
most MAX_STREAMS_PER_PEER streams per peer (MAX_STREAMS in all), and no error of one
stream reaches anything else.
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

from hivemerge.merge.deltas.delta import DeltaError
from hivemerge.merge.io.atomic import fsync_path, write_file_atomic
from hivemerge.merge.io.manifest import model_files, model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.node.storage.store import PACK_SUFFIX, PROBE_SUFFIX, ContentStore, StoreFullError, tree_bytes, verify_file_object
from hivemerge.protocol import wire
from hivemerge.protocol.bounds import MAX_STREAMS, MAX_STREAMS_PER_PEER
from hivemerge.protocol.bundles import (
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_MANIFEST_BYTES,
    MAX_OBJECT_BYTES,
    check_bundle,
    chunk_span,
    object_suffix,
)
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.packs import MAX_PACK_BYTES, MAX_PROBE_BYTES

REQUEST_TIMEOUT = 30.0  # per request: a stalled provider is dropped after this long
IDLE_TIMEOUT = 120.0  # a stream that sends no complete request for this long is closed
WRITE_TIMEOUT = 30.0  # a reader that accepts no slice of a response for this long is dropped
WRITE_SLICE = 1 << 20  # a response is written (and its progress timed) a slice at a time
MAX_PARALLEL_PROVIDERS = 8  # workers of one fetch; a dropped provider makes room for the next
PARSED_BUNDLES = 256  # bundle manifests a server keeps parsed
OPENED_WHOLE = {PACK_SUFFIX: MAX_PACK_BYTES, PROBE_SUFFIX: MAX_PROBE_BYTES}  # objects a node reads into memory: their caps

Progress = Callable[[int, int, str], None]


class FetchError(UserInputError):
    pass


class _Drop(Exception):
    """A stream is closed for misbehaving (the reason is recorded)."""


class BundleServer:
    """Serves the store's bundles to any peer that asks (content is public)."""

    def __init__(self, store: ContentStore):
        self.store = store
        self.read_chunk = store.read_chunk  # replaceable, e.g. by a test's lying provider
        self.idle_timeout, self.write_timeout = IDLE_TIMEOUT, WRITE_TIMEOUT
        self.max_streams_per_peer, self.max_streams = MAX_STREAMS_PER_PEER, MAX_STREAMS
        self.streams: collections.Counter[str] = collections.Counter()  # open streams by peer id
        self.dropped: collections.deque[tuple[str, str]] = collections.deque(maxlen=256)  # (peer, why), latest last
        self._parsed: dict[str, dict | None] = {}  # bundle id -> its manifest, oldest first

    async def register(self, p2p: P2P) -> None:
        await p2p.add_binary_stream_handler(wire.BUNDLE_PROTOCOL, self._serve)

    def _bundle(self, bundle_id: str) -> dict | None:
        """A stored bundle manifest, parsed and checked once (up to 4 MiB to hash, on the
        loop): a peer repeating requests costs a stat each, not a parse."""
        if not (self.store.bundles / f"{bundle_id}.json").is_file():  # pruned since, or never here
            self._parsed.pop(bundle_id, None)
            return None
        if bundle_id not in self._parsed:
            self._parsed[bundle_id] = self.store.bundle(bundle_id)
            while len(self._parsed) > PARSED_BUNDLES:
                self._parsed.pop(next(iter(self._parsed)))
        return self._parsed[bundle_id]

    async def _serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(getattr(stream_info, "peer_id", "?"))
        try:
            if self.streams[peer] >= self.max_streams_per_peer or sum(self.streams.values()) >= self.max_streams:
                self.dropped.append((peer, "too many streams"))
                writer.write(wire.encode_header(error="too many streams"))
                await asyncio.wait_for(writer.drain(), self.write_timeout)
                return
            self.streams[peer] += 1
            try:
                await self._requests(reader, writer)
            finally:
                self.streams[peer] -= 1
                if self.streams[peer] <= 0:
                    del self.streams[peer]
        except _Drop as exc:
            self.dropped.append((peer, str(exc)))
        except asyncio.TimeoutError:
            self.dropped.append((peer, "write timed out"))
            writer.transport.abort()  # at once: close() would wait to flush to a peer that does not read
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer left
        except Exception as exc:  # contained: one stream's error never reaches the node
            self.dropped.append((peer, f"{type(exc).__name__}: {exc}"[:200]))
        finally:
            writer.close()  # flushes what is left (an answer, at most a slice) ...
            asyncio.get_running_loop().call_later(self.write_timeout, writer.transport.abort)  # ... if it is read

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
            except asyncio.TimeoutError:
                raise _Drop("no request within the idle timeout") from None
            except ValueError:  # past the reader's limit (64 KiB): the stream cannot be read on
                await self._send(writer, wire.encode_header(error="request line too long"))
                try:  # the rest of the line, read and dropped (1 MiB, 1 s at most): input left unread
                    await asyncio.wait_for(reader.read(1 << 20), 1.0)  # at close can reset the stream, answer and all
                except (asyncio.TimeoutError, ConnectionError, ValueError):
                    pass
                raise _Drop("request line too long") from None
            if not line:
                return
            try:
                request = wire.parse_request(line)
                bundle = self._bundle(request["bundle"])
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
                await self._send(writer, wire.encode_header(error=str(exc)))
                continue
            await self._send(writer, wire.encode_header(size=len(payload)), payload)

    async def _send(self, writer: asyncio.StreamWriter, header: bytes, payload: bytes = b"") -> None:
        """Write a response a slice at a time, each within the write timeout: a peer that
        stops reading holds at most a slice in the transport, and only until the timeout."""
        writer.write(header)
        view = memoryview(payload)
        for begin in range(0, len(view), WRITE_SLICE):
            await asyncio.wait_for(writer.drain(), self.write_timeout)
            writer.write(view[begin : begin + WRITE_SLICE])
        await asyncio.wait_for(writer.drain(), self.write_timeout)


class _Connection:
    def __init__(self, p2p: P2P, peer: PeerID):
        self.p2p, self.peer = p2p, peer
        self.reader = self.writer = None

    async def request(self, message: bytes, max_size: int) -> bytes:
        """One request and its response, every step within REQUEST_TIMEOUT (a header line
        over the reader's limit is a ValueError, like any malformed one a WireError)."""
        if self.writer is None:
            _, self.reader, self.writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.peer, wire.BUNDLE_PROTOCOL), REQUEST_TIMEOUT
            )
        self.writer.write(message)
        await asyncio.wait_for(self.writer.drain(), REQUEST_TIMEOUT)
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
    refused: dict[str, str] = field(default_factory=dict)  # bundle id -> why it was not fetched (size, quota)
    bundle_id: str | None = None  # the bundle that yielded the content


def size_limit(bundle: dict, expected_size: int | None) -> int:
    """The most bytes a fetch of ``bundle`` may bring in, before the store's quota."""
    limit = MAX_OBJECT_BYTES if expected_size is None else min(expected_size, MAX_OBJECT_BYTES)
    # a node opens no bigger pack, probe or replay set (they are read into memory)
    return min(limit, OPENED_WHOLE.get(object_suffix(bundle), limit))


def _claimed_chunks(marker: Path, bundle: dict) -> list[tuple[int, int]]:
    """The (file, chunk) pairs an earlier attempt recorded as verified; nothing when the
    record is missing, torn or names chunks the bundle does not have (each is re-hashed anyway)."""
    try:
        claimed = json.loads(marker.read_text()) if marker.is_file() else []
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(claimed, list):
        return []
    files = bundle["files"]
    return [(c[0], c[1]) for c in claimed
            if isinstance(c, list) and len(c) == 2 and type(c[0]) is int and type(c[1]) is int
            and 0 <= c[0] < len(files) and 0 <= c[1] < len(files[c[0]]["chunks"])]


class BundleFetcher:
    def __init__(self, p2p: P2P, store: ContentStore):
        self.p2p, self.store = p2p, store
        self._active: set[str] = set()  # bundles being fetched: their staging is never evicted

    async def fetch(self, content: str, offers: list[tuple[str, list[PeerID]]], progress: Progress | None = None,
                    expected_size: int | None = None) -> FetchReport:
        """Fetch ``content`` from the first of ``offers`` (bundle id, its providers) that
        yields it. ``expected_size``: the object's bytes as a signed record states them."""
        if self.store.has(content):
            return FetchReport(content, self.store.resolve(content))
        report = FetchReport(content)
        errors: list[UserInputError] = []
        for bundle_id, providers in offers:
            dropped = set(report.liars) | set(report.failed)
            peers = [p for p in dict.fromkeys(providers) if p != self.p2p.peer_id and str(p) not in dropped]
            if not peers:
                continue
            try:
                await self._fetch_bundle(content, bundle_id, peers, report, progress, expected_size)
                return report
            except UserInputError as exc:
                errors.append(exc)
            except (ValueError, LookupError, TypeError, RecursionError) as exc:  # a reader's gap: still this bundle's fault
                errors.append(FetchError(f"bundle {bundle_id[:12]}: {type(exc).__name__}: {exc}"[:300]))
        if not errors:
            raise FetchError(f"hm://{content}: no provider is known")
        if len(errors) == 1:
            raise errors[0]
        raise FetchError(f"hm://{content}: none of {len(errors)} bundles offered yielded it: "
                         + "; ".join(f"{type(e).__name__}: {e}" for e in errors)[:2000])

    async def _fetch_bundle(self, content: str, bundle_id: str, providers: list[PeerID], report: FetchReport,
                            progress: Progress | None, expected_size: int | None) -> None:
        offered = providers
        bundle = await self._manifest(bundle_id, providers, report)
        providers = [p for p in providers if str(p) not in report.liars and str(p) not in report.failed]

        def lied(why: str) -> FetchError:
            for p in offered:  # each signed a record that names this bundle for this content, reachable or not
                report.failed.pop(str(p), None)
                report.liars[str(p)] = why
            report.refused[bundle_id] = why
            return FetchError(f"hm://{content}: {why}")

        if bundle["content"] != content:
            raise lied(f"bundle {bundle_id[:12]} holds {bundle['content'][:12]}, not {content[:12]}")
        size = sum(f["size"] for f in bundle["files"])
        total = sum(len(f["chunks"]) for f in bundle["files"])
        limit = size_limit(bundle, expected_size)
        if total > MAX_CHUNKS:
            raise lied(f"bundle {bundle_id[:12]} lists {total} chunks, more than the {MAX_CHUNKS} a manifest may")
        if size > limit:
            bound = "its signed record states" if limit == expected_size else "a fetch of it may bring in"
            raise lied(f"bundle {bundle_id[:12]} describes {size} bytes, more than the {limit} bytes {bound}")
        staging = self.store.fetch_staging(bundle_id)
        try:  # refused before a byte is written; no await until the staging files exist
            self.store.make_room(size + len(canonical_json(bundle)) - tree_bytes(staging), self._active | {bundle_id})
        except StoreFullError as exc:
            report.refused[bundle_id] = str(exc)
            raise FetchError(f"hm://{content}: bundle {bundle_id[:12]} refused: {exc}") from None
        self._active.add(bundle_id)
        try:
            await self._pull(content, bundle_id, bundle, staging, providers, report, progress)
        finally:
            self._active.discard(bundle_id)

    async def _pull(self, content: str, bundle_id: str, bundle: dict, staging: Path, providers: list[PeerID],
                    report: FetchReport, progress: Progress | None) -> None:
        report.chunks_by_provider = {}  # who served the bundle that yields the content, not an abandoned one
        done = self._resume(staging, bundle, report)
        pending: collections.deque = collections.deque()
        total = sum(len(f["chunks"]) for f in bundle["files"])
        for i, entry in enumerate(bundle["files"]):
            for j in range(len(entry["chunks"])):
                if (i, j) not in done:
                    pending.append((i, j))
        state = {"done": len(done), "in_flight": 0}
        settled = asyncio.Event()  # set when an in-flight chunk is done or back in the queue
        waiting = collections.deque(providers)  # providers not yet given a worker
        served: set[str] = set()

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
                    served.add(str(peer))
                    report.bytes_received += len(data)
                    report.chunks_by_provider[str(peer)] = report.chunks_by_provider.get(str(peer), 0) + 1
                    state["done"] += 1
                    if progress:
                        progress(state["done"], total, entry["path"])
            finally:
                conn.close()

        async def slot() -> None:
            # One worker at a time; when its provider is dropped, the next waiting one takes over.
            while waiting and (pending or state["in_flight"]):
                await worker(waiting.popleft())

        try:
            await asyncio.gather(*(slot() for _ in range(min(MAX_PARALLEL_PROVIDERS, len(providers)))))
        finally:
            if len(done) < total:  # failed or cancelled: keep what was verified, if anything
                self._keep_for_resume(staging, done)
        if len(done) < total:
            raise FetchError(
                f"hm://{content}: {total - len(done)} of {total} chunks could not be fetched "
                f"(liars: {sorted(report.liars) or 'none'}; failed: {sorted(report.failed) or 'none'}); "
                "verified chunks are kept and a new fetch resumes from them"
            )
        try:
            report.path = await asyncio.get_running_loop().run_in_executor(None, self._finish, staging, bundle)
        except UserInputError as exc:
            # Every chunk matched the manifest, yet the whole is not the content: this bundle
            # is bad for good, and its staging would only fail again.
            shutil.rmtree(staging, ignore_errors=True)
            for peer in served:
                report.liars[peer] = f"served bundle {bundle_id[:12]}, which is not hm://{content[:12]}"
            raise exc from None
        report.bundle_id = bundle_id
        self.store.write_bundle(content)

    async def _manifest(self, bundle_id: str, providers: list[PeerID], report: FetchReport) -> dict:
        """The bundle manifest from the first provider that serves a valid one. Several are
        asked at once: providers that stall (fake records at dead addresses) cost one
        request timeout together, not one each in turn."""
        cached = self.store.bundle(bundle_id)
        if cached is not None:
            return cached

        async def ask(peer: PeerID) -> dict | None:
            conn = _Connection(self.p2p, peer)
            try:
                raw = await conn.request(wire.encode_request("bundle", bundle_id), MAX_MANIFEST_BYTES)
                return check_bundle(json.loads(raw), bundle_id)
            except UserInputError as exc:
                report.liars[str(peer)] = str(exc)
            except Exception as exc:
                report.failed[str(peer)] = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                conn.close()
            return None

        waiting, asking = list(providers), set()
        try:
            while waiting or asking:
                while waiting and len(asking) < MAX_PARALLEL_PROVIDERS:
                    asking.add(asyncio.ensure_future(ask(waiting.pop(0))))
                answered, asking = await asyncio.wait(asking, return_when=asyncio.FIRST_COMPLETED)
                for task in answered:
                    if task.result() is not None:
                        return task.result()
        finally:
            for task in asking:
                task.cancel()
            await asyncio.gather(*asking, return_exceptions=True)
        raise FetchError(f"no provider served bundle {bundle_id[:12]} (failed: {report.failed}, liars: {report.liars})")

    # -- staging ----------------------------------------------------------------------
    def _resume(self, staging: Path, bundle: dict, report: FetchReport) -> set[tuple[int, int]]:
        """Chunks a previous attempt verified and wrote (re-hashed: the disk is not trusted either)."""
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "bundle.json").write_bytes(canonical_json(bundle))
        done: set[tuple[int, int]] = set()
        for i, j in _claimed_chunks(staging / "done.json", bundle):
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

    def _keep_for_resume(self, staging: Path, done: set[tuple[int, int]]) -> None:
        """Record the verified chunks for a later fetch; staging with none of them goes."""
        if done:
            write_file_atomic(staging / "done.json", json.dumps(sorted(done)).encode())
        else:
            shutil.rmtree(staging, ignore_errors=True)

    def _finish(self, staging: Path, bundle: dict) -> Path:
        """Verify the whole object, then move it into the store in one rename. An object
        that fails is removed with its staging: its chunks matched the bundle, so the
        bundle itself is bad and fetching it again would not help. A delta that fails keeps
        its DeltaError (a round excludes it as failing verification, not as unavailable)."""
        try:
            return self._verify_and_store(staging, bundle)
        except DeltaError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
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
