"""The demo's tiny base model and its domain experts, built deterministically and cached.

The base is pretrained on a mix of every task, compositions included, mostly easy
instances (one digit) and some at full difficulty, so it knows the formats and is
partly able; each expert is fine-tuned from it on its own domain at full difficulty
(with a little replay of the base mix, which keeps it in the base's basin so weight
merging works). The compositional suite needs two domains at full difficulty at once. No model ever trains on a prompt
of the held-out split (``tasks.training_only``).

The experts are independent of each other: the demo trains them in parallel processes
(``build_experts(workers=None)``), one thread each, and the bytes are those of training
them one after another.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.training import build_tokenizer, new_model, save, train

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


def expert_mix(domain: str, spec: dict) -> Callable[[random.Random], tasks.Example]:
    """An expert's training stream: its own domain, and ``replay`` of the base mix."""
    skill = tasks.DOMAINS[domain]

    def sample(rng: random.Random) -> tasks.Example:
        return base_mix(rng, spec["base_hard"]) if rng.random() < spec["replay"] else skill(rng)

    return tasks.training_only(sample)


def build_experts(workdir: Path, progress: Progress | None = None, spec: dict = SPEC, workers: int | None = 1) -> dict[str, Path]:
    """``{"base": dir, "math": dir, ...}``, trained now or reused from ``workdir``.
    ``workers``: processes training experts at once; 1 (the default) trains them here,
    one after another; None, one per core. More than one starts fresh interpreters
    (multiprocessing "spawn"), so a calling script needs ``if __name__ == "__main__":``."""
    workdir = Path(workdir)
    marker = workdir / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) != spec:
        shutil.rmtree(workdir)  # another recipe: start over
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(spec, indent=2))
    paths = {"base": workdir / "base", **{d: workdir / d for d in tasks.DOMAINS}}
    if not (paths["base"] / "config.json").is_file():
        _train_base(paths["base"], spec, progress)
    missing = [d for d in tasks.DOMAINS if not (paths[d] / "config.json").is_file()]
    workers = workers or min(len(missing), os.cpu_count() or 1)
    if workers <= 1 or len(missing) <= 1:
        for domain in missing:
            _train_expert(domain, paths["base"], paths[domain], spec, progress)
    else:
        _train_in_parallel(missing, paths, spec, progress, workers)
    return paths


def _reporter(stage: str, progress: Progress | None) -> Callable[[int, int, float], None] | None:
    return (lambda done, total, loss: progress(stage, done, total)) if progress else None


def _train_base(target: Path, spec: dict, progress: Progress | None) -> None:
    tokenizer = build_tokenizer()
    model = new_model(len(tokenizer), spec["seed"], spec["hidden"], spec["layers"])
    mix = tasks.training_only(lambda rng: base_mix(rng, spec["base_hard"]))
    train(model, tokenizer, mix, spec["base_steps"], seed=spec["seed"] + 1, lr=spec["base_lr"], progress=_reporter("base", progress))
    _save_atomically(model, tokenizer, target)


def _train_expert(domain: str, base: Path, target: Path, spec: dict, progress: Progress | None) -> None:
    from transformers import AutoModelForCausalLM  # heavy: transformers, only when models are built

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = build_tokenizer()
    index = list(tasks.DOMAINS).index(domain)
    train(model, tokenizer, expert_mix(domain, spec), spec["expert_steps"], seed=spec["seed"] + 10 + index,
          lr=spec["expert_lr"], progress=_reporter(domain, progress))
    _save_atomically(model, tokenizer, target)


def _worker(domain: str, base: str, target: str, spec: dict, updates) -> None:
    """One expert in a worker process; its progress, its end or its error go to ``updates``."""
    torch.set_num_threads(1)
    every = max(1, spec["expert_steps"] // 100)  # about a hundred updates per expert

    def report(stage: str, done: int, total: int) -> None:
        if done % every == 0 or done == total:
            updates.put(("progress", stage, done, total))

    try:
        _train_expert(domain, Path(base), Path(target), spec, report)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the group; the parent decides what follows
        _ignore_interrupts()
        updates.put(("interrupted", domain))
        raise SystemExit(1) from None
    except Exception as exc:
        _ignore_interrupts()
        updates.put(("error", domain, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    _ignore_interrupts()
    updates.put(("done", domain))


def _ignore_interrupts() -> None:
    """A worker whose work is over only exits. The parent forwards a Ctrl-C to every worker
    still alive, and a second KeyboardInterrupt during the exit's cleanup would cut short
    the release of the queue's semaphores ("leaked semaphore" warnings)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train_in_parallel(domains: list[str], paths: dict, spec: dict, progress: Progress | None, workers: int) -> None:
    """Trains ``domains`` in at most ``workers`` processes at once. A worker's error, or
    Ctrl-C, stops the other workers at once and is raised here."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked copy of threads or open nodes
    updates = context.Queue()
    waiting, running = list(domains), {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                domain = waiting.pop(0)
                running[domain] = context.Process(target=_worker, args=(domain, str(paths["base"]), str(paths[domain]), spec, updates),
                                                  name=f"hivemerge-expert-{domain}", daemon=True)
                running[domain].start()
            try:
                message = updates.get(timeout=1.0)
            except queue.Empty:
                dead = [d for d, p in running.items() if p.exitcode not in (None, 0)]
                if dead:  # killed without a word (out of memory, a signal)
                    raise RuntimeError(f"training the {dead[0]} expert: its process ended with exit code {running[dead[0]].exitcode}")
                continue
            if message[0] == "progress" and progress:
                progress(*message[1:])
            elif message[0] == "done":
                running.pop(message[1]).join()
            elif message[0] == "error":
                raise RuntimeError(f"training the {message[1]} expert: {message[2]}")
            elif message[0] == "interrupted":
                raise KeyboardInterrupt
    finally:
        # Interrupted like a Ctrl-C, a worker ends cleanly (its semaphores released); one
        # that does not within seconds is terminated.
        for process in running.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in running.values():
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
        updates.close()
        updates.join_thread()


def _save_atomically(model, tokenizer, target: Path) -> None:
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save(model, tokenizer, staging)
    staging.rename(target)
