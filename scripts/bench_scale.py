#!/usr/bin/env python
"""Benchmark of a merge round at real expert sizes (issue 21), node by node through the CLI.

Builds (once; cached under --root by shape and seed) a synthetic bf16 Llama base of
TinyLlama's shape (1.1B parameters, untied LM head), one tensor and one <= 1 GB shard at a
time, and --experts experts: the base plus noise of 1% of each tensor's RMS on half of its
tensors. Starts one `python -m hivemerge node start` per expert plus node 0 on 127.0.0.1:
node i publishes expert i, node 0 proposes the README's TIES round and, once every
participant attested the same result, fetches the consensus (recomputing it: verify).
Per step: wall time; CPU seconds of each node and of its p2pd (utime+stime over the process
tree, /proc/PID/stat); their peak RSS in the step (VmHWM, reset through /proc/PID/clear_refs);
the CLI command's own CPU and peak RSS (GNU time). Beside it, nodes stopped: `delta extract`
of expert 1 alone, an offline `merge` of the same recipe on the round's deltas (hm:// ids in
node 1's store; its id must equal the round's result), and the I/O floor (the models' weight
files read from the page cache; one file the consensus's size written and fsynced). Prints
a markdown table, delta sizes, disk per home and issue 21's goals.

    python scripts/bench_scale.py [--layers 22] [--hidden 2048] [--intermediate 5632] [--vocab 32000]
        [--heads 32] [--kv-heads 4] [--experts 3] [--seed 0] [--deadline 60] [--timeout 1800]
        [--root /tmp/hivemerge-bench-scale] [--json FILE] [--repeat 1]

A quick run: --layers 1 --hidden 64 --intermediate 128 --vocab 512 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.io.writer import ShardedWriter
from hivemerge.node.local_network import LOOPBACK
from hivemerge.node.storage.home import ROUNDS_DIR, Phase
from hivemerge.protocol.bundles import DELTA_SUFFIX

FAMILY_VERSION = 1  # bump when the generator changes: cached families are rebuilt
SHAPE = {"layers": 22, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 32, "kv-heads": 4}  # TinyLlama
RECIPE = {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}  # the README's round recipe
START_TIMEOUT, STOP_TIMEOUT = 120.0, 60.0
MB = 1024 * 1024
TIME = "/usr/bin/time"  # GNU time: a command's own CPU seconds and peak RSS (run_cli)


def linked_bytes(home: Path) -> int:
    """Bytes of the files under ``home`` that are hard links with a name outside it (a
    published base, a fetched model's --out): on disk once, whatever du says per folder."""
    inside: dict[int, list[int]] = {}
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            inside.setdefault(st.st_ino, [st.st_nlink, st.st_size, 0])[2] += 1
    return sum(size for nlink, size, names in inside.values() if nlink > names)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_family(args) -> dict[str, Path]:
    """base, expert1..N under --root; reused when its marker names the same parameters."""
    spec = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads", "experts", "seed")}
    root = args.root / "-".join(f"{k}{v}" for k, v in spec.items())
    paths = {"base": root / "base", **{f"expert{e}": root / f"expert{e}" for e in range(1, args.experts + 1)}}
    spec["version"] = FAMILY_VERSION
    if (root / "family.json").is_file() and json.loads((root / "family.json").read_text()) == spec:
        return paths
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         vocab_size=args.vocab, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    config.dtype, config.architectures = torch.bfloat16, ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    names = sorted(shapes)
    say(f"building {root.name}: {sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.1f}M parameters per model")
    shutil.rmtree(root, ignore_errors=True)
    writers = {}
    for name, path in paths.items():
        path.mkdir(parents=True)
        config.save_pretrained(path)
        writers[name] = ShardedWriter(path, [(n, torch.bfloat16, shapes[n]) for n in names], max_shard_bytes=10**9)
    noisy = {e: set(random.Random(args.seed * 1000 + e).sample(names, len(names) // 2)) for e in range(1, args.experts + 1)}
    for i, name in enumerate(names):  # one tensor of every model at a time: the builder stays small
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        base = torch.ones(shapes[name]) if name.endswith("norm.weight") else torch.randn(shapes[name], generator=gen) * 0.02
        base = base.to(torch.bfloat16)
        writers["base"].write(name, base)
        for e, chosen in noisy.items():
            expert = base
            if name in chosen:
                x = base.float()
                expert = x.add_(torch.randn(x.shape, generator=gen).mul_(0.01 * x.pow(2).mean().sqrt())).to(torch.bfloat16)
            writers[f"expert{e}"].write(name, expert)
    for writer in writers.values():
        writer.finish()
    (root / "family.json").write_text(json.dumps(spec, indent=2))
    return paths


# -- processes: CPU seconds, peak RSS, the CLI ----------------------------------------------

def process_table() -> dict[int, tuple[str, int, float]]:
    """pid -> (name, parent pid, CPU seconds including its reaped children's), from /proc/PID/stat."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2:].split()
        cpu = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
        table[int(entry)] = (text[text.index("(") + 1:text.rindex(")")], int(fields[1]), cpu)
    return table


def peak_mb(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0  # exited meanwhile
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), 0.0)


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the current RSS
        return True
    except OSError:
        return False


def run_cli(*args: str) -> tuple[str, dict]:
    """``python -m hivemerge ARGS`` to its end: (stdout, its wall s, CPU s and peak RSS MB).

    Under GNU time: the ru_maxrss that wait4 or RUSAGE_CHILDREN give a child of this
    process starts at this process's own RSS (subprocess spawns with vfork, and exec keeps
    the high-water mark), hundreds of MB here; time's child starts from time's few MB."""
    with tempfile.NamedTemporaryFile("r") as usage:
        start = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%U %S %M", "-o", usage.name, sys.executable, "-m", "hivemerge", *args],
                              capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"hivemerge {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-3000:]}")
        user, system, rss_kb = usage.read().split()[-3:]
    return proc.stdout, {"wall_s": wall, "cpu_s": float(user) + float(system), "rss_mb": int(rss_kb) / 1024}


class NodeProcess:
    """``hivemerge node start`` in a process group of its own, with its p2pd."""

    def __init__(self, home: Path, peer: str | None = None):
        self.home = home
        home.mkdir(parents=True)
        self.log = open(home.parent / f"{home.name}.log", "w")  # noqa: SIM115 (the node's stderr, closed by stop)
        argv = [sys.executable, "-m", "hivemerge", "node", "start", "--home", str(home), "--listen", LOOPBACK]
        self.proc = subprocess.Popen(argv + (["--peer", peer] if peer else []), stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line.strip()) for line in self.proc.stdout], daemon=True).start()

    def wait_serving(self) -> str:
        """Its first ``listening MADDR`` address, once it says it serves."""
        maddr, deadline = None, time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            maddr = maddr or (line.split()[1] if line.startswith("listening ") else None)
            if line.startswith("serving") and maddr:
                return maddr
        raise RuntimeError(f"node on {self.home} did not start (see {self.log.name})")

    def usage(self) -> dict:
        """CPU seconds and peak RSS MB of the node (with anything else it runs) and of its p2pd."""
        table, tree, todo = process_table(), {}, [self.proc.pid]
        if self.proc.pid not in table:
            raise RuntimeError(f"node on {self.home} exited (see {self.log.name})")
        while todo:
            pid = todo.pop()
            tree[pid] = table[pid]
            todo += [child for child, (_, parent, _) in table.items() if parent == pid]
        daemons = [pid for pid, (name, _, _) in tree.items() if name == "p2pd"]
        return {"cpu_node": sum(t[2] for pid, t in tree.items() if pid not in daemons),
                "cpu_daemon": sum(tree[pid][2] for pid in daemons), "pids": list(tree),
                "rss_node": peak_mb(self.proc.pid), "rss_daemon": max((peak_mb(pid) for pid in daemons), default=0.0)}

    def stop(self) -> None:
        """SIGINT, and wait; one that does not leave in time is killed with its whole group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say(f"node on {self.home} still running {STOP_TIMEOUT:g} s after SIGINT: killing its process group")
                os.killpg(self.proc.pid, signal.SIGKILL)  # the leader is not reaped yet: the group is still ours
                self.proc.wait(10)
        for pid, (name, _, _) in process_table().items():  # a p2pd that outlived its node (its key file is in the home)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if name == "p2pd" else []
            except OSError:
                continue
            if any(arg.endswith(f"{self.home}/p2p.key".encode()) for arg in argv):
                say(f"p2pd {pid} outlived the node on {self.home}: killing it")
                os.kill(pid, signal.SIGKILL)
        self.log.close()


class Step:
    """One measured step: its wall time, each node's CPU seconds and peak RSS (reset at its start)."""

    def __init__(self, name: str, nodes: list[NodeProcess], actor: int | None = None):
        self.name, self.nodes, self.actor, self.cli = name, nodes, actor, []  # actor: the node that does the work
        self.before = [n.usage() for n in nodes]
        self.reset = all(reset_peak(pid) for u in self.before for pid in u["pids"])
        self.start = time.perf_counter()

    def run(self, *args: str) -> str:
        out, usage = run_cli(*args)
        self.cli.append(usage)
        return out

    def end(self) -> dict:
        wall, after = time.perf_counter() - self.start, [n.usage() for n in self.nodes]
        nodes = [{"cpu_node": a["cpu_node"] - b["cpu_node"], "cpu_daemon": a["cpu_daemon"] - b["cpu_daemon"],
                  "rss_node": a["rss_node"], "rss_daemon": a["rss_daemon"]} for a, b in zip(after, self.before)]
        say(f"{self.name}: {wall:.1f} s")
        return {"step": self.name, "actor": self.actor, "wall_s": wall, "nodes": nodes, "peak_reset": self.reset,
                "cli_cpu_s": sum(c["cpu_s"] for c in self.cli), "cli_rss_mb": max((c["rss_mb"] for c in self.cli), default=0.0)}


# -- the round, and what it is compared with -----------------------------------------------

def wait_attested(homes: list[Path], round_id: str, timeout: float) -> None:
    """Until every participant's state file says attested (bounded); a failed round raises."""
    deadline = time.monotonic() + timeout
    while True:
        phases = []
        for home in homes:
            try:
                phases.append(json.loads((home / ROUNDS_DIR / f"{round_id}.json").read_text())["phase"])
            except (OSError, ValueError, KeyError):
                phases.append(None)
        if Phase.FAILED in phases or time.monotonic() > deadline:
            raise RuntimeError(f"round {round_id[:12]} not attested by every participant: {phases}")
        if all(p == Phase.ATTESTED for p in phases):
            return
        time.sleep(0.2)


def agreed_round(homes: list[Path], round_id: str) -> dict:
    """The round as each participant's ``round status --json`` shows it: all attested, one result."""
    rows = [next((r for r in json.loads(run_cli("round", "status", "--json", "--home", str(h))[0])
                  if r["proposal"]["round_id"] == round_id), {}) for h in homes]
    phases, results = [r.get("phase") for r in rows], {r.get("result_id") for r in rows}
    if any(p != Phase.ATTESTED for p in phases) or len(results) != 1 or None in results:
        raise RuntimeError(f"participants disagree: phases {phases}, results {results}")
    return rows[0]


def run_round(args, family: dict[str, Path], run: Path) -> dict:
    base, homes = family["base"], [run / f"node{i}" for i in range(args.experts + 1)]
    nodes, steps, published = [], [], []
    try:
        nodes.append(NodeProcess(homes[0]))
        first = nodes[0].wait_serving()
        nodes += [NodeProcess(home, first) for home in homes[1:]]
        for node in nodes[1:]:
            node.wait_serving()
        for e in range(1, args.experts + 1):
            step = Step(f"publish expert{e} (node {e})", nodes, actor=e)
            published.append(json.loads(step.run("publish", str(family[f"expert{e}"]), "--domain", f"d{e}", "--base",
                                                  str(base), "--home", str(homes[e]), "--json")))
            steps.append(step.end())
        select = {"domains": [p["domain"] for p in published]}
        round_recipe = {**RECIPE, "base_model": str(base), "select": select, "deadline": args.deadline}
        (run / "round.yaml").write_text(json.dumps(round_recipe))  # JSON is YAML
        step = Step("proposal -> deadline", nodes)
        proposal = json.loads(step.run("round", "propose", str(run / "round.yaml"), "--home", str(homes[0]), "--json"))
        time.sleep(max(0.0, proposal["deadline"] - time.time()))
        steps.append(step.end())
        step = Step("deadline -> all attested", nodes)
        wait_attested(homes[1:], proposal["round_id"], args.timeout)
        steps.append(step.end())
        row = agreed_round(homes[1:], proposal["round_id"])
        step = Step("fetch (node 0, verified)", nodes, actor=0)
        fetched = json.loads(step.run("fetch", "--out", str(run / "consensus"), "--base", str(base), "--home", str(homes[0]),
                                      "--json"))
        steps.append(step.end())
    finally:
        for node in nodes:
            node.stop()
    return {"steps": steps, "published": published, "result_id": row["result_id"], "excluded": row.get("excluded") or {},
            "fetched_id": fetched.get("content"), "recomputed": fetched.get("recomputed"),
            "deltas": {h.name: sum(p.stat().st_size for p in (h / "store" / "objects").glob(f"*{DELTA_SUFFIX}")) for h in homes},
            "disk": {h.name: int(subprocess.check_output(["du", "-sb", str(h)]).split()[0]) for h in homes},
            "linked": {h.name: linked_bytes(h) for h in homes}}


def beside_round(family: dict[str, Path], run: Path, result: dict, repeat: int) -> dict:
    """delta extract alone, the offline merge of the round's deltas (each ``repeat`` times:
    the median by wall time stands for it), and the I/O floor."""
    home1 = run / "node1"
    models = [{"model": f"hm://{d}"} for d in sorted(p["delta_id"] for p in result["published"])]  # the round's order
    base_id = result["published"][0]["base_id"]
    # the round keeps the base's dtype (bf16) where its recipe names none; an offline merge says it
    offline = {**RECIPE, "out_dtype": "bfloat16", "base_model": f"hm://{base_id}", "models": models}
    (run / "merge.json").write_text(json.dumps(offline))
    extracts, merges = [], []
    for _ in range(repeat):  # alternated: a machine whose speed drifts slows both alike
        (run / f"extract{DELTA_SUFFIX}").unlink(missing_ok=True)
        extracts.append(run_cli("delta", "extract", "--base", str(family["base"]), "--model", str(family["expert1"]),
                                "--out", str(run / f"extract{DELTA_SUFFIX}"), "--home", str(home1))[1])
        merges.append(run_cli("merge", str(run / "merge.json"), "--out", str(run / "offline"), "--home", str(home1),
                              "--overwrite")[1])
    extract, merge = (sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2] for runs in (extracts, merges))
    result["offline_id"] = model_id(SafetensorsModel(run / "offline"))
    files = [p for path in family.values() for p in sorted(path.glob("*.safetensors"))]
    buffer = bytearray(16 * MB)
    for _ in range(2):  # the second read comes from the page cache
        start = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        read = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (run / "consensus").glob("*.safetensors"))
    start = time.perf_counter()
    with open(run / "floor.bin", "wb") as f:
        f.writelines(memoryview(buffer)[: min(len(buffer), size - offset)] for offset in range(0, size, len(buffer)))
        os.fsync(f.fileno())
    write = time.perf_counter() - start
    (run / "floor.bin").unlink()
    return {"extract": extract, "merge": merge, "extract_runs": extracts, "merge_runs": merges, "read_s": read,
            "read_files": len(files), "write_s": write, "write_bytes": size}


def report(result: dict, beside: dict, largest_f32: int) -> dict:
    print("| step | wall s | CPU-s node | CPU-s p2pd | CPU-s all | peak RSS MB node / p2pd | CLI CPU-s | CLI peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in result["steps"]:  # the acting node's figures, or the most of any node's
        n = s["nodes"] if s["actor"] is None else [s["nodes"][s["actor"]]]
        total = sum(x["cpu_node"] + x["cpu_daemon"] for x in s["nodes"]) + s["cli_cpu_s"]
        print(f"| {s['step']} | {s['wall_s']:.2f} | {max(x['cpu_node'] for x in n):.2f} | "
              f"{max(x['cpu_daemon'] for x in n):.2f} | {total:.2f} | "
              f"{max(x['rss_node'] for x in n):.0f} / {max(x['rss_daemon'] for x in n):.0f} | "
              + (f"{s['cli_cpu_s']:.2f} | {s['cli_rss_mb']:.0f} |" if s["cli_rss_mb"] else "- | - |"))
    extract, merge = beside["extract"], beside["merge"]
    for name, runs in (("delta extract expert1 (alone)", beside["extract_runs"]),
                       ("offline merge (hm:// in node 1's store)", beside["merge_runs"])):
        for i, r in enumerate(runs):
            label = name if len(runs) == 1 else f"{name}, run {i + 1}"
            print(f"| {label} | {r['wall_s']:.2f} | - | - | {r['cpu_s']:.2f} | - | {r['cpu_s']:.2f} | {r['rss_mb']:.0f} |")
    print(f"| I/O floor: read {beside['read_files']} weight files (cached) | {beside['read_s']:.3f} | - | - | - | - | - | - |")
    print(f"| I/O floor: write {beside['write_bytes'] / MB:.1f} MB + fsync | {beside['write_s']:.3f} | - | - | - | - | - | - |")
    if not all(s["peak_reset"] for s in result["steps"]):
        print("\nnote: /proc/PID/clear_refs refused: the nodes' peaks are since each process started, not per step")
    print("\ndelta sizes (publish --json): " + ", ".join(f"{p['domain']} {p['size'] / MB:.2f} MB" for p in result["published"]))
    print("delta files in each home's store: " + ", ".join(f"{h} {b / MB:.2f} MB" for h, b in result["deltas"].items()))
    print("disk per home: " + ", ".join(f"{h} {b / MB:.1f} MB (of which {result['linked'][h] / MB:.1f} MB hard links "
                                        "shared with files outside it)" for h, b in result["disk"].items()))
    if result["excluded"]:
        print(f"excluded from the round: {result['excluded']}")
    same = "EQUAL" if result["offline_id"] == result["result_id"] else "DIFFERENT"
    print(f"round result {result['result_id'][:16]}, fetched {str(result['fetched_id'])[:16]} (recomputed: "
          f"{result['recomputed']}), offline merge {result['offline_id'][:16]}: offline {same} to the round's")
    attest = next(s for s in result["steps"] if s["step"] == "deadline -> all attested")
    publish = [s for s in result["steps"] if s["step"].startswith("publish")]
    cpu = max(x["cpu_node"] + x["cpu_daemon"] for x in attest["nodes"])
    rss = max(x["rss_node"] for x in attest["nodes"])
    publish_rss = max(max(s["nodes"][s["actor"]]["rss_node"], s["cli_rss_mb"]) for s in publish)
    floor, limit = max(beside["read_s"] + beside["write_s"], 1e-6), 8 * largest_f32 / MB + 300
    goals = {"round_cpu_over_offline_cpu": cpu / merge["cpu_s"], "offline_wall_over_io_floor": merge["wall_s"] / floor,
             "merging_node_rss_mb": rss, "offline_merge_rss_mb": merge["rss_mb"], "rss_limit_mb": limit,
             "publish_wall_over_extract_wall": publish[0]["wall_s"] / extract["wall_s"], "publish_rss_mb": publish_rss}
    print("\ngoals (issue 21):")
    print(f"- per-node CPU-s deadline -> attested / offline merge CPU-s: {cpu:.2f} / {merge['cpu_s']:.2f} = "
          f"{goals['round_cpu_over_offline_cpu']:.2f} (goal <= 1.5)")
    print(f"- offline merge wall / I/O floor: {merge['wall_s']:.2f} / {floor:.3f} = {goals['offline_wall_over_io_floor']:.2f} "
          "(goal <= 4)")
    print(f"- peak RSS of a merging process: node {rss:.0f} MB, offline merge {merge['rss_mb']:.0f} MB (goals: < 1536 MB; "
          f"< 8 x the largest tensor in float32 + 300 MB = {limit:.0f} MB)")
    print(f"- publish wall / delta extract wall (expert1): {publish[0]['wall_s']:.2f} / {extract['wall_s']:.2f} = "
          f"{goals['publish_wall_over_extract_wall']:.2f} (goal <= 1.3)")
    print(f"- publish peak RSS (publishing node or CLI): {publish_rss:.0f} MB (goal < 1024 MB)")
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in {**SHAPE, "experts": 3, "seed": 0}.items():
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds from the proposal until commitments close")
    parser.add_argument("--timeout", type=float, default=1800.0, help="most seconds from the deadline until all attested")
    parser.add_argument("--root", type=Path, default=Path("/tmp/hivemerge-bench-scale"))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of delta extract and of the offline merge, alternated (the median stands, the lower of two; this machine's speed drifts)")
    args = parser.parse_args()
    if not Path(TIME).is_file():
        parser.error(f"needs GNU time at {TIME} (apt-get install time)")
    args.root = args.root.resolve()
    family = build_family(args)
    run = args.root / "run"  # the homes and outputs of the last run, kept for a look
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    result = run_round(args, family, run)
    beside = beside_round(family, run, result, args.repeat)
    largest = max(args.vocab, args.intermediate, args.hidden) * args.hidden  # embed_tokens and lm_head, at Llama shapes
    goals = report(result, beside, 4 * largest)
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, **result, **beside, "goals": goals}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
