"""The network node (issue 4) with real in-process nodes on 127.0.0.1.

Publishing, discovery and verified fetching across three nodes; forged records refused
and ignored everywhere; a lying provider caught and avoided; a provider killed in the
middle of a fetch; a failed fetch that leaves nothing behind and resumes; a restarted
node that keeps its identity and still serves. Every node a test starts is closed by
its fixture, and the module checks that no p2pd it started outlives it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from network_fixtures import (
    NodePool,
    build_models,
    kill_daemon,
    model_manifest,
    no_leftover_daemons,  # noqa: F401 (autouse)
    sha256_file,
    tensors_equal,
    wait_until,
)

from hivemerge.merge.deltas.delta import DeltaFile, apply_delta
from hivemerge.node.net.network import peer_id_of
from hivemerge.node.net.transfer import FetchError
from hivemerge.protocol import records, rounds
from hivemerge.protocol.content import canonical_json
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import sign_manifest

CHUNK = 1024  # small chunks: a ~40 KB lossless delta is ~40 of them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("big-models"), hidden=64)


@pytest.fixture
def pool(tmp_path_factory):
    nodes = NodePool(tmp_path_factory.mktemp("net"))
    yield nodes
    nodes.close_all()


def run_on_loop(node, fn, timeout: float = 10):
    """Call ``fn()`` on the node's event loop (where hivemind's state lives)."""
    async def call():
        return fn()

    return node.network.loop.run(call(), timeout)


def stored_values(node, key: str) -> dict:
    """{subkey: record bytes} that the node holds for ``key`` in its DHT storage and cache."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.utils import MSGPackSerializer

    def read():
        key_id = DHTID.generate(source=key)
        found = {}
        protocol = node.network.dht.protocol
        for storage in (protocol.storage, protocol.cache):
            entry = storage.get(key_id)
            if entry is not None and isinstance(entry.value, DictionaryDHTValue):
                for subkey, item in entry.value.items():
                    found.setdefault(subkey, set()).add(MSGPackSerializer.loads(item.value))
        return found

    return run_on_loop(node, read)


def raw_records(node, key: str) -> dict:
    """{subkey: record bytes} as a DHT lookup from ``node`` returns them (before open_record)."""
    found = node.network.loop.run(node.network.dht.get(key, latest=True), 30)
    return {} if found is None else {subkey: item.value for subkey, item in found.value.items()}


def dht_store(node, key: str, subkey: str, value: bytes, ttl: float = 1000.0) -> bool:
    """Store through the node's DHTNode directly (bypassing make_record)."""
    from hivemind.utils import get_dht_time

    return node.network.loop.run(node.network.dht.store(key, value, get_dht_time() + ttl, subkey=subkey), 30)


def expert_subkey(identity: Identity, delta_id: str) -> str:
    return f"{identity.public_hex}/{delta_id}"


def three_nodes(pool, chunk_size: int | None = None):
    a = pool.start("a", chunk_size=chunk_size)
    b = pool.start("b", peers=a.maddrs(), chunk_size=chunk_size)
    c = pool.start("c", peers=a.maddrs(), chunk_size=chunk_size)
    return a, b, c


# -- 1. publish, list, fetch, rebuild ---------------------------------------------------

def test_three_nodes_publish_list_fetch_and_rebuild(pool, models, tmp_path):
    a, b, c = three_nodes(pool)
    published = b.publish(models.expert, "math", models.base)
    delta_id = published["delta_id"]
    b_file = b.store.resolve(delta_id)
    assert published["publisher"] == b.identity.public_hex and DeltaFile(b_file).id == delta_id

    for node in (a, b, c):  # every node sees the record, signed by B and pointing at B
        (row,) = node.experts()
        assert row["delta_id"] == delta_id and row["domain"] == "math"
        assert row["publisher"] == b.identity.public_hex and row["peer_id"] == b.peer_id
        assert row["expert_id"] == published["expert_id"] and row["bundle_id"] == published["bundle_id"]
        assert row["maddrs"] == b.maddrs()
        assert node.experts(domain="math") == [row] and node.experts(domain="code") == []

    # C fetches the delta file: the very bytes B published.
    got = c.fetch(delta_id, out=tmp_path / "delta-out")
    out_file = Path(got["out"])
    assert out_file == tmp_path / "delta-out" / f"{delta_id}.delta.safetensors"
    assert sha256_file(out_file) == sha256_file(b_file)
    assert DeltaFile(out_file, expected_signer=b.identity.public_hex).id == delta_id
    assert got["chunks_by_provider"] == {b.peer_id: 1} and got["bytes_received"] == b_file.stat().st_size
    assert got["liars"] == {} and got["failed"] == {} and got["resumed_chunks"] == 0

    # By the expert's id, with --base: the rebuilt expert is what apply_delta gives here.
    rebuilt = c.fetch(published["expert_id"], out=tmp_path / "rebuilt", base=models.base)
    assert rebuilt["content"] == delta_id and "bytes_received" not in rebuilt  # from C's store now
    local = tmp_path / "local-apply"
    apply_delta(models.base, b_file, local)
    assert model_manifest(tmp_path / "rebuilt") == model_manifest(local)
    assert tensors_equal(tmp_path / "rebuilt", local)

    # What C fetched, C serves: A sees two providers, each bound to its key.
    providers = {r["peer_id"]: r for r in a.providers(delta_id)}
    assert set(providers) == {b.peer_id, c.peer_id}
    assert providers[c.peer_id]["publisher"] == c.identity.public_hex


def test_fetch_of_unknown_or_malformed_ids_fails_cleanly(pool, tmp_path):
    a = pool.start("a")
    b = pool.start("b", peers=a.maddrs())
    with pytest.raises(FetchError, match="no provider"):
        b.fetch("ab" * 32, out=tmp_path / "out")
    with pytest.raises(Exception, match="not a content id"):
        b.fetch("not-an-id", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def assert_fetched_intact(fetcher, provider, delta_id: str, got: dict) -> None:
    """The fetched delta, in the fetcher's store and at --out, is the provider's to the byte."""
    stored = fetcher.store.resolve(delta_id)
    assert sha256_file(stored) == sha256_file(provider.store.resolve(delta_id)) == sha256_file(Path(got["out"]))
    assert DeltaFile(stored).id == delta_id


# -- 2. forged records -----------------------------------------------------------------------

def test_forged_records_are_refused_by_every_validating_node(pool, models):
    a, b, c = three_nodes(pool)
    delta_id = b.publish(models.expert, "math", models.base)["delta_id"]
    subkey = expert_subkey(b.identity, delta_id)
    genuine = raw_records(c, records.EXPERTS_KEY)[subkey]
    expected = a.experts()
    assert [r["publisher"] for r in expected] == [b.identity.public_hex]

    signed = records.open_record(records.EXPERTS_KEY, subkey, genuine)
    fields = {k: v for k, v in signed.items() if k != "publisher"}
    hijack = {**fields, "peer_id": c.peer_id, "maddrs": c.maddrs(), "issued_at": time.time(), "expires_at": time.time() + 1100}
    flipped = bytearray(genuine)
    flipped[genuine.index(b'"signature":"') + 20] ^= 0x01
    by_c = canonical_json(sign_manifest(c.identity, "record/expert", hijack))
    claims_b = canonical_json({**sign_manifest(c.identity, "record/expert", hijack), "signer": b.identity.public_hex})
    forgeries = {"flipped byte": bytes(flipped), "signed by C under B's subkey": by_c, "C's signature, B as signer": claims_b}

    for why, forged in forgeries.items():
        # Stored with a later expiry than the genuine record, so it would replace it if accepted.
        for via in (a, c):
            assert dht_store(via, records.EXPERTS_KEY, subkey, forged) is False, why

    # The genuine record itself, replayed to live past its signed expiry.
    assert dht_store(a, records.EXPERTS_KEY, subkey, genuine, ttl=fields["expires_at"] - time.time() + 60) is False

    for node in (a, b, c):
        held = stored_values(node, records.EXPERTS_KEY)
        assert all(forged not in held.get(subkey, set()) for forged in forgeries.values()), node.peer_id
        assert raw_records(node, records.EXPERTS_KEY)[subkey] == genuine
        assert node.experts() == expected  # B's genuine record, still pointing at B

    # C's own, validly signed expert record that points readers at B's peer: stored (its
    # signature and schema are fine) but listed by nobody, since C's key does not derive B's id.
    other = {**fields, "delta_id": "cd" * 32, "issued_at": time.time(), "expires_at": time.time() + 1100}
    misbound = canonical_json(sign_manifest(c.identity, "record/expert", other))
    assert dht_store(c, records.EXPERTS_KEY, expert_subkey(c.identity, "cd" * 32), misbound) is True
    assert expert_subkey(c.identity, "cd" * 32) in raw_records(a, records.EXPERTS_KEY)
    assert a.experts() == expected


def test_a_key_flooded_by_one_stranger_stays_readable_and_an_owners_newer_record_wins(pool, models):
    """Issue 18, findings 9 and 10 on loopback: a stranger's 40 valid expert records under
    one key are kept 16 at most by every node, honest records stay listed, and a relayed
    copy of an owner's older record cannot replace its newer one, whatever its expiry."""
    from hivemerge.protocol import bounds

    a, b, c = three_nodes(pool)
    delta_id = b.publish(models.expert, "math", models.base)["delta_id"]
    honest = records.open_record(records.EXPERTS_KEY, expert_subkey(b.identity, delta_id),
                                 raw_records(a, records.EXPERTS_KEY)[expert_subkey(b.identity, delta_id)])
    fields = {k: v for k, v in honest.items() if k != "publisher"}
    now = time.time()
    flood = [hashlib.sha256(f"flood{i}".encode()).hexdigest() for i in range(40)]
    for fake in flood:
        forged = {**fields, "delta_id": fake, "issued_at": now, "expires_at": now + 300}
        dht_store(c, records.EXPERTS_KEY, expert_subkey(c.identity, fake), records.make_record(c.identity, "record/expert", forged))
    for node in (a, b, c):
        held = stored_values(node, records.EXPERTS_KEY)
        assert sum(s.startswith(c.identity.public_hex) for s in held) <= bounds.MAX_RECORDS_PER_OWNER_KEY, node.peer_id
    assert [r["delta_id"] for r in a.experts()] == [delta_id]  # c's records point at no peer of c's: listed by nobody

    subkey = expert_subkey(b.identity, "ab" * 32)
    older = records.make_record(b.identity, "record/expert", {**fields, "delta_id": "ab" * 32, "issued_at": now - 5,
                                                              "expires_at": now + 600})
    newer = records.make_record(b.identity, "record/expert", {**fields, "delta_id": "ab" * 32, "maddrs": [],
                                                              "issued_at": now, "expires_at": now + 100})
    assert dht_store(b, records.EXPERTS_KEY, subkey, newer, ttl=90) is True
    dht_store(c, records.EXPERTS_KEY, subkey, older, ttl=500)  # the replay, with the later expiry
    for node in (a, b):
        assert stored_values(node, records.EXPERTS_KEY)[subkey] == {newer}, node.peer_id
    assert raw_records(a, records.EXPERTS_KEY)[subkey] == newer


def test_forgeries_relayed_by_a_node_without_validator_are_ignored(pool, models, tmp_path):
    """An attacker runs a plain hivemind DHTNode (no validator) and stores forged records
    with it: its own storage keeps them, no honest node stores them, and lookups that
    reach the attacker still return only the genuine record."""
    from hivemind.dht import DHTNode
    from hivemind.p2p import P2P
    from hivemind.utils import get_dht_time

    from hivemerge.node.net.loop import LoopThread
    from hivemerge.node.net.network import write_p2p_key

    a, b, c = three_nodes(pool)
    delta_id = b.publish(models.expert, "math", models.base)["delta_id"]
    subkey = expert_subkey(b.identity, delta_id)
    genuine = raw_records(c, records.EXPERTS_KEY)[subkey]
    expected = c.experts()

    mallory = Identity.generate()
    fields = {k: v for k, v in records.open_record(records.EXPERTS_KEY, subkey, genuine).items() if k != "publisher"}
    hijack = {**fields, "maddrs": ["/ip4/127.0.0.1/tcp/9/p2p/" + str(peer_id_of(mallory.public_key))]}
    forged = canonical_json(sign_manifest(mallory, "record/expert", hijack))
    extra = canonical_json(sign_manifest(mallory, "record/expert", {**hijack, "delta_id": "ef" * 32}))
    extra_subkey = f"{b.identity.public_hex}/{'ef' * 32}"  # a whole fake expert in B's name

    home = tmp_path / "mallory"
    home.mkdir()
    loop = LoopThread("mallory")
    state = {}

    async def start():
        state["p2p"] = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=a.maddrs(),
                                        identity_path=str(write_p2p_key(mallory, home)), check_if_identity_free=False)
        state["dht"] = await DHTNode.create(p2p=state["p2p"], initial_peers=a.maddrs())

    async def stop():
        if "dht" in state:
            await state["dht"].shutdown()
        if "p2p" in state:
            await state["p2p"].shutdown()

    try:
        loop.run(start(), 60)
        dht = state["dht"]
        expiry = get_dht_time() + 1000
        loop.run(dht.store(records.EXPERTS_KEY, forged, expiry, subkey=subkey), 30)
        loop.run(dht.store(records.EXPERTS_KEY, extra, expiry, subkey=extra_subkey), 30)
        mine = loop.run(dht.get(records.EXPERTS_KEY, latest=True), 30)
        assert mine.value[subkey].value == forged  # the attacker does hold and serve them

        for node in (a, b, c):
            held = stored_values(node, records.EXPERTS_KEY)
            assert forged not in held.get(subkey, set()) and extra_subkey not in held
            assert node.experts() == expected
            assert raw_records(node, records.EXPERTS_KEY).get(subkey) == genuine
            assert extra_subkey not in node.network.loop.run(node.network.get_records(records.EXPERTS_KEY), 30)
    finally:
        try:
            loop.run(stop(), 20)
        finally:
            loop.stop()


def test_records_that_pass_the_validator_but_not_their_key_or_binding_are_ignored(pool, models):
    """The DHT validator sees only a hash of the key, and a provider record's peer id is
    not checked by it: such records are stored, and readers drop them."""
    a, b, c = three_nodes(pool)
    published = b.publish(models.expert, "math", models.base)
    delta_id, bundle_id = published["delta_id"], published["bundle_id"]
    other = "cd" * 32
    key = records.providers_key(delta_id)

    mallory = Identity.generate()
    # Signed by Mallory, but claiming B's peer id and addresses: not bound to Mallory's key.
    claims_b = records.make_record(mallory, "record/provider", {
        "content": delta_id, "bundle_id": bundle_id, "peer_id": b.peer_id, "maddrs": b.maddrs(), "issued_at": time.time(),
        "expires_at": time.time() + 1100})
    # Bound to Mallory, but about another content, stored under this content's key.
    elsewhere = records.make_record(mallory, "record/provider", {
        "content": other, "bundle_id": bundle_id, "peer_id": str(peer_id_of(mallory.public_key)),
        "maddrs": ["/ip4/127.0.0.1/tcp/9"], "issued_at": time.time(), "expires_at": time.time() + 1100})
    # A provider record under the experts key.
    trudy = Identity.generate()
    wrong_kind = records.make_record(trudy, "record/provider", {
        "content": delta_id, "bundle_id": bundle_id, "peer_id": str(peer_id_of(trudy.public_key)),
        "maddrs": ["/ip4/127.0.0.1/tcp/9"], "issued_at": time.time(), "expires_at": time.time() + 1100})

    assert dht_store(c, key, mallory.public_hex, claims_b) is True
    assert {r["peer_id"] for r in a.providers(delta_id)} == {b.peer_id}
    seen = a.network.loop.run(a.network.get_records(key), 30)
    assert seen[mallory.public_hex]["peer_id"] == b.peer_id  # valid signature, so it is found ...
    for node in (a, b, c):  # ... and dropped by every reader: its peer id is not Mallory's
        assert [r["publisher"] for r in node.providers(delta_id)] == [b.identity.public_hex]

    assert dht_store(c, key, mallory.public_hex, elsewhere) is True  # replaces Mallory's first record
    assert dht_store(c, records.EXPERTS_KEY, trudy.public_hex, wrong_kind) is True
    for node in (a, b, c):
        assert raw_records(node, key)[mallory.public_hex] == elsewhere
        assert mallory.public_hex not in node.network.loop.run(node.network.get_records(key), 30)
        assert trudy.public_hex in raw_records(node, records.EXPERTS_KEY)
        assert [r["delta_id"] for r in node.experts()] == [delta_id]
        assert [r["publisher"] for r in node.providers(delta_id)] == [b.identity.public_hex]

    got = a.fetch(delta_id)
    assert got["chunks_by_provider"] == {b.peer_id: 1} and got["failed"] == {} and got["liars"] == {}


# -- 3. a lying provider ---------------------------------------------------------------------

class Served:
    """Wraps a node's read_chunk: counts, optionally delays, lies or blocks."""

    def __init__(self, node, delay: float = 0.0, lie_from: int | None = None, block_at: int | None = None):
        self.real = node.server.read_chunk
        self.delay, self.lie_from, self.block_at = delay, lie_from, block_at
        self.calls: list[tuple[int, int, bool]] = []  # (file, chunk, honest)
        self.lock = threading.Lock()
        self.blocked = threading.Event()
        self.release = threading.Event()
        node.server.read_chunk = self

    def __call__(self, bundle, file_index, chunk_index):
        with self.lock:
            n = len(self.calls)
            honest = self.lie_from is None or n < self.lie_from
            self.calls.append((file_index, chunk_index, honest))
        if self.block_at is not None and n >= self.block_at:
            self.blocked.set()
            self.release.wait(30)  # held in flight until the test kills the node (or gives up)
        if self.delay:
            time.sleep(self.delay)
        data = self.real(bundle, file_index, chunk_index)
        if not honest:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x40
            data = bytes(data)
        return data


def provider_pair(pool, big_models, codec: str = "lossless"):
    """Publisher P1 and P2 (which fetched it from P1) both serve the same many-chunk bundle."""
    p1 = pool.start("p1", chunk_size=CHUNK)
    p2 = pool.start("p2", peers=p1.maddrs(), chunk_size=CHUNK)
    published = p1.publish(big_models.expert, "math", big_models.base, codec=codec)
    p2.fetch(published["delta_id"])
    delta_id = published["delta_id"]
    assert p2.store.bundle_of(delta_id) == published["bundle_id"]
    total = len(p1.store.bundle(published["bundle_id"])["files"][0]["chunks"])
    assert total >= 30
    return p1, p2, delta_id, total


def test_a_lying_provider_is_caught_and_avoided(pool, big_models, tmp_path):
    honest, liar, delta_id, total = provider_pair(pool, big_models)
    fetcher = pool.start("f", peers=honest.maddrs())
    # The liar serves two good chunks, then a corrupted one; the honest one is a little
    # slower, so the liar surely gets its turns.
    lies = Served(liar, lie_from=2)
    slow = Served(honest, delay=0.01)

    got = fetcher.fetch(delta_id, out=tmp_path / "out")

    assert set(got["liars"]) == {liar.peer_id} and "hash check" in got["liars"][liar.peer_id]
    assert len(lies.calls) == 3  # two good chunks, one bad, then never asked again
    assert got["chunks_by_provider"] == {liar.peer_id: 2, honest.peer_id: total - 2}
    lied_about = lies.calls[2][:2]
    assert lied_about in [c[:2] for c in slow.calls]  # the honest provider served that chunk instead
    assert got["failed"] == {}
    assert_fetched_intact(fetcher, honest, delta_id, got)


def test_a_fetch_from_liars_only_fails_and_stores_nothing(pool, big_models, tmp_path):
    liar = pool.start("liar", chunk_size=CHUNK)
    delta_id = liar.publish(big_models.expert, "math", big_models.base, codec="lossless")["delta_id"]
    fetcher = pool.start("f", peers=liar.maddrs())
    lies = Served(liar, lie_from=0)
    with pytest.raises(FetchError, match="could not be fetched") as info:
        fetcher.fetch(delta_id, out=tmp_path / "out")
    assert liar.peer_id in str(info.value)
    assert len(lies.calls) == 1
    assert not (tmp_path / "out").exists() and not fetcher.store.has(delta_id)
    assert not fetcher.store.partial.exists() or list(fetcher.store.partial.iterdir()) == []  # no chunk verified: no staging


# -- 4. providers that die -------------------------------------------------------------------

@pytest.mark.parametrize("when", ["midway", "holding-the-last-chunk"])
def test_a_provider_killed_during_a_fetch_is_replaced_by_another(pool, big_models, tmp_path, when):
    victim, other, delta_id, total = provider_pair(pool, big_models)
    fetcher = pool.start("f", peers=other.maddrs())
    # The victim serves three chunks, then holds its fourth request until it is killed.
    held = Served(victim, block_at=3)
    steady = Served(other, delay=0.04 if when == "midway" else 0.0)
    with ThreadPoolExecutor(1) as pool_thread:
        future = pool_thread.submit(fetcher.fetch, delta_id, tmp_path / "out")
        assert held.blocked.wait(30), "the victim was never asked for a fourth chunk"
        if when == "holding-the-last-chunk":  # everything else is done: only the held chunk is missing
            wait_until(lambda: len(steady.calls) >= total - 4, 30, what="the other provider to serve the rest")
            time.sleep(0.3)
        else:
            assert len(steady.calls) < total - 4  # the fetch is really midway
        kill_daemon(victim)
        try:
            got = future.result(60)
        finally:
            held.release.set()

    assert victim.peer_id in got["failed"]
    assert got["chunks_by_provider"] == {victim.peer_id: 3, other.peer_id: total - 3}
    assert got["liars"] == {}
    assert_fetched_intact(fetcher, other, delta_id, got)


def test_a_fetch_whose_only_provider_dies_keeps_nothing_visible_and_resumes(pool, big_models, tmp_path):
    """Also: the provider, restarted on its home and port, keeps its identity and serves."""
    provider = pool.start("p", chunk_size=CHUNK)
    delta_id = provider.publish(big_models.expert, "math", big_models.base, codec="lossless")["delta_id"]
    bundle_id = provider.store.bundle_of(delta_id)
    total = len(provider.store.bundle(bundle_id)["files"][0]["chunks"])
    fetcher = pool.start("f", peers=provider.maddrs())
    identity, peer_id = provider.identity.public_hex, provider.peer_id
    (maddr,) = provider.maddrs()
    listen = maddr.split("/p2p/")[0]  # its TCP address, to listen on again
    held = Served(provider, block_at=10)
    out = tmp_path / "out"

    with ThreadPoolExecutor(1) as pool_thread:
        future = pool_thread.submit(fetcher.fetch, delta_id, out)
        assert held.blocked.wait(30)
        kill_daemon(provider)
        try:
            with pytest.raises(FetchError, match=f"{total - 10} of {total} chunks could not be fetched"):
                future.result(60)
        finally:
            held.release.set()
    assert not out.exists()  # no partial output where a complete one is expected
    assert not fetcher.store.has(delta_id)
    with pytest.raises(Exception):
        fetcher.store.resolve(delta_id)
    assert (fetcher.store.partial / bundle_id).is_dir()  # the verified chunks are kept aside

    # The provider comes back: same home, same port, same identity; it still has the delta.
    pool.close(provider)
    back = pool.start("p", listen=[listen], peers=fetcher.maddrs(), chunk_size=CHUNK)
    assert back.peer_id == peer_id and back.identity.public_hex == identity
    assert back.maddrs() == [maddr]
    assert delta_id in back.status()["stored"]

    got = fetcher.fetch(delta_id, out=out)
    assert got["resumed_chunks"] == 10
    assert got["chunks_by_provider"] == {peer_id: total - 10}
    assert sha256_file(Path(got["out"])) == sha256_file(back.store.resolve(delta_id))
    assert DeltaFile(fetcher.store.resolve(delta_id)).id == delta_id
    assert not (fetcher.store.partial / bundle_id).exists()


# -- 5. restart ---------------------------------------------------------------------------------

def test_a_restarted_node_keeps_its_identity_and_is_found_again_at_once(pool, models, tmp_path):
    """A node that leaves cleanly replaces its records by 'gone' ones; started again on
    the same home (here on another port) it must be listed and fetched from right away,
    not hidden by its own 'gone' records."""
    a = pool.start("a")
    b = pool.start("b", peers=a.maddrs())
    c = pool.start("c", peers=a.maddrs())
    published = b.publish(models.expert, "math", models.base)
    delta_id = published["delta_id"]
    peer_id, public_key, old_maddrs = b.peer_id, b.identity.public_hex, b.maddrs()
    assert [r["delta_id"] for r in c.experts()] == [delta_id]

    pool.close(b)
    assert c.experts() == [] and c.providers(delta_id) == []  # gone, not merely expiring

    b = pool.start("b", peers=a.maddrs())
    assert b.peer_id == peer_id and b.identity.public_hex == public_key
    assert b.maddrs() != old_maddrs  # another port, announced anew
    (row,) = wait_until(c.experts, 5, what="the restarted node's expert record")
    assert row["delta_id"] == delta_id and row["peer_id"] == peer_id and row["maddrs"] == b.maddrs()
    got = c.fetch(delta_id, out=tmp_path / "out")
    assert got["chunks_by_provider"] == {peer_id: 1}
    assert sha256_file(Path(got["out"])) == sha256_file(b.store.resolve(delta_id))


# -- storing records: a round's one-shot records are tried again --------------------------
class FlakyDHT:
    """Answers each store with the next of ``outcomes`` (a bool, or an exception to raise)."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.stored = []

    async def store_record(self, key, subkey, value, ttl):
        self.stored.append((key, subkey, value))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def stub_node(monkeypatch, outcomes):
    import asyncio

    from hivemerge.node import node as node_module

    monkeypatch.setattr(node_module, "STORE_RETRY_SECONDS", 0.0)
    node = object.__new__(node_module.Node)  # only what store_record uses: no daemon, no DHT
    node.identity = Identity.generate()
    node.network = FlakyDHT(outcomes)
    node.logged = []
    node.log = node.logged.append
    return node, asyncio.run


ROUND_KEY = rounds.round_key("ab" * 32)
COMMITMENT = {"round_id": "ab" * 32, "delta_ids": ["cd" * 32], "domains": {"cd" * 32: "math"},
              "peer_id": "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua", "maddrs": [], "issued_at": 1.0}


def test_a_refused_or_failed_round_record_is_stored_again(monkeypatch):
    node, run = stub_node(monkeypatch, [False, TimeoutError("dht busy"), True])
    assert run(node.store_record("record/commitment", ROUND_KEY, COMMITMENT, 30.0)) is True
    assert len(node.network.stored) == 3  # refused, raised, accepted
    assert len({value for _, _, value in node.network.stored}) == 1  # the same signed record each time
    records.open_record(ROUND_KEY, node.network.stored[0][1], node.network.stored[0][2])
    assert len(node.logged) == 1 and "TimeoutError" in node.logged[0]


def test_a_round_record_no_node_accepts_is_reported_after_three_attempts(monkeypatch):
    node, run = stub_node(monkeypatch, [False, False, False, True])
    assert run(node.store_record("record/commitment", ROUND_KEY, COMMITMENT, 30.0)) is False
    assert len(node.network.stored) == 3
    assert "record/commitment" in node.logged[-1] and "3 attempt(s)" in node.logged[-1]
    node, run = stub_node(monkeypatch, [False, False, TimeoutError("still busy")])
    with pytest.raises(TimeoutError):  # the last attempt's error reaches the caller, as without retries
        run(node.store_record("record/commitment", ROUND_KEY, COMMITMENT, 30.0))


def test_a_refreshed_record_is_stored_once(monkeypatch):
    node, run = stub_node(monkeypatch, [False, True])
    fields = {"content": "ef" * 32, "bundle_id": "12" * 32, "peer_id": "12D3KooWCHTsmnFqzECtNepaJp3WordvsVhcq7pgtp1MAY3SUHua", "maddrs": [], "issued_at": 1.0}
    assert run(node.store_record("record/provider", records.providers_key("ef" * 32), fields, 30.0)) is False
    assert len(node.network.stored) == 1  # the next announce() stores it again
