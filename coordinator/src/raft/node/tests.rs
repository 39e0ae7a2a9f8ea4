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

struct Running {
    handle: RaftHandle,
    task: tokio::task::JoinHandle<Result<(), NodeError>>,
    shutdown: CancellationToken,
}

impl Running {
    async fn open(path: &std::path::Path, config: &NodeConfig) -> Running {
        let db = open_db(path, Duration::from_secs(10)).unwrap();
        let shutdown = CancellationToken::new();
        let (handle, task) = super::start(&db, config, NoPeers, shutdown.clone()).unwrap();
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
    assert_eq!(applied.state, RolloutState::Progressing);
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
    assert_eq!(resumed.state, RolloutState::Progressing);
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
