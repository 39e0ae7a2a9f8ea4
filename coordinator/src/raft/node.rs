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
//! intends: the registry is written only with a snapshot (taken here, or installed from a
//! leader), as one record per rollout and per service ([`super::records`]), and a snapshot
//! taken here writes only the records changed since the previous one. What an entry costs on
//! disk is the entry, and a snapshot what changed, whatever the size of the history. (In
//! memory the registry's maps are persistent, so the copy published to readers after every
//! batch is O(1) too: [`crate::rollout::Table`].)
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::records::{self, RecordError};
use super::storage::{SledStorage, StorageError, encode_records};
use super::transport::AddressBook;
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
    /// A membership change that cannot be made (now): the reason names it.
    #[error("{0}")]
    Membership(String),
    /// This node stopped leading after the entry was appended and before it committed: it may
    /// still commit under the next leader, or be replaced.
    #[error(
        "this coordinator stopped being the leader before the command committed; it may still \
         commit under the next leader: check before retrying"
    )]
    Undecided,
    /// The leader could not confirm it still leads (a read-index round got no quorum in time).
    #[error("this coordinator could not confirm it is still the leader within {0:?}; retry")]
    Unconfirmed(Duration),
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
    /// The state machine could not be encoded (a bug) or decoded.
    #[error("stored state machine is unreadable: {0}")]
    CorruptState(serde_json::Error),
    /// A snapshot's records do not make a registry.
    #[error("stored state machine is unreadable: {0}")]
    Records(#[from] RecordError),
}

/// Sends raft messages to peers. The single-voter node has none; the multi-node transport
/// ([`super::transport::PeerTransport`], one ordered queue per peer) implements this too.
pub trait Transport: Send + 'static {
    /// Queue messages for delivery; must not block. Unreachable peers are reported back via
    /// the returned ids.
    fn send(&mut self, messages: Vec<Message>) -> Vec<u64>;

    /// Member `id` was removed: stop sending to it.
    fn forget(&mut self, _id: u64) {}

    /// Whether the transport reports each snapshot it queued as delivered or failed
    /// ([`PeerReport`]); when not, the node reports one as finished once it is queued.
    fn reports_snapshots(&self) -> bool {
        false
    }
}

/// What a transport learns about deliveries after [`Transport::send`] returned, sent back to
/// the node (`RaftNode::with_reports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerReport {
    /// A send to the peer failed: raft probes it instead of streaming appends.
    Unreachable(u64),
    /// A snapshot reached the peer.
    SnapshotDelivered(u64),
    /// A snapshot did not reach the peer: raft sends another.
    SnapshotFailed(u64),
}

/// A change of the group's members, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add member `id` at gRPC `address`: first as a learner, promoted to voter by the leader
    /// once it has caught up.
    Add {
        /// The new member's id.
        id: u64,
        /// Its gRPC address.
        address: String,
    },
    /// Remove member `id`.
    Remove {
        /// The member's id.
        id: u64,
    },
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipChange::Add { id, address } => write!(f, "add node {id} at {address}"),
            MembershipChange::Remove { id } => write!(f, "remove node {id}"),
        }
    }
}

/// How the group looks from one node, for `serin cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The answering node.
    pub id: u64,
    /// Its role.
    pub role: Role,
    /// The leader, when known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Members that replicate without voting (catching up before promotion).
    pub learners: Vec<u64>,
    /// Each member's replication progress; only the leader knows it.
    pub progress: Option<BTreeMap<u64, MemberProgress>>,
    /// A proposed membership change not yet applied.
    pub pending_change: Option<String>,
}

/// One member's replication, as the leader tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberProgress {
    /// Highest log index known to be on the member.
    pub matched: u64,
    /// "replicate", "probe" or "snapshot".
    pub state: &'static str,
    /// Whether it answered within the last election timeout.
    pub recent_active: bool,
}

/// How long [`RaftHandle::read_index`] waits for the quorum's confirmation.
pub const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);

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
    Propose {
        command: Box<Command>,
        reply: Reply,
    },
    Step(Box<Message>),
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    ChangeMembership {
        change: MembershipChange,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Status {
        reply: oneshot::Sender<ClusterStatus>,
    },
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

    /// Confirms with a quorum that this node is still the leader, then waits until it has
    /// applied everything committed at that moment: a read after it is current (raft's
    /// read-index). Fails on a follower, or after [`READ_INDEX_TIMEOUT`].
    pub async fn read_index(&self) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::ReadIndex { reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(READ_INDEX_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map(|_| ()),
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Unconfirmed(READ_INDEX_TIMEOUT)),
        }
    }

    /// Proposes a membership change and waits until it is applied.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::ChangeMembership { change, reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// The group as this node sees it now.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Status { reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)
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
    /// The members' gRPC addresses: seeded from the command line, kept up to date from the
    /// committed membership. Written into the bootstrap snapshot of a brand-new group.
    pub book: AddressBook,
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
            book: AddressBook::default(),
            election_timeout_ticks: None,
        }
    }
}

/// A proposed membership change, answered when its entry applies.
struct PendingChange {
    index: u64,
    term: u64,
    description: String,
    reply: Option<oneshot::Sender<Result<(), ProposeError>>>,
}

/// The node task's state.
pub struct RaftNode<T: Transport> {
    raw: RawNode<SledStorage>,
    storage: SledStorage,
    registry: Registry,
    /// The registry as the latest snapshot's records hold it (empty when that snapshot is a
    /// blob of an earlier version): what the next snapshot writes is the difference.
    persisted: Registry,
    applied: u64,
    last_snapshot: u64,
    snapshot_every: u64,
    pending: HashMap<u64, (u64, Reply)>,
    /// Answers of applied proposals, sent once the view including them is published.
    answers: Vec<(Reply, Result<Applied, ProposeError>)>,
    transport: T,
    view: watch::Sender<Arc<NodeView>>,
    requests: mpsc::Receiver<Request>,
    reports: Option<mpsc::UnboundedReceiver<PeerReport>>,
    book: AddressBook,
    /// Read-index requests sent to raft, by context, with when they were asked.
    reads_asked: HashMap<u64, (Instant, oneshot::Sender<Result<u64, ProposeError>>)>,
    /// Contexts of reads in `reads_asked` not handed to raft yet: a leader that has not
    /// committed an entry in its term would drop them silently (see [`RaftNode::send_held_reads`]).
    reads_held: Vec<u64>,
    /// Confirmed reads waiting until the node has applied their index.
    reads_confirmed: Vec<(u64, oneshot::Sender<Result<u64, ProposeError>>)>,
    next_read: u64,
    pending_change: Option<PendingChange>,
    was_leader: bool,
}

impl<T: Transport> RaftNode<T> {
    /// Opens the node over `db`, restoring the applied state machine.
    pub fn open(
        db: &sled::Db,
        config: &NodeConfig,
        transport: T,
    ) -> Result<(RaftNode<T>, RaftHandle), NodeError> {
        let storage = SledStorage::open(db)?;
        // A member that joins a running group starts empty: its leader sends it a snapshot
        // (the bootstrap one at least), membership included.
        if !config.initial_voters.is_empty() {
            let members = config
                .book
                .all()
                .into_iter()
                .filter(|(id, _)| config.initial_voters.contains(id))
                .collect();
            let bootstrap = Registry {
                members,
                ..Registry::default()
            };
            let records = records::all(&bootstrap).map_err(NodeError::CorruptState)?;
            let data = encode_records(records.iter().map(|(k, v)| (&k[..], &v[..])));
            storage.initialize_with(&config.initial_voters, data)?;
        }
        let snapshot_index = storage.snapshot_metadata().index;
        // The records on disk are what the next snapshot's delta is taken against; a blob of
        // an earlier version leaves none, so that snapshot writes every record.
        let (snapshot_registry, persisted) = match storage.state_blob()? {
            Some(blob) => (records::decode_blob(&blob)?, Registry::default()),
            None => {
                let registry = records::registry(storage.state_records()?)?;
                (registry.clone(), registry)
            }
        };
        let (applied, registry) = match storage.load_applied()? {
            Some((applied, bytes)) if applied >= snapshot_index => {
                (applied, records::decode_blob(&bytes)?)
            }
            // A snapshot installed after the last save: it is the newer state.
            _ => (snapshot_index, snapshot_registry),
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
        let mut node = RaftNode {
            raw,
            storage,
            registry,
            persisted,
            applied,
            last_snapshot: applied,
            snapshot_every: config.snapshot_every.max(1),
            pending: HashMap::new(),
            answers: Vec::new(),
            transport,
            view,
            requests: rx,
            reports: None,
            book: config.book.clone(),
            reads_asked: HashMap::new(),
            reads_held: Vec::new(),
            reads_confirmed: Vec::new(),
            next_read: 0,
            pending_change: None,
            was_leader: false,
        };
        node.learn_addresses();
        Ok((
            node,
            RaftHandle {
                requests: tx,
                view: view_rx,
            },
        ))
    }

    /// Delivery reports from the transport (snapshots delivered or not, unreachable peers).
    pub fn with_reports(mut self, reports: mpsc::UnboundedReceiver<PeerReport>) -> Self {
        self.reports = Some(reports);
        self
    }

    /// Records the committed members' addresses in the address book.
    fn learn_addresses(&mut self) {
        for (id, address) in &self.registry.members {
            self.book.set(*id, address);
        }
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
            let report = async {
                match self.reports.as_mut() {
                    Some(reports) => reports.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => self.on_tick(),
                request = self.requests.recv() => match request {
                    Some(request) => self.handle(request),
                    None => break,
                },
                report = report => match report {
                    Some(report) => self.on_report(report),
                    None => self.reports = None,
                },
            }
            self.send_held_reads();
            self.on_ready()?;
        }
        for (_, (_, reply)) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        Ok(())
    }

    fn on_tick(&mut self) {
        self.raw.tick();
        // raft-rs drops read-index requests silently (e.g. before the leader committed an
        // entry in its term); their callers have timed out by now.
        let now = Instant::now();
        self.reads_asked
            .retain(|_, (asked, _)| now.duration_since(*asked) < READ_INDEX_TIMEOUT * 2);
        let asked = &self.reads_asked;
        self.reads_held
            .retain(|context| asked.contains_key(context));
        self.promote_caught_up_learners();
    }

    fn on_report(&mut self, report: PeerReport) {
        match report {
            PeerReport::Unreachable(id) => self.raw.report_unreachable(id),
            PeerReport::SnapshotDelivered(id) => {
                self.raw.report_snapshot(id, SnapshotStatus::Finish)
            }
            PeerReport::SnapshotFailed(id) => self.raw.report_snapshot(id, SnapshotStatus::Failure),
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn leader_id(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|&l| l != 0)
    }

    /// On the leader: a learner whose log reached the commit index becomes a voter (members
    /// are added as learners so that a new member catching up never counts against the
    /// quorum).
    fn promote_caught_up_learners(&mut self) {
        if !self.is_leader() || self.raw.raft.has_pending_conf() || self.pending_change.is_some() {
            return;
        }
        let commit = self.raw.raft.raft_log.committed;
        let learners: Vec<u64> = self
            .raw
            .raft
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .collect();
        let Some(id) = learners.into_iter().find(|id| {
            self.raw
                .raft
                .prs()
                .get(*id)
                .is_some_and(|p| p.matched >= commit && p.recent_active)
        }) else {
            return;
        };
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        let description = format!("promote node {id} to voter");
        tracing::info!(node = id, "learner caught up; promoting it to voter");
        self.propose_change(cc, Vec::new(), description, None);
    }

    fn propose_change(
        &mut self,
        cc: ConfChange,
        context: Vec<u8>,
        description: String,
        reply: Option<oneshot::Sender<Result<(), ProposeError>>>,
    ) {
        let expected = self.raw.raft.raft_log.last_index() + 1;
        let term = self.raw.raft.term;
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) if self.raw.raft.raft_log.last_index() == expected => {
                self.pending_change = Some(PendingChange {
                    index: expected,
                    term,
                    description,
                    reply,
                });
            }
            Ok(()) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(ProposeError::Dropped));
                }
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
                }
            }
        }
    }

    fn change_membership(
        &mut self,
        change: MembershipChange,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    ) {
        if !self.is_leader() {
            let _ = reply.send(Err(ProposeError::NotLeader {
                leader: self.leader_id(),
            }));
            return;
        }
        if let Some(pending) = &self.pending_change {
            let _ = reply.send(Err(ProposeError::Membership(format!(
                "another membership change is pending ({}, at index {}): retry once it is applied",
                pending.description, pending.index
            ))));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            let _ = reply.send(Err(ProposeError::Membership(format!(
                "another membership change is pending (at index {}): retry once it is applied",
                self.raw.raft.pending_conf_index
            ))));
            return;
        }
        let conf = self.raw.raft.prs().conf();
        let voters: Vec<u64> = conf.voters().ids().iter().collect();
        let is_member = |id: u64| voters.contains(&id) || conf.learners().contains(&id);
        let refusal = match &change {
            MembershipChange::Add { id: 0, .. } => Some("node id 0 is reserved by raft".to_owned()),
            MembershipChange::Add { id, .. } if is_member(*id) => {
                Some(format!("node {id} is already a member"))
            }
            MembershipChange::Remove { id } if !is_member(*id) => {
                Some(format!("node {id} is not a member"))
            }
            MembershipChange::Remove { id } if *id == self.raw.raft.id => Some(format!(
                "node {id} is the leader: stop it, and remove it from the new leader once one \
                 is elected"
            )),
            MembershipChange::Remove { id } if voters == [*id] => {
                Some(format!("node {id} is the last voter"))
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            let _ = reply.send(Err(ProposeError::Membership(refusal)));
            return;
        }
        let mut cc = ConfChange::default();
        let context = match &change {
            MembershipChange::Add { id, address } => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = *id;
                address.clone().into_bytes()
            }
            MembershipChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = *id;
                Vec::new()
            }
        };
        tracing::info!(%change, "proposing a membership change");
        self.propose_change(cc, context, change.to_string(), Some(reply));
    }

    fn cluster_status(&self) -> ClusterStatus {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        let progress = self.is_leader().then(|| {
            raft.prs()
                .iter()
                .map(|(id, p)| {
                    let state = match p.state {
                        ProgressState::Probe => "probe",
                        ProgressState::Replicate => "replicate",
                        ProgressState::Snapshot => "snapshot",
                    };
                    let progress = MemberProgress {
                        matched: p.matched,
                        state,
                        recent_active: p.recent_active || *id == raft.id,
                    };
                    (*id, progress)
                })
                .collect()
        });
        ClusterStatus {
            id: raft.id,
            role: role_of(raft.state),
            leader: self.leader_id(),
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied,
            last_index: raft.raft_log.last_index(),
            voters: conf.voters().ids().iter().collect(),
            learners: conf.learners().iter().copied().collect(),
            progress,
            pending_change: self.pending_change.as_ref().map(|p| p.description.clone()),
        }
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
            Request::ReadIndex { reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader: self.leader_id(),
                    }));
                    return;
                }
                self.next_read += 1;
                let context = self.next_read;
                self.reads_asked.insert(context, (Instant::now(), reply));
                self.reads_held.push(context);
                self.send_held_reads();
            }
            Request::ChangeMembership { change, reply } => self.change_membership(change, reply),
            Request::Status { reply } => {
                let _ = reply.send(self.cluster_status());
            }
        }
    }

    /// Hands held reads to raft once this leader has committed an entry in its term. raft-rs
    /// drops a read-index request silently before that (the first ~heartbeat of a new term), so
    /// a read asked of a fresh leader used to wait out [`READ_INDEX_TIMEOUT`] (3 s) and fail;
    /// held here it is answered as soon as the term's first entry commits. Reads whose callers
    /// gave up are dropped from `reads_asked` by [`RaftNode::on_tick`] and skipped here.
    fn send_held_reads(&mut self) {
        if self.reads_held.is_empty()
            || !self.is_leader()
            || !self.raw.raft.commit_to_current_term()
        {
            return;
        }
        for context in std::mem::take(&mut self.reads_held) {
            if self.reads_asked.contains_key(&context) {
                self.raw.read_index(context.to_be_bytes().to_vec());
            }
        }
    }

    /// Read-index rounds that the quorum confirmed, and confirmed reads now applied.
    fn on_read_states(&mut self, states: Vec<raft::ReadState>) {
        for state in states {
            let Ok(context) = <[u8; 8]>::try_from(state.request_ctx.as_slice()) else {
                continue;
            };
            if let Some((_, reply)) = self.reads_asked.remove(&u64::from_be_bytes(context)) {
                self.reads_confirmed.push((state.index, reply));
            }
        }
    }

    fn answer_reads(&mut self) {
        if !self.is_leader() {
            let leader = self.leader_id();
            self.reads_held.clear();
            for (_, (_, reply)) in self.reads_asked.drain() {
                let _ = reply.send(Err(ProposeError::NotLeader { leader }));
            }
            for (_, reply) in self.reads_confirmed.drain(..) {
                let _ = reply.send(Err(ProposeError::NotLeader { leader }));
            }
            return;
        }
        let applied = self.applied;
        let (done, waiting) = std::mem::take(&mut self.reads_confirmed)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_confirmed = waiting;
        for (index, reply) in done {
            let _ = reply.send(Ok(index));
        }
    }

    fn send(&mut self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        // raft-rs holds a peer sent a snapshot until told how it went; a lost one would stall
        // that follower for good. One the transport could not queue has failed; one it queued
        // is reported by the transport when it knows, or here as done: if it never arrives,
        // the follower's rejections bring the leader back to sending another.
        let reported_later = self.transport.reports_snapshots();
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
            if unreachable.contains(&peer) {
                self.raw
                    .report_snapshot(peer, raft::SnapshotStatus::Failure);
            } else if !reported_later {
                self.raw.report_snapshot(peer, raft::SnapshotStatus::Finish);
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        let read_states = ready.take_read_states();
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            let (registry, were_records) = records::decode_snapshot(snapshot.get_data())?;
            let index = snapshot.get_metadata().index;
            // The stored snapshot is the durable state machine from here on.
            self.storage.apply_snapshot(snapshot)?;
            self.persisted = if were_records {
                registry.clone()
            } else {
                Registry::default()
            };
            self.registry = registry;
            self.applied = index;
            self.last_snapshot = index;
            self.learn_addresses();
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
        self.on_read_states(read_states);
        self.maybe_snapshot()?;
        self.publish();
        for (reply, answer) in self.answers.drain(..) {
            let _ = reply.send(answer);
        }
        self.answer_reads();
        self.on_role_change();
        Ok(())
    }

    /// A leader that stepped down answers the proposals and the membership change it had not
    /// committed (they may still commit under the next leader; callers check). Without this,
    /// a leader cut off from the majority kept its callers waiting until they timed out (20 s
    /// for the CLI): their entries' fate is only learnt once the partition heals.
    fn on_role_change(&mut self) {
        let leader = self.is_leader();
        if self.was_leader && !leader {
            tracing::warn!(term = self.raw.raft.term, "no longer the leader");
            for (_, (_, reply)) in self.pending.drain() {
                let _ = reply.send(Err(ProposeError::Undecided));
            }
            if let Some(mut pending) = self.pending_change.take()
                && let Some(reply) = pending.reply.take()
            {
                let _ = reply.send(Err(ProposeError::NotLeader {
                    leader: self.leader_id(),
                }));
            }
        } else if leader && !self.was_leader {
            tracing::info!(term = self.raw.raft.term, "became the leader");
        }
        self.was_leader = leader;
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
                    self.record_member(&cc, &entry.context);
                    conf_changed = true;
                    self.answer_change(entry.index, entry.term);
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
        // Everything else is replayed from the log on restart (module docs). A conf change
        // also changes what a new member must be sent: a snapshot holding the new membership
        // (raft refuses to restore one it is not in), so one is taken at once.
        if conf_changed {
            self.take_snapshot(false)?;
        }
        Ok(())
    }

    /// Keeps the members' addresses in the registry (so snapshots carry them) and the book.
    fn record_member(&mut self, cc: &ConfChange, context: &[u8]) {
        let id = cc.node_id;
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Ok(address) = std::str::from_utf8(context)
                    && !address.is_empty()
                {
                    self.registry.members.insert(id, address.to_owned());
                    self.book.set(id, address);
                }
                tracing::info!(node = id, change = ?cc.get_change_type(), "membership changed");
            }
            ConfChangeType::RemoveNode => {
                self.registry.members.remove(&id);
                self.transport.forget(id);
                if id == self.raw.raft.id {
                    tracing::warn!("this node was removed from the cluster; it no longer votes");
                } else {
                    tracing::info!(node = id, "member removed");
                }
            }
        }
    }

    fn answer_change(&mut self, index: u64, term: u64) {
        if self
            .pending_change
            .as_ref()
            .is_some_and(|p| p.index == index)
        {
            let mut pending = self.pending_change.take().expect("checked");
            if let Some(reply) = pending.reply.take() {
                let answer = if pending.term == term {
                    Ok(())
                } else {
                    Err(ProposeError::Dropped)
                };
                let _ = reply.send(answer);
            }
        }
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
        self.take_snapshot(true)
    }

    /// Snapshots the registry at the applied index (with the current membership), and
    /// compacts the log below it when `compact`.
    fn take_snapshot(&mut self, compact: bool) -> Result<(), NodeError> {
        if self.storage.snapshot_metadata().index >= self.applied {
            return Ok(());
        }
        let delta =
            records::delta(&self.registry, &self.persisted).map_err(NodeError::CorruptState)?;
        let conf_state = self.storage.conf_state();
        self.storage
            .create_snapshot_of_records(self.applied, conf_state, &delta)?;
        self.persisted = self.registry.clone();
        if compact {
            self.storage.compact(self.applied)?;
            self.last_snapshot = self.applied;
            tracing::info!(index = self.applied, "snapshot taken, log compacted");
        } else {
            tracing::info!(
                index = self.applied,
                "snapshot taken for the new membership"
            );
        }
        Ok(())
    }

    fn publish(&mut self) {
        let role = role_of(self.raw.raft.state);
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

fn role_of(state: StateRole) -> Role {
    match state {
        StateRole::Leader => Role::Leader,
        StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
        StateRole::Follower => Role::Follower,
    }
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
