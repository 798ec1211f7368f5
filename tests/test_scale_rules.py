"""Issue 21's rules for real model sizes: a model's manifest is hashed once while its
files stay as they were (publishing and every round re-hashed a 2.2 GB base several
times), a round keeps its base's dtype, a node sizes its thread pool to its cores."""

from __future__ import annotations

import os
import shutil

import torch
from conftest import write_tensors

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
    # the last weight rewritten in place, size and mtime kept: its ctime moved, so it is hashed again
    weights = model / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(torch.tensor([99.0]).numpy().tobytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    changed = manifest.model_id(SafetensorsModel(model))
    assert len(hashed) == 3 and changed != first


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
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 3, 5})  # e.g. `taskset -c 0,3,5`
    try:
        assert threads.use_threads(None) == 3 and torch.get_num_threads() == 3
        assert threads.use_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
