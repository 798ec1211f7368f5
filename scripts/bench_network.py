#!/usr/bin/env python
"""Benchmark of hivemerge transfers and discovery on loopback.

Side by side in one run:
1. a raw asyncio TCP stream of the blob on 127.0.0.1 (the ceiling), hashed on receipt
   as the fetcher hashes chunks;
2. a fetch of the same blob (a 200 MB model in a node's store) from one provider node;
3. the same fetch from two provider nodes at once;
4. discovery: 16 nodes, one publishes a new expert, time until the farthest node's
   ``experts`` lists it.
Providers run as separate ``hivemerge node start`` processes. Goals (issue 4): one
provider >= 0.25x raw TCP, two providers faster than one, discovery under 5 s.

    python scripts/bench_network.py [--mb 200] [--nodes 16] [--workdir .bench/network]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hivemerge.node.local_network import LOOPBACK, local_network


def make_blob_model(directory: Path, megabytes: int) -> Path:
    if (directory / "model.safetensors").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n = megabytes * 1024 * 1024 // 2
    rows = 4096
    tensor = torch.randn(rows, n // rows, generator=g).to(torch.float16)
    save_file({"blob.weight": tensor}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "blob"}))
    return directory


async def raw_tcp(path: Path) -> float:
    data = path.read_bytes()

    async def serve(reader, writer):
        writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    digest, got = hashlib.sha256(), 0
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
        got += len(chunk)
    elapsed = time.perf_counter() - start
    writer.close()
    server.close()
    assert got == len(data)
    return elapsed


def start_node(home: Path, peers: list[str]) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "hivemerge", "node", "start", "--home", str(home), "--listen", LOOPBACK]
    for p in peers:
        args += ["--peer", p]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    maddr = None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening") and maddr is None:
            maddr = line.split()[1]
        if line.startswith("serving"):
            return proc, maddr
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"node on {home} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def fetch_with(providers: int, work: Path, cid: str, maddrs: list[str]) -> tuple[float, dict]:
    from hivemerge.node.node import Node

    home = work / f"client-{providers}"
    shutil.rmtree(home, ignore_errors=True)
    client = Node(home, listen=[LOOPBACK], peers=maddrs, client_mode=True)
    try:
        deadline = time.time() + 30
        while len(client.providers(cid)) < providers and time.time() < deadline:
            time.sleep(0.2)
        start = time.perf_counter()
        result = client.fetch(cid)
        return time.perf_counter() - start, result
    finally:
        client.close()
        shutil.rmtree(home, ignore_errors=True)


def discovery(nodes: int, work: Path, expert: Path, base: Path) -> float:
    with local_network(work / "discovery", nodes) as started:
        print(f"  {nodes} nodes up", flush=True)
        publisher, watcher = started[1], started[-1]
        start = time.perf_counter()
        record = publisher.publish(expert, "bench", base)
        while not any(e["delta_id"] == record["delta_id"] for e in watcher.experts()):
            if time.perf_counter() - start > 60:
                raise RuntimeError("expert never discovered")
            time.sleep(0.05)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="blob size in MB")
    parser.add_argument("--nodes", type=int, default=16, help="nodes for the discovery test")
    parser.add_argument("--workdir", type=Path, default=Path(".bench/network"))
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from hivemerge.node.storage.store import ContentStore

    blob = make_blob_model(work / "blob-model", args.mb)
    size = (blob / "model.safetensors").stat().st_size
    homes = [work / "provider-a", work / "provider-b"]
    cid = None
    for home in homes:
        cid = ContentStore(home).add_model(blob)
    print(f"blob: {size / 1e6:.0f} MB model {cid[:12]} in two providers' stores", flush=True)

    raw = asyncio.run(raw_tcp(blob / "model.safetensors"))
    print(f"raw TCP: {raw:.2f}s", flush=True)
    procs = []
    try:
        proc_a, maddr_a = start_node(homes[0], [])
        procs.append(proc_a)
        one, r1 = fetch_with(1, work, cid, [maddr_a])
        print(f"one provider: {one:.2f}s {r1['chunks_by_provider']}", flush=True)
        proc_b, maddr_b = start_node(homes[1], [maddr_a])
        procs.append(proc_b)
        two, r2 = fetch_with(2, work, cid, [maddr_a])
        print(f"two providers: {two:.2f}s chunks per provider {sorted(r2['chunks_by_provider'].values())}", flush=True)
    finally:
        for p in procs:
            stop(p)

    tiny = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tiny))
    from conftest import make_llama

    base = make_llama(work / "tiny-base", seed=0) if not (work / "tiny-base").exists() else work / "tiny-base"
    expert = make_llama(work / "tiny-expert", seed=1, base=base) if not (work / "tiny-expert").exists() else work / "tiny-expert"
    found = discovery(args.nodes, work, expert, base)

    mbps = lambda s: size / s / 1e6  # noqa: E731
    print()
    print(f"{'transfer of ' + format(size / 1e6, '.0f') + ' MB':32} {'seconds':>8} {'MB/s':>8} {'vs raw TCP':>10}")
    print(f"{'raw asyncio TCP (loopback)':32} {raw:>8.2f} {mbps(raw):>8.0f} {1.0:>10.2f}")
    print(f"{'hivemerge, one provider':32} {one:>8.2f} {mbps(one):>8.0f} {raw / one:>10.2f}")
    print(f"{'hivemerge, two providers':32} {two:>8.2f} {mbps(two):>8.0f} {raw / two:>10.2f}")
    print(f"\ndiscovery of a new expert across {args.nodes} nodes: {found:.2f}s")
    print(
        f"goals: one provider >= 0.25x raw TCP: {raw / one:.2f}x; two faster than one: {one / two:.2f}x; "
        f"discovery < 5 s: {found:.2f}s"
    )


if __name__ == "__main__":
    main()
