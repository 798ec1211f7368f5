#!/usr/bin/env python
"""Benchmark of merge rounds: wall time and bytes received per node for 2, 4 and 8
nodes, each publishing one tiny expert, all on loopback in this process.

For each size it reports the time from the commit deadline until every participant
attested the same result (fetching the others' deltas, screening, merging), the whole
round from proposal, and the bytes each node received; then how they grow with the
number of participants. With ``--charter`` the nodes run under a network charter (node
0 proposes; every node contributes and attests; the proposer's participant list is
waited for), and a node off the roster then fetches the consensus twice, plainly and
with ``verify`` (recomputing the merge from the signed deltas): the cost of checking.

    python scripts/bench_round.py [--sizes 2 4 8] [--deadline 4] [--charter]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.node.local_network import local_network
from hivemerge.protocol import charter as charters
from hivemerge.protocol.identity import Identity


def network_charter(root: Path, n: int, base: Path) -> dict:
    """Node 0 maintains the charter and proposes; every node contributes and attests."""
    keys = [Identity.load_or_create(root / f"n{i}") for i in range(n)]
    roster = {k.public_hex: ["attester", "contributor"] for k in keys}
    roster[keys[0].public_hex].append("proposer")
    document = charters.new_charter(name="bench", base_ids=[model_id(SafetensorsModel(base))], maintainers=[keys[0].public_hex],
                                    methods=["ties"], roster=roster)
    return charters.sign_charter(document, keys[0])


def timed_fetch(node, base: Path, out: Path, verify: bool) -> float:
    start = time.perf_counter()
    node.fetch(None, out=out, base=base, overwrite=True, verify=verify)
    return time.perf_counter() - start


def run_round(n: int, work: Path, base: Path, experts: list[Path], deadline: float, charter: bool = False) -> dict:
    root = work / f"round-{n}{'-charter' if charter else ''}"
    shutil.rmtree(root, ignore_errors=True)
    options = {"network": network_charter(root, n, base)} if charter else {}
    with local_network(root, n, fresh=False, record_ttl=120, round_poll=0.25, **options) as nodes:
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
        fetches = {}
        if charter:  # a node with no role (its key is not on the roster) fetches the consensus
            from hivemerge.node.local_network import LocalNetwork

            outsider = LocalNetwork(root, **options)
            try:  # two fresh fetchers, so that neither finds the other's downloads in its store
                for mode, verify in (("plain", False), ("verify", True)):
                    fetcher = outsider.start(f"fetcher-{mode}", peers=nodes[0].maddrs())
                    while fetcher.latest(model_id(SafetensorsModel(base))) is None:
                        time.sleep(0.2)
                    fetches[mode] = timed_fetch(fetcher, base, root / mode, verify=verify)
            finally:
                outsider.close_all()
        return {
            "fetch": fetches,
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
    parser.add_argument("--charter", action="store_true", help="run the rounds under a network charter, and time fetch --verify")
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
        row = run_round(n, work, base, experts, args.deadline, charter=args.charter)
        rows.append(row)
        print(f"{n} nodes: {row['after_deadline']:.2f}s after the deadline, {row['total']:.2f}s in all", flush=True)

    print(f"\n{'nodes':>5} {'after deadline s':>16} {'whole round s':>13} {'KB received/node':>16} {'deltas fetched/node':>19}")
    for r in rows:
        per_node = statistics.mean(r["bytes"]) / 1024
        print(f"{r['nodes']:>5} {r['after_deadline']:>16.2f} {r['total']:>13.2f} {per_node:>16.1f} "
              f"{statistics.mean(r['bytes']) / r['delta_bytes']:>19.1f}")
    for r in rows:
        if r["fetch"]:
            print(f"{r['nodes']} nodes: fetch of the consensus {r['fetch']['plain']:.2f}s plain, {r['fetch']['verify']:.2f}s "
                  f"recomputing it (verify): x{r['fetch']['verify'] / r['fetch']['plain']:.2f}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth_t = last["after_deadline"] / first["after_deadline"]
        growth_b = statistics.mean(last["bytes"]) / max(statistics.mean(first["bytes"]), 1)
        print(f"\nfrom {first['nodes']} to {last['nodes']} nodes ({last['nodes'] / first['nodes']:.0f}x): "
              f"time after deadline x{growth_t:.2f}, bytes received per node x{growth_b:.2f} "
              f"(each node fetches the n-1 deltas it lacks: linear in n)")


if __name__ == "__main__":
    main()
