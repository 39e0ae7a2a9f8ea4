//! The node against a real sled store: proposals, rejections, restart and compaction.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::raft::storage::open_db;
use crate::rollout::{Actor, RolloutId, RolloutState};
use crate::strategy::Strategy;

fn strategy() -> Strategy {
    Strategy::from_toml("[[stages]]\nweight = 10\n[[stages]]\nweight = 50\n").unwrap()
}

fn start(id: &str, service: &str) -> Command {
    Command::Start {
        id: RolloutId(id.into()),
        service: service.into(),
        version: "v2".into(),
        stable_version: Some("v1".into()),
        strategy: strategy(),
        actor: Actor::Operator("test".into()),
        at: 1,
    }
}

fn pause(id: &str) -> Command {
    Command::Pause {
        id: RolloutId(id.into()),
        actor: Actor::Operator("test".into()),
        reason: "hold".into(),
        at: 2,
    }
}

fn resume(id: &str) -> Command {
    Command::Resume {
        id: RolloutId(id.into()),
        actor: Actor::Operator("test".into()),
        reason: "go".into(),
        at: 3,
    }
}

fn abort(id: &str) -> Command {
    Command::Abort {
        id: RolloutId(id.into()),
        actor: Actor::Operator("test".into()),
        reason: "done".into(),
        analysis: None,
        at: 4,
    }
}

/// Snapshots so rare that none is taken during a test.
fn no_snapshots() -> NodeConfig {
    NodeConfig {
        snapshot_every: 1_000_000,
        ..NodeConfig::single(1)
    }
}

struct Running {
    handle: RaftHandle,
    task: tokio::task::JoinHandle<Result<(), NodeError>>,
    shutdown: CancellationToken,
    /// The node's own store (shares its write counter).
    storage: SledStorage,
}

impl Running {
    async fn open(path: &std::path::Path, config: &NodeConfig) -> Running {
        let db = open_db(path, Duration::from_secs(10)).unwrap();
        let shutdown = CancellationToken::new();
        let (node, handle) = RaftNode::open(&db, config, NoPeers).unwrap();
        let storage = node.storage().clone();
        let task = tokio::spawn(node.run(shutdown.clone()));
        let mut view = handle.subscribe();
        tokio::time::timeout(
            Duration::from_secs(5),
            view.wait_for(|v| v.role == Role::Leader),
        )
        .await
        .expect("a single voter elects itself")
        .unwrap();
        Running {
            handle,
            task,
            shutdown,
            storage,
        }
    }

    /// Pause and resume `id` `times` times: entries of a constant size whose replay, were any
    /// applied twice, would show in the rollout's history.
    async fn pause_resume(&self, id: &str, times: usize) {
        for _ in 0..times {
            self.handle.propose(pause(id)).await.unwrap();
            self.handle.propose(resume(id)).await.unwrap();
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn proposals_apply_and_publish() {
    let dir = tempfile::tempdir().unwrap();
    let node = Running::open(dir.path(), &NodeConfig::single(1)).await;
    let applied = node.handle.propose(start("r1", "api")).await.unwrap();
    assert_eq!(applied.state, Some(RolloutState::Progressing));
    let view = node.handle.view();
    assert_eq!(view.registry.rollouts.len(), 1);
    assert_eq!(view.leader, Some(1));
    assert!(view.applied >= 2, "leader's empty entry plus ours");
    // The generation of the service is the entry that set it.
    let plan = view.registry.traffic("api").unwrap();
    assert_eq!(plan.generation.index, view.applied);
    assert_eq!(plan.generation.term, view.term);
    node.stop().await;
}

#[tokio::test]
async fn rejected_commands_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Running::open(dir.path(), &NodeConfig::single(1)).await;
    node.handle.propose(start("r1", "api")).await.unwrap();
    let before = node.handle.view().registry.clone();
    let err = node.handle.propose(start("r2", "api")).await.unwrap_err();
    assert!(
        matches!(err, ProposeError::Rejected(Rejection::ServiceBusy { .. })),
        "{err}"
    );
    let err = node.handle.propose(pause("nope")).await.unwrap_err();
    assert_eq!(err.to_string(), "rollout 'nope' not found");
    assert_eq!(*node.handle.view().registry, *before);
    node.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::single(1);
    let node = Running::open(dir.path(), &config).await;
    node.handle.propose(start("r1", "api")).await.unwrap();
    node.handle.propose(pause("r1")).await.unwrap();
    let before = node.handle.view();
    node.stop().await;

    let node = Running::open(dir.path(), &config).await;
    let after = node.handle.view();
    assert_eq!(*after.registry, *before.registry);
    assert!(after.applied >= before.applied);
    assert!(after.term > before.term, "a new election happened");
    // And it keeps working: the paused rollout can resume.
    let resumed = node
        .handle
        .propose(Command::Resume {
            id: RolloutId("r1".into()),
            actor: Actor::Operator("test".into()),
            reason: "go".into(),
            at: 3,
        })
        .await
        .unwrap();
    assert_eq!(resumed.state, Some(RolloutState::Progressing));
    node.stop().await;
}

#[tokio::test]
async fn snapshots_compact_the_log_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        snapshot_every: 5,
        ..NodeConfig::single(1)
    };
    let node = Running::open(dir.path(), &config).await;
    for i in 0..12 {
        node.handle
            .propose(start(&format!("r{i}"), &format!("svc{i}")))
            .await
            .unwrap();
    }
    let before = node.handle.view();
    node.stop().await;
    {
        let db = open_db(dir.path(), Duration::from_secs(10)).unwrap();
        let storage = SledStorage::open(&db).unwrap();
        use raft::Storage;
        assert!(
            storage.first_index().unwrap() > 5,
            "log compacted below the snapshot"
        );
        assert!(storage.latest_snapshot().unwrap().get_metadata().index >= 10);
    }
    let node = Running::open(dir.path(), &config).await;
    assert_eq!(*node.handle.view().registry, *before.registry);
    assert_eq!(node.handle.view().registry.rollouts.len(), 12);
    node.stop().await;
}

/// On a multi-threaded runtime the proposer wakes on another worker as soon as it is answered:
/// the view must already hold its entry then, or a caller acting on `view()` acts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposer_sees_its_own_write_in_the_next_view() {
    let dir = tempfile::tempdir().unwrap();
    let node = Running::open(dir.path(), &NodeConfig::single(1)).await;
    for i in 0..100 {
        let id = format!("r{i}");
        let service = format!("svc{i}");
        let before = node.handle.view().applied;
        node.handle.propose(start(&id, &service)).await.unwrap();
        let view = node.handle.view();
        assert!(
            view.applied > before,
            "proposal {i}: answered at applied {} before the view moved past {before}",
            view.applied
        );
        assert!(
            view.registry.rollouts.contains_key(&RolloutId(id.clone())),
            "proposal {i}: the view does not hold rollout {id}"
        );
        let plan = view.registry.traffic(&service).unwrap();
        assert!(
            view.applied >= plan.generation.index,
            "proposal {i}: the view's applied index is behind its own entry"
        );
        // A rejection is an answer too: it must also come after the view is published.
        let before = node.handle.view().applied;
        node.handle.propose(start(&id, &service)).await.unwrap_err();
        assert!(
            node.handle.view().applied > before,
            "proposal {i}: rejected before the view moved past {before}"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn a_restart_without_a_snapshot_replays_the_log_to_the_same_registry_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let config = no_snapshots();
    let node = Running::open(dir.path(), &config).await;
    node.handle.propose(start("r1", "api")).await.unwrap();
    node.pause_resume("r1", 10).await;
    node.handle.propose(pause("r1")).await.unwrap();
    let before = node.handle.view();
    assert_eq!(
        node.storage.snapshot_metadata().index,
        crate::raft::storage::INITIAL_INDEX,
        "no snapshot was taken: the restart must replay the log"
    );
    node.stop().await;

    for restart in 1..=2u64 {
        let node = Running::open(dir.path(), &config).await;
        let after = node.handle.view();
        assert_eq!(*after.registry, *before.registry, "restart {restart}");
        // Each new term's leader commits one empty entry; nothing else is added or lost.
        assert_eq!(after.applied, before.applied + restart, "restart {restart}");
        node.stop().await;
    }
    let node = Running::open(dir.path(), &config).await;
    let resumed = node.handle.propose(resume("r1")).await.unwrap();
    assert_eq!(resumed.state, Some(RolloutState::Progressing));
    node.stop().await;
}

#[tokio::test]
async fn a_restart_right_after_a_snapshot_comes_back_with_the_snapshot_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        snapshot_every: 7,
        ..NodeConfig::single(1)
    };
    let node = Running::open(dir.path(), &config).await;
    node.handle.propose(start("r1", "api")).await.unwrap();
    let mut proposals = 0;
    while node.storage.snapshot_metadata().index != node.handle.view().applied {
        node.handle.propose(pause("r1")).await.unwrap();
        node.handle.propose(resume("r1")).await.unwrap();
        proposals += 1;
        assert!(proposals < 20, "no snapshot landed on the applied index");
    }
    let before = node.handle.view();
    node.stop().await;

    let node = Running::open(dir.path(), &config).await;
    let after = node.handle.view();
    assert_eq!(*after.registry, *before.registry);
    assert_eq!(after.applied, before.applied + 1);
    node.stop().await;
}

/// The commit index of the last entries is written unflushed: a crash can lose it while the
/// entries themselves are on disk. The new leader commits them again, and they apply once.
#[tokio::test]
async fn entries_whose_commit_index_was_lost_are_committed_again_and_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = no_snapshots();
    let node = Running::open(dir.path(), &config).await;
    node.handle.propose(start("r1", "api")).await.unwrap();
    node.pause_resume("r1", 5).await;
    let before = node.handle.view();
    node.stop().await;
    {
        // What a crash before the commit index reached the disk leaves: the entries, an old
        // commit index.
        let db = open_db(dir.path(), Duration::from_secs(10)).unwrap();
        let storage = SledStorage::open(&db).unwrap();
        let mut hs = storage.hard_state().unwrap();
        assert_eq!(hs.commit, before.applied);
        hs.commit = storage.snapshot_metadata().index;
        storage.persist_ready(&[], Some(&hs), true).unwrap();
    }
    let node = Running::open(dir.path(), &config).await;
    let after = node.handle.view();
    assert_eq!(*after.registry, *before.registry);
    assert_eq!(after.applied, before.applied + 1);
    node.stop().await;
}

/// What one applied entry costs on disk must not grow with the history: the registry is
/// written with the snapshots, not with every entry.
#[tokio::test]
async fn bytes_written_per_entry_do_not_depend_on_the_registry_size() {
    async fn per_entry(finished: usize) -> (u64, usize) {
        let dir = tempfile::tempdir().unwrap();
        let node = Running::open(dir.path(), &no_snapshots()).await;
        for i in 0..finished {
            let id = format!("old-{i}");
            node.handle.propose(start(&id, "api")).await.unwrap();
            node.handle.propose(abort(&id)).await.unwrap();
        }
        node.handle.propose(start("live", "api")).await.unwrap();
        let registry = serde_json::to_vec(&*node.handle.view().registry)
            .unwrap()
            .len();
        let written = node.storage.bytes_written();
        let applied = node.handle.view().applied;
        node.pause_resume("live", 10).await;
        let entries = node.handle.view().applied - applied;
        assert_eq!(entries, 20);
        let per_entry = (node.storage.bytes_written() - written) / entries;
        node.stop().await;
        (per_entry, registry)
    }
    let (small, small_registry) = per_entry(0).await;
    let (large, large_registry) = per_entry(100).await;
    assert!(
        large_registry > 50 * small_registry,
        "registries of {small_registry} and {large_registry} bytes are not far enough apart"
    );
    // Larger indexes take a byte or two more to encode; the registry would take kilobytes.
    assert!(
        large <= small + 32,
        "{small} bytes written per entry with a {small_registry}-byte registry, \
         {large} with a {large_registry}-byte one"
    );
}

/// A snapshot writes the records that changed since the previous one: with a hundred
/// finished rollouts in the history, the entries and snapshots of a live rollout cost what
/// they cost with none. A restart rebuilds the same registry from those records.
#[tokio::test]
async fn bytes_written_per_snapshot_do_not_depend_on_the_history() {
    async fn per_entry(finished: usize) -> (u64, usize) {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            snapshot_every: 5,
            ..NodeConfig::single(1)
        };
        let node = Running::open(dir.path(), &config).await;
        for i in 0..finished {
            let id = format!("old-{i}");
            node.handle.propose(start(&id, "api")).await.unwrap();
            node.handle.propose(abort(&id)).await.unwrap();
        }
        node.handle.propose(start("live", "api")).await.unwrap();
        let registry = serde_json::to_vec(&*node.handle.view().registry)
            .unwrap()
            .len();
        let written = node.storage.bytes_written();
        let applied = node.handle.view().applied;
        let snapshot_before = node.storage.snapshot_metadata().index;
        node.pause_resume("live", 10).await;
        let entries = node.handle.view().applied - applied;
        assert_eq!(entries, 20);
        assert!(
            node.storage.snapshot_metadata().index >= snapshot_before + 15,
            "snapshots were taken while measuring"
        );
        let per_entry = (node.storage.bytes_written() - written) / entries;
        let before = node.handle.view();
        node.stop().await;

        let node = Running::open(dir.path(), &config).await;
        assert_eq!(*node.handle.view().registry, *before.registry);
        node.stop().await;
        (per_entry, registry)
    }
    let (small, small_registry) = per_entry(0).await;
    let (large, large_registry) = per_entry(100).await;
    assert!(
        large_registry > 50 * small_registry,
        "registries of {small_registry} and {large_registry} bytes are not far enough apart"
    );
    // The service record (its revisions) grows with the history a little; a snapshot of
    // the whole registry would add tens of kilobytes per entry.
    assert!(
        large <= small + small / 4,
        "{small} bytes written per entry (snapshots included) with a {small_registry}-byte \
         registry, {large} with a {large_registry}-byte one"
    );
}

/// Stores written before the registry stopped being saved at every entry hold it, with its
/// index, newer than the snapshot: it is restored as it is, and the log after it replayed once.
#[tokio::test]
async fn a_store_with_a_registry_saved_at_every_entry_restarts_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = no_snapshots();
    let node = Running::open(dir.path(), &config).await;
    node.handle.propose(start("r1", "api")).await.unwrap();
    node.pause_resume("r1", 3).await;
    let saved = node.handle.view();
    node.storage
        .save_applied(
            saved.applied,
            &serde_json::to_vec(&*saved.registry).unwrap(),
        )
        .unwrap();
    node.pause_resume("r1", 2).await;
    let before = node.handle.view();
    node.stop().await;

    let node = Running::open(dir.path(), &config).await;
    let after = node.handle.view();
    assert_eq!(*after.registry, *before.registry);
    assert_eq!(after.applied, before.applied + 1);
    node.stop().await;
}
