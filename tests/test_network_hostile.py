"""Hostile providers and peers on 127.0.0.1 (issue 18, findings 3, 4 and 7).

- Fake provider records (correctly signed, each by its own key) that name fake bundles,
  outnumber the honest provider and sort first: the fetch tries them, drops them, and
  gets the object from the honest provider.
- A provider whose manifest claims more bytes than the signed size, or than the
  fetcher's quota: refused before a byte is written; a bundle that proves bad after a
  full download leaves no staging.
- A peer that stops reading, one that sends a request line over the stream reader's
  limit, one that opens more streams than a peer may: each is dropped or refused, no
  error escapes the handler, and another peer is served meanwhile.

The nodes are shared by the module; each test starts from a fetcher that holds nothing.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field

import pytest
from network_fixtures import (
    NodePool,
    build_models,
    no_leftover_daemons,  # noqa: F401 (autouse)
    sha256_file,
    wait_until,
)

from hivemerge.node.net.network import peer_id_of
from hivemerge.node.net.transfer import MAX_STREAMS_PER_PEER, FetchError
from hivemerge.protocol import records, wire
from hivemerge.protocol.bundles import MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, bundle_manifest
from hivemerge.protocol.content import canonical_json, content_id
from hivemerge.protocol.identity import Identity

CHUNK = 1024  # the delta: ~40 chunks
BIG_CHUNK = 4 << 20  # the probe set the slow reader asks for
WRITE_TIMEOUT = 8.0  # the honest server's, for these tests (30 s in a node)


@dataclass
class Net:
    honest: object
    mallory: object
    trudy: object
    fetcher: object
    client: object
    delta_id: str
    probe_id: str
    base_id: str  # only the honest node offers it
    unhandled: list = field(default_factory=list)  # what reached the honest node's loop exception handler


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    models = build_models(tmp_path_factory.mktemp("models"), hidden=64)
    pool = NodePool(tmp_path_factory.mktemp("net"))
    try:
        honest = pool.start("honest", chunk_size=CHUNK)
        published = honest.publish(models.expert, "math", models.base, codec="lossless")
        delta_id = published["delta_id"]
        probe = tmp_path_factory.mktemp("probe") / "big.jsonl"
        probe.write_text("".join(json.dumps({"prompt": f"p{i} " + "x" * 2000, "response": "y" * 2000}) + "\n"
                                 for i in range(2500)))  # ~10 MB: three chunks of 4 MiB
        honest.store.chunk_size = BIG_CHUNK
        probe_id = honest.store.add_probe(probe)
        honest.network.loop.run(honest.announce(), 60)
        honest.server.write_timeout = WRITE_TIMEOUT
        unhandled: list = []
        honest.network.loop.loop.set_exception_handler(lambda loop, context: unhandled.append(context))
        peers = honest.maddrs()
        net = Net(honest, pool.start("mallory", peers=peers), pool.start("trudy", peers=peers),
                  pool.start("fetcher", peers=peers), pool.start("client", peers=peers), delta_id, probe_id,
                  published["base_id"], unhandled)
        yield net
    finally:
        pool.close_all()


@pytest.fixture
def fetcher(net):
    """The fetcher, holding nothing: no object, no bundle, no staging."""
    store = net.fetcher.store
    for folder in (store.objects, store.models, store.bundles, store.partial):
        shutil.rmtree(folder, ignore_errors=True)
    yield net.fetcher
    gc.collect()  # an exception that escaped a handler task is reported when the task is collected
    assert net.unhandled == [], net.unhandled


def dead_maddr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}"  # nobody listens there


def announce(via, identity: Identity, content: str, bundle_id: str, maddrs: list[str]) -> None:
    """Store a provider record signed by ``identity`` (bound to its own peer id) through ``via``."""
    fields = {"content": content, "bundle_id": bundle_id, "peer_id": str(peer_id_of(identity.public_key)),
              "maddrs": maddrs, "issued_at": time.time(), "expires_at": time.time() + 300.0}
    value = records.make_record(identity, "record/provider", fields)
    subkey = records.owner_subkey(identity, "record/provider", fields)
    stored = via.network.store_record(records.providers_key(content), subkey, value, fields["expires_at"])
    assert via.network.loop.run(stored, 30)


def announce_own(node, content: str, bundle_id: str) -> None:
    fields = {"content": content, "bundle_id": bundle_id, "peer_id": node.peer_id, "maddrs": node.maddrs(),
              "issued_at": time.time()}
    assert node.network.loop.run(node.store_record("record/provider", records.providers_key(content), fields, 300.0), 30)


def unreachable_providers(via, content: str, bundle_id: str, count: int) -> list[str]:
    """``count`` fake providers, each its own key and a correctly signed record, at a dead address."""
    peer_ids = []
    for _ in range(count):
        identity = Identity.generate()
        announce(via, identity, content, bundle_id, [dead_maddr()])
        peer_ids.append(str(peer_id_of(identity.public_key)))
    return peer_ids


def serve_bundle(node, manifest: dict, data: bytes | None) -> str:
    """Make ``node`` serve ``manifest`` (and ``data`` as its one file's bytes); returns its id."""
    bundle_id = content_id(manifest)
    node.store.bundles.mkdir(parents=True, exist_ok=True)
    (node.store.bundles / f"{bundle_id}.json").write_bytes(canonical_json(manifest))
    asked: list = []
    real = node.server.read_chunk

    def read_chunk(bundle, file_index, chunk_index):
        if bundle is not None and content_id(bundle) == bundle_id:
            asked.append(chunk_index)
            begin = chunk_index * bundle["chunk_size"]
            return (data or b"")[begin : begin + bundle["chunk_size"]]
        return real(bundle, file_index, chunk_index)

    node.server.read_chunk = read_chunk
    node.asked = getattr(node, "asked", {})
    node.asked[bundle_id] = asked
    return bundle_id


def huge_manifest(content: str, path: str, size: int) -> dict:
    """A well-formed manifest claiming ``size`` bytes (random chunk hashes: it is never served)."""
    count = -(-size // MAX_CHUNK_SIZE)
    return bundle_manifest(content, MAX_CHUNK_SIZE, [{"path": path, "size": size,
                                                      "chunks": [os.urandom(32).hex() for _ in range(count)]}])


def staging_left(node) -> list[str]:
    return sorted(p.name for p in node.store.partial.iterdir()) if node.store.partial.is_dir() else []


# -- 3. fake providers --------------------------------------------------------------------------

def test_fake_providers_that_outnumber_and_sort_first_do_not_stop_a_fetch(net, fetcher):
    delta_id, honest = net.delta_id, net.honest
    honest_file = honest.store.resolve(delta_id)
    size = honest_file.stat().st_size
    total = -(-size // CHUNK)
    path = f"{delta_id}.delta.safetensors"

    # Three keys name a bundle nobody serves, with the lowest id there is.
    nowhere = unreachable_providers(net.trudy, delta_id, "00" * 32, 3)
    # Mallory serves a bundle whose every chunk matches its manifest, but the whole is not the delta.
    garbage = os.urandom(size)
    mallory_bundle = serve_bundle(net.mallory, bundle_manifest(delta_id, CHUNK, [{
        "path": path, "size": size,
        "chunks": [hashlib.sha256(garbage[i : i + CHUNK]).hexdigest() for i in range(0, size, CHUNK)]}]), garbage)
    announce_own(net.mallory, delta_id, mallory_bundle)
    # Trudy serves a manifest of the delta that claims 1 GiB, far more than the expert record's size.
    trudy_bundle = serve_bundle(net.trudy, huge_manifest(delta_id, path, 1 << 30), None)
    announce_own(net.trudy, delta_id, trudy_bundle)
    # Each fake bundle is named by three keys, the honest one by one.
    mallory_sybils = unreachable_providers(net.trudy, delta_id, mallory_bundle, 2)
    trudy_sybils = unreachable_providers(net.trudy, delta_id, trudy_bundle, 2)
    wait_until(lambda: len(fetcher.providers(delta_id)) == 10, 30, what="every provider record")

    got = fetcher.fetch(delta_id)

    assert got["chunks_by_provider"] == {honest.peer_id: total}
    assert sha256_file(fetcher.store.resolve(delta_id)) == sha256_file(honest_file)
    assert "which is not" in got["liars"][net.mallory.peer_id]
    assert sorted(set(net.mallory.asked[mallory_bundle])) == list(range(total))
    claim = f"describes {1 << 30} bytes, more than the {size} bytes its signed record states"
    assert got["refused"] == {trudy_bundle: f"bundle {trudy_bundle[:12]} {claim}"}
    for peer in [net.trudy.peer_id, *trudy_sybils]:  # each signed a record naming that bundle
        assert claim in got["liars"][peer]
    assert net.trudy.asked[trudy_bundle] == []  # not one chunk asked for
    assert set(got["failed"]) == set(nowhere + mallory_sybils)  # unreachable: dropped
    assert honest.peer_id not in got["liars"] and honest.peer_id not in got["failed"]
    assert staging_left(fetcher) == []  # Mallory's bundle failed for good: its staging is gone


# -- 4. disk fill -------------------------------------------------------------------------------

def test_a_bundle_over_the_quota_is_refused_before_a_byte_is_written(net, fetcher):
    probe_id, honest = net.probe_id, net.honest
    probe_size = honest.store.resolve(probe_id).stat().st_size
    # No signed record states a probe set's size: the quota bounds the fetch (32 MiB: under the
    # probe cap, MAX_PROBE_BYTES, which refuses anything larger before the quota is asked).
    fetcher.store.max_bytes = fetcher.store.used_bytes() + probe_size + (1 << 20)
    trudy_bundle = serve_bundle(net.trudy, huge_manifest(probe_id, f"{probe_id}.probe.jsonl", 32 << 20), None)
    announce_own(net.trudy, probe_id, trudy_bundle)
    unreachable_providers(net.trudy, probe_id, trudy_bundle, 2)  # tried before the honest bundle
    wait_until(lambda: len(fetcher.providers(probe_id)) == 4, 30, what="every provider record")

    got = fetcher.fetch(probe_id)

    assert got["chunks_by_provider"] == {honest.peer_id: 3}
    assert "over its quota" in got["refused"].get(trudy_bundle, "not refused")
    assert net.trudy.asked[trudy_bundle] == []
    assert fetcher.store.used_bytes() <= fetcher.store.max_bytes
    assert staging_left(fetcher) == []

    # Only Trudy offers this one: refused, and the store is as it was.
    other = hashlib.sha256(b"nobody has this").hexdigest()
    announce_own(net.trudy, other, serve_bundle(net.trudy, huge_manifest(other, f"{other}.probe.jsonl", 32 << 20), None))
    wait_until(lambda: fetcher.providers(other), 30, what="Trudy's record")
    before = fetcher.store.used_bytes()
    with pytest.raises(FetchError, match="over its quota"):
        fetcher.fetch(other)
    assert fetcher.store.used_bytes() == before <= fetcher.store.max_bytes
    assert staging_left(fetcher) == [] and not fetcher.store.has(other)
    fetcher.store.max_bytes = 200 << 30


def test_a_manifest_over_its_cap_is_refused_unread(net, fetcher):
    """80,000 chunk hashes: a 5 MB manifest, over MAX_MANIFEST_BYTES (it used to be 16 MiB)."""
    other = hashlib.sha256(b"a long manifest").hexdigest()
    manifest = bundle_manifest(other, 1, [{"path": f"{other}.probe.jsonl", "size": 80_000,
                                           "chunks": [os.urandom(32).hex() for _ in range(80_000)]}])
    assert len(canonical_json(manifest)) > MAX_MANIFEST_BYTES
    announce_own(net.trudy, other, serve_bundle(net.trudy, manifest, None))
    wait_until(lambda: fetcher.providers(other), 30, what="Trudy's record")
    with pytest.raises(FetchError, match=r"announced size \d+ out of range"):
        fetcher.fetch(other)
    assert staging_left(fetcher) == [] and not fetcher.store.bundles.exists()


# -- 7. slow and abusive peers ----------------------------------------------------------------

class Streams:
    """Raw bundle-protocol streams from the client node to the honest one (on the client's loop)."""

    def __init__(self, client, server):
        self.client, self.peer = client, server.network.peer_id
        self.open: list = []

    def run(self, coro, timeout: float = 30):
        return self.client.network.loop.run(coro, timeout)

    def connect(self) -> int:
        async def go():
            _, reader, writer = await self.client.network.p2p.call_binary_stream_handler(self.peer, wire.BUNDLE_PROTOCOL)
            self.open.append((reader, writer))
            return len(self.open) - 1
        return self.run(go())

    def send(self, i: int, data: bytes) -> None:
        async def go():
            self.open[i][1].write(data)  # no drain: this peer does not wait for anything
        self.run(go())

    def read_line(self, i: int, timeout: float = 20) -> bytes:
        return self.run(asyncio.wait_for(self.open[i][0].readline(), timeout), timeout + 5)

    def read_rest(self, i: int, timeout: float = 20) -> bytes:
        return self.run(asyncio.wait_for(self.open[i][0].read(), timeout), timeout + 5)

    def close_all(self) -> None:
        async def go():
            for _, writer in self.open:
                writer.close()
        self.run(go())
        self.open = []


def fetch_from_honest(net, fetcher) -> dict:
    """The fetcher fetches the base model, which the honest node alone serves."""
    got = fetcher.fetch(net.base_id)
    bundle = net.honest.store.bundle(net.honest.store.bundle_of(net.base_id))
    assert got["chunks_by_provider"] == {net.honest.peer_id: sum(len(f["chunks"]) for f in bundle["files"])}
    assert fetcher.store.has(net.base_id)
    return got


def wait_dropped(server, peer: str, why: str, timeout: float) -> float:
    wait_until(lambda: (peer, why) in server.dropped, timeout, interval=0.05, what=f"{peer} dropped ({why})")
    return time.monotonic()


def test_a_peer_that_stops_reading_is_dropped_while_others_are_served(net, fetcher):
    server, client = net.honest.server, net.client
    bundle = net.honest.store.bundle_of(net.probe_id)
    served = []
    real = server.read_chunk
    server.read_chunk = lambda *a: (served.append(a[2]), real(*a))[1]
    streams = Streams(client, net.honest)
    try:
        i = streams.connect()
        # 200 requests for a 4 MiB chunk, and not one byte read: the server's writes block.
        streams.send(i, wire.encode_request("chunk", bundle, 0, 0) * 200)
        wait_until(lambda: server.streams.get(client.peer_id) == 1 and served, 30, what="the slow stream")

        def stalled():
            n = len(served)
            time.sleep(1.0)
            return len(served) == n
        wait_until(stalled, 60, interval=0, what="the server's writes to block")
        stalled_at = time.monotonic()
        assert len(served) < 200

        fetch_from_honest(net, fetcher)  # served while the slow stream is held
        assert server.streams.get(client.peer_id) == 1 and (client.peer_id, "write timed out") not in server.dropped

        dropped_at = wait_dropped(server, client.peer_id, "write timed out", WRITE_TIMEOUT + 10)
        assert dropped_at - stalled_at < WRITE_TIMEOUT + 2
        wait_until(lambda: client.peer_id not in server.streams, 10, what="the slow stream to be closed")
    finally:
        server.read_chunk = real
        streams.close_all()


def test_a_request_line_over_the_reader_limit_is_answered_and_closed(net, fetcher):
    server, client = net.honest.server, net.client
    streams = Streams(client, net.honest)
    try:
        i = streams.connect()
        streams.send(i, b'{"op":"bundle","bundle":"' + b"a" * 100_000 + b'"}\n')  # over asyncio's 64 KiB line limit
        header = streams.read_line(i)
        with pytest.raises(wire.WireError, match="request line too long"):
            wire.parse_header(header, 0)
        assert streams.read_rest(i) == b""  # and closed
        wait_dropped(server, client.peer_id, "request line too long", 10)
        fetch_from_honest(net, fetcher)  # the server is unharmed
    finally:
        streams.close_all()


def test_more_streams_than_a_peer_may_hold_are_refused_while_another_peer_is_served(net, fetcher):
    server, client = net.honest.server, net.client
    streams = Streams(client, net.honest)
    try:
        for _ in range(MAX_STREAMS_PER_PEER):  # idle streams: they send nothing
            streams.connect()
        wait_until(lambda: server.streams.get(client.peer_id) == MAX_STREAMS_PER_PEER, 30, what="the client's streams")
        extra = streams.connect()
        with pytest.raises(wire.WireError, match="too many streams"):
            wire.parse_header(streams.read_line(extra), 0)
        assert streams.read_rest(extra) == b""
        assert server.streams.get(client.peer_id) == MAX_STREAMS_PER_PEER

        got = fetch_from_honest(net, fetcher)  # another peer is served meanwhile
        assert got["failed"] == {} and got["liars"] == {}
    finally:
        streams.close_all()
    wait_until(lambda: client.peer_id not in server.streams, 30, what="the client's streams to be closed")
