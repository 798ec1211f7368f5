"""Output bytes are a pure function of the recipe and the inputs: the same on every run
and for any thread count."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_RECIPES, write_tensors
from safetensors.torch import load_file

from hivemerge.merge.engine import run_merge
from hivemerge.merge.recipe import load_recipe, validate_recipe

METHODS = sorted(FAMILY_RECIPES)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("method", METHODS)
def test_cli_merge_succeeds(family_merges, method):
    for variant in ("threads1", "threads2"):
        _, out, proc = family_merges[(method, variant)]
        assert proc.returncode == 0, proc.stderr
        assert f"with {method} on cpu" in proc.stderr
        assert "Traceback" not in proc.stderr
        files = {p.name for p in out.iterdir()}
        assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= files
        assert not list(out.parent.glob(f".{out.name}.partial-*"))  # no staging left behind


@pytest.mark.parametrize("method", METHODS)
def test_same_bytes_with_one_and_two_threads(family_merges, method):
    one = digests(family_merges[(method, "threads1")][1])
    two = digests(family_merges[(method, "threads2")][1])
    assert one == two


def test_fresh_processes_give_the_same_bytes(family_merges):
    """``python -m hivemerge merge --threads 1`` and ``--threads 2`` in new interpreters."""
    runs = [family_merges[("ties", v)] for v in ("fresh1", "fresh2", "threads1")]
    for _, _, proc in runs:
        assert proc.returncode == 0, proc.stderr
    assert digests(runs[0][1]) == digests(runs[1][1]) == digests(runs[2][1])


@pytest.mark.parametrize("method", METHODS)
def test_same_bytes_again_in_process(family_merges, method, tmp_path):
    recipe, out, _ = family_merges[(method, "threads1")]
    run_merge(load_recipe(recipe), tmp_path / "again", device="cpu")
    assert digests(tmp_path / "again") == digests(out)


@pytest.mark.parametrize("method", METHODS)
def test_merge_is_not_trivial(family_merges, tiny_family, method):
    """The compared outputs really are merges: different from every input."""
    out = load_file(str(family_merges[(method, "threads1")][1] / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    for model in tiny_family.values():
        source = load_file(str(model / "model.safetensors"))[name]
        assert not torch.equal(out[name].float(), source)
    expected_dtype = {"dare_ties": torch.bfloat16, "model_stock": torch.float16}.get(method, torch.float32)
    assert all(t.dtype == expected_dtype for t in out.values())
    config = json.loads((family_merges[(method, "threads1")][1] / "config.json").read_text())
    assert config["dtype"] == str(expected_dtype).removeprefix("torch.")


def _wide_family(root: Path) -> dict[str, str]:
    """Tensors large enough (2**16 elements) that torch splits elementwise work across threads."""
    g = torch.Generator().manual_seed(11)
    base = {"big": torch.randn(1 << 16, generator=g), "mat": torch.randn(256, 384, generator=g)}
    dirs = {"base": str(write_tensors(root / "base", base))}
    for i in range(3):
        dirs[f"m{i}"] = str(write_tensors(root / f"m{i}", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}))
    return dirs


WIDE = {
    "ties": {"parameters": {}, "model": {"weight": 0.7, "density": 0.37}},
    "ties@bfloat16": {"parameters": {}, "model": {"weight": 0.7, "density": 0.37}, "dtype": "bfloat16"},
    "dare_ties": {"parameters": {"rescale": True}, "model": {"weight": 0.7, "density": 0.37}},
    "breadcrumbs_ties": {"parameters": {}, "model": {"weight": 0.7, "density": 0.37, "gamma": 0.05}},
    "model_stock": {"parameters": {"filter_wise": True}, "model": {}},
    "slerp": {"parameters": {"t": 0.35}, "model": {}},
}


@pytest.mark.parametrize("method", sorted(WIDE))
def test_wide_tensors_same_bytes_for_thread_counts(tmp_path, method):
    dirs = _wide_family(tmp_path)
    spec = WIDE[method]
    experts = ["m0"] if method == "slerp" else ["m0", "m1", "m2"]
    doc = {
        "merge_method": method.split("@")[0],
        "base_model": dirs["base"],
        "models": [{"model": dirs[e], "parameters": spec["model"]} for e in experts],
        "parameters": spec["parameters"],
        "dtype": spec.get("dtype", "float32"),
    }
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out = tmp_path / f"out{len(outputs)}"
            run_merge(validate_recipe(doc), out, device="cpu")
            outputs.append(digests(out))
    finally:
        torch.set_num_threads(before)
    assert outputs[0] == outputs[1] == outputs[2]
