#!/usr/bin/env python
"""Benchmark of merge rounds: wall time and bytes received per node for 2, 4 and 8
nodes, each publishing one tiny expert, all on loopback in this process.

For each size it reports the time from the commit deadline until every participant
attested the same result (fetching the others' deltas, screening, merging), the whole
round from proposal, and the bytes each node received; then how they grow with the
number of participants.

    python scripts/bench_round.py [--sizes 2 4 8] [--deadline 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from hivemerge.node.local_network import local_network


def run_round(n: int, work: Path, base: Path, experts: list[Path], deadline: float) -> dict:
    with local_network(work / f"round-{n}", n, record_ttl=120, round_poll=0.25) as nodes:
        for i, node in enumerate(nodes):
            node.publish(experts[i], f"domain{i}", base)
        start = time.perf_counter()
        proposal = nodes[0].propose({
            "merge_method": "ties", "base_model": str(base), "select": {"domains": [f"domain{i}" for i in range(n)]},
            "parameters": {"weight": 1.0, "density": 0.5}, "deadline": deadline,
        })
        deadline_at = proposal["deadline"]
        while True:
            states = [node.rounds.state(proposal["round_id"]) or {} for node in nodes]
            if all(s.get("phase") in ("attested", "failed") for s in states):
                break
            if time.perf_counter() - start > deadline + 300:
                raise RuntimeError("round did not finish")
            time.sleep(0.1)
        done = time.time()
        results = {s.get("result_id") for s in states}
        if len(results) != 1 or None in results:
            raise RuntimeError(f"participants disagree: {[s.get('phase') for s in states]} {results}")
        return {
            "nodes": n,
            "after_deadline": done - deadline_at,
            "total": time.perf_counter() - start,
            "bytes": [node.bytes_received for node in nodes],
            "delta_bytes": statistics.mean(Path(node.store.resolve(p["delta_id"])).stat().st_size
                                           for node in nodes for p in node.published()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--deadline", type=float, default=4.0, help="seconds from proposal to commit deadline")
    parser.add_argument("--workdir", type=Path, default=Path(".bench/round"))
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_llama

    base = work / "base"
    if not base.exists():
        make_llama(base, seed=0, layers=4)
    experts = []
    for i in range(max(args.sizes)):
        path = work / f"expert{i}"
        if not path.exists():
            make_llama(path, seed=10 + i, base=base, layers=4)
        experts.append(path)

    rows = []
    for n in args.sizes:
        row = run_round(n, work, base, experts, args.deadline)
        rows.append(row)
        print(f"{n} nodes: {row['after_deadline']:.2f}s after the deadline, {row['total']:.2f}s in all", flush=True)

    print(f"\n{'nodes':>5} {'after deadline s':>16} {'whole round s':>13} {'KB received/node':>16} {'deltas fetched/node':>19}")
    for r in rows:
        per_node = statistics.mean(r["bytes"]) / 1024
        print(f"{r['nodes']:>5} {r['after_deadline']:>16.2f} {r['total']:>13.2f} {per_node:>16.1f} "
              f"{statistics.mean(r['bytes']) / r['delta_bytes']:>19.1f}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth_t = last["after_deadline"] / first["after_deadline"]
        growth_b = statistics.mean(last["bytes"]) / max(statistics.mean(first["bytes"]), 1)
        print(f"\nfrom {first['nodes']} to {last['nodes']} nodes ({last['nodes'] / first['nodes']:.0f}x): "
              f"time after deadline x{growth_t:.2f}, bytes received per node x{growth_b:.2f} "
              f"(each node fetches the n-1 deltas it lacks: linear in n)")


if __name__ == "__main__":
    main()
