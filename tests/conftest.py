"""Shared fixtures: tiny models made on the spot, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(directory)


def make_llama(directory: Path, seed: int, base: Path | None = None, scale: float = 0.02, layers: int = 2) -> Path:
    """A tiny random Llama saved as safetensors; with ``base``, a perturbed copy of it (an 'expert')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config) if base is None else perturbed_copy(base, scale)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def perturbed_copy(base: Path, scale: float):
    """The Llama saved in ``base`` with Gaussian noise of std ``scale`` added to every
    weight (from torch's current seed): a stand-in expert."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A model directory holding exactly ``tensors`` (for hand-computed method tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three experts fine-tuned from it (random perturbations)."""
    root = tmp_path_factory.mktemp("family")
    base = make_llama(root / "base", seed=0)
    family = {"base": base}
    for i, name in enumerate(["math", "code", "logic"]):
        family[name] = make_llama(root / name, seed=100 + i, base=base)
    return family


# -- helpers shared by the merge-engine tests ------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def merge_doc(document: dict, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Validate ``document``, merge it in this process on the CPU, return the output tensors."""
    from safetensors.torch import load_file

    from hivemerge.merge.engine import run_merge
    from hivemerge.merge.recipe import validate_recipe

    run_merge(validate_recipe(document), out, device="cpu", **kwargs)
    return load_file(str(out / "model.safetensors"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120):
    """``python -m hivemerge ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "hivemerge", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def run_cli_many(argvs: dict, cwd: Path | None = None, workers: int = 2) -> dict:
    """Several CLI runs, a few at a time (each spends most of its time importing torch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(run_cli, *argv, cwd=cwd) for key, argv in argvs.items()}
        return {key: f.result() for key, f in futures.items()}


def loop_calls(monkeypatch, names=("mix", "task_vector", "ternary_span")) -> dict[str, int]:
    """How often each fused loop (merge/numerics/kernels.py) runs from now on: a comparison
    of the loops and the torch operations that never ran the loops would prove nothing."""
    from hivemerge.merge.numerics import kernels

    seen = dict.fromkeys(names, 0)
    for name in seen:
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    return seen


def write_recipe(path: Path, document: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def llama4(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer tiny Llama base and one expert, for gradients, filters and per-layer tables."""
    root = tmp_path_factory.mktemp("llama4")
    base = make_llama(root / "base", seed=7, layers=4)
    return {"base": base, "expert": make_llama(root / "expert", seed=8, base=base, scale=0.05, layers=4)}


FAMILY_RECIPES = {
    "ties": lambda f: {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["base"])},
            {"model": str(f["math"]), "parameters": {"weight": 1.0, "density": [0.3, 0.7]}},
            {"model": str(f["code"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.5}], "density": 0.5}},
            {"model": str(f["logic"]), "parameters": {"weight": 0.7, "density": {"per_layer": [0.4, 0.6], "default": 0.5}}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    "dare_ties": lambda f: {
        "merge_method": "dare_ties",
        "base_model": str(f["base"]),
        "seed": 3,
        "models": [
            {"model": str(f["math"]), "parameters": {"weight": 1.0, "density": 0.6}},
            {"model": str(f["code"]), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": str(f["logic"]), "parameters": {"weight": 0.9, "density": 0.45}},
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "slerp": lambda f: {
        "merge_method": "slerp",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["base"])}, {"model": str(f["math"])}],
        "parameters": {"t": [0.1, 0.6, 0.3]},
        "dtype": "float32",
    },
    "model_stock": lambda f: {
        "merge_method": "model_stock",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["math"])}, {"model": str(f["code"])}, {"model": str(f["logic"])}],
        "dtype": "float32",
        "out_dtype": "float16",
    },
    "della": lambda f: {
        "merge_method": "della",
        "base_model": str(f["base"]),
        "seed": 5,
        "models": [
            {"model": str(f["math"]), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.2}},
            {"model": str(f["code"]), "parameters": {"weight": 0.7, "density": 0.4, "epsilon": 0.1}},
        ],
        "dtype": "float32",
    },
    "nuslerp": lambda f: {
        "merge_method": "nuslerp",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["math"]), "parameters": {"weight": 0.3}}, {"model": str(f["code"]), "parameters": {"weight": 0.7}}],
        "parameters": {"nuslerp_flatten": False},
        "dtype": "float32",
    },
    "multislerp": lambda f: {
        "merge_method": "multislerp",
        "base_model": str(f["base"]),
        "models": [{"model": str(f[n]), "parameters": {"weight": w}} for n, w in (("math", 1.0), ("code", 0.5), ("logic", 0.8))],
        "dtype": "float32",
    },
    "karcher": lambda f: {
        "merge_method": "karcher",
        "models": [{"model": str(f["math"])}, {"model": str(f["code"])}, {"model": str(f["logic"])}],
        "dtype": "float32",
    },
    "ramplus_tl": lambda f: {
        "merge_method": "ramplus_tl",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["math"])}, {"model": str(f["code"])}, {"model": str(f["logic"])}],
        "parameters": {"epsilon": 0.001, "r": 0.3},
        "dtype": "float32",
    },
    "sce": lambda f: {
        "merge_method": "sce",
        "base_model": str(f["base"]),
        "models": [{"model": str(f["math"])}, {"model": str(f["code"])}, {"model": str(f["logic"])}],
        "parameters": {"select_topk": 0.5},
        "dtype": "float32",
    },
}


@pytest.fixture(scope="session")
def family_merges(tiny_family, tmp_path_factory) -> dict:
    """The tiny family merged by the CLI, each run a process of its own: every method of
    FAMILY_RECIPES with --threads 1 and --threads 2 and ties once more into small shards
    (forked from one interpreter that imported the CLI: delta_fixtures.CliRunner), and
    ties with --threads 1 and 2 as fresh ``python -m hivemerge`` processes.
    Returns {(method, variant): (recipe path, out dir, result with returncode/stdout/stderr)}."""
    from delta_fixtures import shared_runner

    root = tmp_path_factory.mktemp("family-merges")
    recipes = {m: write_recipe(root / f"{m}.yaml", make(tiny_family)) for m, make in FAMILY_RECIPES.items()}
    argvs, outs = {}, {}
    for method, recipe in recipes.items():
        for threads in (1, 2):
            key = (method, f"threads{threads}")
            outs[key] = root / f"{method}-t{threads}"
            argvs[key] = ["merge", recipe, "--out", outs[key], "--device", "cpu", "--threads", str(threads)]
    key = ("ties", "sharded")
    outs[key] = root / "ties-sharded"
    argvs[key] = ["merge", recipes["ties"], "--out", outs[key], "--max-shard-size", "30KB"]
    fresh = {}
    for threads in (1, 2):
        key = ("ties", f"fresh{threads}")
        outs[key] = root / f"ties-fresh-t{threads}"
        fresh[key] = ["merge", recipes["ties"], "--out", outs[key], "--device", "cpu", "--threads", str(threads)]
    runner = shared_runner(tmp_path_factory)
    results = {key: runner(*argv) for key, argv in argvs.items()}
    results.update(run_cli_many(fresh))
    return {key: (recipes[key[0]], outs[key], results[key]) for key in results}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The session's forked CLI runner (tests/cli_runner.py); a module may define its own."""
    from delta_fixtures import shared_runner

    return shared_runner(tmp_path_factory)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The delta tests' tiny base and expert (delta_fixtures.shared_family)."""
    from delta_fixtures import shared_family

    return shared_family(tmp_path_factory)


# Peak RSS as the process's own memory map counts it (VmHWM, since the last reset):
# ru_maxrss would start at the parent's size at fork.
PEAK_RSS = """
from pathlib import Path

def status_kib(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the present RSS
"""
