"""The demo's tiny base model and its domain experts, built deterministically and cached.

The base is pretrained on a mix of every task, compositions included, mostly easy
instances (one digit) and some at full difficulty, so it knows the formats and is
partly able; each expert is fine-tuned from it on its own domain at full difficulty
(with a little replay of the base mix, which keeps it in the base's basin so weight
merging works). The compositional suite needs two domains at full difficulty at once. No model ever trains on a prompt
of the held-out split (``tasks.training_only``).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hivemerge.merge import tasks
from hivemerge.merge.training import build_tokenizer, new_model, save, train

# Everything that decides the models' bytes; a change makes a new cache entry.
SPEC = {
    "version": 3,  # 2: training never draws a held-out prompt; 3: a partly able base
    "hidden": 128,
    "layers": 4,
    "base_steps": 1500,
    "base_hard": 0.3,  # share of full-difficulty instances in the base mix
    "expert_steps": 600,
    "base_lr": 3e-3,
    "expert_lr": 5e-4,
    "replay": 0.2,
    "seed": 0,
}

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def base_mix(rng: random.Random, hard: float = SPEC["base_hard"]) -> tasks.Example:
    full = rng.random() < hard
    r = rng.random()
    if r < 0.25:
        return tasks.math_task(rng, 2 if full else 1)
    if r < 0.5:
        return tasks.strings_task(rng, 4 if full else 3)
    if r < 0.75:
        return tasks.logic_task(rng, 2 if full else 1)
    return tasks.compose_task(rng, 2 if full else 1)


def build_experts(workdir: Path, progress: Progress | None = None, spec: dict = SPEC) -> dict[str, Path]:
    """``{"base": dir, "math": dir, ...}``, trained now or reused from ``workdir``."""
    from transformers import AutoModelForCausalLM

    workdir = Path(workdir)
    marker = workdir / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) != spec:
        shutil.rmtree(workdir)  # another recipe: start over
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(spec, indent=2))
    torch.manual_seed(spec["seed"])
    tokenizer = build_tokenizer()
    paths = {"base": workdir / "base"}

    def report(stage: str) -> Callable[[int, int, float], None] | None:
        return (lambda done, total, loss: progress(stage, done, total)) if progress else None

    if not (paths["base"] / "config.json").is_file():
        model = new_model(len(tokenizer), spec["seed"], spec["hidden"], spec["layers"])
        mix = lambda rng: base_mix(rng, spec["base_hard"])  # noqa: E731
        train(model, tokenizer, tasks.training_only(mix), spec["base_steps"], seed=spec["seed"] + 1, lr=spec["base_lr"], progress=report("base"))
        _save_atomically(model, tokenizer, paths["base"])
    for i, domain in enumerate(tasks.DOMAINS):
        paths[domain] = workdir / domain
        if (paths[domain] / "config.json").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        skill = tasks.DOMAINS[domain]

        def sample(rng: random.Random, skill=skill) -> tasks.Example:
            return base_mix(rng, spec["base_hard"]) if rng.random() < spec["replay"] else skill(rng)

        train(model, tokenizer, tasks.training_only(sample), spec["expert_steps"], seed=spec["seed"] + 10 + i, lr=spec["expert_lr"],
              progress=report(domain))
        _save_atomically(model, tokenizer, paths[domain])
    return paths


def _save_atomically(model, tokenizer, target: Path) -> None:
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save(model, tokenizer, staging)
    staging.rename(target)
