//! An hour of analysis checkpoints, compressed: one live rollout checkpointed `ENTRIES` times
//! (one per simulated second) through a real raft node on sled, with `FINISHED` finished
//! rollouts already in the registry (whatever the node writes per entry that grows with the
//! registry shows as a difference between runs). Prints the raft store's size, the bytes the
//! store handed to sled and the bytes the process wrote (sled's own rewrites included) per
//! checkpoint every 500 entries, so the effect of the snapshot-and-compact every
//! 1000 entries shows. benches/checkpoints.py measures the entry rate of a real stack; this
//! measures where the disk settles.
//!
//! cargo run -p serin-coordinator --example checkpoint_log -- [ENTRIES] [FINISHED]

use std::path::Path;
use std::time::{Duration, Instant};

use serin_coordinator::analysis::{Pair, Window};
use serin_coordinator::raft::node::{NoPeers, NodeConfig, RaftNode};
use serin_coordinator::raft::storage::open_db;
use serin_coordinator::rollout::{Actor, Checkpoint, Command, RolloutId};
use serin_coordinator::strategy::Strategy;
use tokio_util::sync::CancellationToken;

/// The demo app's latency buckets (seconds) and +Inf.
const BOUNDS: [f64; 11] = [
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    f64::INFINITY,
];

/// (apparent, allocated) bytes of the files under `path`.
fn size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (a, b) = size(&entry.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    total
}

/// Bytes this process has passed to `write(2)` and friends (Linux `/proc/self/io` `wchar`):
/// what sled really wrote, with its framing and page rewrites. 0 where unavailable.
fn process_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: ").map(|v| v.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

/// Cumulative windows after `seconds` of 75 stable and 25 canary requests a second.
fn totals(seconds: u64) -> Pair {
    let window = |requests: u64| {
        let buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .enumerate()
            .map(|(i, &b)| (b, requests * (i as u64 + 1) / BOUNDS.len() as u64))
            .collect();
        Window::from_counts(requests, requests / 100, &buckets, requests as f64 * 0.004)
    };
    Pair {
        stable: window(75 * seconds),
        canary: window(25 * seconds),
    }
}

fn start(id: &str, service: &str, at: i64) -> Command {
    Command::Start {
        id: RolloutId(id.into()),
        service: service.into(),
        version: "v1.1.0".into(),
        stable_version: Some("v1.0.0".into()),
        strategy: Strategy::from_toml("[[stages]]\nweight = 25\nmin_duration = \"1h\"\n").unwrap(),
        actor: Actor::Operator("bench".into()),
        at,
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let entries: u64 = args.next().map_or(3600, |a| a.parse().expect("ENTRIES"));
    let finished: u64 = args.next().map_or(0, |a| a.parse().expect("FINISHED"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.sled");
    let db = open_db(&path, Duration::from_secs(10)).unwrap();
    let shutdown = CancellationToken::new();
    let (node, raft) = RaftNode::open(&db, &NodeConfig::single(1), NoPeers).unwrap();
    let storage = node.storage().clone();
    let task = tokio::spawn(node.run(shutdown.clone()));
    raft.subscribe()
        .wait_for(|v| v.role == serin_coordinator::raft::Role::Leader)
        .await
        .unwrap();
    for i in 0..finished {
        let id = format!("old-{i}");
        raft.propose(start(&id, "api", 0)).await.unwrap();
        raft.propose(Command::Abort {
            id: RolloutId(id),
            actor: Actor::Operator("bench".into()),
            reason: "bench".into(),
            analysis: None,
            at: 1,
        })
        .await
        .unwrap();
    }
    let t0 = 1_000_000;
    raft.propose(start("live", "api", t0)).await.unwrap();
    let registry = serde_json::to_vec(&*raft.view().registry).unwrap().len();
    let entry = serde_json::to_vec(&Command::Checkpoint {
        id: RolloutId("live".into()),
        checkpoint: Checkpoint {
            stage: 0,
            stage_started_at: t0,
            data: totals(3600),
            at: t0 + 3_600_000,
        },
    })
    .unwrap()
    .len();
    // What publishing a view costs: the node clones the registry for each applied batch.
    let view = raft.view();
    let cloned = Instant::now();
    for _ in 0..100 {
        std::hint::black_box((*view.registry).clone());
    }
    let clone_us = cloned.elapsed().as_secs_f64() * 1e6 / 100.0;
    drop(view);
    println!(
        "{finished} finished rollouts; registry {registry} bytes as JSON, cloned in {clone_us:.0} µs; \
         a checkpoint entry {entry} bytes"
    );
    println!(
        "| checkpoints | applied index | raft.sled bytes | allocated | store wrote per checkpoint | process wrote per checkpoint |"
    );
    println!("|---|---|---|---|---|---|");
    let began = Instant::now();
    let written_before = storage.bytes_written();
    let process_before = process_written();
    for s in 1..=entries {
        raft.propose(Command::Checkpoint {
            id: RolloutId("live".into()),
            checkpoint: Checkpoint {
                stage: 0,
                stage_started_at: t0,
                data: totals(s),
                at: t0 + s as i64 * 1000,
            },
        })
        .await
        .unwrap();
        if s % 500 == 0 || s == entries {
            db.flush().unwrap();
            let (apparent, allocated) = size(&path);
            println!(
                "| {s} | {} | {apparent} | {allocated} | {} | {} |",
                raft.view().applied,
                (storage.bytes_written() - written_before) / s,
                (process_written() - process_before) / s
            );
        }
    }
    println!(
        "{entries} checkpoints in {:.1} s; the store wrote {} bytes, the process {}",
        began.elapsed().as_secs_f64(),
        storage.bytes_written() - written_before,
        process_written() - process_before
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
