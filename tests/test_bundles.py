"""Bundle manifests (protocol/bundles.py): untrusted manifests are checked against the id
a signed record names, and must not be able to point a fetcher outside its staging
folder or describe chunks the files cannot have."""

from __future__ import annotations

import hashlib

import pytest

from hivemerge.node.store import ContentStore
from hivemerge.protocol.bundles import (
    MAX_CHUNK_SIZE, BundleError, bundle_manifest, check_bundle, chunk_count, chunk_span,
)
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError

CONTENT = hashlib.sha256(b"content").hexdigest()


def chunks_of(data: bytes, chunk_size: int) -> list[str]:
    n = chunk_count(len(data), chunk_size)
    return [hashlib.sha256(data[i * chunk_size:(i + 1) * chunk_size]).hexdigest() for i in range(n)]


def manifest(files: dict[str, bytes] | None = None, chunk_size: int = 4, **changes) -> dict:
    files = files if files is not None else {"model.safetensors": b"0123456789", "config.json": b"{}"}
    entries = [{"path": p, "size": len(d), "chunks": chunks_of(d, chunk_size)} for p, d in files.items()]
    m = bundle_manifest(CONTENT, chunk_size, entries)
    m.update(changes)
    return m


def refused(m) -> str:
    """check_bundle refuses ``m`` even when given ``m``'s own id (so the structure is what is checked)."""
    expected = content_id(m) if isinstance(m, dict) else "0" * 64
    with pytest.raises(BundleError) as info:
        check_bundle(m, expected)
    assert isinstance(info.value, UserInputError)
    return str(info.value)


def test_chunk_arithmetic():
    assert chunk_count(0, 4) == 1  # an empty file is one empty chunk
    assert [chunk_count(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert chunk_span(10, 4, 0) == (0, 4) and chunk_span(10, 4, 2) == (8, 10)
    assert chunk_span(0, 4, 0) == (0, 0)


def test_a_good_manifest_passes_and_any_change_changes_its_id():
    m = manifest()
    bundle_id = content_id(m)
    assert check_bundle(m, bundle_id) is m
    assert check_bundle(manifest(files={"empty.bin": b""}), content_id(manifest(files={"empty.bin": b""})))
    for changed in (
        manifest(chunk_size=5),
        manifest(files={"model.safetensors": b"0123456789", "config.json": b"{ }"}),
        {**m, "content": hashlib.sha256(b"other").hexdigest()},
        {**m, "files": list(reversed(m["files"]))},
    ):
        with pytest.raises(BundleError, match="does not match id"):
            check_bundle(changed, bundle_id)


def test_wrong_id_or_not_a_dict_is_refused():
    m = manifest()
    with pytest.raises(BundleError, match="does not match id"):
        check_bundle(m, "f" * 64)
    with pytest.raises(BundleError, match="does not match id"):
        check_bundle(m, content_id(m).upper())
    for bad in ([m], None, "bundle", 7):
        refused(bad)


@pytest.mark.parametrize("path", [
    "../x", "../../etc/passwd", "a/../../b", "a/../b", "/etc/passwd", "//etc/passwd", "\\x", "a\\..\\b", "C:\\x",
    "./x", "a/./b", "a//b", "a/", "", ".", "..", "x\x00y",
])
def test_paths_that_could_leave_the_staging_folder_are_refused(path):
    m = manifest(files={path: b"abc"})
    assert "file entry" in refused(m)


def test_nested_relative_paths_are_fine():
    m = manifest(files={"tokenizer/vocab.json": b"{}", "model-00001-of-00002.safetensors": b"x" * 9, ".hidden": b""})
    assert check_bundle(m, content_id(m))


def test_non_string_path_and_duplicate_paths_are_refused():
    m = manifest()
    m["files"][0]["path"] = 7
    refused(m)
    m = manifest()
    m["files"][1] = dict(m["files"][0])  # the same path twice: two writers of one file
    refused(m)


@pytest.mark.parametrize("change", [
    lambda f: f["chunks"].pop(),  # one chunk too few
    lambda f: f["chunks"].append(f["chunks"][0]),  # one too many
    lambda f: f.update(size=f["size"] + 4),  # the size needs another chunk
    lambda f: f.update(size=-1),
    lambda f: f.update(size=10.0),
    lambda f: f.update(chunks=[]),
    lambda f: f.update(chunks="abc"),
    lambda f: f["chunks"].__setitem__(0, f["chunks"][0].upper()),
    lambda f: f["chunks"].__setitem__(0, f["chunks"][0][:-1]),
    lambda f: f["chunks"].__setitem__(0, None),
    lambda f: f.pop("size"),
    lambda f: f.pop("chunks"),
], ids=["fewer-chunks", "more-chunks", "size-needs-more", "negative-size", "float-size", "no-chunks",
        "chunks-string", "uppercase-hash", "short-hash", "null-hash", "missing-size", "missing-chunks"])
def test_file_entries_whose_chunks_do_not_fit_their_size_are_refused(change):
    m = manifest()
    change(m["files"][0])
    assert "file entry" in refused(m)


@pytest.mark.parametrize("changes", [
    {"kind": "model"}, {"version": 2}, {"version": "1"}, {"content": "xyz"}, {"content": CONTENT.upper()},
    {"chunk_size": 0}, {"chunk_size": -4}, {"chunk_size": MAX_CHUNK_SIZE + 1}, {"chunk_size": 4.0}, {"chunk_size": "4"},
    {"files": []}, {"files": {}}, {"files": None},
], ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items())[:40])
def test_malformed_manifests_are_refused(changes):
    m = manifest()
    m.update(changes)
    assert "malformed" in refused(m)


def test_a_file_entry_that_is_not_a_dict_is_refused():
    m = manifest()
    m["files"].append("model.safetensors")
    refused(m)


def test_store_bundles_describe_what_the_store_serves(tmp_path):
    """A store's bundle passes check_bundle and every chunk it serves hashes to its entry."""
    from delta_fixtures import tiny_pair

    from hivemerge.merge.delta import extract_delta
    from hivemerge.protocol.identity import Identity

    base, expert = tiny_pair(tmp_path)
    delta = extract_delta(base, expert, tmp_path / "x.delta.safetensors", Identity.generate(), "lossless")
    for chunk_size in (64, 1000, 1 << 22):
        store = ContentStore(tmp_path / f"home-{chunk_size}", chunk_size=chunk_size)
        delta_id = store.add_delta(delta.path)
        bundle_id = store.bundle_of(delta_id)
        bundle = check_bundle(store.bundle(bundle_id), bundle_id)
        (entry,) = bundle["files"]
        assert entry["path"] == f"{delta_id}.delta.safetensors" and entry["size"] == delta.path.stat().st_size
        assert len(entry["chunks"]) == chunk_count(entry["size"], chunk_size)
        served = b"".join(store.read_chunk(bundle, 0, j) for j in range(len(entry["chunks"])))
        assert served == delta.path.read_bytes()
        assert [hashlib.sha256(store.read_chunk(bundle, 0, j)).hexdigest() for j in range(len(entry["chunks"]))] == entry["chunks"]
