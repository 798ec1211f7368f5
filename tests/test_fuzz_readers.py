"""Seeded fuzzing of the readers of network bytes: delta containers (DeltaFile and what
reads a delta after it opens), bundle manifests (check_bundle) and model folders
(SafetensorsModel, as _finish opens a fetched model).

Thousands of mutations of valid inputs, some as raw bytes and some as structure signed
again with the test's own key (a publisher can sign anything). Each must either be
refused with a UserInputError, or be accepted only when an independent check of what was
accepted finds nothing invalid. Any other exception is a bug. ``HIVEMERGE_FUZZ_SEED`` and
``HIVEMERGE_FUZZ_SCALE`` run other or longer campaigns.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from delta_fixtures import read_container, tiny_pair, write_container

from hivemerge.merge.deltas.delta import METADATA_KEY, DeltaFile, DeltaSource, apply_delta, extract_delta
from hivemerge.merge.io.manifest import model_files, model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.protocol.bundles import FILE_SUFFIXES, MAX_CHUNK_SIZE, MAX_FILES, BundleError, bundle_manifest, check_bundle
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.fingerprint import architecture_fingerprint
from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import sign_manifest

SEED = int(os.environ.get("HIVEMERGE_FUZZ_SEED", "20240518"))
SCALE = float(os.environ.get("HIVEMERGE_FUZZ_SCALE", "1"))

# Independent of the code under test: what a model folder may hold, spelled out again.
SIDE_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
}
INDEX = "model.safetensors.index.json"
HOSTILE_NAMES = [
    "../../x", "../x", "/tmp/abs", "sub/config.json", "evil.py", "x/../config.json", "config.json/", ".config.json",
    "", ".", "..", "\\x", "C:\\x", "a\x00b", "config.json\n", "model.safetensors/../../x", "~/.ssh/id_rsa",
    "model.py", "filler.bin", "README.md", "tokenizer/vocab.json", "__metadata__", "__files__/config.json", "a::b",
    " config.json", "CONFIG.JSON", "x" * 300, "model.safetensors", "other.safetensors", INDEX, "config.json",
]
PALETTE = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**63, 2**64 + 1, 1.5, -0.0, 1e308, "", "x", "F32", "U8", "I64", "lossless",
    "ternary", "delta", "bundle", "model", [], {}, [1, 2], [-1], [0, 0], [2**40, 2**40], {"a": 1}, {"": None},
    "0" * 64, "f" * 64, "A" * 64, "0" * 63, "0" * 64 + "\n", [[[[[]]]]], *HOSTILE_NAMES,
]


def _locations(value, path=()):
    """Every (parent, key) of a JSON tree, the root's children first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield value, k
            yield from _locations(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield value, i
            yield from _locations(v, (*path, i))


def mutate_tree(rng: random.Random, root):
    """One to three random edits of a JSON tree (in place): replace, delete, rename, insert, wrap, duplicate."""
    for _ in range(rng.choice((1, 1, 2, 3))):
        spots = list(_locations(root))
        if not spots:
            return
        parent, key = rng.choice(spots)
        op = rng.choice(("replace", "replace", "replace", "delete", "rename", "insert", "wrap", "dup"))
        if op == "replace":
            parent[key] = copy.deepcopy(rng.choice(PALETTE))
        elif op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[rng.choice(HOSTILE_NAMES + [str(rng.choice(PALETTE))])] = parent.pop(key)
        elif op == "insert":
            if isinstance(parent, dict):
                parent[rng.choice(HOSTILE_NAMES)] = copy.deepcopy(rng.choice(PALETTE))
            else:
                parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(rng.choice(PALETTE)))
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "dup" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))


def mutate_bytes(rng: random.Random, raw: bytes, hot: tuple[int, int]) -> bytes:
    """Random byte edits; half of them inside ``hot`` (the header: where the structure is)."""
    data = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 4))):
        lo, hi = hot if rng.random() < 0.5 else (0, len(data))
        if not data:
            break
        i = rng.randrange(lo, max(lo + 1, min(hi, len(data))))
        op = rng.randrange(7)
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i] = rng.randrange(256)
        elif op == 2:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3:
            del data[i:i + rng.randrange(1, 17)]
        elif op == 4:
            del data[i:]
        elif op == 5:
            data[i:i] = data[max(0, i - 16):i]
        else:
            data[i:i + 1] = rng.choice([b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"-", b"9", b"e", b" "])
    return bytes(data)


# -- deltas -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-deltas")
    base_dir, expert_dir = tiny_pair(root)
    (expert_dir / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    identity = Identity.generate()
    paths = {}
    for codec in ("lossless", "ternary"):
        paths[codec] = extract_delta(base_dir, expert_dir, root / f"{codec}.delta.safetensors", identity, codec).path
    base = SafetensorsModel(base_dir)
    model_id(base)  # cached: every DeltaSource checks the base's id
    return root, base, identity, paths


def _read_counted(path, base, counts: dict):
    """_read_everything, or None when refused; counts the verdict either way."""
    try:
        read = _read_everything(path, base)
    except UserInputError:
        counts["refused"] += 1
        return None
    counts["accepted"] += 1
    return read


def _read_everything(path: Path, base: SafetensorsModel) -> tuple[DeltaFile, dict]:
    """Open a delta and use all of it as a merge does; raises only what it raises."""
    delta = DeltaFile(path)
    delta.verify_all()
    delta.summary()
    source = DeltaSource(delta, base)
    return delta, {n: source.get(n) for n in source.names()}


def _check_accepted(delta: DeltaFile) -> None:
    """An accepted delta, checked independently of check_delta_manifest."""
    manifest = delta.manifest
    assert set(manifest["files"]) <= SIDE_FILES, manifest["files"]
    assert manifest["architecture"] == architecture_fingerprint({n: e["shape"] for n, e in manifest["tensors"].items()})
    for name in manifest["tensors"]:
        assert "::" not in name and not name.startswith("__files__/") and name != "__metadata__", name


def test_fuzz_delta_bytes(deltas, tmp_path):
    """Raw byte mutations: anything accepted decodes to exactly what was signed."""
    _, base, _, paths = deltas
    rng = random.Random(SEED)
    counts = {"refused": 0, "accepted": 0}
    for codec, original_path in paths.items():
        original = original_path.read_bytes()
        expected_delta, expected = _read_everything(original_path, base)
        header_end = 8 + int.from_bytes(original[:8], "little")
        path = tmp_path / f"{codec}.delta.safetensors"
        for _ in range(int(1200 * SCALE)):
            mutated = mutate_bytes(rng, original, (0, header_end))
            path.write_bytes(mutated)
            read = _read_counted(path, base, counts)
            if read is None:
                continue
            delta, tensors = read
            assert delta.id == expected_delta.id and delta.signer == expected_delta.signer
            assert delta.files() == expected_delta.files()
            assert tensors.keys() == expected.keys() and all(torch.equal(tensors[n], expected[n]) for n in tensors)
    print("delta bytes", counts)
    assert counts["refused"] > 2000 * SCALE, counts


def _resigned_container(original: Path, dst: Path, identity: Identity, rng: random.Random) -> Path:
    """The delta with its manifest and/or header mutated, the manifest signed again by
    ``identity``; renames of files, tensors and parts move their stored parts along."""
    header, data = read_container(original)
    meta = header.pop("__metadata__")
    manifest = json.loads(meta[METADATA_KEY])["manifest"]
    kind = rng.randrange(5)
    if kind == 0 and manifest["files"]:  # a side file under another name
        old = rng.choice(sorted(manifest["files"]))
        new = rng.choice(HOSTILE_NAMES)
        manifest["files"][new] = manifest["files"].pop(old)
        header[f"__files__/{new}"] = header.pop(f"__files__/{old}")
    elif kind == 1:  # a tensor under another name
        old = rng.choice(sorted(manifest["tensors"]))
        new = rng.choice(HOSTILE_NAMES + [old + ".x", old.upper()])
        entry = manifest["tensors"].pop(old)
        manifest["tensors"][new] = entry
        for part in entry["parts"]:
            header[f"{new}::{part}"] = header.pop(f"{old}::{part}")
    elif kind == 2:  # anything in the manifest
        mutate_tree(rng, manifest)
    elif kind == 3:  # anything in the (unsigned) header
        mutate_tree(rng, header)
    else:  # both
        mutate_tree(rng, manifest)
        mutate_tree(rng, header)
    try:
        signed = sign_manifest(identity, "delta", manifest)
    except (ValueError, TypeError, AttributeError):  # our own signing refuses it (not JSON-able): sign raw
        signed = {"kind": "delta", "manifest": manifest, "signer": identity.public_hex, "signature": "00" * 64}
    meta = {**meta, METADATA_KEY: json.dumps(signed, sort_keys=True, separators=(",", ":"))} if isinstance(meta, dict) else meta
    return write_container(dst, {"__metadata__": meta, **header}, data)


def test_fuzz_signed_delta_structure(deltas, tmp_path):
    """A publisher signs whatever it likes: mutated manifests and headers, validly signed.
    Refused with a UserInputError, or accepted with only model side files and a manifest
    that says what the tensors are; applying an accepted one writes only inside --out."""
    root, base, identity, paths = deltas
    rng = random.Random(SEED + 1)
    counts = {"refused": 0, "accepted": 0}
    work = tmp_path / "work"
    work.mkdir()
    for i in range(int(2400 * SCALE)):
        original = paths[rng.choice(sorted(paths))]
        path = _resigned_container(original, work / "d.delta.safetensors", identity, rng)
        read = _read_counted(path, base, counts)
        if read is None:
            continue
        delta, _ = read
        _check_accepted(delta)
        out = work / "out"
        try:
            apply_delta(base.directory, path, out, overwrite=True)
        except UserInputError:
            pass
        written = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
        assert all(p == "d.delta.safetensors" or p == "out" or p.startswith("out/") for p in written), written
        assert not (root / "x").exists() and not Path("/tmp/abs").exists()
        assert set(p.name for p in out.iterdir()) <= SIDE_FILES | {"model.safetensors", INDEX} | \
            {f"model-{a:05d}-of-{b:05d}.safetensors" for b in range(1, 4) for a in range(1, b + 1)}
        shutil.rmtree(out)
    print("signed delta structure", counts)
    assert counts["refused"] > 1500 * SCALE, counts


def test_deeply_nested_json_is_a_user_error(deltas, tmp_path):
    """JSON nested past the parser's stack, in the header or in the signed manifest."""
    _, _, _, paths = deltas
    header, data = read_container(paths["lossless"])
    deep = "[" * 100_000 + "]" * 100_000
    header["__metadata__"][METADATA_KEY] = json.dumps({"kind": "delta", "manifest": "M", "signer": "", "signature": ""}).replace(
        '"M"', deep)
    with pytest.raises(UserInputError):
        DeltaFile(write_container(tmp_path / "a.delta.safetensors", header, data))
    raw = b"[" * 100_000
    (tmp_path / "b.delta.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(UserInputError):
        DeltaFile(tmp_path / "b.delta.safetensors")


# -- bundle manifests -----------------------------------------------------------------------

def _valid_bundles() -> list[dict]:
    content = "ab" * 32
    def entry(path, size, chunk):
        return {"path": path, "size": size, "chunks": [f"{i:064x}" for i in range(max(1, math.ceil(size / chunk)))]}
    return [
        bundle_manifest(content, 4, [entry("model.safetensors", 10, 4), entry("config.json", 3, 4), entry("tokenizer.json", 0, 4)]),
        bundle_manifest(content, 8, [entry("model-00001-of-00002.safetensors", 16, 8), entry("model-00002-of-00002.safetensors", 9, 8),
                                     entry(INDEX, 5, 8), entry("generation_config.json", 1, 8)]),
        *[bundle_manifest(content, 1024, [entry(content + s, 2000, 1024)]) for s in FILE_SUFFIXES],
    ]


def _is_int(value) -> bool:
    return type(value) is int


def _bundle_is_valid(m) -> bool:
    """What an accepted bundle must be, written out again without the code under test."""
    if not (isinstance(m, dict) and m.get("kind") == "bundle" and m.get("version") == 1):
        return False
    content, chunk, files = m.get("content"), m.get("chunk_size"), m.get("files")
    if not (isinstance(content, str) and re.fullmatch(r"[0-9a-f]{64}", content) and _is_int(chunk) and 0 < chunk <= MAX_CHUNK_SIZE):
        return False
    if not (isinstance(files, list) and 0 < len(files) <= MAX_FILES and all(isinstance(f, dict) for f in files)):
        return False
    paths = [f.get("path") for f in files]
    if not all(isinstance(p, str) for p in paths) or len(set(paths)) != len(paths):
        return False
    for f in files:
        size, chunks = f.get("size"), f.get("chunks")
        if not (_is_int(size) and size >= 0 and isinstance(chunks, list) and len(chunks) == max(1, -(-size // chunk))):
            return False
        if not all(isinstance(c, str) and re.fullmatch(r"[0-9a-f]{64}", c) for c in chunks):
            return False
    if len(paths) == 1 and paths[0] in {content + s for s in FILE_SUFFIXES}:
        return True
    plain = all(os.path.basename(p) == p and p not in ("", ".", "..") and not p.startswith((".", "-"))
                and "\\" not in p and "\x00" not in p and p.isprintable() and " " not in p for p in paths)
    known = all(p in SIDE_FILES or p == INDEX or p.endswith(".safetensors") for p in paths)
    return plain and known and any(p.endswith(".safetensors") for p in paths) and \
        not any(p in {content + s for s in FILE_SUFFIXES} for p in paths)


def test_fuzz_bundle_manifests():
    rng = random.Random(SEED + 2)
    counts = {"refused": 0, "accepted": 0}
    valid = _valid_bundles()
    for m in valid:
        assert check_bundle(m, content_id(m)) is m and _bundle_is_valid(m)
    for _ in range(int(6000 * SCALE)):
        m = copy.deepcopy(rng.choice(valid))
        if rng.random() < 0.3:  # aim at the names
            rng.choice(m["files"])["path"] = rng.choice(HOSTILE_NAMES + [m["content"] + rng.choice(FILE_SUFFIXES)])
        else:
            mutate_tree(rng, m)
        try:
            expected = content_id(m) if isinstance(m, dict) else "0" * 64
        except (ValueError, TypeError):  # not canonical JSON (e.g. a non-string key): never an id
            continue
        try:
            check_bundle(m, expected)
        except BundleError as exc:
            assert isinstance(exc, UserInputError)
            counts["refused"] += 1
            continue
        counts["accepted"] += 1
        assert _bundle_is_valid(m), m
        for f in m["files"]:  # where a fetcher writes it: inside its staging folder, no sub-folder
            assert (Path("/staging/files") / f["path"]).resolve().parent == Path("/staging/files")
    print("bundle manifests", counts)
    assert counts["refused"] > 3000 * SCALE and counts["accepted"] > 100 * SCALE, counts


# -- model folders (a fetched model before its id is checked) ---------------------------------

@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    from delta_fixtures import family_shapes, random_tensors, save_model

    from hivemerge.merge.io.writer import ShardedWriter

    root = tmp_path_factory.mktemp("fuzz-model")
    single = save_model(root / "single", random_tensors(5, family_shapes(8)))
    model = SafetensorsModel(single)
    sharded = root / "sharded"
    sharded.mkdir()
    layout = [(n, model.tensors[n].dtype, model.tensors[n].shape) for n in sorted(model.tensors)]
    writer = ShardedWriter(sharded, layout, max_shard_bytes=700)
    for name, _, _ in layout:
        writer.write(name, model.get(name))
    writer.finish()
    for f in ("config.json", "tokenizer_config.json"):
        shutil.copy(single / f, sharded / f)
    assert model_id(SafetensorsModel(sharded)) == model_id(model)
    return sharded


def test_fuzz_model_folders(sharded_model, tmp_path):
    """Mutated shards and index: SafetensorsModel and the model id raise only UserInputError;
    an accepted folder's weights are plain files of the folder and every tensor reads."""
    rng = random.Random(SEED + 3)
    names = sorted(p.name for p in sharded_model.iterdir())
    counts = {"refused": 0, "accepted": 0}
    folder = tmp_path / "m"
    shutil.copytree(sharded_model, folder)
    for _ in range(int(1500 * SCALE)):
        victim = folder / rng.choice([n for n in names if n.endswith((".safetensors", ".json"))])
        raw = (sharded_model / victim.name).read_bytes()
        for name in names:  # the previous mutation undone
            if (folder / name).read_bytes() != (sharded_model / name).read_bytes():
                shutil.copy(sharded_model / name, folder / name)
        if victim.name == INDEX and rng.random() < 0.6:
            index = json.loads(raw)
            mutate_tree(rng, index)
            victim.write_text(json.dumps(index))
        else:
            victim.write_bytes(mutate_bytes(rng, raw, (0, min(len(raw), 8 + int.from_bytes(raw[:8], "little")))))
        try:
            model = SafetensorsModel(folder)
            model_id(model)
            for name in model.names():
                model.get(name)
            files = model_files(model)
        except UserInputError:
            counts["refused"] += 1
            continue
        counts["accepted"] += 1
        assert all((folder / f).resolve().parent == folder.resolve() for f in files), files
        assert all(w.resolve().parent == folder.resolve() for w in model.weight_files)
    print("model folders", counts)
    assert counts["refused"] > 500 * SCALE, counts
