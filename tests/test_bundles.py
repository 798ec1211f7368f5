"""Bundle manifests (protocol/bundles.py): untrusted manifests are checked against the id
a signed record names, and must not be able to point a fetcher outside its staging
folder, bring in files the content id does not cover, or describe chunks the files
cannot have. A fetched model must hold exactly the files its id covers (transfer._finish)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from hivemerge.node.storage.store import ContentStore
from hivemerge.protocol.bundles import MAX_CHUNK_SIZE, BundleError, bundle_manifest, check_bundle, chunk_count, chunk_span
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
    empty = manifest(files={"model.safetensors": b"", "config.json": b""})
    assert check_bundle(empty, content_id(empty))
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


def test_a_models_files_are_plain_names_of_model_files():
    m = manifest(files={
        "model-00001-of-00002.safetensors": b"x" * 9, "model-00002-of-00002.safetensors": b"y",
        "model.safetensors.index.json": b"{}", "config.json": b"{}", "generation_config.json": b"{}",
        "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "special_tokens_map.json": b"{}",
    })
    assert check_bundle(m, content_id(m))


@pytest.mark.parametrize("path", [
    "tokenizer/vocab.json", "a/b", "sub/config.json", "x.py", "modeling_evil.py", "filler.bin", ".hidden", "README.md",
    ".model.safetensors", "-x.safetensors", "a b.safetensors", "model.safetensors/x", "config.json ", "CONFIG.JSON",
    "x.safetensors\n", "pytorch_model.bin", "model.safetensors.index.json.bak",
])
def test_files_a_model_id_does_not_cover_are_refused(path):
    """Beside real model files, any other name (a folder, code, filler) is refused."""
    m = manifest(files={"model.safetensors": b"0123456789", "config.json": b"{}", path: b"abc"})
    assert f"file entry {path!r}" in refused(m)


def test_a_model_bundle_needs_weights_and_an_object_bundle_is_one_file():
    assert "no weights file" in refused(manifest(files={"config.json": b"{}", "tokenizer.json": b"{}"}))
    for suffix in (".delta.safetensors", ".pack.safetensors", ".probe.jsonl"):
        one = manifest(files={f"{CONTENT}{suffix}": b"0123456789"})
        assert check_bundle(one, content_id(one))
        assert "holds other files" in refused(manifest(files={f"{CONTENT}{suffix}": b"x", "config.json": b"{}"}))
    # A probe set named by another id is no model file either (a *.safetensors file of
    # another name is a model's shard: _finish then finds it does not hash to the content).
    other = hashlib.sha256(b"other").hexdigest()
    assert "file entry" in refused(manifest(files={f"{other}.probe.jsonl": b"x"}))


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
    lambda f: f.update(size=True, chunks=f["chunks"][:1]),  # True == 1 in Python, not in JSON
    lambda f: f.update(chunks=[]),
    lambda f: f.update(chunks="abc"),
    lambda f: f["chunks"].__setitem__(0, f["chunks"][0].upper()),
    lambda f: f["chunks"].__setitem__(0, f["chunks"][0][:-1]),
    lambda f: f["chunks"].__setitem__(0, None),
    lambda f: f.pop("size"),
    lambda f: f.pop("chunks"),
], ids=["fewer-chunks", "more-chunks", "size-needs-more", "negative-size", "float-size", "bool-size", "no-chunks",
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


def test_a_boolean_chunk_size_is_refused():
    m = manifest(chunk_size=1)
    assert check_bundle(m, content_id(m))
    m["chunk_size"] = True  # equal to 1 in Python, another manifest (and id) in JSON
    assert "malformed" in refused(m)


def test_a_file_entry_that_is_not_a_dict_is_refused():
    m = manifest()
    m["files"].append("model.safetensors")
    refused(m)


def test_store_bundles_describe_what_the_store_serves(tmp_path):
    """A store's bundle passes check_bundle and every chunk it serves hashes to its entry."""
    from delta_fixtures import tiny_pair

    from hivemerge.merge.deltas.delta import extract_delta
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


# -- a fetched object holds exactly what its content id covers (transfer._finish) ----------

def _staged(store: ContentStore, content: str, files: dict[str, bytes]) -> tuple:
    """A fetch whose every chunk arrived and matched its bundle (as BundleFetcher leaves it
    before _finish); the bundle passes check_bundle, so _finish is the layer that decides."""
    from hivemerge.node.net.transfer import BundleFetcher

    entries = [{"path": p, "size": len(d), "chunks": chunks_of(d, store.chunk_size)} for p, d in sorted(files.items())]
    bundle = bundle_manifest(content, store.chunk_size, entries)
    bundle = check_bundle(bundle, content_id(bundle))
    staging = store.partial / content_id(bundle)
    (staging / "files").mkdir(parents=True)
    for p, d in files.items():
        (staging / "files" / p).write_bytes(d)
    return BundleFetcher(None, store), staging, bundle


@pytest.fixture(scope="module")
def honest_model(tmp_path_factory):
    from delta_fixtures import family_shapes, random_tensors, save_model

    from hivemerge.merge.io.manifest import model_id
    from hivemerge.merge.io.sources import SafetensorsModel

    directory = save_model(tmp_path_factory.mktemp("honest") / "m", random_tensors(3, family_shapes(8)))
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    return model_id(SafetensorsModel(directory)), files


def _refused_by_finish(tmp_path, content, files, *fragments):
    from hivemerge.merge.deltas.delta import DeltaError
    from hivemerge.node.net.transfer import FetchError

    store = ContentStore(tmp_path / "home", chunk_size=1024)
    fetcher, staging, bundle = _staged(store, content, files)
    with pytest.raises((FetchError, DeltaError)) as info:  # a delta keeps its type: rounds say "failed verification"
        fetcher._finish(staging, bundle)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not staging.exists()  # removed: the bundle itself is bad, a resume would not help
    assert not store.has(content) and not (store.models.exists() and any(store.models.iterdir()))
    assert not (store.objects.exists() and any(store.objects.iterdir()))


def test_a_fetched_model_with_files_its_id_does_not_cover_is_refused(honest_model, tmp_path):
    """The honest model's files plus an unused weights file: the model id is still right
    (the filler is not read), but nothing unverified may be stored, served or exported."""
    from safetensors.torch import save as save_bytes

    from hivemerge.node.net.transfer import BundleFetcher

    content, files = honest_model
    filler = save_bytes({"payload": torch.zeros(64)})
    _refused_by_finish(tmp_path / "a", content, {**files, "filler.safetensors": filler},
                       "fetched model holds files its content id does not cover: ['filler.safetensors']")
    # the honest files alone are stored, and hold just those files
    store = ContentStore(tmp_path / "b" / "home", chunk_size=1024)
    fetcher, staging, bundle = _staged(store, content, files)
    assert isinstance(fetcher, BundleFetcher)
    target = fetcher._finish(staging, bundle)
    assert target == store.models / content and sorted(p.name for p in target.iterdir()) == sorted(files)


def test_a_fetched_model_whose_index_names_a_path_is_refused(honest_model, tmp_path):
    content, files = honest_model
    weights = files["model.safetensors"]
    index = {"metadata": {}, "weight_map": {n: "../other.safetensors" for n in _tensor_names(weights)}}
    hostile = {**{k: v for k, v in files.items() if k != "model.safetensors"},
               "model-00001-of-00001.safetensors": weights, "model.safetensors.index.json": json.dumps(index).encode()}
    (tmp_path / "home" / "store" / "partial").mkdir(parents=True)
    (tmp_path / "home" / "store" / "partial" / "other.safetensors").write_bytes(weights)  # where ../ would lead
    _refused_by_finish(tmp_path, content, hostile, "is mapped to '../other.safetensors', not a shard file name")


def test_a_fetched_shard_with_filler_bytes_is_refused(honest_model, tmp_path):
    content, files = honest_model
    _refused_by_finish(tmp_path, content, {**files, "model.safetensors": files["model.safetensors"] + b"filler"},
                       "bytes after the last tensor's data")


def test_a_fetched_delta_naming_a_path_is_refused(honest_model, tmp_path):
    """A delta correctly signed by its publisher whose side file is named ../../x is
    neither stored nor written anywhere (fetch EXPERT --base B --out D would apply it)."""
    from delta_fixtures import forge_side_file, read_container, tiny_pair

    from hivemerge.merge.deltas.delta import extract_delta
    from hivemerge.protocol.identity import Identity

    base, expert = tiny_pair(tmp_path / "models")
    good = extract_delta(base, expert, tmp_path / "good.delta.safetensors", Identity.generate(), "lossless").path
    forged = forge_side_file(good, tmp_path / "forged.delta.safetensors", Identity.generate(), "config.json", "../../x")
    header, _ = read_container(forged)
    delta_id = content_id(json.loads(header["__metadata__"]["hivemerge.delta"])["manifest"])
    _refused_by_finish(tmp_path, delta_id, {f"{delta_id}.delta.safetensors": forged.read_bytes()},
                       "file '../../x' is not a model side file")
    assert not (tmp_path / "home" / "store" / "x").exists() and not (tmp_path / "home" / "x").exists()


def _tensor_names(safetensors_bytes: bytes) -> list[str]:
    n = int.from_bytes(safetensors_bytes[:8], "little")
    return [k for k in json.loads(safetensors_bytes[8:8 + n]) if k != "__metadata__"]
