"""Content addressing (canonical JSON, model manifests and their ids) and the node's content store."""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
from pathlib import Path

import pytest
import torch
from delta_fixtures import CONFIG, family_shapes, perturbed, random_tensors, save_model
from safetensors.torch import save_file

from hivemerge.merge.deltas.delta import DeltaError, extract_delta
from hivemerge.merge.io.manifest import build_model_manifest, model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.node.storage.store import ContentStore
from hivemerge.protocol.content import canonical_json, content_id, parse_content_ref, short_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.fingerprint import architecture_fingerprint
from hivemerge.protocol.identity import Identity

# -- canonical JSON -----------------------------------------------------------------


def test_canonical_json_ignores_key_order_at_every_depth():
    a = {"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "é"}, "c": None}
    b = {"c": None, "a": {"x": "é", "y": [1, {"p": 3, "q": 2}]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"x":"é","y":[1,{"p":3,"q":2}]},"b":1,"c":null}'.encode()
    assert content_id(a) == content_id(b) == hashlib.sha256(canonical_json(a)).hexdigest()
    assert canonical_json({"l": [1, 2]}) != canonical_json({"l": [2, 1]})  # list order is content
    assert content_id({"a": 1}) != content_id({"a": 1.5})


def test_canonical_json_refuses_nan():
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_parse_content_ref():
    cid = "ab" * 32
    assert parse_content_ref(f"hm://{cid}") == cid == parse_content_ref(cid)
    assert parse_content_ref("hm://" + "AB" * 32) is None
    assert parse_content_ref("hm://" + "ab" * 31) is None
    assert parse_content_ref("./model") is None
    assert short_id(cid) == cid[:12]
    # "$" also matches before a final newline: an id with one would name another file
    assert parse_content_ref(cid + "\n") is None and parse_content_ref(f"hm://{cid}\n") is None


# -- model manifests ------------------------------------------------------------------

def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.w": torch.randn(4, 3, generator=g),
        "model.layers.1.w": torch.randn(4, 3, generator=g).half(),
        "model.norm.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(5),
    }


def test_model_id_changes_with_every_tensor_byte(tmp_path):
    directory = save_model(tmp_path / "m", _tensors())
    original_id = model_id(SafetensorsModel(directory))
    path = directory / "model.safetensors"
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    assert len(raw) - data_start == 4 * 3 * 4 + 4 * 3 * 2 + 3 * 2 + 5 * 8
    seen = set()
    for i in range(data_start, len(raw)):
        raw[i] ^= 1 << (i % 8)
        path.write_bytes(raw)
        changed = content_id(build_model_manifest(SafetensorsModel(directory)))
        assert changed != original_id, i
        seen.add(changed)
        raw[i] ^= 1 << (i % 8)
    path.write_bytes(raw)
    assert len(seen) == len(raw) - data_start  # every flip gives its own id
    assert model_id(SafetensorsModel(directory)) == original_id


def test_model_id_covers_config_and_tokenizer_but_not_the_readme(tmp_path):
    directory = save_model(tmp_path / "m", _tensors())
    first = model_id(SafetensorsModel(directory))
    (directory / "README.md").write_text("a model card")
    assert model_id(SafetensorsModel(directory)) == first
    (directory / "config.json").write_text(json.dumps({**CONFIG, "hidden_size": 17}))
    second = model_id(SafetensorsModel(directory))
    assert second != first
    (directory / "tokenizer_config.json").write_text("{}")
    assert model_id(SafetensorsModel(directory)) not in (first, second)


def test_model_id_ignores_tensor_order_sharding_and_file_metadata(tmp_path):
    tensors = _tensors()
    names = list(tensors)
    single = save_model(tmp_path / "single", tensors)

    reordered = tmp_path / "reordered"  # same single file, tensors written in the opposite order
    reordered.mkdir()
    save_file({n: tensors[n] for n in reversed(names)}, str(reordered / "model.safetensors"), metadata={"note": "resaved"})
    shutil.copy(single / "config.json", reordered)
    shutil.copy(single / "tokenizer_config.json", reordered)

    sharded = tmp_path / "sharded"  # three shards with an index, another grouping
    sharded.mkdir()
    groups = [[names[3], names[0]], [names[2]], [names[1]]]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in group}, str(sharded / fname))
        weight_map.update({n: fname for n in group})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(single / "config.json", sharded)
    shutil.copy(single / "tokenizer_config.json", sharded)

    unindexed = tmp_path / "unindexed"  # two shards found by glob
    unindexed.mkdir()
    save_file({n: tensors[n] for n in names[:2]}, str(unindexed / "a.safetensors"))
    save_file({n: tensors[n] for n in names[2:]}, str(unindexed / "b.safetensors"))
    shutil.copy(single / "config.json", unindexed)
    shutil.copy(single / "tokenizer_config.json", unindexed)

    ids = {d.name: model_id(SafetensorsModel(d)) for d in (single, reordered, sharded, unindexed)}
    assert len(set(ids.values())) == 1, ids
    assert (single / "model.safetensors").read_bytes() != (reordered / "model.safetensors").read_bytes()


def test_manifest_lists_every_tensor_and_file(tmp_path):
    tensors = _tensors()
    directory = save_model(tmp_path / "m", tensors)
    manifest = build_model_manifest(SafetensorsModel(directory))
    assert manifest["kind"] == "model" and manifest["version"] == 1
    w = manifest["tensors"]["model.layers.1.w"]
    assert w == {"dtype": "F16", "shape": [4, 3], "sha256": hashlib.sha256(tensors["model.layers.1.w"].numpy().tobytes()).hexdigest()}
    assert manifest["tensors"]["model.norm.weight"]["dtype"] == "BF16"
    assert manifest["tensors"]["position_ids"]["dtype"] == "I64"
    assert manifest["files"] == {
        "config.json": hashlib.sha256((directory / "config.json").read_bytes()).hexdigest(),
        "tokenizer_config.json": hashlib.sha256((directory / "tokenizer_config.json").read_bytes()).hexdigest(),
    }
    assert manifest["architecture"] == architecture_fingerprint({n: t.shape for n, t in tensors.items()})


def test_dtype_changes_the_id_but_not_the_architecture(tmp_path):
    tensors = _tensors()
    a = SafetensorsModel(save_model(tmp_path / "a", tensors))
    b = SafetensorsModel(save_model(tmp_path / "b", {n: t.double() if t.is_floating_point() else t for n, t in tensors.items()}))
    assert model_id(a) != model_id(b)
    assert build_model_manifest(a)["architecture"] == build_model_manifest(b)["architecture"]
    c = SafetensorsModel(save_model(tmp_path / "c", {**tensors, "model.norm.weight": torch.zeros(4)}))
    assert build_model_manifest(a)["architecture"] != build_model_manifest(c)["architecture"]


# -- the content store ------------------------------------------------------------------

@pytest.fixture
def delta_file(tmp_path):
    shapes = {k: v for k, v in family_shapes(8).items() if "layers.0" in k}
    base = random_tensors(0, shapes)
    base_dir = save_model(tmp_path / "base", base)
    expert_dir = save_model(tmp_path / "expert", perturbed(base, 1))
    path = tmp_path / "x.delta.safetensors"
    report = extract_delta(base_dir, expert_dir, path, Identity.generate(), "lossless")
    return path, report.delta_id


def test_store_adds_verified_deltas_by_id(tmp_path, delta_file):
    path, delta_id = delta_file
    store = ContentStore(tmp_path / "home")
    assert store.add_delta(path) == delta_id
    stored = tmp_path / "home" / "store" / "objects" / f"{delta_id}.delta.safetensors"
    assert store.resolve(delta_id) == stored
    assert stored.read_bytes() == path.read_bytes()
    assert store.add_delta(path) == delta_id  # idempotent
    assert sorted(p.name for p in stored.parent.iterdir()) == [stored.name]
    with pytest.raises(UserInputError, match=f"hm://{'0' * 64}: not in the content store"):
        store.resolve("0" * 64)


def test_store_refuses_a_corrupt_delta_and_keeps_nothing(tmp_path, delta_file):
    path, _ = delta_file
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # in the data: only the part's hash notices
    path.write_bytes(raw)
    store = ContentStore(tmp_path / "home")
    with pytest.raises(DeltaError, match="fails its hash check"):
        store.add_delta(path)
    assert not (tmp_path / "home" / "store" / "objects").exists() or not any((tmp_path / "home" / "store" / "objects").iterdir())


def test_a_failed_copy_into_the_store_leaves_no_partial_object(tmp_path, delta_file, monkeypatch):
    path, delta_id = delta_file
    model_dir = path.parent / "expert"
    store = ContentStore(tmp_path / "home")

    def disk_full(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"half")  # a copy cut short
        raise OSError(28, "No space left on device")

    def no_links(src, dst):  # another file system: the store copies
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.add_delta(path)
    with pytest.raises(OSError, match="No space"):
        store.add_model(model_dir)
    leftovers = [p.name for p in (tmp_path / "home" / "store").rglob("*") if p.is_file() and "partial" in p.name]
    assert leftovers == [] and not any((tmp_path / "home" / "store" / "models").iterdir())
    monkeypatch.undo()
    assert store.add_delta(path) == delta_id  # and a later attempt succeeds


# -- model folders from elsewhere: names, links, layout ------------------------------------

def _sharded(root: Path, weight_map_of=None) -> Path:
    """A model in two shards with an index (``weight_map_of(weight_map)`` may change its map)."""
    tensors = _tensors()
    names = sorted(tensors)
    directory = save_model(root, {n: tensors[n] for n in names[:2]})
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[2:]}, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    if weight_map_of is not None:
        weight_map = weight_map_of(weight_map)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("target", ["../other.safetensors", "ABSOLUTE", "sub/model-00002-of-00002.safetensors",
                                    ".hidden.safetensors", "model-00002-of-00002.bin"])
def test_an_index_naming_a_path_is_refused(tmp_path, target):
    """weight_map values are plain shard names of the folder; one that leads elsewhere is
    refused even though the file it names exists and is a fine safetensors file."""
    tensors = _tensors()
    names = sorted(tensors)
    elsewhere = tmp_path / "other.safetensors"
    save_file({n: tensors[n] for n in names[2:]}, str(elsewhere))
    target = str(elsewhere) if target == "ABSOLUTE" else target
    directory = _sharded(tmp_path / "m", lambda wm: {n: (target if f.startswith("model-00002") else f) for n, f in wm.items()})
    (directory / "sub").mkdir()
    shutil.copy(elsewhere, directory / "sub" / "model-00002-of-00002.safetensors")
    shutil.copy(elsewhere, directory / ".hidden.safetensors")
    shutil.copy(elsewhere, directory / "model-00002-of-00002.bin")
    # the message shows at most 80 characters of a name from the file (a temporary path may be longer)
    with pytest.raises(UserInputError, match=f"is mapped to {re.escape(repr(target[:80]))}, not a shard file name"):
        SafetensorsModel(directory)


def test_an_index_must_list_exactly_what_its_shards_hold(tmp_path):
    assert len(SafetensorsModel(_sharded(tmp_path / "ok")).tensors) == 4
    for i, change in enumerate([
        lambda wm: {n: f for n, f in list(wm.items())[1:]},  # a tensor of the shards left out
        lambda wm: {**wm, "ghost.weight": "model-00001-of-00002.safetensors"},  # one no shard holds
        lambda wm: {n: "model-00001-of-00002.safetensors" for n in wm},  # tensors in another shard than it says
    ]):
        directory = _sharded(tmp_path / f"bad{i}", change)
        with pytest.raises(UserInputError, match="the index does not list what its shards hold"):
            SafetensorsModel(directory)
    for document in ("[]", "{}", '{"weight_map": {}}', '{"weight_map": {"a": 1}}', '{"weight_map": {"a": "model.safetensors"}, "x": 1}',
                     "[" * 100_000):
        directory = _sharded(tmp_path / f"doc{len(document)}-{hash(document) % 1000}")
        (directory / "model.safetensors.index.json").write_text(document)
        with pytest.raises(UserInputError, match="index"):
            SafetensorsModel(directory)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    directory = save_model(tmp_path / "m", _tensors())
    save_file({"position_ids": torch.arange(5) + 1}, str(directory / "b.safetensors"))
    (directory / "model.safetensors").rename(directory / "a.safetensors")  # shards found by glob
    with pytest.raises(UserInputError, match="tensor position_ids is also in a.safetensors"):
        SafetensorsModel(directory)


@pytest.mark.parametrize("damage", ["gap", "trailing", "overlap", "bad-offsets", "not-a-dict", "deep-json"])
def test_shard_bytes_no_tensor_covers_are_refused(tmp_path, damage):
    """Every byte of a shard's data belongs to one tensor (as the safetensors format
    requires): bytes no tensor hash covers could carry anything past the content id."""
    import struct

    directory = save_model(tmp_path / "m", _tensors())
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    first = next(k for k in header if k != "__metadata__")
    if damage == "gap":
        for k, e in header.items():
            if k != "__metadata__":
                e["data_offsets"] = [e["data_offsets"][0] + 8, e["data_offsets"][1] + 8]
        data = b"FILLER!!" + data
    elif damage == "trailing":
        data += b"#!/bin/sh\n"
    elif damage == "overlap":
        header[first]["data_offsets"] = [0, header[first]["data_offsets"][1] - header[first]["data_offsets"][0]]
        for k, e in header.items():
            if k not in ("__metadata__", first):
                e["data_offsets"] = [0, e["data_offsets"][1] - e["data_offsets"][0]]
    elif damage == "bad-offsets":
        header[first]["data_offsets"] = ["0", 8]
    elif damage == "not-a-dict":
        header[first] = [1, 2]
    blob = json.dumps(header).encode() if damage != "deep-json" else b"[" * 100_000
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with pytest.raises(UserInputError):
        SafetensorsModel(directory)


def test_files_linked_out_of_the_model_folder_are_refused(tmp_path):
    directory = save_model(tmp_path / "m", _tensors())
    secret = tmp_path / "secret"
    secret.write_text("private")
    (directory / "tokenizer.json").symlink_to(secret)
    model = SafetensorsModel(directory)  # weights are its own
    with pytest.raises(UserInputError, match="tokenizer.json: a symbolic link out of the model folder"):
        build_model_manifest(model)
    with pytest.raises(UserInputError, match="a symbolic link out of the model folder"):
        model.read_file("tokenizer.json")
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer.json").symlink_to("tokenizer_config.json")  # a link inside the folder: its own file
    assert SafetensorsModel(directory).read_file("tokenizer.json") == (directory / "tokenizer_config.json").read_bytes()
    (directory / "model.safetensors").rename(tmp_path / "weights.safetensors")
    (directory / "model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(UserInputError, match="model.safetensors: a symbolic link out of the model folder"):
        SafetensorsModel(directory)


def test_the_store_keeps_exactly_the_files_a_model_id_covers(tmp_path):
    """Beside its weights and side files, a model folder may hold anything: code, notes,
    weights it does not use. None of it enters the store or its bundle."""
    from hivemerge.protocol.bundles import check_bundle

    directory = save_model(tmp_path / "m", _tensors())
    save_file({"x": torch.zeros(3)}, str(directory / "unused.safetensors"))  # model.safetensors is what is read
    (directory / "modeling_evil.py").write_text("import os")
    (directory / "notes.index.json").write_text("{}")
    (directory / "sub").mkdir()
    (directory / "sub" / "config.json").write_text("{}")
    store = ContentStore(tmp_path / "home")
    cid = store.add_model(directory)
    assert sorted(p.name for p in (store.models / cid).iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    bundle_id = store.bundle_of(cid)
    assert [f["path"] for f in check_bundle(store.bundle(bundle_id), bundle_id)["files"]] == \
        ["config.json", "model.safetensors", "tokenizer_config.json"]
    # and a file that lands in the stored folder later is not served either
    (store.models / cid / "extra.py").write_text("x = 1")
    assert [f["path"] for f in store.bundle(store.write_bundle(cid))["files"]] == \
        ["config.json", "model.safetensors", "tokenizer_config.json"]
    # a bundle id names a file: never a path, even to a valid manifest lying there
    shutil.copy(store.bundles / f"{bundle_id}.json", store.root / f"{bundle_id}.json")
    shutil.copy(store.bundles / f"{bundle_id}.json", store.bundles / f"{bundle_id}\n.json")
    assert store.bundle("../" + bundle_id) is None and store.bundle(bundle_id + "\n") is None
