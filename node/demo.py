"""``hivemerge demo``: the whole mission on this machine, nothing downloaded.

Uses the tiny base and domain experts shipped with the package (``demo_models/``, trained
by :func:`hivemerge.merge.toy.experts.build_experts` from its ``SPEC``; ``retrain`` builds
them again in the cache instead), starts a local network of real nodes on
loopback (one per expert plus one that only fetches), publishes the experts and each
expert's logit pack on a probe of its own domain, runs a merge round whose fusion step
heals the weight merge with those packs (``pivot: merge``, docs/fusion.md: Fusion in merge
rounds), fetches the consensus model on the fetch-only node, evaluates base, experts
and consensus on every suite, and writes the table as JSON and a plot. Every node it
started is stopped on the way out, Ctrl-C included.

What is the same on every machine: the shipped models' bytes (so the base and expert
rows), the experts' deltas and the round's plain weight merge (the engine is bitwise
deterministic: its ``weight_merge_id`` can be compared across machines). The healing
step trains, and training is not bit-reproducible across CPUs and thread counts, so the
consensus may differ slightly from one machine to another.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from hivemerge.merge.engine import run_merge
from hivemerge.merge.evaluation.evaluate import evaluate, greedy_answers
from hivemerge.merge.fusion.packs import make_pack
from hivemerge.merge.fusion.probe import write_probe
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.models import load_causal_lm
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.methods import METHODS
from hivemerge.merge.numerics.threads import single_thread
from hivemerge.merge.recipe import validate_recipe
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.experts import SPEC, base_mix, build_experts
from hivemerge.node.local_network import LocalNetwork
from hivemerge.protocol import charter as charters
from hivemerge.protocol import fusion, rounds
from hivemerge.protocol.identity import Identity

# The base and experts of ``SPEC``, trained once and shipped as package data (pyproject.toml):
# training them takes many minutes and gives other bytes on another CPU.
SHIPPED_MODELS = Path(__file__).resolve().parent / "demo_models"
# The round's merge: TIES at density 0.9 with the full math task vector and a quarter of
# the others. It is the best uniform recipe (one weight and density per model) of the
# 118-recipe grid in scripts/bench_search.py, chosen on the validation split, which the
# demo's held-out test suites never overlap.
ROUND_RECIPE = {
    "merge_method": "ties",
    "parameters": {"weight": 0.25, "density": 0.9},
    "domain_parameters": {"math": {"weight": 1.0}},
    "dtype": "float32",
    "out_dtype": "float32",
    "deadline": 15,  # seconds for the experts' nodes to commit (the fuser distils before it proposes)
    "quorum": 2 / 3,
}
# The round's fusion step: the fetch-only node (the proposer, so the fuser) distils the
# experts' packs into the round's weight merge, which the fused delta then replaces. It
# wins back what the weight merge lost (these 300 steps: every domain within 2.5 points
# of its expert, docs/benchmarks.md; scripts/bench_heal.py measures more settings offline). The
# replay set, prompts of every suite with the base's own answers, holds the merge to
# itself elsewhere, compose included.
FUSION = {  # distillation at the protocol's defaults (protocol/fusion.py), which were measured on this demo,
    # but a quarter of every batch from the replay set (the demo's measured setting; its drift stays under the cap)
    **fusion.DISTILLATION, "replay_share": 0.25, "packs": {"domains": list(tasks.DOMAINS)}, "pivot": "merge", "codec": "int8",
}
PROBE_PER_DOMAIN = 1000  # training-split examples of its domain each expert's pack covers (300 was too few)
REPLAY_PROMPTS = 900
ROUND_TIMEOUT = 300.0
# int8 deltas rebuild these tiny experts without a measurable loss change; the default
# ternary codec costs the math expert much of its skill at this scale.
PUBLISH_CODEC = "int8"

Say = Callable[[str], None]


def shipped_models() -> dict[str, Path]:
    """``{"base": dir, "math": dir, ...}``: the demo's models shipped with the package."""
    return {name: SHIPPED_MODELS / name for name in ("base", *tasks.DOMAINS)}


def demo_models(workdir: Path, say: Say, train_progress=None, spec: dict = SPEC, retrain: bool = False) -> dict[str, Path]:
    """``{"base": dir, "math": dir, ...}``: the shipped models, read in place; with ``retrain``,
    or for another ``spec`` than the shipped one, those trained in ``workdir / "models"`` (reused
    when that cache holds them)."""
    if not retrain and spec == SPEC:
        say(f"using the base and the domain experts shipped in {SHIPPED_MODELS}")
        return shipped_models()
    say(f"training the base and the domain experts in {workdir / 'models'} (or reusing those trained there)")
    return build_experts(workdir / "models", progress=train_progress, spec=spec, workers=None)  # experts: one process per core


def run_demo(workdir: Path, out: Path, say: Say, train_progress=None, count: int = 200, spec: dict = SPEC,
             retrain: bool = False) -> dict:
    started = time.perf_counter()
    models = demo_models(workdir, say, train_progress, spec, retrain)
    base_dir = models["base"]
    base_id = model_id(SafetensorsModel(base_dir))

    homes = workdir / "nodes"
    shutil.rmtree(homes, ignore_errors=True)  # fresh nodes: a former run's publications must not join
    genesis = demo_charter(homes, base_id)
    network = LocalNetwork(homes, record_ttl=120, round_poll=0.5, network=genesis)
    try:
        say(f"network charter {charters.charter_id(genesis['charter'])[:12]}: the fetch-only node maintains it, proposes "
            f"and fuses; every node contributes and attests; a result is final when {ROUND_RECIPE['quorum']:.0%} of them attest it")
        say(f"starting {len(tasks.DOMAINS) + 1} nodes on 127.0.0.1")
        fetcher = network.start("fetcher")
        experts = {domain: network.start(domain) for domain in tasks.DOMAINS}
        probe, replay = write_probe_and_replay(workdir / "fusion", base_dir)
        for domain, node in experts.items():
            record = node.publish(models[domain], domain, base_dir, codec=PUBLISH_CODEC)
            say(f"{domain} expert published by {node.identity.fingerprint}: delta {record['delta_id'][:12]} ({record['size']:,} bytes)")
            pack = make_pack(models[domain], probe, workdir / "fusion" / f"{domain}.pack.safetensors", node.identity)
            node.rounds.fusion.publish_pack(pack.path, probe.path, domain)
            say(f"{domain} pack published: {pack.tokens:,} tokens of its domain's probe, {pack.bytes:,} bytes")
        say(f"the fetch-only node, the round's fuser, merges the experts ({ROUND_RECIPE['merge_method']}) and heals the "
            f"merge with their packs ({FUSION['steps']} distillation steps) before it proposes the round")
        proposal = fetcher.propose({**ROUND_RECIPE, "base_model": str(base_dir), "select": {"domains": list(tasks.DOMAINS)},
                                    "fusion": {**FUSION, "replay": str(replay.path)}})
        say(f"round {proposal['round_id'][:12]} proposed; commitments close in {ROUND_RECIPE['deadline']}s")
        merged = weight_merge_id(fetcher, proposal, workdir / "weight-merge")  # while the commitments come in
        say(f"the round's weight merge, before healing (the same bytes on every machine): {merged}")
        deadline = time.time() + ROUND_RECIPE["deadline"] + ROUND_TIMEOUT
        final = None
        while final is None:
            if time.time() > deadline:
                raise RuntimeError("the demo round did not finalize in time")
            time.sleep(1.0)
            final = fetcher.latest(base_id)
            if final is not None and final["proposal"]["round_id"] != proposal["round_id"]:
                final = None  # an older round of an earlier run: wait for this one
        say(f"round final: {len(final['attesters'])} of {len(final['commitments'])} participants attest {final['result_id'][:12]}")
        row = next((r for r in fetcher.round_status() if r["proposal"]["round_id"] == proposal["round_id"]), {})
        verdict = (row.get("fusion") or {}).get("verdict")
        say(f"fusion step: {verdict}: " + ("the consensus is the weight merge healed with the experts' packs" if verdict == "kept"
                                          else "the consensus is the plain weight merge"))
        fetched = fetcher.fetch(None, out=out / "consensus", base=base_dir, overwrite=True)
        checked = "recomputed from the signed deltas: the same bytes" if fetched["recomputed"] else "not recomputed"
        say(f"consensus model fetched by the fetch-only node ({checked}) -> {fetched['out']}")
    finally:
        network.close_all()
        say("all nodes stopped")

    say("evaluating base, experts and consensus on every suite")
    rows = {}
    for name, path in [("base", base_dir), *[(d, models[d]) for d in tasks.DOMAINS], ("consensus", out / "consensus")]:
        model, tokenizer = load_causal_lm(path)
        rows[name] = {s: vars(evaluate(model, tokenizer, s, count)) for s in tasks.SUITES}
    result = {
        "charter_id": charters.charter_id(genesis["charter"]), "round_id": proposal["round_id"], "weight_merge_id": merged, "consensus_id": final["result_id"],
        "recipe": ROUND_RECIPE, "fusion": FUSION,
        "fusion_verdict": verdict, "results": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_plot(rows, out / "results.png")
    return result


def demo_charter(homes: Path, base_id: str) -> dict:
    """The demo network's genesis charter, signed by its one maintainer (the fetch-only node)."""
    identities = {name: Identity.load_or_create(homes / name) for name in ("fetcher", *tasks.DOMAINS)}
    roster = {i.public_hex: ["attester", "contributor"] for i in identities.values()}
    fetcher = identities["fetcher"]
    roster[fetcher.public_hex] = ["attester", "contributor", "proposer"]
    document = charters.new_charter(name="hivemerge-demo", base_ids=[base_id], maintainers=[fetcher.public_hex],
                                    methods=sorted(METHODS), roster=roster, quorum=ROUND_RECIPE["quorum"])
    return charters.sign_charter(document, fetcher)


def weight_merge_id(node, proposal: dict, out: Path) -> str:
    """The content id of the round's plain weight merge of the experts' deltas, the one its
    fusion step heals (``pivot_recipe``), built again into ``out`` from ``node``'s store
    (the fuser's: it fetched every pinned delta). The engine's bytes depend only on the
    recipe and the inputs, so for the shipped experts this id is the same everywhere."""
    run_merge(validate_recipe(rounds.pivot_recipe(proposal), resolver=node.store.resolve), out, device="cpu", overwrite=True)
    return model_id(SafetensorsModel(out))


def write_probe_and_replay(directory: Path, answer_with: Path, per_domain: int | None = None,
                           replay_prompts: int | None = None, seed: str = "demo-probe"):
    """The probe every expert's pack covers (``per_domain`` training-split examples of each
    domain, with their answers) and the replay set (prompts of every suite, compose
    included, with the greedy answers of ``answer_with``: no labels). Deterministic: the
    same files every run. scripts/bench_heal.py writes its sets with this too."""
    per_domain = PROBE_PER_DOMAIN if per_domain is None else per_domain
    replay_prompts = REPLAY_PROMPTS if replay_prompts is None else replay_prompts
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pairs = []
    for domain in tasks.DOMAINS:
        draw = tasks.training_only(tasks.DOMAINS[domain])
        pairs += [(e.prompt, e.answer + "\n") for e in (draw(rng) for _ in range(per_domain))]
    probe = write_probe(pairs, directory / "probe.jsonl")
    draw = tasks.training_only(lambda r: tasks.compose_task(r) if r.random() < 0.5 else base_mix(r))
    prompts = [draw(rng).prompt for _ in range(replay_prompts)]
    model, tokenizer = load_causal_lm(answer_with)
    with single_thread():
        answers = greedy_answers(model, tokenizer, prompts, max_new=8)
    return probe, write_probe([(p, a + "\n") for p, a in zip(prompts, answers)], directory / "replay.jsonl")


def write_plot(rows: dict, path: Path) -> None:
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the plot

    suites = list(tasks.SUITES)
    models = list(rows)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(models):
        values = [100 * rows[name][s]["accuracy"] for s in suites]
        ax.bar([x + i * width for x in range(len(suites))], values, width, label=name)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(suites))], suites)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("hivemerge demo: base, domain experts and the consensus model")
    ax.legend(ncols=len(models), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
