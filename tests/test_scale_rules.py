"""Issue 21's rules for real model sizes: a model's manifest is hashed once while its
files stay as they were (publishing and every round re-hashed a 2.2 GB base several
times), a round keeps its base's dtype, a node sizes its thread pool to its cores."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch
from conftest import PEAK_RSS, write_tensors

from hivemerge.merge.io import manifest
from hivemerge.merge.io.sources import SafetensorsModel


def test_a_manifest_is_hashed_once_and_again_when_a_file_changes_in_place(tmp_path, monkeypatch):
    hashed = []
    real = manifest._hash_model
    monkeypatch.setattr(manifest, "_hash_model", lambda model: hashed.append(model.directory) or real(model))
    monkeypatch.setattr(manifest, "_manifests", manifest.OrderedDict())
    model = write_tensors(tmp_path / "m", {"w": torch.arange(12, dtype=torch.float32)}, {"num_hidden_layers": 1})
    first = manifest.model_id(SafetensorsModel(model))
    assert manifest.model_id(SafetensorsModel(model)) == first and len(hashed) == 1  # a new object: remembered
    twin = shutil.copytree(model, tmp_path / "twin")
    assert manifest.model_id(SafetensorsModel(twin)) == first and len(hashed) == 2  # other files: hashed
    linked = tmp_path / "linked"  # hard links (the store's copy of a published base): the same files
    linked.mkdir()
    for item in model.iterdir():
        os.link(item, linked / item.name)
    assert manifest.model_id(SafetensorsModel(linked)) == first and len(hashed) == 2
    # the last weight rewritten in place, same size: its modification time moved, so it is hashed again
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    os.utime(weights, ns=(0, 0))  # as if written long ago: the rewrite below surely moves the time
    manifest.model_id(SafetensorsModel(model))  # (hashed again: its time moved back)
    with open(weights, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(torch.tensor([99.0]).numpy().tobytes())
    assert weights.stat().st_size == size
    changed = manifest.model_id(SafetensorsModel(model))
    assert len(hashed) == 4 and changed != first
    assert manifest.model_id(SafetensorsModel(linked)) == changed  # the links see the rewrite too


def test_a_stored_models_bundle_is_hashed_once_and_again_when_a_file_changes_in_place(tmp_path, monkeypatch):
    """Publishing a second expert of the same base took the base into the store again: its
    transfer chunks were hashed every time (2.1 GB at 1.1B, 14 GB for a 7B base)."""
    from hivemerge.node.storage import store as store_module

    hashed = []
    real = store_module._chunk_hashes
    monkeypatch.setattr(store_module, "_chunk_hashes", lambda path, size: hashed.append(path.name) or real(path, size))
    model = write_tensors(tmp_path / "base", {"w": torch.arange(4096, dtype=torch.float32)}, {"num_hidden_layers": 1})
    store = store_module.ContentStore(tmp_path / "home", chunk_size=4096)
    cid = store.add_model(model)
    first = store.bundle_of(cid)
    per_bundle = len(hashed)  # its weights and side files
    assert per_bundle >= 2 and store.add_model(model) == cid and len(hashed) == per_bundle  # remembered
    assert store.write_bundle(cid) == first and len(hashed) == per_bundle
    (store.bundles / f"{first}.json").unlink()  # pruned: written again
    assert store.write_bundle(cid) == first and len(hashed) == 2 * per_bundle
    assert (store.bundles / f"{first}.json").exists()
    # a weight file rewritten in place (the store holds a hard link of it), same size: hashed again
    weights = store.models / cid / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(torch.tensor([-1.0]).numpy().tobytes())
    written = weights.stat().st_mtime_ns  # within the clock's step of the first write it may be unchanged:
    os.utime(weights, ns=(written + 10**9, written + 10**9))  # a rewrite a second later
    changed = store.write_bundle(cid)
    assert len(hashed) == 3 * per_bundle and changed != first
    chunks = {f["path"]: f["chunks"] for f in store.bundle(changed)["files"]}
    data = weights.read_bytes()
    assert chunks["model.safetensors"][-1] == hashlib.sha256(data[(len(data) - 1) // 4096 * 4096:]).hexdigest()


def test_a_round_recipe_without_out_dtype_keeps_the_bases_dtype(tmp_path):
    """Issue 21: the README's round recipe turned a bf16 base into a float32 consensus."""
    from hivemerge.node.node import with_base_dtype

    base = write_tensors(tmp_path / "base", {"embed": torch.zeros(64, 8, dtype=torch.bfloat16),
                                             "norm": torch.ones(8, dtype=torch.float32)}, {"num_hidden_layers": 1})
    recipe = {"merge_method": "ties", "select": {"domains": ["math"]}}
    assert with_base_dtype(recipe, base) == {**recipe, "out_dtype": "bfloat16"}  # most parameters are bf16
    assert with_base_dtype({**recipe, "out_dtype": "float32"}, base)["out_dtype"] == "float32"  # said: kept
    assert with_base_dtype(recipe, None) == recipe  # a base known only by id, not held here: the recipe's default


def test_a_node_uses_the_cores_it_may_run_on_unless_told(monkeypatch):
    from hivemerge.merge.numerics import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_width", threads._width)  # restored after the test
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 3, 5})  # e.g. `taskset -c 0,3,5`
    try:
        assert threads.use_threads(None) == 3 and torch.get_num_threads() == 3 and threads.workers() == 3
        assert threads.use_threads(1) == 1 and torch.get_num_threads() == 1 and threads.workers() == 1
    finally:
        torch.set_num_threads(before)


MERGE_RSS = PEAK_RSS + """
import json, sys
from hivemerge.merge.engine import run_merge
from hivemerge.merge.recipe import validate_recipe

def merge(base, deltas, out):
    document = {"merge_method": "ties", "base_model": base, "parameters": {"weight": 1.0, "density": 0.5},
                "models": [{"model": d} for d in deltas], "out_dtype": "bfloat16"}
    run_merge(validate_recipe(document), out, device="cpu")

small, big, out = json.loads(sys.argv[1])
merge(*small, out + "-warm")  # kernels, thread pools, allocator: what every merge costs once
reset_peak()
before = status_kib("VmRSS")
merge(*big, out)
print(status_kib("VmHWM") - before)
"""


def embedding_family(root, vocab: int, hidden: int, seed: int) -> tuple[str, list[str]]:
    """A bf16 base whose embedding dominates, and three signed ternary deltas (about 58%
    zeros, as ternary deltas are) of experts that changed every other tensor."""
    from hivemerge.merge.deltas.delta import extract_delta
    from hivemerge.protocol.identity import Identity

    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              **{f"model.layers.{i}.mlp.up_proj.weight": (hidden, hidden) for i in range(2)}}
    base = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
    config = {"num_hidden_layers": 2, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    write_tensors(root / "base", base, config)
    key = Identity.generate()
    deltas = []
    for e in range(3):
        expert = {k: (v.float() + (torch.randn(v.shape, generator=g) * 4e-4 if i % 2 == e % 2 else 0)).bfloat16()
                  for i, (k, v) in enumerate(sorted(base.items()))}
        write_tensors(root / f"expert{e}", expert, config)
        deltas.append(str(extract_delta(root / "base", root / f"expert{e}", root / f"{e}.delta.safetensors", key, "ternary").path))
    return str(root / "base"), deltas


def test_a_merge_grows_by_a_few_of_its_largest_tensor_not_by_the_model(tmp_path):
    """TIES over three ternary deltas of a bf16 model whose embedding and head (2**23
    entries each, 32 MiB in float32) are most of it, in a fresh process after a warm-up
    merge: peak RSS grows by less than 8x the largest tensor's float32 size (issue 21's
    law). Measured: 4.2-4.6x with glibc's arenas capped at the merge's threads, 6.3-7.6x
    without (numerics/threads.limit_allocator_arenas); before issue 21, 18x (every delta
    decoded to four float32 copies of the embedding, the top-k select's index arrays)."""
    small = embedding_family(tmp_path / "small", 64, 64, 1)
    big = embedding_family(tmp_path / "big", 4096, 2048, 2)
    run = subprocess.run([sys.executable, "-c", MERGE_RSS, json.dumps([small, big, str(tmp_path / "out")])],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    largest_f32_kib = 4096 * 2048 * 4 // 1024
    grown = int(run.stdout.split()[-1])
    assert grown < 8 * largest_f32_kib, f"grew {grown / 1024:.0f} MiB, {grown / largest_f32_kib:.1f}x the largest tensor"


def test_the_store_links_a_models_files_instead_of_copying_them(tmp_path):
    """A published base is not stored twice on one file system (issue 21: a home held
    4.7 GB for a 2.2 GB model): the store hard-links its files, and the same id comes out."""
    from hivemerge.node.storage.store import ContentStore

    base = write_tensors(tmp_path / "base", {"w": torch.arange(64, dtype=torch.float32)}, {"num_hidden_layers": 1})
    store = ContentStore(tmp_path / "home")
    cid = store.add_model(base)
    stored = store.resolve(cid)
    for name in ("model.safetensors", "config.json"):
        assert (stored / name).stat().st_ino == (base / name).stat().st_ino
    assert manifest.model_id(SafetensorsModel(stored)) == cid
