//! The Raft node: one task owns raft-rs's `RawNode`; everything else talks to it through a
//! [`RaftHandle`] (proposals carry a reply channel) and reads the applied state from a
//! `watch` channel.
//!
//! # Ready handling order (raft-rs "Processing the Ready State")
//!
//! 1. send `messages` (leader-only, safe before persisting);
//! 2. install a snapshot, if any (storage first, then the registry);
//! 3. apply `committed_entries` to the [`Registry`] (in memory only, see below);
//! 4. persist new `entries` and the hard state in one atomic batch, flushed when `must_sync`;
//! 5. only then send `persisted_messages`;
//! 6. `advance`; persist the light ready's commit index, send its messages, apply its committed
//!    entries; `advance_apply`;
//! 7. every `snapshot_every` applied entries, snapshot the registry and compact the log.
//!
//! # What is durable
//!
//! The state machine on disk is the latest snapshot plus the committed log after it, as raft
//! intends: the registry is written whole only with a snapshot (taken here, or installed from
//! a leader), so what an entry costs on disk is the entry, whatever the size of the history.
//! On open the node restores the snapshot (or a newer saved applied state, see
//! [`SledStorage::save_applied`]) and gives its index to raft-rs as `applied`; raft-rs then
//! hands back the committed entries after it in the first ready, and they are applied again,
//! deterministically, onto exactly the state they were first applied to. Entries whose commit
//! index did not reach the disk before a crash are on disk themselves (a leader counts its own
//! vote only once they are flushed): the new leader's first entry commits them again. A
//! restarted single-voter node has replayed everything before it first publishes itself as
//! leader. Conf changes, which also change what raft-rs restarts from, save the registry with
//! them, so they are never replayed onto a membership that already holds them.
//!
//! Proposals are tracked by the log index they land at and the term at proposal time: an entry
//! applied at that index with another term means the proposal was overwritten (dropped).
//!
//! Answers to proposers are held until the view that includes their entry is published: a
//! caller acting on [`RaftHandle::view`] right after its proposal returns (the control loop's
//! next pass) must see its own write, or it decides the same thing again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::storage::{SledStorage, StorageError};
use crate::rollout::{Applied, Command, Generation, Registry, Rejection};

/// How often the node ticks; elections take 10-20 ticks, heartbeats every 3.
pub const TICK: Duration = Duration::from_millis(100);
/// Default: take a state-machine snapshot and compact the log every this many applied entries.
pub const SNAPSHOT_EVERY: u64 = 1000;

/// This node's place in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the control loop and accepts proposals.
    Leader,
    /// Replicates; points writers at the leader.
    Follower,
    /// Campaigning.
    Candidate,
}

/// What readers see of the node: the applied registry and the node's status.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// The state machine as of `applied`.
    pub registry: Arc<Registry>,
    /// This node's id.
    pub id: u64,
    /// Its role.
    pub role: Role,
    /// The leader's id, when known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Last applied log index.
    pub applied: u64,
}

/// Why a proposal did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader.
    #[error("this coordinator is not the leader{}", .leader.map(|l| format!(" (leader is node {l})")).unwrap_or_default())]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<u64>,
    },
    /// The state machine rejected the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The entry was replaced by another leader's entry before committing.
    #[error("the proposal was dropped by a leader change; retry")]
    Dropped,
    /// The node is shutting down or has failed.
    #[error("the raft node stopped")]
    Stopped,
    /// Raft refused the proposal.
    #[error("raft refused the proposal: {0}")]
    Raft(String),
}

/// A fatal node error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The log or state store failed.
    #[error("raft storage: {0}")]
    Storage(#[from] StorageError),
    /// raft-rs reported an error.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The stored state machine could not be decoded.
    #[error("stored state machine is unreadable: {0}")]
    CorruptState(serde_json::Error),
}

/// Sends raft messages to peers. The single-voter node has none; the multi-node transport
/// (gRPC `RaftService`, one ordered queue per peer) implements this too.
pub trait Transport: Send + 'static {
    /// Queue messages for delivery; must not block. Unreachable peers are reported back via
    /// the returned ids.
    fn send(&mut self, messages: Vec<Message>) -> Vec<u64>;
}

/// A transport for a group of one.
#[derive(Debug, Default)]
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&mut self, messages: Vec<Message>) -> Vec<u64> {
        if !messages.is_empty() {
            tracing::debug!(count = messages.len(), "no peers to send raft messages to");
        }
        messages.iter().map(|m| m.to).collect()
    }
}

/// Where a proposal's outcome goes.
type Reply = oneshot::Sender<Result<Applied, ProposeError>>;

enum Request {
    Propose { command: Box<Command>, reply: Reply },
    Step(Box<Message>),
}

/// A cheap, cloneable handle to the node task.
#[derive(Clone)]
pub struct RaftHandle {
    requests: mpsc::Sender<Request>,
    view: watch::Receiver<Arc<NodeView>>,
}

impl RaftHandle {
    /// Proposes a command and waits until it is applied (or rejected).
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Propose {
                command: Box::new(command),
                reply,
            })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Hands a message from a peer to the node.
    pub async fn step(&self, message: Message) -> Result<(), ProposeError> {
        self.requests
            .send(Request::Step(Box::new(message)))
            .await
            .map_err(|_| ProposeError::Stopped)
    }

    /// The latest applied view.
    pub fn view(&self) -> Arc<NodeView> {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every change of the view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<NodeView>> {
        self.view.clone()
    }
}

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (non-zero).
    pub id: u64,
    /// The voters of a brand-new group (ignored once the store holds a conf state).
    pub initial_voters: Vec<u64>,
    /// Snapshot and compact the log every this many applied entries.
    pub snapshot_every: u64,
    /// The election timeout's range in ticks, `min..max` (min at least 10); `None`: raft-rs's
    /// default of 10..20. A range of one value makes elections deterministic (simulation).
    pub election_timeout_ticks: Option<std::ops::Range<usize>>,
}

impl NodeConfig {
    /// A single-voter group of node `id`.
    pub fn single(id: u64) -> NodeConfig {
        NodeConfig {
            id,
            initial_voters: vec![id],
            snapshot_every: SNAPSHOT_EVERY,
            election_timeout_ticks: None,
        }
    }
}

/// The node task's state.
pub struct RaftNode<T: Transport> {
    raw: RawNode<SledStorage>,
    storage: SledStorage,
    registry: Registry,
    applied: u64,
    last_snapshot: u64,
    snapshot_every: u64,
    pending: HashMap<u64, (u64, Reply)>,
    /// Answers of applied proposals, sent once the view including them is published.
    answers: Vec<(Reply, Result<Applied, ProposeError>)>,
    transport: T,
    view: watch::Sender<Arc<NodeView>>,
    requests: mpsc::Receiver<Request>,
}

impl<T: Transport> RaftNode<T> {
    /// Opens the node over `db`, restoring the applied state machine.
    pub fn open(
        db: &sled::Db,
        config: &NodeConfig,
        transport: T,
    ) -> Result<(RaftNode<T>, RaftHandle), NodeError> {
        let storage = SledStorage::open(db)?;
        storage.initialize_if_empty(&config.initial_voters)?;
        let snapshot = storage.latest_snapshot()?;
        let snapshot_index = snapshot.get_metadata().index;
        let (applied, registry) = match storage.load_applied()? {
            Some((applied, bytes)) if applied >= snapshot_index => (applied, decode(&bytes)?),
            // A snapshot installed after the last save: it is the newer state.
            _ => (snapshot_index, decode(snapshot.get_data())?),
        };
        let (min_election_tick, max_election_tick) = config
            .election_timeout_ticks
            .clone()
            .map_or((0, 0), |r| (r.start, r.end));
        let raft_config = raft::Config {
            id: config.id,
            election_tick: 10,
            min_election_tick,
            max_election_tick,
            heartbeat_tick: 3,
            pre_vote: true,
            check_quorum: true,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..raft::Config::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!());
        let raw = RawNode::new(&raft_config, storage.clone(), &logger)?;
        let view_value = Arc::new(NodeView {
            registry: Arc::new(registry.clone()),
            id: config.id,
            role: Role::Follower,
            leader: None,
            term: raw.raft.term,
            applied,
        });
        let (view, view_rx) = watch::channel(view_value);
        let (tx, rx) = mpsc::channel(1024);
        let node = RaftNode {
            raw,
            storage,
            registry,
            applied,
            last_snapshot: applied,
            snapshot_every: config.snapshot_every.max(1),
            pending: HashMap::new(),
            answers: Vec::new(),
            transport,
            view,
            requests: rx,
        };
        Ok((
            node,
            RaftHandle {
                requests: tx,
                view: view_rx,
            },
        ))
    }

    /// The node's store, e.g. to read [`SledStorage::bytes_written`] before spawning the node.
    pub fn storage(&self) -> &SledStorage {
        &self.storage
    }

    /// Runs the node until `shutdown` fires or storage fails.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A group of one need not wait an election timeout.
        if self.raw.raft.prs().conf().voters().ids().len() == 1 {
            self.raw.campaign()?;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => { self.raw.tick(); }
                request = self.requests.recv() => match request {
                    Some(request) => self.handle(request),
                    None => break,
                },
            }
            self.on_ready()?;
        }
        for (_, (_, reply)) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        Ok(())
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Propose { command, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let leader = Some(self.raw.raft.leader_id).filter(|&l| l != 0);
                    let _ = reply.send(Err(ProposeError::NotLeader { leader }));
                    return;
                }
                // Refuse here what could not be decoded when applied: a bad entry must never
                // reach the log.
                let data = match serde_json::to_vec(&command)
                    .and_then(|d| serde_json::from_slice::<Command>(&d).map(|_| d))
                {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Raft(format!(
                            "command cannot be encoded for the log: {e}"
                        ))));
                        return;
                    }
                };
                let expected = self.raw.raft.raft_log.last_index() + 1;
                let term = self.raw.raft.term;
                match self.raw.propose(vec![], data) {
                    Ok(()) if self.raw.raft.raft_log.last_index() == expected => {
                        self.pending.insert(expected, (term, reply));
                    }
                    Ok(()) => {
                        let _ = reply.send(Err(ProposeError::Dropped));
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(ProposeError::NotLeader { leader: None }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
                    }
                }
            }
            Request::Step(message) => {
                if let Err(e) = self.raw.step(*message) {
                    tracing::debug!(error = %e, "ignored raft message");
                }
            }
        }
    }

    fn send(&mut self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        // raft-rs holds a peer sent a snapshot until told how it went; a lost one would stall
        // that follower for good. Reported done once queued: if it never arrives, the
        // follower's rejections bring the leader back to sending another.
        let snapshots: Vec<u64> = messages
            .iter()
            .filter(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        let unreachable = self.transport.send(messages);
        for &peer in &unreachable {
            self.raw.report_unreachable(peer);
        }
        for peer in snapshots {
            let status = if unreachable.contains(&peer) {
                raft::SnapshotStatus::Failure
            } else {
                raft::SnapshotStatus::Finish
            };
            self.raw.report_snapshot(peer, status);
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            let registry = decode(snapshot.get_data())?;
            let index = snapshot.get_metadata().index;
            // The stored snapshot is the durable state machine from here on.
            self.storage.apply_snapshot(snapshot)?;
            self.registry = registry;
            self.applied = index;
            self.last_snapshot = index;
        }
        self.apply_entries(ready.take_committed_entries())?;
        self.storage
            .persist_ready(ready.entries(), ready.hs(), ready.must_sync())?;
        self.send(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_snapshot()?;
        self.publish();
        for (reply, answer) in self.answers.drain(..) {
            let _ = reply.send(answer);
        }
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let mut conf_changed = false;
        for entry in entries {
            let generation = Generation {
                term: entry.term,
                index: entry.index,
            };
            let pending = self.pending.remove(&entry.index);
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => None,
                EntryType::EntryNormal => Some(self.apply_command(&entry.data, generation)),
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &entry.data)
                        .map_err(|e| NodeError::Raft(raft::Error::CodecError(e)))?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.storage.set_conf_state(&cs)?;
                    conf_changed = true;
                    None
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &entry.data)
                        .map_err(|e| NodeError::Raft(raft::Error::CodecError(e)))?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.storage.set_conf_state(&cs)?;
                    conf_changed = true;
                    None
                }
            };
            if let Some((term, reply)) = pending {
                let answer = if term != entry.term {
                    Err(ProposeError::Dropped)
                } else {
                    result.unwrap_or(Err(ProposeError::Dropped))
                };
                self.answers.push((reply, answer));
            }
        }
        self.applied = last;
        // Everything else is replayed from the log on restart (module docs).
        if conf_changed {
            let bytes = serde_json::to_vec(&self.registry).map_err(NodeError::CorruptState)?;
            self.storage.save_applied(last, &bytes)?;
        }
        Ok(())
    }

    fn apply_command(
        &mut self,
        data: &[u8],
        generation: Generation,
    ) -> Result<Applied, ProposeError> {
        let command: Command = match serde_json::from_slice(data) {
            Ok(c) => c,
            Err(e) => {
                // Deterministic on every node: the same bytes fail the same way.
                tracing::error!(index = generation.index, error = %e, "undecodable log entry skipped");
                return Err(ProposeError::Raft(format!("undecodable entry: {e}")));
            }
        };
        // Checkpoints arrive every second per live rollout: not news at info.
        let checkpoint = matches!(command, Command::Checkpoint { .. });
        let result = self.registry.apply(command, generation);
        match &result {
            Ok(applied) if checkpoint => tracing::debug!(
                rollout = ?applied.id,
                index = generation.index,
                "checkpoint applied"
            ),
            Ok(applied) => tracing::info!(
                rollout = ?applied.id,
                state = ?applied.state,
                index = generation.index,
                "applied"
            ),
            Err(rejection) => {
                tracing::debug!(index = generation.index, %rejection, "command rejected")
            }
        }
        result.map_err(ProposeError::Rejected)
    }

    fn maybe_snapshot(&mut self) -> Result<(), NodeError> {
        if self.applied < self.last_snapshot + self.snapshot_every {
            return Ok(());
        }
        let data = serde_json::to_vec(&self.registry).map_err(NodeError::CorruptState)?;
        let conf_state = self.storage.conf_state();
        self.storage
            .create_snapshot(self.applied, conf_state, data)?;
        self.storage.compact(self.applied)?;
        self.last_snapshot = self.applied;
        tracing::info!(index = self.applied, "snapshot taken, log compacted");
        Ok(())
    }

    fn publish(&mut self) {
        let role = match self.raw.raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
            StateRole::Follower => Role::Follower,
        };
        let leader = Some(self.raw.raft.leader_id).filter(|&l| l != 0);
        let term = self.raw.raft.term;
        let applied = self.applied;
        let current = self.view.borrow().clone();
        if current.applied == applied
            && current.role == role
            && current.leader == leader
            && current.term == term
        {
            return;
        }
        let registry = if current.applied == applied {
            current.registry.clone()
        } else {
            Arc::new(self.registry.clone())
        };
        self.view.send_replace(Arc::new(NodeView {
            registry,
            id: current.id,
            role,
            leader,
            term,
            applied,
        }));
    }
}

/// Decodes a stored registry; empty bytes (the bootstrap snapshot) are the empty registry.
fn decode(bytes: &[u8]) -> Result<Registry, NodeError> {
    if bytes.is_empty() {
        return Ok(Registry::default());
    }
    serde_json::from_slice(bytes).map_err(NodeError::CorruptState)
}

/// Opens the node and spawns its task; returns the handle and the task's join handle.
pub fn start<T: Transport>(
    db: &sled::Db,
    config: &NodeConfig,
    transport: T,
    shutdown: CancellationToken,
) -> Result<(RaftHandle, tokio::task::JoinHandle<Result<(), NodeError>>), NodeError> {
    let (node, handle) = RaftNode::open(db, config, transport)?;
    let task = tokio::spawn(node.run(shutdown));
    Ok((handle, task))
}

#[cfg(test)]
mod tests;

// Step-driven API: the simulation drives the node without its run loop
impl<T: Transport> RaftNode<T> {
    /// Advances raft's logical clock by one [`TICK`]; follow with [`RaftNode::process_ready`].
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Hands a peer's message to the node, as the run loop does for [`RaftHandle::step`].
    pub fn step_message(&mut self, message: Message) {
        self.handle(Request::Step(Box::new(message)));
    }

    /// Proposes `command`; the receiver gets its outcome once a later
    /// [`RaftNode::process_ready`] applies (or drops) it, or is closed if the node is dropped.
    pub fn propose_command(
        &mut self,
        command: Command,
    ) -> oneshot::Receiver<Result<Applied, ProposeError>> {
        let (reply, rx) = oneshot::channel();
        self.handle(Request::Propose {
            command: Box::new(command),
            reply,
        });
        rx
    }

    /// Starts an election now (what `run` does first in a group of one).
    pub fn campaign(&mut self) -> Result<(), NodeError> {
        Ok(self.raw.campaign()?)
    }

    /// Handles the ready state, exactly what the run loop does after every event.
    pub fn process_ready(&mut self) -> Result<(), NodeError> {
        self.on_ready()
    }

    /// The view the run loop would publish (current as of the last `process_ready`).
    pub fn current_view(&self) -> Arc<NodeView> {
        self.view.borrow().clone()
    }

    /// The committed log entries from index `from` on that are still in the log (stored or
    /// not yet persisted): what this node has committed, to compare with its peers.
    pub fn committed_entries_from(&self, from: u64) -> Result<Vec<Entry>, NodeError> {
        let log = &self.raw.raft.raft_log;
        let from = from.max(log.first_index());
        if from > log.committed {
            return Ok(Vec::new());
        }
        Ok(log.slice(
            from,
            log.committed + 1,
            None,
            raft::GetEntriesContext::empty(false),
        )?)
    }
}
