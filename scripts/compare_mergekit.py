#!/usr/bin/env python3
"""hivemerge's merge methods against mergekit 0.1.5's, recipe for recipe (issue 22).

For each of three architectures -- tiny random Llama, Qwen2 and Gemma2 models made with
transformers (float32; hidden 64, 2 layers, vocab 256), a base and three experts (the
base plus N(0, 0.01) noise on every tensor, seeded) -- and each method, one recipe
(dtype and out_dtype float32) is merged by hivemerge in this process and by
`mergekit-yaml` in mergekit's own venv (created on first use with torch 2.13.0 first,
then mergekit 0.1.5; see scripts/bench_merge.py). Printed per method: the worst relative
difference over every tensor of every architecture, max |hivemerge - mergekit| /
max |mergekit| per tensor, and how many entries differ by more than 1e-5 of that scale
(arcee_fusion: the few whose importance rounds to either side of its threshold, the KL
being float64 here and float32 in mergekit).

The random-drop methods (dare_*, della*) draw their masks from different generators
(hivemerge's keyed stream, mergekit's torch.bernoulli), so they are compared in
distribution: the fraction of each expert's task-vector entries a method keeps is
measured on a one-expert recipe (weight 1, no rescale), where an entry is kept exactly
when the output differs from the base; printed for both tools beside the expected value.

    python scripts/compare_mergekit.py [--workdir /tmp/hm-compare] [--mergekit-venv DIR] [--methods ties,sce]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # its mergekit venv

from hivemerge.merge.engine import run_merge
from hivemerge.merge.recipe import validate_recipe

F32 = {"dtype": "float32", "out_dtype": "float32"}
W3 = [1.0, 0.5, 0.8]


def recipes(m: dict) -> dict[str, dict]:
    """Method -> recipe over the paths in ``m`` (base, e1, e2, e3)."""
    experts = [m["e1"], m["e2"], m["e3"]]

    def with_base(method, params=None, per_model=None, base=True, models=experts):
        doc = {"merge_method": method, **F32, "models": [{"model": str(p), **({"parameters": per_model[i]} if per_model else {})}
                                                        for i, p in enumerate(models)]}
        if base:
            doc["base_model"] = str(m["base"])
        if params:
            doc["parameters"] = params
        return doc

    weights = [{"weight": w} for w in W3]
    dens = [{"weight": w, "density": d} for w, d in zip(W3, (0.5, 0.3, 0.7))]
    crumbs = [{"weight": w, "density": 0.6, "gamma": 0.05} for w in W3]
    return {
        "linear": with_base("linear", per_model=weights, base=False),
        "task_arithmetic": with_base("task_arithmetic", {"lambda": 0.9}, weights),
        "ties": with_base("ties", None, dens),
        "ties+rescale": with_base("ties", {"rescale": True}, dens),
        "breadcrumbs": with_base("breadcrumbs", None, crumbs),
        "breadcrumbs_ties": with_base("breadcrumbs_ties", None, crumbs),
        "slerp": with_base("slerp", {"t": 0.3}, models=[m["base"], m["e1"]]),
        "nuslerp": with_base("nuslerp", None, [{"weight": 0.4}, {"weight": 0.6}], base=False, models=[m["e1"], m["e2"]]),
        "nuslerp+base,rows": with_base("nuslerp", {"nuslerp_flatten": False}, [{"weight": 0.4}, {"weight": 0.6}],
                                       models=[m["e1"], m["e2"]]),
        "multislerp": with_base("multislerp", None, weights),
        "karcher": with_base("karcher", None, base=False),
        "nearswap": with_base("nearswap", {"t": 0.005}, models=[m["e1"]]),
        "arcee_fusion": with_base("arcee_fusion", models=[m["e1"]]),
        "sce": with_base("sce", {"select_topk": 0.5}),
        "model_stock": with_base("model_stock"),
        "ram": with_base("ram", {"epsilon": 0.01}),
        "ramplus_tl": with_base("ramplus_tl", {"epsilon": 0.01, "r": 0.5, "alpha": 0.4}),
    }


RANDOM = {  # method -> (per-model parameters of a one-expert recipe, expected kept fraction)
    "dare_linear": ({"weight": 1.0, "density": 0.3}, 0.3),
    "dare_ties": ({"weight": 1.0, "density": 0.3}, 0.3),
    "della": ({"weight": 1.0, "density": 0.4, "epsilon": 0.2}, 0.4),
    "della_linear": ({"weight": 1.0, "density": 0.4, "epsilon": 0.2}, 0.4),
}


def build(arch: str, root: Path) -> dict[str, Path]:
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    config, cls = {"llama": (LlamaConfig(**common), LlamaForCausalLM), "qwen2": (Qwen2Config(**common), Qwen2ForCausalLM),
                   "gemma2": (Gemma2Config(**common, head_dim=16), Gemma2ForCausalLM)}[arch]
    paths = {n: root / arch / n for n in ("base", "e1", "e2", "e3")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    base = cls(config)
    base.save_pretrained(paths["base"])
    for i, name in enumerate(("e1", "e2", "e3")):
        g = torch.Generator().manual_seed(100 + i)
        expert = cls(config)
        expert.load_state_dict({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.state_dict().items()})
        expert.save_pretrained(paths[name])
    return paths


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hivemerge(doc: dict, out: Path) -> dict[str, torch.Tensor]:
    shutil.rmtree(out, ignore_errors=True)
    run_merge(validate_recipe(doc), out, device="cpu")
    return tensors(out)


def mergekit(exe: Path, doc: dict, out: Path) -> dict[str, torch.Tensor] | str:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.with_suffix(".yaml")
    recipe.write_text(json.dumps(doc))  # JSON is YAML
    proc = subprocess.run([str(exe), str(recipe), str(out), "--device", "cpu"], capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return tensors(out)


def worst_relative(a: dict, b: dict) -> tuple[float, int, int]:
    """The worst relative difference, and how many entries differ by more than 1e-5 of their tensor's scale, of how many."""
    worst, differing, total = 0.0, 0, 0
    for name, x in b.items():
        y = a[name].float()
        scale = float(x.float().abs().max()) or 1.0
        gap = (y - x.float()).abs()
        worst = max(worst, float(gap.max()) / scale)
        differing += int((gap > 1e-5 * scale).sum())
        total += x.numel()
    return worst, differing, total


def kept_fraction(merged: dict, base: dict) -> float:
    kept = total = 0
    for name, x in merged.items():
        if x.dim() >= 2:  # weights; 1-D norms are few
            kept += int((x != base[name]).sum())
            total += x.numel()
    return kept / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-compare"))
    parser.add_argument("--mergekit-venv", type=Path, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    args = parser.parse_args()
    exe = bench_merge.ensure_mergekit((args.mergekit_venv or args.workdir / "mergekit-venv").resolve())
    wanted = set(args.methods.split(",")) if args.methods else None
    worst: dict[str, tuple | str] = {}
    kept: dict[str, list] = {}
    started = time.time()
    for arch in ("llama", "qwen2", "gemma2"):
        models = build(arch, args.workdir / "models")
        base = tensors(models["base"])
        for method, doc in recipes(models).items():
            if wanted and method.split("+")[0] not in wanted:
                continue
            theirs = mergekit(exe, doc, args.workdir / "out" / arch / f"{method}-mergekit")
            if isinstance(theirs, str):
                worst[method] = f"mergekit failed: {theirs}"
                continue
            ours = hivemerge(doc, args.workdir / "out" / arch / f"{method}-hivemerge")
            if isinstance(worst.get(method), str):
                continue
            rel, differing, total = worst_relative(ours, theirs)
            before = worst.get(method, (0.0, 0, 0))
            worst[method] = (max(before[0], rel), before[1] + differing, before[2] + total)
        for method, (params, expected) in RANDOM.items():
            if wanted and method not in wanted:
                continue
            doc = {"merge_method": method, **F32, "base_model": str(models["base"]), "parameters": {"rescale": False},
                   "models": [{"model": str(models["e1"]), "parameters": params}]}
            theirs = mergekit(exe, doc, args.workdir / "out" / arch / f"{method}-mergekit")
            ours = hivemerge(doc, args.workdir / "out" / arch / f"{method}-hivemerge")
            kept.setdefault(method, []).append((arch, expected, kept_fraction(ours, base),
                                                theirs if isinstance(theirs, str) else kept_fraction(theirs, base)))
    print(f"\nhivemerge vs mergekit {bench_merge.MERGEKIT_VERSION}, float32, tiny Llama/Qwen2/Gemma2 ({time.time() - started:.0f} s)\n")
    print("| method | worst relative difference | entries off by > 1e-5 |\n| --- | ---: | ---: |")
    for method, value in worst.items():
        shown = value if isinstance(value, str) else f"{value[0]:.2e} | {value[1]} of {value[2]}"
        print(f"| {method} | {shown} |")
    if kept:
        print("\n| random method | model | expected kept | hivemerge | mergekit |\n| --- | --- | ---: | ---: | ---: |")
        for method, rows in kept.items():
            for arch, expected, ours, theirs in rows:
                theirs = theirs if isinstance(theirs, str) else f"{theirs:.4f}"
                print(f"| {method} | {arch} | {expected:.4f} | {ours:.4f} | {theirs} |")
    failed = [m for m, v in worst.items() if isinstance(v, str) or not math.isfinite(v[0]) or v[0] > 1e-5]
    print(f"\nmethods over 1e-5 or failed: {', '.join(failed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
