//! Benchmark (ignored by default): what one committed command costs the leader with a history
//! of 0, 1,000 or 5,000 finished rollouts in the registry. docs/benchmarks.md §14.
//!
//! ```text
//! cargo nextest run --release -p serin-coordinator --run-ignored only --test bench_history --no-capture
//! SERIN_BENCH_HISTORY=0,1000,5000,10000  (the history sizes to measure)
//! ```
//!
//! One single-voter node on a sled store in a temporary directory, driven step by step on
//! this thread (`RaftNode::propose_command` / `process_ready`, as the simulation does), so the
//! thread's CPU time (`/proc/thread-self/schedstat`) is the node's own work: applying the
//! command, publishing the view, snapshotting every 1,000 entries. sled's fsync waits are in
//! the wall time, not the CPU time. The measured commands pause and resume one live rollout,
//! one at a time (every command its own ready and fsync), in batches of 100; the medians are
//! over the batches. It also times [`Registry::validate`], which checks each operator command
//! against a copy of the registry before it is proposed.

use std::time::{Duration, Instant};

use serin_coordinator::raft::node::{NoPeers, NodeConfig, RaftNode};
use serin_coordinator::rollout::{Actor, Command, RolloutId};
use serin_coordinator::strategy::Strategy;

const STRATEGY: &str = "[[stages]]\nweight = 1\nmin_duration = \"1h\"\n[[stages]]\nweight = 5\n\
                        [[stages]]\nweight = 25\n[[stages]]\nweight = 50\n[[stages]]\nweight = 100\n";
const BATCHES: usize = 30;
const PER_BATCH: usize = 100;

fn operator() -> Actor {
    Actor::Operator("bench".into())
}

fn start(id: &str, service: &str) -> Command {
    Command::Start {
        id: RolloutId(id.into()),
        service: service.into(),
        version: "v2".into(),
        stable_version: Some("v1".into()),
        strategy: Strategy::from_toml(STRATEGY).unwrap(),
        actor: operator(),
        at: 1_000,
    }
}

fn abort(id: &str) -> Command {
    Command::Abort {
        id: RolloutId(id.into()),
        actor: operator(),
        reason: "finished for the benchmark".into(),
        analysis: None,
        at: 2_000,
    }
}

fn steer(id: &str, pause: bool) -> Command {
    let id = RolloutId(id.into());
    if pause {
        Command::Pause {
            id,
            actor: operator(),
            reason: "bench".into(),
            at: 3_000,
        }
    } else {
        Command::Resume {
            id,
            actor: operator(),
            reason: "bench".into(),
            at: 3_000,
        }
    }
}

/// CPU time this thread has run, from the scheduler's own accounting (nanoseconds).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat starts with the time on CPU");
    Duration::from_nanos(ns)
}

struct Node {
    node: RaftNode<NoPeers>,
}

impl Node {
    /// Proposes every command, then runs readies until all are answered; panics on a refusal.
    fn commit(&mut self, commands: Vec<Command>) {
        let mut answers: Vec<_> = commands
            .into_iter()
            .map(|c| self.node.propose_command(c))
            .collect();
        for _ in 0..100 {
            self.node.process_ready().expect("ready");
            answers.retain_mut(|rx| match rx.try_recv() {
                Ok(result) => {
                    result.expect("the command applies");
                    false
                }
                Err(_) => true,
            });
            if answers.is_empty() {
                return;
            }
        }
        panic!("{} commands unanswered after 100 readies", answers.len());
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn measure(history: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let (node, _handle) = RaftNode::open(&db, &NodeConfig::single(1), NoPeers).unwrap();
    let mut node = Node { node };
    node.node.campaign().unwrap();
    node.node.process_ready().unwrap();

    // The history: 64 services, each rollout started and aborted; 64 commands per ready.
    let lanes = 64.min(history.max(1));
    let mut done = 0;
    while done < history {
        let round: Vec<usize> = (done..(done + lanes).min(history)).collect();
        let ids: Vec<String> = round.iter().map(|i| format!("old-{i:06}")).collect();
        let services: Vec<String> = round.iter().map(|i| format!("svc-{}", i % lanes)).collect();
        node.commit(
            ids.iter()
                .zip(&services)
                .map(|(id, service)| start(id, service))
                .collect(),
        );
        node.commit(ids.iter().map(|id| abort(id)).collect());
        done += round.len();
    }
    node.commit(vec![start("live", "web")]);
    let view = node.node.current_view();
    let registry_bytes = serde_json::to_vec(&*view.registry).unwrap().len();
    assert_eq!(view.registry.rollouts.len(), history + 1);

    // Until the next snapshot, so the first one measured writes only what the measured
    // commands changed, not the last of the history.
    let storage = node.node.storage().clone();
    let built = view.applied;
    let mut pause = true;
    while storage.snapshot_metadata().index <= built {
        node.commit(vec![steer("live", pause)]);
        pause = !pause;
    }
    let written_before = storage.bytes_written();
    let mut cpu = Vec::new();
    let mut wall = Vec::new();
    for _ in 0..BATCHES {
        let (c0, w0) = (thread_cpu(), Instant::now());
        for _ in 0..PER_BATCH {
            node.commit(vec![steer("live", pause)]);
            pause = !pause;
        }
        cpu.push((thread_cpu() - c0).as_secs_f64() * 1e6 / PER_BATCH as f64);
        wall.push(w0.elapsed().as_secs_f64() * 1e6 / PER_BATCH as f64);
    }
    let commits = (BATCHES * PER_BATCH) as u64;
    let bytes_per_commit = (storage.bytes_written() - written_before) / commits;
    let worst_cpu = cpu.iter().cloned().fold(0.0, f64::max);

    let registry = node.node.current_view().registry.clone();
    let probe = steer("live", pause);
    let mut validate = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        registry.validate(&probe).expect("valid");
        validate.push(t.elapsed().as_secs_f64() * 1e6);
    }
    format!(
        "history {history:>6} rollouts ({:>6} KiB registry): CPU per commit median {:>7.1} us \
         (worst batch {:>7.1}), wall per commit median {:>7.1} us, {:>5} bytes written per \
         commit, validate median {:>8.2} us",
        registry_bytes / 1024,
        median(&mut cpu),
        worst_cpu,
        median(&mut wall),
        bytes_per_commit,
        median(&mut validate),
    )
}

#[test]
#[ignore = "benchmark: run explicitly (docs/benchmarks.md §14)"]
fn cost_per_commit_with_a_long_history() {
    let sizes: Vec<usize> = std::env::var("SERIN_BENCH_HISTORY")
        .unwrap_or_else(|_| "0,1000,5000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("SERIN_BENCH_HISTORY: comma-separated counts")
        })
        .collect();
    for history in sizes {
        println!("{}", measure(history));
    }
}
