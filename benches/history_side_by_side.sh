#!/usr/bin/env bash
# docs/benchmarks.md §14, side by side: runs two builds of coordinator/tests/bench_history.rs
# alternately, 3 rounds, so both see the same machine noise.
#
#   OLD=path/to/old/bench_history-HASH NEW=path/to/new/bench_history-HASH benches/history_side_by_side.sh
#
# Build each with `cargo test --release -p serin-coordinator --test bench_history --no-run`
# (for the old one, in a worktree of the older commit with this test file copied in).
# SIZES (default 0,1000,5000) is passed on as SERIN_BENCH_HISTORY.
set -euo pipefail
: "${OLD:?set OLD to the old build's bench_history binary}"
: "${NEW:?set NEW to the new build's bench_history binary}"
for round in 1 2 3; do
    for build in old new; do
        bin=$OLD
        [ "$build" = new ] && bin=$NEW
        SERIN_BENCH_HISTORY=${SIZES:-0,1000,5000} "$bin" --ignored --nocapture --test-threads 1 \
            2>/dev/null | grep -o 'history  *[0-9]* rollouts.*' | sed "s/^/round $round $build: /"
    done
done
