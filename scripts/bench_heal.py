#!/usr/bin/env python
"""Healing a weight merge with the experts' own distributions (issue 6's domain goal).

At the demo's scale a weight merge loses part of each skill the base lacked (the
demo's consensus: math 7 points, logic 13.5 points below their experts). This script
measures what distribution-based fusion does when its pivot is that weight merge
rather than the base: every expert publishes its signed logit pack on a probe of its
own domain (training split, reference answers), and the merge is distilled on the
fused distributions, held to itself on a replay set (prompts of every suite, compose
included, answered greedily by the merge itself: no labels). It runs the same code
as ``hivemerge merge``, ``hivemerge pack make`` and ``hivemerge fuse --pivot MERGED``,
then evaluates base, experts, merge and healed merge on the held-out suites, and
states issue 6's goals: each domain within 5 points of its expert, compose above
every expert.

This is offline (one machine runs the distillation). In a round, a fusion step with
``pivot: merge`` does the same (docs/fusion.md: Fusion in merge rounds).

    python scripts/bench_heal.py [--workdir ~/.cache/hivemerge/heal] [--steps 800] [--lam 0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hivemerge.merge.engine import run_merge
from hivemerge.merge.evaluation.evaluate import evaluate
from hivemerge.merge.fusion.distill import DistillConfig, fuse_into_pivot
from hivemerge.merge.fusion.packs import PackFile, make_pack
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.recipe import validate_recipe
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.experts import build_experts
from hivemerge.node.demo import ROUND_RECIPE, shipped_models, write_probe_and_replay
from hivemerge.protocol.identity import Identity

SUITES = list(tasks.SUITES)
DOMAINS = list(tasks.DOMAINS)
GOAL_POINTS = 5.0  # issue 6: each domain within this many points of its expert


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def merge_recipe(models: dict[str, Path]) -> dict:
    """The demo round's recipe (its per-domain weights) over the experts' model directories."""
    per_domain = ROUND_RECIPE.get("domain_parameters", {})
    return {
        "merge_method": ROUND_RECIPE["merge_method"], "base_model": str(models["base"]),
        "models": [{"model": str(models[d]), "parameters": {**ROUND_RECIPE["parameters"], **per_domain.get(d, {})}}
                   for d in DOMAINS],
        "dtype": ROUND_RECIPE["dtype"], "out_dtype": ROUND_RECIPE["out_dtype"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "hivemerge" / "heal")
    parser.add_argument("--demo-models", type=Path, default=None,
                        help="trained (or reused) here with the demo's spec; default: the models shipped with hivemerge")
    parser.add_argument("--probe", type=int, default=1000, help="probe examples per domain (training split)")
    parser.add_argument("--replay", type=int, default=900, help="replay prompts (every suite, training split)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--method", default="mince")
    parser.add_argument("--lam", type=float, default=DistillConfig.lam)
    parser.add_argument("--steps", type=int, default=DistillConfig.steps)
    parser.add_argument("--lr", type=float, default=DistillConfig.lr)
    parser.add_argument("--batch", type=int, default=DistillConfig.batch)
    parser.add_argument("--replay-share", type=float, default=DistillConfig.replay_share)
    parser.add_argument("--count", type=int, default=200, help="held-out examples per suite")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.workdir.expanduser()
    work.mkdir(parents=True, exist_ok=True)

    say("demo base and experts (cached)")
    models = (build_experts(args.demo_models.expanduser()) if args.demo_models else shipped_models())
    t = time.perf_counter()
    merged = run_merge(validate_recipe(merge_recipe(models)), work / "merged", device="cpu", overwrite=True).out_dir
    say(f"weight merge ({ROUND_RECIPE['merge_method']}, the demo round's weights) in {time.perf_counter() - t:.1f}s")

    # the demo's probe and replay writer; the replay answers are the merge's own here
    probe, replay = write_probe_and_replay(work, merged, args.probe, args.replay, seed="heal-probe")

    owner = Identity.generate()  # in a network each expert's owner signs its own pack
    t = time.perf_counter()
    packs = [PackFile(make_pack(models[d], probe, work / f"{d}.pack.safetensors", owner, top_k=args.top_k).path) for d in DOMAINS]
    pack_seconds = time.perf_counter() - t
    config = DistillConfig(lam=args.lam, steps=args.steps, lr=args.lr, batch=args.batch, replay_share=args.replay_share)
    t = time.perf_counter()
    report = fuse_into_pivot(merged, packs, probe, work / "healed", args.method, config, overwrite=True, replay=replay)
    fuse_seconds = time.perf_counter() - t
    say(f"packs in {pack_seconds:.1f}s; distilled {args.steps} steps in {fuse_seconds:.1f}s; probe loss "
        f"{report.before['lm']:.3f} -> {report.after['lm']:.3f} (reference)")

    say("evaluating")
    rows = {}
    for name, directory in [("base", models["base"]), *[(d, models[d]) for d in DOMAINS], ("weight merge", merged),
                            ("healed merge", work / "healed")]:
        model, tokenizer = load_causal_lm(directory)
        rows[name] = {s: evaluate(model, tokenizer, s, args.count).accuracy for s in SUITES}
    print(f"\naccuracy % on {args.count} held-out examples per suite")
    print("| model | " + " | ".join(SUITES) + " |\n| --- |" + " ---: |" * len(SUITES))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * row[s]:.1f}" for s in SUITES) + " |")
    goals = {}
    for name in ("weight merge", "healed merge"):
        gaps = {d: round(100 * (rows[d][d] - rows[name][d]), 1) for d in DOMAINS}
        best_compose = max(rows[d]["compose"] for d in DOMAINS)
        goals[name] = {"points_below_expert": gaps, "domains_met": max(gaps.values()) <= GOAL_POINTS,
                       "compose_met": rows[name]["compose"] > best_compose}
        print(f"{name}: points below each expert " + ", ".join(f"{d} {g:+.1f}" for d, g in gaps.items())
              + f" (goal <= {GOAL_POINTS:g}: {'met' if goals[name]['domains_met'] else 'NOT met'}); compose "
              + f"{100 * rows[name]['compose']:.1f} vs best expert {100 * best_compose:.1f} "
              + f"({'met' if goals[name]['compose_met'] else 'NOT met'})")
    print(f"total {time.perf_counter() - started:.0f}s")
    (work / "results.json").write_text(json.dumps({
        "rows": rows, "goals": goals, "seconds": {"packs": pack_seconds, "distill": fuse_seconds},
        "report": report.as_dict(), "args": {k: str(v) for k, v in vars(args).items()},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
