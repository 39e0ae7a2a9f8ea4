#!/usr/bin/env python3
"""Benchmark 1: the agent's footprint next to prometheus-node-exporter's, over the same window.

Starts (all on loopback, in a temporary directory):
  - `serin coordinator run`,
  - two `serin demo-app` instances (web stable v1.0.0 and web canary v1.1.0) under light load
    (--app-rps, a new connection per request) so their counters move,
  - for each agent variant: a private nginx (`nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`)
    and `serin agent run --config …` (interval 1s) scraping both apps and managing that nginx,
    under `/usr/bin/time -v`,
  - `/usr/bin/prometheus-node-exporter` (default collectors) on a free port under
    `/usr/bin/time -v`, scraped once a second by `while :; do curl …; sleep 1; done`.
After --warmup seconds, samples VmRSS of every measured process each second for --duration
seconds and reads utime+stime from /proc/PID/stat at both ends of the window.

Usage:
  cargo build --release
  python3 benches/footprint.py                       # default agent vs node_exporter
  python3 benches/footprint.py --variant default= --variant 1-worker=TOKIO_WORKER_THREADS=1
Prints a Markdown table and writes the raw samples as JSON (--json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import (CLK_TCK, Load, Stack, cpu_ticks, find_serin, free_port, http_get,  # noqa: E402
                   rss_kb, threads, wait_until)

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"


def parse_variant(text: str) -> tuple[str, str | None, dict]:
    """`NAME[@BINARY]=ENV1=V1,ENV2=V2` -> (name, binary or None, env)."""
    head, _, envs = text.partition("=")
    name, _, binary = head.partition("@")
    env = {}
    for kv in filter(None, envs.split(",")):
        k, _, v = kv.partition("=")
        env[k] = v
    return name, binary or None, env


def time_v_max_rss(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if "Maximum resident set size" in line:
                return int(line.split(":")[1])
    except FileNotFoundError:
        pass
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serin", help="serin binary (default target/release/serin, or $SERIN_BIN)")
    ap.add_argument("--duration", type=int, default=60, help="measured window, seconds")
    ap.add_argument("--warmup", type=int, default=10, help="seconds before the window starts")
    ap.add_argument("--app-rps", type=float, default=20, help="load on the two apps, req/s total")
    ap.add_argument("--variant", action="append",
                    help="agent variant NAME[@BINARY]=ENV1=V1,ENV2=V2, run side by side "
                         "(repeatable; default: 'agent='). BINARY must accept "
                         "`agent run --config FILE` (or, named serin-agent*, `run --config FILE`); "
                         "default: the serin binary")
    ap.add_argument("--no-nginx", action="store_true", help="agents without an [nginx] section")
    ap.add_argument("--json", help="write raw samples here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    serin = find_serin(args.serin)
    variants = [parse_variant(v) for v in (args.variant or ["agent="])]
    work = Path(tempfile.mkdtemp(prefix="serin-footprint-"))
    # A private copy, so a concurrent `cargo build` cannot swap the binary mid-run.
    shutil.copy2(serin, work / "serin")
    print(f"# files in {work}; serin = {serin}", file=sys.stderr)

    stacks: list[Stack] = []
    load = None
    scraper = None
    try:
        base = Stack(work / "base", work / "serin")
        base.dir.mkdir()
        stacks.append(base)
        base.start_coordinator()
        stable = base.start_demo_app("app-stable", "v1.0.0")
        canary = base.start_demo_app("app-canary", "v1.1.0")
        instances = [
            {"name": "web-stable", "service": "web", "variant": "stable", "port": stable},
            {"name": "web-canary", "service": "web", "variant": "canary", "port": canary},
        ]
        load = Load([(stable, "/web"), (canary, "/web")], args.app_rps, workers=2).start()

        measured: dict[str, int] = {}
        time_files: dict[str, Path] = {}
        for name, binary, env in variants:
            exe = work / "serin"
            if binary:
                exe = work / f"{name}.bin"
                shutil.copy2(binary, exe)
            s = Stack(work / name, exe, coordinator=base.coordinator)
            s.dir.mkdir()
            stacks.append(s)
            services = []
            if not args.no_nginx:
                s.start_nginx()
                services = [("web", free_port())]
            cfg = s.write_agent_config(instances, services)
            text = cfg.read_text().replace('name = "bench-host"', f'name = "bench-{name}"', 1)
            cfg.write_text(text)
            standalone = bool(binary) and Path(binary).name.startswith("serin-agent")
            p = s.start_agent(cfg, env=env, time_v=True, wait_ports=[p for _, p in services],
                              standalone=standalone)
            measured[name] = p.pid
            time_files[name] = s.dir / "agent.time.txt"
        ne_port = free_port()
        ne = base.spawn("node_exporter", [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ne_port}"],
                        time_v=True)
        wait_until("node_exporter", lambda: http_get("127.0.0.1", ne_port, "/metrics")[0] == 200)
        measured["node_exporter"] = ne.pid
        time_files["node_exporter"] = base.dir / "node_exporter.time.txt"
        scraper = subprocess.Popen(
            ["bash", "-c", f"while :; do curl -s -o /dev/null http://127.0.0.1:{ne_port}/metrics;"
                           " sleep 1; done"], start_new_session=True)

        print(f"# warmup {args.warmup}s, then {args.duration}s window", file=sys.stderr)
        time.sleep(args.warmup)
        rss: dict[str, list[int]] = {k: [] for k in measured}
        anon: dict[str, list[int]] = {k: [] for k in measured}
        thr: dict[str, list[int]] = {k: [] for k in measured}
        t0 = time.monotonic()
        ticks0 = {k: cpu_ticks(pid) for k, pid in measured.items()}
        for i in range(args.duration):
            for k, pid in measured.items():
                rss[k].append(rss_kb(pid))
                anon[k].append(rss_kb(pid, "RssAnon:"))
                thr[k].append(threads(pid))
            next_at = t0 + i + 1
            time.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - t0
        ticks1 = {k: cpu_ticks(pid) for k, pid in measured.items()}
        load_requests = len(load.records)
    finally:
        if scraper:
            os.killpg(scraper.pid, signal.SIGTERM)
            scraper.wait()
        if load:
            load.stop()
        for s in reversed(stacks):
            s.stop()

    results = {}
    for k in measured:
        cpu = (ticks1[k] - ticks0[k]) / CLK_TCK / elapsed * 100
        results[k] = {
            "rss_median_kb": statistics.median(rss[k]),
            "rss_max_kb": max(rss[k]),
            "rss_min_kb": min(rss[k]),
            "time_v_max_rss_kb": time_v_max_rss(time_files[k]),
            "cpu_percent_of_one_core": cpu,
            "cpu_seconds": (ticks1[k] - ticks0[k]) / CLK_TCK,
            "threads_median": statistics.median(thr[k]),
            "rss_anon_median_kb": statistics.median(anon[k]),
            "rss_samples_kb": rss[k],
        }
    ne = results["node_exporter"]
    mb = lambda kb: f"{kb / 1024:.1f}"  # noqa: E731
    print(f"\nwindow {elapsed:.1f} s, {len(rss['node_exporter'])} samples per process; "
          f"app load {args.app_rps:g} req/s ({load_requests} requests in total)\n")
    print("| process | RSS median (MiB) | RSS max (MiB) | max RSS, time -v (MiB) | of which anon"
          " (median, MiB) | CPU (% of one core) | threads | RSS ratio vs node_exporter (median)"
          " | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in results.items():
        tv = r["time_v_max_rss_kb"]
        print(f"| {k} | {mb(r['rss_median_kb'])} | {mb(r['rss_max_kb'])} | "
              f"{mb(tv) if tv else '-'} | {mb(r['rss_anon_median_kb'])} | "
              f"{r['cpu_percent_of_one_core']:.2f} | "
              f"{r['threads_median']:g} | {r['rss_median_kb'] / ne['rss_median_kb']:.2f} | "
              f"{r['cpu_percent_of_one_core'] / max(ne['cpu_percent_of_one_core'], 1e-9):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "window_s": elapsed, "variants": [list(v) for v in variants],
            "results": results}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"# kept {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
