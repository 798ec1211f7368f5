"""The content store's quota (issue 18, finding 4): what it counts, how resumable staging
is kept only within it, a store of big objects cut into manifests peers accept, and the
``node start --max-store`` flag."""

from __future__ import annotations

import os
import time

import pytest

from hivemerge.node.storage import store as store_module
from hivemerge.node.storage.store import ContentStore, StoreFullError
from hivemerge.protocol import bundles
from hivemerge.protocol.bundles import MAX_CHUNKS
from hivemerge.protocol.content import canonical_json

KIB = 1024


def staging(store: ContentStore, bundle_id: str, size: int, age: float) -> None:
    """A failed fetch's staging folder: a file at its full size and the verified-chunk list."""
    folder = store.fetch_staging(bundle_id)
    (folder / "files").mkdir(parents=True)
    with (folder / "files" / "x").open("wb") as f:
        f.truncate(size)
    (folder / "done.json").write_text("[[0, 0]]")
    stamp = time.time() - age
    os.utime(folder, (stamp, stamp))


@pytest.fixture
def store(tmp_path):
    s = ContentStore(tmp_path / "home", max_bytes=100 * KIB)
    s.objects.mkdir(parents=True)
    (s.objects / "something").write_bytes(b"x" * 20 * KIB)
    return s


def test_used_bytes_count_everything_in_the_store_staging_included(store):
    assert store.used_bytes() == 20 * KIB
    staging(store, "aa" * 32, 30 * KIB, age=10)
    assert store.used_bytes() == 50 * KIB + len("[[0, 0]]")


def test_staging_is_kept_only_within_the_quota_oldest_removed_first(store):
    old, newer, busy = "aa" * 32, "bb" * 32, "cc" * 32
    staging(store, old, 20 * KIB, age=300)
    staging(store, newer, 20 * KIB, age=100)
    staging(store, busy, 20 * KIB, age=500)  # the oldest, but a fetch is using it
    assert store.make_room(10 * KIB) == []  # 80 KiB + 10 fits 100: nothing goes
    assert store.make_room(30 * KIB, keep={busy}) == [old]  # 110 > 100: the oldest idle staging goes
    assert not store.fetch_staging(old).exists() and store.fetch_staging(newer).is_dir()
    assert store.used_bytes() + 30 * KIB <= store.max_bytes


def test_a_store_that_cannot_make_room_refuses_and_removes_nothing(store):
    staging(store, "aa" * 32, 30 * KIB, age=10)
    before = store.used_bytes()
    with pytest.raises(StoreFullError, match=f"over its quota of {100 * KIB}"):
        store.make_room(90 * KIB)  # 20 KiB of objects + 90 > 100 even without the staging
    assert store.fetch_staging("aa" * 32).is_dir() and store.used_bytes() == before


def test_a_fetch_never_leaves_the_disk_below_its_floor(store, monkeypatch):
    store.max_bytes = 1 << 60
    free = store_module.shutil.disk_usage(store.root).free
    with pytest.raises(StoreFullError, match="free on the disk"):
        store.make_room(free - store_module.MIN_FREE_DISK + 1)


def test_sparse_staging_counts_as_taken_on_the_disk(store):
    """Fetches side by side each create their staging at full size before writing a chunk:
    the disk floor must count what those sparse files will still take."""
    path = store.partial / ("cd" * 32) / "files" / "model.safetensors"
    path.parent.mkdir(parents=True)
    with path.open("wb") as f:
        f.truncate(3 << 30)  # 3 GiB promised, nothing written
    assert store_module.unwritten_bytes(store.partial) >= (3 << 30) - 4096
    store.max_bytes = 1 << 60
    free = store_module.shutil.disk_usage(store.root).free
    with pytest.raises(StoreFullError, match="free on the disk"):
        store.make_room(free - store_module.MIN_FREE_DISK - (2 << 30))  # fits the disk, not beside the staging


def test_a_torn_resume_record_is_ignored_not_fatal(tmp_path):
    from hivemerge.node.net.transfer import _claimed_chunks

    bundle = {"files": [{"chunks": ["aa" * 32, "bb" * 32]}, {"chunks": ["cc" * 32]}]}
    marker = tmp_path / "done.json"
    for text, claimed in (("[[0, 1], [1, 0]]", [(0, 1), (1, 0)]), ("[[0, 1], [1", []), ("", []), ("{}", []),
                          ("[[0, 5], [9, 0], [-1, 0], [true, 0], [0], 3, [0, 0]]", [(0, 0)]), ("[" * 5000, [])):
        marker.write_text(text)
        assert _claimed_chunks(marker, bundle) == claimed, text


def test_a_big_object_gets_chunks_big_enough_for_a_manifest_peers_accept(tmp_path, monkeypatch):
    s = ContentStore(tmp_path / "home", chunk_size=1 * KIB)
    cid = "ab" * 32
    s.objects.mkdir(parents=True)
    (s.objects / f"{cid}.probe.jsonl").write_bytes(os.urandom(100 * KIB))
    monkeypatch.setattr(store_module, "MAX_CHUNKS", 16)  # scaled down: 100 chunks of 1 KiB are too many
    bundle = s.bundle(s.write_bundle(cid))
    assert bundle["chunk_size"] == 8 * KIB and len(bundle["files"][0]["chunks"]) == 13
    assert len(canonical_json(bundle)) < bundles.MAX_MANIFEST_BYTES
    assert MAX_CHUNKS * 70 + bundles.MAX_FILES * 150 < bundles.MAX_MANIFEST_BYTES  # honest manifests fit the cap


@pytest.mark.parametrize("value", ["lots", "0", "-5GiB", "inf", "5XB"])
def test_node_start_refuses_a_bad_max_store(cli, tmp_path, value):
    home = tmp_path / f"home-{value}"
    result = cli("node", "start", "--home", str(home), "--max-store", value)
    assert result.returncode == 2, result.stderr
    lines = result.stderr_lines
    assert len(lines) == 1 and lines[0].startswith("error: --max-store:"), lines
    assert not home.exists()  # nothing written
