#!/usr/bin/env bash
# Builds what the benchmarks need and runs both (see docs/benchmarks.md).
#   bash benches/run.sh [OUT_DIR]      # default OUT_DIR: /tmp/serin-bench-results
# Needs: cargo, python3 (3.9+, standard library only), nginx, curl, /usr/bin/time,
# /usr/bin/prometheus-node-exporter, haproxy and wrk (apt-get install -y nginx-light curl time
# prometheus-node-exporter haproxy wrk). Takes about 12 minutes on 2 cores (builds mostly cached).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/serin-bench-results}
mkdir -p "$out"

cargo build --release
# The lean agent binary, in the release build and with whole-program LTO (the shipped profile).
cargo build --release -p serin-agent --bin serin-agent
cargo build --profile lean -p serin-agent --bin serin-agent

echo "== footprint: serin agent vs node_exporter" >&2
python3 benches/footprint.py --json "$out/footprint.json" | tee "$out/footprint.md"

echo "== footprint: agent builds side by side" >&2
python3 benches/footprint.py --json "$out/footprint-variants.json" \
  --variant serin-agent-run= \
  --variant serin-agent-release@target/release/serin-agent= \
  --variant serin-agent-lean@target/lean/serin-agent= \
  | tee "$out/footprint-variants.md"

echo "== rollback latency" >&2
python3 benches/rollback.py --runs 10 --json "$out/rollback.json" | tee "$out/rollback.md"
echo "== rollback latency, canary at 50% errors" >&2
python3 benches/rollback.py --runs 10 --error-rate 0.5 --json "$out/rollback-0.5.json" | tee "$out/rollback-0.5.md"
echo "== failed requests during 100 weight changes: HAProxy and nginx" >&2
cargo build --release --example weight_changes
target/release/examples/weight_changes --runs 3 --changes 100 | tee "$out/weight-changes.md"
echo "results in $out" >&2
