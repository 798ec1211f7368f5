"""CPU and GPU merges write the same bytes.

Nodes of one round merge on whatever they have (``--device auto``) and then compare
hashes of the output, so a merge on CUDA must be bit-identical to the CPU's. Every
registered method runs on the tiny family and on large random tensors (where GPU
reductions and selections would take other paths than on the CPU), in the compute
dtypes a recipe can ask for. Those comparisons are skipped where no CUDA device is
present: CI has none, run them on a GPU machine (``python -m pytest -q
tests/test_device_bytes.py``). What runs everywhere: the GPU's ways of a pass (unsplit,
large chunks, no fused loops, no reused buffers: numerics/placement.py) run on the CPU
against the CPU's ways, and a check of the one pitfall found on a GPU: a method that
divides a tensor by a Python number.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_RECIPES, loop_calls, write_tensors
from torch.overrides import TorchFunctionMode

from hivemerge.merge.deltas.codecs import CODECS
from hivemerge.merge.engine import run_merge
from hivemerge.merge.methods import METHODS
from hivemerge.merge.numerics import placement
from hivemerge.merge.recipe import validate_recipe

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Parameters that make each method do its real work (densities below 1, trims, clips).
METHOD_PARAMS = {
    "linear": ({"normalize": True}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.9}]),
    "model_stock": ({}, [{}, {}, {}]),
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.9}]),
    "ties": ({"normalize": True}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.5}, {"weight": 0.9, "density": 0.7}]),
    "dare_linear": ({}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.5}, {"weight": 0.9, "density": 0.7}]),
    "dare_ties": ({}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.5}, {"weight": 0.9, "density": 0.7}]),
    "breadcrumbs": ({}, [{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.6, "density": 0.5, "gamma": 0.1}, {"weight": 0.9, "density": 0.7, "gamma": 0.02}]),
    "breadcrumbs_ties": ({}, [{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.6, "density": 0.5, "gamma": 0.1}, {"weight": 0.9, "density": 0.7, "gamma": 0.02}]),
    "median": ({"lambda": 0.9}, [{}, {}, {}]),
    "trimmed_mean": ({"trim": 0.34}, [{}, {}, {}]),
    "centered_clip": ({"tau": 0.01, "iterations": 3}, [{}, {}, {}]),
    "slerp": ({"t": 0.3}, [{}]),
    "nearswap": ({"t": 0.002}, [{}]),
    "della": ({}, [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}, {"weight": 0.6, "density": 0.5, "epsilon": 0.2},
                   {"weight": 0.9, "density": 0.7, "epsilon": 0.15}]),
    "della_linear": ({}, [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}, {"weight": 0.6, "density": 0.5, "epsilon": 0.2},
                          {"weight": 0.9, "density": 0.7, "epsilon": 0.15}]),
    "sce": ({"select_topk": 0.4}, [{}, {}, {}]),
    "nuslerp": ({"nuslerp_flatten": False}, [{"weight": 0.4}, {"weight": 0.9}]),
    "multislerp": ({}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.9}]),
    "karcher": ({"max_iter": 5}, [{}, {}, {}]),
    "ram": ({"epsilon": 0.002}, [{}, {}, {}]),
    "arcee_fusion": ({}, [{}]),
    "passthrough": ({}, [{}]),
    "ramplus_tl": ({"epsilon": 0.002, "r": 0.3, "alpha": 0.5}, [{}, {}, {}]),
}


def test_every_registered_method_is_covered():
    assert set(METHOD_PARAMS) == set(METHODS)


def recipe_for(method: str, base: Path, experts: list[Path], dtype: str) -> dict:
    global_params, model_params = METHOD_PARAMS[method]
    if method in ("slerp", "nearswap", "arcee_fusion"):
        models = [{"model": str(base)}, {"model": str(experts[0])}]
    else:
        models = [{"model": str(p), "parameters": params} for p, params in zip(experts, model_params)]  # nuslerp: the first 2
    return {
        "merge_method": method, "base_model": str(base), "models": models, "parameters": global_params,
        "dtype": dtype, "out_dtype": "float32" if dtype == "float32" else dtype, "seed": 11,
    }


def digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def merged_on(device: str, document: dict, out: Path) -> str:
    result = run_merge(validate_recipe(document), out, device=device)
    assert result.device == device
    return digest(out)


@pytest.fixture(scope="module")
def large_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base and three experts holding two large tensors (1M and 300k entries, with
    exact ties and zeros) and a small one: big enough for the GPU's multi-block paths."""
    root = tmp_path_factory.mktemp("large")
    gen = torch.Generator().manual_seed(5)
    shapes = {"model.layers.0.mlp.weight": (1024, 1024), "model.layers.1.attn.weight": (300, 1000), "model.norm.weight": (64,)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    experts = []
    for i in range(3):
        tensors = {}
        for k, s in shapes.items():
            delta = torch.randn(s, generator=gen) * 0.01
            delta[..., ::7] = torch.round(delta[..., ::7] * 256) / 256  # many equal magnitudes
            delta[..., ::11] = 0.0
            tensors[k] = base[k] + delta
        experts.append(write_tensors(root / f"expert{i}", tensors))
    return write_tensors(root / "base", base), experts


class NumberDivisions(TorchFunctionMode):
    """Records every division of a tensor by a Python number. CUDA computes ``x / 3.0``
    as ``x * (1 / 3.0)``, two roundings where the CPU has one, so such a division gives
    other bytes on a GPU node (``exact.divide`` divides by a tensor instead)."""

    DIVISIONS = {torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div, torch.Tensor.div_,
                 torch.Tensor.true_divide, torch.Tensor.true_divide_, torch.div, torch.true_divide}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.DIVISIONS:
            divisor = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
                self.seen.append((getattr(func, "__name__", str(func)), divisor))
        return func(*args, **kwargs)


def test_the_division_check_sees_divisions_by_numbers():
    x = torch.ones(4)
    with NumberDivisions() as mode:
        x / 3, x.div(2.5), x.div_(1.5), torch.div(x, 7), x / torch.tensor(3.0)
        x /= 2
    assert [d for _, d in mode.seen] == [3, 2.5, 1.5, 7, 2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_no_method_divides_a_tensor_by_a_number(large_family, tmp_path, method, dtype):
    """Runs on the CPU, so CI keeps the GPU's bytes in step without a GPU."""
    base, experts = large_family
    document = recipe_for(method, base, experts, dtype)
    with NumberDivisions() as mode:
        run_merge(validate_recipe(document), tmp_path / "out", device="cpu")
    assert mode.seen == []


@pytest.mark.parametrize("method, dtype", [(m, "float32") for m in sorted(METHOD_PARAMS)]
                         + [(m, "bfloat16") for m in ("ties", "dare_ties", "breadcrumbs")])
def test_the_gpu_ways_write_the_bytes_of_the_cpu_ways(large_family, tmp_path, monkeypatch, method, dtype):
    """A GPU merge takes other ways than the CPU's (numerics/placement.py): each pass one
    unsplit run over chunks of 2**24 entries, torch operations instead of the fused loops,
    fresh output tensors, a DARE mask drawn in one launch. Taken on the CPU they must write
    the CPU ways' bytes, so the GPU path's logic is checked here without a GPU (what is
    left to a GPU run is CUDA's own arithmetic, checked by the tests above)."""
    base, experts = large_family
    document = recipe_for(method, base, experts, dtype)
    loops = loop_calls(monkeypatch, ("mix", "task_vector", "magnitudes", "high_bit_counts", "finite"))
    cpu_ways = merged_on("cpu", document, tmp_path / "cpu")
    used = sum(loops.values())
    monkeypatch.setattr(placement, "cpu_ways", lambda device: False)
    assert merged_on("cpu", document, tmp_path / "gpu-ways") == cpu_ways
    assert sum(loops.values()) == used  # the GPU's ways ran no fused loop
    assert loops["finite"] > 0, loops  # and the CPU's ran some: the two paths differ
    if dtype == "float32" and method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                         "breadcrumbs_ties", "della", "della_linear"):  # the loops compute in float32
        assert loops["mix"] > 0 and loops["task_vector"] > 0, loops


@needs_cuda
@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_large_tensors_same_bytes_on_cpu_and_cuda(large_family, tmp_path, method):
    base, experts = large_family
    document = recipe_for(method, base, experts, "float32")
    assert merged_on("cpu", document, tmp_path / "cpu") == merged_on("cuda", document, tmp_path / "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "linear", "slerp", "median"])
def test_half_compute_dtypes_same_bytes_on_cpu_and_cuda(large_family, tmp_path, method, dtype):
    base, experts = large_family
    document = recipe_for(method, base, experts, dtype)
    assert merged_on("cpu", document, tmp_path / "cpu") == merged_on("cuda", document, tmp_path / "cuda")


@needs_cuda
@pytest.mark.parametrize("method", sorted(FAMILY_RECIPES))
def test_tiny_llama_family_same_bytes_on_cpu_and_cuda(tiny_family, tmp_path, method):
    document = FAMILY_RECIPES[method](tiny_family)
    assert merged_on("cpu", document, tmp_path / "cpu") == merged_on("cuda", document, tmp_path / "cuda")


@needs_cuda
@pytest.mark.parametrize("codec", sorted(n for n in CODECS if n != "same"))  # "same" is chosen per tensor, not by name
def test_delta_inputs_same_bytes_on_cpu_and_cuda(family, tmp_path, codec):
    """Deltas are decoded on the CPU and merged on the device, as a node merges a round."""
    from hivemerge.merge.deltas.delta import extract_delta

    delta = tmp_path / f"expert.{codec}.delta.safetensors"
    extract_delta(family.base, family.expert, delta, family.alice, codec)
    document = {
        "merge_method": "ties", "base_model": str(family.base), "dtype": "float32", "parameters": {"normalize": True},
        "models": [{"model": str(delta), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(family.expert2), "parameters": {"weight": 0.7, "density": 0.5}}],
    }
    assert merged_on("cpu", document, tmp_path / "cpu") == merged_on("cuda", document, tmp_path / "cuda")
