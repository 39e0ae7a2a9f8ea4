#!/usr/bin/env python3
"""Benchmark 2: rollback latency, from the first bad report to nginx serving the rolled-back
config, with a 1 s report interval.

One stack for all runs (loopback, temporary directory, separate processes of a release `serin`):
`serin coordinator run`, `serin demo-app` api stable v1.0.0 and canary v1.1.0, a private nginx
(`nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`), and `serin agent run` (interval 1s)
scraping both apps and managing that nginx. Load: --rps req/s through nginx, a new connection
per request.

Each run:
  1. canary error rate 0; `serin rollout start api --version v1.1.0 --strategy S
     --stable-version v1.0.0`, S = one 25% stage held for 30 min plus a critical trigger
     (error_rate max 0.2 over window "3s", min_requests 10); wait until nginx serves the new
     generation and the canary answers, then --settle seconds of healthy traffic;
  2. wait a random 0-1 s (so injection lands at a random phase of the scrape cycle), then
     `POST /admin {"error_rate": 1.0}` (--error-rate) to the canary: T_inject = just before the POST;
  3. poll the canary's `GET /admin` every ~5 ms: T_first_bad_scrape = `last_scrape_unix_ms` of
     the first /metrics scrape after the injection (the POST's answer carries the scrape count
     at injection);
  4. poll `GET http://nginx/__serin/generation` every ~5 ms on a fresh connection:
     T_served = first answer with a new generation;
  5. follow-up: sequential new-connection requests through nginx for 1 s from T_served: the
     last one answered by the canary gives T_drained (old nginx workers can still accept for a
     moment after the new generation first answers); and the load's requests sent after
     T_served + 500 ms must not reach the canary at all;
  6. `serin rollout status ID --json`: T_decision = the last event's at_ms (the rollback's
     commit), to split detect (first bad scrape → decision) and apply (decision → served).

Usage:
  cargo build --release
  python3 benches/rollback.py --runs 10
  python3 benches/rollback.py --runs 10 --error-rate 0.5
Prints per-run rows and a summary (Markdown); --json PATH writes the raw numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import (Load, Stack, find_serin, free_port, http_get, http_post_json,  # noqa: E402
                   now_ms, wait_until)

STRATEGY = """# benches/rollback.py: hold the canary at 25% and roll back on an error spike.
[[stages]]
weight = 25
min_duration = "30m"

[[stages]]
weight = 100
min_duration = "1s"

[[triggers]]
name = "canary-error-spike"
metric = "error_rate"
max = 0.2
window = "3s"
min_requests = 10
severity = "critical"
"""

STABLE, CANARY = "v1.0.0", "v1.1.0"
POLL_S = 0.005


def generation(port: int) -> str | None:
    try:
        status, _, body = http_get("127.0.0.1", port, "/__serin/generation", timeout=1)
        return body.strip() if status == 200 else None
    except OSError:
        return None


class AdminPoller(threading.Thread):
    """Polls the canary's GET /admin (keep-alive) and records every new scrape it reports."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stop_event = threading.Event()
        self.scrapes: list[tuple[int, int]] = []  # (metrics_scrapes, last_scrape_unix_ms)

    def run(self):
        conn = None
        last = None
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/admin")
                s = json.loads(conn.getresponse().read())
                key = (s["metrics_scrapes"], s["last_scrape_unix_ms"])
                if key != last:
                    self.scrapes.append(key)
                    last = key
            except (OSError, http.client.HTTPException, ValueError):
                if conn:
                    conn.close()
                conn = None
            time.sleep(POLL_S)

    def stop(self):
        self.stop_event.set()
        self.join()


class GenerationPoller(threading.Thread):
    """Polls nginx's generation marker on a fresh connection each time (as a new client)."""

    def __init__(self, port: int, old: str):
        super().__init__(daemon=True)
        self.port, self.old = port, old
        self.served_ms: float | None = None
        self.new: str | None = None
        self.polls = 0

    def run(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            g = generation(self.port)
            self.polls += 1
            if g is not None and g != self.old:
                self.served_ms, self.new = now_ms(), g
                return
            time.sleep(POLL_S)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def one_run(i: int, stack: Stack, strategy: Path, canary_port: int, listen: int, load: Load,
            settle: float, cooldown: float, error_rate: float) -> dict:
    http_post_json("127.0.0.1", canary_port, "/admin", {"error_rate": 0.0})
    before = generation(listen)
    rid = stack.cli(["rollout", "start", "api", "--version", CANARY, "--strategy", str(strategy),
                     "--stable-version", STABLE]).stdout.strip()
    # nginx serves the 25% config, and the canary really gets traffic.
    wait_until("25% config served", lambda: generation(listen) not in (None, before), timeout=30)
    t_weighted = now_ms()
    wait_until("canary traffic", lambda: any(r[3] == CANARY for r in load.since(t_weighted)),
               timeout=10)
    time.sleep(settle)
    status = json.loads(stack.cli(["rollout", "status", rid, "--json"]).stdout)
    assert status["state"] == "progressing" and status["canary_weight"] == 25, status

    old_gen = generation(listen)
    admin = AdminPoller(canary_port)
    admin.start()
    time.sleep(random.uniform(0.0, 1.0))
    gen_poller = GenerationPoller(listen, old_gen)
    t_inject = now_ms()
    answer = http_post_json("127.0.0.1", canary_port, "/admin", {"error_rate": error_rate})
    t_inject_acked = now_ms()
    scrapes_at_inject = answer["metrics_scrapes"]
    gen_poller.start()
    gen_poller.join()
    t_served = gen_poller.served_ms
    if t_served is None:
        admin.stop()
        stack.cli(["rollout", "abort", rid, "--reason", "bench: no rollback within 60 s"],
                  check=False)
        raise RuntimeError(f"run {i}: nginx did not change generation within 60 s")

    # Follow-up: sequential new-connection requests through nginx for 1 s from T_served (old
    # nginx workers can still accept for a moment after the new generation answers), then 1 s
    # more of the load alone.
    probes = []
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        sent = now_ms()
        try:
            version = http_get("127.0.0.1", listen, "/api/probe", timeout=2)[1].get(
                "x-serin-version", "?")
        except OSError:
            version = "error"
        probes.append((sent, version))
    time.sleep(1.0)
    admin.stop()
    after = load.since(t_served + 500)
    canary_after = sum(1 for r in after if r[3] == CANARY)
    late = [t for t, v in probes if v == CANARY] + [r[0] for r in load.since(t_served)
                                                     if r[3] == CANARY]
    t_drained = max(late, default=t_served)

    status = json.loads(stack.cli(["rollout", "status", rid, "--json"]).stdout)
    last = status["events"][-1]
    t_decision = last["at_ms"]
    new_scrapes = [(n, t) for n, t in admin.scrapes if n > scrapes_at_inject]
    if not new_scrapes:
        raise RuntimeError(f"run {i}: no scrape of the canary seen after the injection")
    n1, t_first = new_scrapes[0]
    deciding = [t for _, t in new_scrapes if t <= t_decision]
    if not deciding or t_decision < t_inject:
        raise RuntimeError(f"run {i}: decided at {t_decision}, before any bad scrape: {last}")
    load.trim()
    # Back to healthy, and a pause so each run starts from the same steady state. (Before
    # commit 41641f2 the pause was needed: a trigger's window reached back before its rollout's
    # start, so the next rollout was rolled back at once on this one's errors.)
    http_post_json("127.0.0.1", canary_port, "/admin", {"error_rate": 0.0})
    time.sleep(cooldown)
    return {
        "run": i + 1,
        "rollout": rid,
        "state": status["state"],
        "last_event": last["kind"],
        "reason": last["reason"],
        "generation": f"{old_gen} -> {gen_poller.new}",
        "t_inject_ms": t_inject,
        "inject_post_ms": t_inject_acked - t_inject,
        "t_first_bad_scrape_ms": t_first,
        "first_scrape_seen_exactly": n1 == scrapes_at_inject + 1,
        "t_decision_ms": t_decision,
        "t_served_ms": t_served,
        "inject_to_first_scrape_ms": t_first - t_inject,
        "first_scrape_to_served_ms": t_served - t_first,
        "inject_to_served_ms": t_served - t_inject,
        "detect_ms": t_decision - t_first,
        "apply_ms": t_served - t_decision,
        "scrapes_after_inject_to_decision": len(deciding),
        "deciding_scrape_to_decision_ms": t_decision - deciding[-1],
        "served_to_drained_ms": t_drained - t_served,
        "canary_hits_sent_after_served": len(late),
        "probes_after_served": len(probes),
        "canary_after_served_plus_500ms": canary_after,
        "requests_after_served_plus_500ms": len(after),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serin", help="serin binary (default target/release/serin, or $SERIN_BIN)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rps", type=float, default=150, help="load through nginx, req/s")
    ap.add_argument("--settle", type=float, default=4.0,
                    help="seconds of healthy canary traffic before each injection")
    ap.add_argument("--cooldown", type=float, default=5.0,
                    help="seconds of healthy canary after a rollback before the next rollout")
    ap.add_argument("--error-rate", type=float, default=1.0,
                    help="canary error rate injected in each run")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", help="write the per-run numbers here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    random.seed(args.seed)

    serin = find_serin(args.serin)
    work = Path(tempfile.mkdtemp(prefix="serin-rollback-"))
    shutil.copy2(serin, work / "serin")
    print(f"# files in {work}; serin = {serin}", file=sys.stderr)
    stack = Stack(work, work / "serin")
    load = None
    runs = []
    try:
        stack.start_coordinator()
        stable = stack.start_demo_app("api-stable", STABLE)
        canary = stack.start_demo_app("api-canary", CANARY)
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
        for i in range(args.runs):
            r = one_run(i, stack, strategy, canary, listen, load, args.settle, args.cooldown,
                       args.error_rate)
            runs.append(r)
            print(f"run {r['run']:>2}: inject->scrape {r['inject_to_first_scrape_ms']:6.0f} ms, "
                  f"scrape->served {r['first_scrape_to_served_ms']:6.0f} ms (detect "
                  f"{r['detect_ms']:5.0f} + apply {r['apply_ms']:4.0f}), inject->served "
                  f"{r['inject_to_served_ms']:6.0f} ms, scrapes {r['scrapes_after_inject_to_decision']}"
                  f", {r['state']}, served->drained {r['served_to_drained_ms']:.0f} ms "
                  f"({r['canary_hits_sent_after_served']} canary hits), canary after "
                  f"served+500ms: {r['canary_after_served_plus_500ms']}/"
                  f"{r['requests_after_served_plus_500ms']}",
                  file=sys.stderr, flush=True)
        sent = len(load.records)
    finally:
        if load:
            load.stop()
        stack.stop()

    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    cols = [("inject_to_first_scrape_ms", "inject → first scrape"),
            ("first_scrape_to_served_ms", "first bad scrape → served"),
            ("detect_ms", "first bad scrape → decision"),
            ("deciding_scrape_to_decision_ms", "deciding scrape → decision"),
            ("apply_ms", "decision → served"),
            ("inject_to_served_ms", "inject → served"),
            ("served_to_drained_ms", "served → last canary hit")]
    print("\n| run | " + " | ".join(c[1] + " (ms)" for c in cols) +
          " | scrapes after injection ≤ decision | canary hits sent after served"
          " | canary hits after served+500 ms |")
    print("|---:|" + "---:|" * len(cols) + "---:|---:|---:|")
    for r in runs:
        print(f"| {r['run']} | " + " | ".join(f"{r[c]:.0f}" for c, _ in cols) +
              f" | {r['scrapes_after_inject_to_decision']} | "
              f"{r['canary_hits_sent_after_served']} of "
              f"{r['probes_after_served'] + r['requests_after_served_plus_500ms']} | "
              f"{r['canary_after_served_plus_500ms']} of {r['requests_after_served_plus_500ms']} |")
    print("\n| measure | median (ms) | p90 | min | max |")
    print("|---|---:|---:|---:|---:|")
    for c, label in cols:
        v = [r[c] for r in runs]
        print(f"| {label} | {statistics.median(v):.0f} | {pct(v, 90):.0f} | {min(v):.0f} | "
              f"{max(v):.0f} |")
    bad = [r for r in runs if r["state"] != "rolled_back" or r["canary_after_served_plus_500ms"]]
    print(f"\n{len(runs)} runs, {sent} load requests; rolled back every time with no canary "
          f"traffic after served+500 ms: {'yes' if not bad else 'NO: ' + str([r['run'] for r in bad])}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
