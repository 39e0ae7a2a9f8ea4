//! A seeded simulation of the coordinator cluster and its agents (docs/cluster.md,
//! "Simulation"): real raft nodes on real sled stores, driven step by step over a simulated
//! network with partitions, loss, duplication and delays, crashes and restarts, and clock
//! jumps, checking the invariants after every step and at the end.
//!
//! `SERIN_SIM_SEEDS=N` runs seeds 0..N (default 200); `SERIN_SIM_SEED=S` runs seed S alone
//! and prints its trace (`SERIN_SIM_TRACE_MESSAGES=1` adds every raft message). A failing seed
//! replays exactly from its number.

mod sim;

use std::path::PathBuf;

use sim::cluster::{self, Settings};

const DEFAULT_SEEDS: u64 = 200;

/// A scratch directory on tmpfs when there is one: sled flushes fsync.
fn scratch() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("serin-sim-")
            .tempdir_in(&shm)
    {
        return dir;
    }
    tempfile::Builder::new()
        .prefix("serin-sim-")
        .tempdir()
        .expect("create a scratch directory")
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a whole number: {e}")),
    )
}

fn replay_command(seed: u64) -> String {
    format!(
        "SERIN_SIM_SEED={seed} cargo nextest run -p serin-coordinator --test simulation -- every_seed"
    )
}

#[test]
fn every_seed_keeps_the_invariants() {
    let single = env_u64("SERIN_SIM_SEED");
    let seeds: Vec<u64> = match single {
        Some(seed) => vec![seed],
        None => (0..env_u64("SERIN_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let (mut entries, mut coverage) = (0, cluster::Coverage::default());
    for &seed in &seeds {
        let dir = scratch();
        match cluster::run(seed, dir.path(), Settings::default()) {
            Ok(report) => {
                if single.is_some() {
                    println!("{}", report.trace.join("\n"));
                }
                entries += report.last_index;
                coverage.add(report.coverage);
            }
            Err(failure) => panic!(
                "seed {seed} failed: {}\n\nreplay it with:\n  {}\n\ntrace of seed {seed}:\n{}\n\nseed {seed} failed: {}",
                failure.message,
                replay_command(seed),
                failure.trace.join("\n"),
                failure.message,
            ),
        }
    }
    println!(
        "{} seeds passed: {entries} committed entries, {coverage}",
        seeds.len()
    );
    if seeds.len() as u64 >= DEFAULT_SEEDS {
        // The seeds must reach what they are meant to test, or passing says little.
        let reached = [
            ("crashes", coverage.crashes),
            ("partitions", coverage.partitions),
            ("clock jumps", coverage.clock_jumps),
            ("lost snapshots", coverage.snapshots_lost),
            ("dropped or undecided proposals", coverage.dropped),
        ];
        for (what, count) in reached {
            assert!(count > 0, "{} seeds went through no {what}", seeds.len());
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    let run = |seed| {
        let dir = scratch();
        let settings = Settings {
            active_ms: 20_000,
            quiet_ms: 20_000,
        };
        cluster::run(seed, dir.path(), settings)
            .unwrap_or_else(|f| panic!("seed {seed} failed: {}\n{}", f.message, f.trace.join("\n")))
    };
    for seed in [11, 12] {
        let (first, second) = (run(seed), run(seed));
        assert!(first.last_index > 0);
        assert_eq!(first.trace, second.trace, "seed {seed}'s traces differ");
        assert_eq!(first.registry, second.registry);
    }
}
