#!/usr/bin/env python
"""Peak memory of verifying a fetched logit pack: building Python objects for every token
(``PackFile.load``, what the store used to run) against the streamed check
(``PackFile.verify``, what it runs now), side by side on one synthetic pack.

Each measurement runs in a fresh interpreter and reports its peak RSS (ru_maxrss), next
to a baseline that only imports and opens the pack. The default pack is realistic for a
heterogeneous expert: 10,000 probe examples of 200 response tokens at top-8 (~69 MiB).

    python scripts/bench_pack_verify.py [--tokens 2000000] [--workdir .bench/packs]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MEASURE = r"""
import json, resource, sys, time
from hivemerge.merge.fusion.packs import PackFile
pack = PackFile(sys.argv[1])
started = time.perf_counter()
if sys.argv[2] == "load":
    pack.load()
elif sys.argv[2] == "verify":
    pack.verify()
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(path: Path, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), how], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from pack_fixtures import synthetic_pack

    from hivemerge.protocol.identity import Identity

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="response tokens in the pack")
    parser.add_argument("--workdir", type=Path, default=Path(".bench/packs"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"synthetic-{args.tokens}.pack.safetensors"
    if not path.exists():
        started = time.perf_counter()
        synthetic_pack(path, args.tokens, Identity.generate(), vocab=32000)
        print(f"wrote {path} in {time.perf_counter() - started:.1f} s")
    size = path.stat().st_size
    print(f"pack: {args.tokens:,} tokens, top-8, {size / 2**20:.1f} MiB")
    base = measure(path, "open")
    rows = {"open only (baseline)": base, "PackFile.load (before)": measure(path, "load"),
            "PackFile.verify (now)": measure(path, "verify")}
    print(f"{'':24} {'peak RSS':>12} {'over baseline':>14} {'x pack size':>12} {'seconds':>8}")
    for name, row in rows.items():
        extra = row["peak_rss"] - base["peak_rss"]
        print(f"{name:24} {row['peak_rss'] / 2**20:9.1f} MiB {extra / 2**20:10.1f} MiB {extra / size:12.2f} {row['seconds']:8.2f}")


if __name__ == "__main__":
    main()
