"""Deltas as merge inputs: a delta file or ``hm://<id>`` reads exactly like the model
directory it was made from, and a delta that does not fit the recipe's base is refused."""

from __future__ import annotations

import pytest
from conftest import write_recipe
from delta_fixtures import assert_user_error

from hivemerge.merge.deltas.delta import apply_delta, extract_delta
from hivemerge.node.storage.store import ContentStore


@pytest.fixture(scope="module")
def deltas(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-deltas")
    paths = {
        "lossless": root / "expert.lossless.delta.safetensors",
        "sign1": root / "expert.sign1.delta.safetensors",
        "wrong_base": root / "expert.vs-wrong-base.delta.safetensors",
    }
    ids = {
        "lossless": extract_delta(family.base, family.expert, paths["lossless"], family.alice, "lossless").delta_id,
        "sign1": extract_delta(family.base, family.expert, paths["sign1"], family.alice, "sign1").delta_id,
        "wrong_base": extract_delta(family.wrong_base, family.expert, paths["wrong_base"], family.alice, "lossless").delta_id,
    }
    return paths, ids


def ties(base, first, second) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(first), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(second), "parameters": {"weight": 0.7, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


def merge(cli, tmp_path, name, document, *extra):
    recipe = write_recipe(tmp_path / f"{name}.yaml", document)
    out = tmp_path / name
    return cli("merge", recipe, "--out", out, "--device", "cpu", *extra), out


def test_delta_file_and_directory_merge_to_the_same_bytes(cli, family, deltas, tmp_path):
    paths, _ = deltas
    with_dirs, dirs_out = merge(cli, tmp_path, "dirs", ties(family.base, family.expert, family.expert2))
    assert with_dirs.returncode == 0, with_dirs.stderr
    with_delta, delta_out = merge(cli, tmp_path, "delta", ties(family.base, paths["lossless"], family.expert2))
    assert with_delta.returncode == 0, with_delta.stderr
    merged = (dirs_out / "model.safetensors").read_bytes()
    assert (delta_out / "model.safetensors").read_bytes() == merged
    assert (delta_out / "config.json").read_bytes() == (dirs_out / "config.json").read_bytes()
    assert merged != (family.base / "model.safetensors").read_bytes()


def test_lossy_delta_merges_like_the_expert_it_rebuilds(cli, family, deltas, tmp_path):
    paths, _ = deltas
    apply_delta(family.base, paths["sign1"], tmp_path / "rebuilt")
    from_dir, dir_out = merge(cli, tmp_path, "dir", ties(family.base, tmp_path / "rebuilt", family.expert2))
    from_delta, delta_out = merge(cli, tmp_path, "delta", ties(family.base, paths["sign1"], family.expert2))
    assert from_dir.returncode == 0 and from_delta.returncode == 0, from_delta.stderr
    assert (delta_out / "model.safetensors").read_bytes() == (dir_out / "model.safetensors").read_bytes()


def test_content_ids_from_the_store(cli, family, deltas, tmp_path):
    paths, ids = deltas
    home = tmp_path / "home"
    assert ContentStore(home).add_delta(paths["lossless"]) == ids["lossless"]
    by_dirs, dirs_out = merge(cli, tmp_path, "dirs", ties(family.base, family.expert, family.expert2))
    by_id, id_out = merge(cli, tmp_path, "by-id", ties(family.base, f"hm://{ids['lossless']}", family.expert2), "--home", home)
    assert by_dirs.returncode == 0 and by_id.returncode == 0, by_id.stderr
    assert (id_out / "model.safetensors").read_bytes() == (dirs_out / "model.safetensors").read_bytes()

    unknown = "0123456789abcdef" * 4
    result, out = merge(cli, tmp_path, "unknown", ties(family.base, family.expert2, f"hm://{unknown}"), "--home", home)
    assert_user_error(result, f"models[1].model: hm://{unknown}: not in the content store at {home / 'store'}")
    assert not out.exists()
    result, out = merge(cli, tmp_path, "malformed", ties(family.base, family.expert2, "hm://1234"), "--home", home)
    assert_user_error(result, "models[1].model: hm://1234: not a content id")
    assert not out.exists()


def test_delta_for_another_base_is_refused_with_its_key_path(cli, family, deltas, tmp_path):
    paths, ids = deltas
    result, out = merge(cli, tmp_path, "wrong", ties(family.base, family.expert2, paths["wrong_base"]))
    line = assert_user_error(result, "models[1].model: ", str(paths["wrong_base"]), "made against base")
    assert not out.exists()
    home = tmp_path / "home"
    ContentStore(home).add_delta(paths["wrong_base"])
    result, out = merge(cli, tmp_path, "wrong-id", ties(family.base, f"hm://{ids['wrong_base']}", family.expert2), "--home", home)
    assert_user_error(result, "models[0].model: ", "made against base")
    assert not out.exists()
    assert line.count("error:") == 1


def test_corrupt_delta_in_a_recipe_is_refused_before_merging(cli, family, deltas, tmp_path):
    paths, _ = deltas
    raw = bytearray(paths["lossless"].read_bytes())
    raw[-5] ^= 0x20
    corrupt = tmp_path / "corrupt.delta.safetensors"
    corrupt.write_bytes(raw)
    result, out = merge(cli, tmp_path, "corrupt", ties(family.base, family.expert2, corrupt))
    assert_user_error(result, "models[1].model: ", "fails its hash check")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.delta.safetensors", "corrupt.yaml"]


def test_a_merge_of_deltas_reads_each_base_tensor_once(family, deltas, tmp_path, monkeypatch):
    """The engine reads the base's tensor once and decodes every delta from that copy
    (it used to read it again for each delta); the bytes are those of the merge of the
    rebuilt experts."""
    from collections import Counter

    from hivemerge.merge.engine import run_merge
    from hivemerge.merge.io.sources import SafetensorsModel
    from hivemerge.merge.recipe import validate_recipe

    paths, _ = deltas
    rebuilt = tmp_path / "sign1-expert"
    apply_delta(family.base, paths["sign1"], rebuilt)
    run_merge(validate_recipe(ties(family.base, rebuilt, family.expert)), tmp_path / "from-experts", device="cpu")
    reads = []
    real = SafetensorsModel.get
    monkeypatch.setattr(SafetensorsModel, "get", lambda self, name, into=None: reads.append((self.directory, name)) or real(self, name, into))
    run_merge(validate_recipe(ties(family.base, paths["sign1"], paths["lossless"])), tmp_path / "from-deltas", device="cpu")
    base_reads = Counter(name for directory, name in reads if directory == family.base)
    assert len(base_reads) == len(SafetensorsModel(family.base).tensors) and set(base_reads.values()) == {1}
    assert (tmp_path / "from-deltas" / "model.safetensors").read_bytes() == (tmp_path / "from-experts" / "model.safetensors").read_bytes()
