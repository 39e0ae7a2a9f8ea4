#!/usr/bin/env python3
"""Benchmark 3: the cost of the analysis checkpoints (one per live stage per second while its
totals change), in committed raft entries per second and raft store size over time.

One stack (loopback, temporary directory, separate processes of `serin`): `serin coordinator
run` (its raft node logging at debug, which names every applied checkpoint and its index),
`serin demo-app` api stable and canary, a private nginx and `serin agent run` (interval 1s).
Load: --rps req/s through nginx. One rollout whose only stage is held for an hour, so nothing
but checkpoints is committed while it runs. Every --every seconds: the last applied index, the
checkpoints applied so far, and the size of `<data_dir>/raft.sled` (apparent bytes of its files
and allocated blocks).

Usage:
  python3 benches/checkpoints.py --seconds 180
Prints one row per sample and a summary.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Load, Stack, find_serin, free_port  # noqa: E402

STRATEGY = """# benches/checkpoints.py: one stage held for an hour; only checkpoints are committed.
[[stages]]
weight = 25
min_duration = "1h"
"""

APPLIED = re.compile(r"checkpoint applied.*index=(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sled_size(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under `path`."""
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def checkpoints(log: Path) -> tuple[int, int]:
    """(checkpoints applied, last applied index) from the coordinator's log."""
    count, last = 0, 0
    for line in log.read_text(errors="replace").splitlines():
        m = APPLIED.search(ANSI.sub("", line))
        if m:
            count, last = count + 1, int(m.group(1))
    return count, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serin", help="serin binary (default target/release/serin, or $SERIN_BIN)")
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--every", type=float, default=15)
    ap.add_argument("--rps", type=float, default=100)
    args = ap.parse_args()

    serin = find_serin(args.serin)
    work = Path(tempfile.mkdtemp(prefix="serin-checkpoints-"))
    shutil.copy2(serin, work / "serin")
    print(f"# files in {work}; serin = {serin}", file=sys.stderr)
    stack = Stack(work, work / "serin")
    load = None
    try:
        os.environ["SERIN_LOG"] = "info,raft=warn,serin_coordinator::raft::node=debug"
        stack.start_coordinator()
        del os.environ["SERIN_LOG"]
        stable = stack.start_demo_app("api-stable", "v1.0.0")
        canary = stack.start_demo_app("api-canary", "v1.1.0")
        stack.start_nginx()
        listen = free_port()
        cfg = stack.write_agent_config(
            [{"name": "api-stable", "service": "api", "variant": "stable", "port": stable},
             {"name": "api-canary", "service": "api", "variant": "canary", "port": canary}],
            [("api", listen)], interval="1s")
        stack.start_agent(cfg, wait_ports=[listen])
        strategy = work / "strategy.toml"
        strategy.write_text(STRATEGY)
        load = Load([(listen, "/api")], args.rps, workers=6).start()
        time.sleep(2)
        stack.cli(["rollout", "start", "api", "--version", "v1.1.0", "--strategy",
                   str(strategy), "--stable-version", "v1.0.0"])
        log, data = work / "coordinator.log", work / "coordinator" / "raft.sled"
        t0 = time.monotonic()
        c0, _ = checkpoints(log)
        print("| t (s) | checkpoints | last index | raft.sled bytes | allocated |")
        print("|---|---|---|---|---|")
        rows = []
        while True:
            t = time.monotonic() - t0
            c, last = checkpoints(log)
            apparent, allocated = sled_size(data)
            rows.append((t, c - c0, last, apparent, allocated))
            print(f"| {t:.0f} | {c - c0} | {last} | {apparent} | {allocated} |", flush=True)
            if t >= args.seconds:
                break
            time.sleep(args.every)
        t, c, last, apparent, allocated = rows[-1]
        print(f"\ncheckpoints/s: {c / t:.2f} over {t:.0f} s; "
              f"raft.sled {rows[0][3]} -> {apparent} bytes apparent, "
              f"{rows[0][4]} -> {allocated} allocated")
    finally:
        if load:
            load.stop()
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
