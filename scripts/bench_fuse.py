#!/usr/bin/env python
"""Benchmark of heterogeneous fusion (issue 7): a GPT-2 with its own byte-level BPE
tokenizer, trained on a domain the demo's models lack, fused into the demo's base.

The domain is ``rotate`` (``arm 48213=`` -> ``82134``). The script builds (or reuses)
the demo's base and experts (``~/.cache/hivemerge/demo/models``) and the GPT-2 expert
(``--workdir``), writes a probe set drawn from rotate's training split and a replay set
(prompts of the base's own domains, training split, answered by the base itself: no
labels), makes the expert's signed pack, fuses it into the base (the pivot) through
the same code path as ``hivemerge fuse``, rebuilds the fused model from its signed
delta, and evaluates pivot, expert and fused models on held-out suites. Goal: the fused
pivot closes at least half of the accuracy gap between the pivot and the expert on
rotate, and loses at most 2 points on math, strings, logic and compose.

    python scripts/bench_fuse.py [--workdir ~/.cache/hivemerge/fuse] [--ablation]

``--ablation`` adds the same run with lambda = 1 (reference tokens only, the expert's
distributions unused) and with lambda = 0 (the distributions only).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from hivemerge.merge.deltas.delta import apply_delta
from hivemerge.merge.evaluation.evaluate import evaluate, greedy_answers
from hivemerge.merge.fusion.distill import DistillConfig, fuse_into_pivot
from hivemerge.merge.fusion.packs import PackFile, make_pack
from hivemerge.merge.fusion.probe import write_probe
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.merge.toy import hetero, tasks
from hivemerge.merge.toy.experts import build_experts
from hivemerge.node.demo import shipped_models
from hivemerge.protocol.identity import Identity

SUITES = list(tasks.SUITES)


def say(message: str) -> None:
    print(f"> {message}", flush=True)


def evaluate_row(directory: Path, held: list[tasks.Example], suites: bool, count: int) -> dict:
    model, tokenizer = load_causal_lm(directory)
    row = {hetero.DOMAIN: {"accuracy": hetero.greedy_accuracy(model, tokenizer, held),
                           "loss": hetero.response_loss(model, tokenizer, held)}}
    if suites:
        for s in SUITES:
            r = evaluate(model, tokenizer, s, count)
            row[s] = {"accuracy": r.accuracy, "loss": r.loss}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "hivemerge" / "fuse")
    parser.add_argument("--demo-models", type=Path, default=None,
                        help="trained (or reused) here with the demo's spec; default: the models shipped with hivemerge")
    parser.add_argument("--expert-steps", type=int, default=800)
    parser.add_argument("--probe", type=int, default=1000, help="probe examples (rotate, training split)")
    parser.add_argument("--replay", type=int, default=1000, help="replay examples (the base's domains)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--method", default="mince")
    parser.add_argument("--lam", type=float, default=DistillConfig.lam)
    parser.add_argument("--steps", type=int, default=DistillConfig.steps)
    parser.add_argument("--lr", type=float, default=DistillConfig.lr)
    parser.add_argument("--batch", type=int, default=DistillConfig.batch)
    parser.add_argument("--replay-share", type=float, default=DistillConfig.replay_share)
    parser.add_argument("--count", type=int, default=200, help="held-out examples per suite")
    parser.add_argument("--ablation", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.workdir.expanduser()
    work.mkdir(parents=True, exist_ok=True)

    say("demo base and experts (cached)")
    pivot = (build_experts(args.demo_models.expanduser()) if args.demo_models else shipped_models())["base"]
    say(f"GPT-2 rotate expert ({args.expert_steps} steps, cached)")
    expert = hetero.build_hetero_expert(work / "gpt2-rotate", steps=args.expert_steps)

    probe = write_probe([(e.prompt, e.answer + "\n") for e in hetero.training_examples(args.probe, seed=7)], work / "probe.jsonl")
    rng = random.Random("replay")
    draws = [tasks.training_only(tasks.SUITES[s]) for s in SUITES]
    prompts = [draws[i % len(draws)](rng).prompt for i in range(args.replay)]
    base_model, base_tok = load_causal_lm(pivot)
    with single_thread():
        answers = greedy_answers(base_model, base_tok, prompts)
    replay = write_probe([(p, a + "\n") for p, a in zip(prompts, answers)], work / "replay.jsonl")

    alice = Identity.generate()
    pack_report = make_pack(expert, probe, work / "rotate.pack.safetensors", alice, top_k=args.top_k)
    say(f"pack {pack_report.pack_id[:12]}: {pack_report.bytes:,} bytes for {pack_report.tokens:,} tokens "
        f"({pack_report.bytes_per_token:.1f} bytes/token, top-{args.top_k}) in {pack_report.seconds:.1f}s")

    runs = {"fused": args.lam}
    if args.ablation:
        runs.update({"lambda=1 (labels only)": 1.0, "lambda=0 (distributions only)": 0.0})
    reports = {}
    for name, lam in runs.items():
        config = DistillConfig(lam=lam, steps=args.steps, lr=args.lr, batch=args.batch, replay_share=args.replay_share)
        out = work / ("fused" if name == "fused" else f"fused-lam{lam:g}")
        t = time.perf_counter()
        reports[name] = fuse_into_pivot(pivot, [PackFile(pack_report.path)], probe, out, args.method, config, alice,
                                        out.with_name(out.name + ".delta.safetensors"), overwrite=True, replay=replay)
        say(f"{name}: distilled {args.steps} steps in {time.perf_counter() - t:.0f}s; coverage "
            f"{reports[name].coverage['covered']}/{reports[name].coverage['tokens']}")
    apply_delta(pivot, reports["fused"].delta_path, work / "fused-from-delta", overwrite=True)

    say("evaluating")
    held = hetero.held_out(args.count)
    rows = {"pivot (demo base)": evaluate_row(pivot, held, True, args.count),
            "GPT-2 rotate expert": evaluate_row(expert, held, False, args.count)}
    for name in runs:
        rows[name] = evaluate_row(reports[name].out_dir, held, True, args.count)
    rows["fused, from its int8 delta"] = evaluate_row(work / "fused-from-delta", held, True, args.count)

    cols = [hetero.DOMAIN] + SUITES
    print(f"\naccuracy % (loss) on {args.count} held-out examples per suite")
    print("| model | " + " | ".join(cols) + " |\n| --- |" + " ---: |" * len(cols))
    for name, row in rows.items():
        cells = [f"{100 * row[c]['accuracy']:.1f} ({row[c]['loss']:.2f})" if c in row else "-" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    p, e = rows["pivot (demo base)"], rows["GPT-2 rotate expert"]
    gap = e[hetero.DOMAIN]["accuracy"] - p[hetero.DOMAIN]["accuracy"]
    summary = {}
    for name in [*runs, "fused, from its int8 delta"]:
        f = rows[name]
        closed = (f[hetero.DOMAIN]["accuracy"] - p[hetero.DOMAIN]["accuracy"]) / gap if gap > 0 else float("nan")
        cost = {s: round(100 * (p[s]["accuracy"] - f[s]["accuracy"]), 1) for s in SUITES}
        summary[name] = {"gap_closed": round(closed, 3), "cost_points": cost}
        print(f"{name}: closes {100 * closed:.0f}% of the rotate gap; cost in points (positive = worse): "
              + ", ".join(f"{s} {c:+.1f}" for s, c in cost.items()))
    ok = summary["fused"]["gap_closed"] >= 0.5 and max(summary["fused"]["cost_points"].values()) <= 2.0
    print(f"goal (>= 50% of the gap, <= 2 points on every other suite): {'met' if ok else 'NOT met'}")
    print(f"pack: {pack_report.bytes_per_token:.1f} bytes per token; total {time.perf_counter() - started:.0f}s")
    (work / "results.json").write_text(json.dumps({
        "rows": rows, "summary": summary, "pack": {"bytes": pack_report.bytes, "tokens": pack_report.tokens,
                                                    "bytes_per_token": pack_report.bytes_per_token},
        "reports": {n: r.as_dict() for n, r in reports.items()}, "args": {k: str(v) for k, v in vars(args).items()},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
