//! The harness: real [`RaftNode`]s (real sled stores, real registries) driven event by event
//! from one seeded RNG and a virtual clock, over the simulated [`Network`], with a workload
//! like the control loop's, agents that fence on generations, and faults (partitions, lossy
//! links, crashes with restarts from what sled had on disk, clock jumps).
//!
//! Everything that varies comes from the seed: raft-rs's only randomness, the election
//! timeout, is pinned per node incarnation (`NodeConfig::election_timeout_ticks` of one
//! value), sled's background flusher is off (only the node's own flushes write), and the
//! harness iterates nothing in hash order. So a seed replays exactly.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::eraftpb::{EntryType, Message};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serin_coordinator::analysis::{Pair, StageAnalysis};
use serin_coordinator::raft::node::{RaftNode, Transport};
use serin_coordinator::raft::{NodeConfig, ProposeError, Role};
use serin_coordinator::rollout::{
    Actor, Applied, Checkpoint, Command, Generation, Millis, Registry, RolloutId, RolloutState,
    TrafficPlan, UpstreamMember,
};
use serin_coordinator::strategy::{Stage, Strategy, Traffic};
use tokio::sync::oneshot;

use super::checker::{Checker, Outcome};
use super::network::{AGENT_BASE, Endpoint, LinkProfile, Network};

/// Virtual milliseconds per raft tick (the node's `TICK`).
const TICK_MS: u64 = 100;
/// The proposers' clocks start here (2026-01-01), then drift by the seed's clock jumps.
const EPOCH_MS: Millis = 1_767_225_600_000;
/// Services the workload rolls out.
const SERVICES: [&str; 2] = ["api", "web"];

/// How long a seed runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Virtual time with workload and faults.
    pub active_ms: u64,
    /// Virtual time after the final heal, with no faults and no workload.
    pub quiet_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            active_ms: 60_000,
            quiet_ms: 30_000,
        }
    }
}

/// What a finished seed did.
#[derive(Debug)]
pub struct Report {
    /// Notable events, in order.
    pub trace: Vec<String>,
    /// The final registry, as JSON (to compare two runs of a seed).
    pub registry: String,
    /// The last committed index.
    pub last_index: u64,
    /// How often each fault and rare path happened.
    pub coverage: Coverage,
}

/// Counts of the faults and rare paths a seed went through, to show the seeds reach them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Coverage {
    /// Nodes crashed (and restarted).
    pub crashes: u64,
    /// Partitions made.
    pub partitions: u64,
    /// Clock jumps.
    pub clock_jumps: u64,
    /// Snapshot messages sent to lagging followers.
    pub snapshots_sent: u64,
    /// Of those, lost on the way.
    pub snapshots_lost: u64,
    /// Proposals answered `Dropped` (overwritten by another leader's entry) or `Undecided`
    /// (their leader stepped down before they committed).
    pub dropped: u64,
    /// Terms reached (the last term of node 1).
    pub terms: u64,
}

impl Coverage {
    /// Adds another seed's counts.
    pub fn add(&mut self, other: Coverage) {
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.clock_jumps += other.clock_jumps;
        self.snapshots_sent += other.snapshots_sent;
        self.snapshots_lost += other.snapshots_lost;
        self.dropped += other.dropped;
        self.terms += other.terms;
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} crashes, {} partitions, {} clock jumps, {} snapshots sent ({} lost), {} proposals dropped or undecided, {} terms",
            self.crashes,
            self.partitions,
            self.clock_jumps,
            self.snapshots_sent,
            self.snapshots_lost,
            self.dropped,
            self.terms
        )
    }
}

/// A broken invariant (or harness failure), with the trace up to it.
#[derive(Debug)]
pub struct Failure {
    /// What broke.
    pub message: String,
    /// Notable events up to the failure.
    pub trace: Vec<String>,
}

/// Runs one seed in a fresh directory under `root`.
pub fn run(seed: u64, root: &Path, settings: Settings) -> Result<Report, Failure> {
    let mut sim = Sim::new(seed, root, settings);
    // A panic in a node (raft-rs asserts its invariants) is a failure of the seed too.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()))
        .unwrap_or_else(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic without a message".into());
            Err(format!("panicked: {text}"))
        });
    match outcome {
        Ok(()) => Ok(Report {
            registry: serde_json::to_string(&*sim.nodes[0].view().registry).unwrap_or_default(),
            last_index: sim.checker.last_index(),
            coverage: Coverage {
                terms: sim.nodes[0].view().term,
                ..sim.coverage
            },
            trace: sim.trace,
        }),
        Err(message) => Err(Failure {
            message: format!("at {} ms: {message}", sim.now),
            trace: sim.trace,
        }),
    }
}

/// Hands a node's messages to the harness, which routes them through the network.
struct SimTransport {
    outbox: Arc<Mutex<Vec<Message>>>,
}

impl Transport for SimTransport {
    fn send(&mut self, messages: Vec<Message>) -> Vec<u64> {
        self.outbox.lock().expect("outbox").extend(messages);
        Vec::new()
    }
}

/// A proposal waiting for its answer.
struct Pending {
    reply: oneshot::Receiver<Result<Applied, ProposeError>>,
    data: Vec<u8>,
    what: String,
}

/// One coordinator: its store on disk and, while it runs, the node.
struct Slot {
    id: u64,
    voters: Vec<u64>,
    snapshot_every: u64,
    node: Option<RaftNode<SimTransport>>,
    db: Option<sled::Db>,
    dir: PathBuf,
    incarnation: u32,
    outbox: Arc<Mutex<Vec<Message>>>,
    /// Added to virtual time to give this node's wall clock.
    clock_offset: Millis,
    /// The highest committed index handed to the checker.
    recorded: u64,
    pending: Vec<Pending>,
    last_status: Option<(Role, u64)>,
}

impl Slot {
    fn view(&self) -> Arc<serin_coordinator::raft::NodeView> {
        self.node.as_ref().expect("node is running").current_view()
    }
}

/// What a desired-state push carries: every service's plan, at their newest generation.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    generation: Generation,
    plans: Vec<TrafficPlan>,
}

impl Desired {
    fn of(registry: &Registry) -> Desired {
        let plans: Vec<TrafficPlan> = registry
            .services
            .keys()
            .filter_map(|s| registry.traffic(s))
            .collect();
        Desired {
            generation: plans.iter().map(|p| p.generation).max().unwrap_or_default(),
            plans,
        }
    }
}

enum Event {
    Tick(u64),
    Raft(Box<Message>),
    Push {
        agent: usize,
        from: u64,
        desired: Box<Desired>,
    },
    PushRound,
    Control,
    Fault,
    Restart(u64),
    EndActive,
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Sim {
    rng: StdRng,
    settings: Settings,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<Slot>,
    /// Each agent's held desired state (fenced by generation).
    agents: Vec<Option<Desired>>,
    net: Network,
    checker: Checker,
    trace: Vec<String>,
    root: PathBuf,
    active: bool,
    next_rollout: u64,
    nonce: u64,
    coverage: Coverage,
}

impl Sim {
    fn new(seed: u64, root: &Path, settings: Settings) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let size = if rng.random_bool(0.5) { 3 } else { 5 };
        let agents = rng.random_range(1..=3);
        let snapshot_every = if rng.random_bool(0.5) {
            1_000_000
        } else {
            rng.random_range(20..=80)
        };
        let voters: Vec<u64> = (1..=size).collect();
        let nodes = voters
            .iter()
            .map(|&id| Slot {
                id,
                voters: voters.clone(),
                snapshot_every,
                node: None,
                db: None,
                dir: root.join(format!("node{id}-0")),
                incarnation: 0,
                outbox: Arc::default(),
                clock_offset: 0,
                recorded: 0,
                pending: Vec::new(),
                last_status: None,
            })
            .collect();
        let mut sim = Sim {
            rng,
            settings,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            agents: vec![None; agents],
            net: Network::new(),
            checker: Checker::default(),
            trace: Vec::new(),
            root: root.to_owned(),
            active: true,
            next_rollout: 1,
            nonce: 0,
            coverage: Coverage::default(),
        };
        sim.note(format!(
            "seed {seed}: {size} coordinators, {agents} agents, snapshot every {snapshot_every} entries"
        ));
        sim
    }

    fn note(&mut self, line: String) {
        self.trace.push(format!("[{:>6} ms] {line}", self.now));
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: self.now + after_ms,
            seq: self.seq,
            event,
        }));
    }

    fn run(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            self.open(id)?;
            let phase = self.rng.random_range(0..TICK_MS);
            self.schedule(phase, Event::Tick(id));
        }
        self.schedule(500, Event::Control);
        {
            let after = self.rng.random_range(1_000..4_000);
            self.schedule(after, Event::Fault);
        }
        self.schedule(250, Event::PushRound);
        self.schedule(self.settings.active_ms, Event::EndActive);
        let end = self.settings.active_ms + self.settings.quiet_ms;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > end {
                break;
            }
            self.now = next.at;
            self.handle(next.event)?;
        }
        self.final_check()
    }

    fn handle(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Tick(id) => {
                self.schedule(TICK_MS, Event::Tick(id));
                self.drive(id, |n| n.tick())?;
            }
            Event::Raft(message) => {
                let (from, to) = (message.from, message.to);
                if self.net.connected(from, to) {
                    self.drive(to, |n| n.step_message(*message))?;
                }
            }
            Event::Push {
                agent,
                from,
                desired,
            } => {
                if self.net.connected(from, AGENT_BASE + agent as u64 + 1) {
                    self.receive(agent, from, *desired)?;
                }
            }
            Event::PushRound => {
                {
                    let after = self.rng.random_range(200..=800);
                    self.schedule(after, Event::PushRound);
                }
                self.push_round();
            }
            Event::Control if self.active => {
                {
                    let after = self.rng.random_range(150..=700);
                    self.schedule(after, Event::Control);
                }
                self.control()?;
            }
            Event::Control => {}
            Event::Fault if self.active => {
                {
                    let after = self.rng.random_range(1_500..=6_000);
                    self.schedule(after, Event::Fault);
                }
                self.fault()?;
            }
            Event::Fault => {}
            Event::Restart(id) => {
                if self.nodes[id as usize - 1].node.is_none() {
                    self.open(id)?;
                }
            }
            Event::EndActive => {
                self.active = false;
                self.net.heal();
                self.net.profile = LinkProfile::CALM;
                self.note(
                    "final heal: no partition, calm links, every node up; quiet from here".into(),
                );
                for i in 0..self.nodes.len() {
                    if self.nodes[i].node.is_none() {
                        let id = self.nodes[i].id;
                        self.open(id)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens (or reopens after a crash) node `id` from its directory.
    fn open(&mut self, id: u64) -> Result<(), String> {
        let timeout = self.rng.random_range(10..30);
        let slot = &mut self.nodes[id as usize - 1];
        let db = open_store(&slot.dir)
            .map_err(|e| format!("node {id}: open sled at {}: {e}", slot.dir.display()))?;
        let config = NodeConfig {
            id,
            initial_voters: slot.voters.clone(),
            snapshot_every: slot.snapshot_every,
            election_timeout_ticks: Some(timeout..timeout + 1),
            ..NodeConfig::single(id)
        };
        slot.outbox.lock().expect("outbox").clear();
        let transport = SimTransport {
            outbox: slot.outbox.clone(),
        };
        let (node, _handle) = RaftNode::open(&db, &config, transport)
            .map_err(|e| format!("node {id}: reopen failed: {e}"))?;
        let view = node.current_view();
        if slot.incarnation == 0 {
            // The bootstrap snapshot: the history starts after it.
            self.checker.start_after(view.applied);
        }
        slot.recorded = view.applied;
        slot.node = Some(node);
        slot.db = Some(db);
        slot.last_status = None;
        if slot.incarnation > 0 {
            // What the node restored (snapshot, saved state, replay) is the committed history.
            let expected = self.checker.registry_at(view.applied)?;
            if *view.registry != expected {
                return Err(format!(
                    "node {id} reopened at index {} with a registry other than the committed history's",
                    view.applied
                ));
            }
        }
        let slot = &mut self.nodes[id as usize - 1];
        let line = format!(
            "node {id} up (incarnation {}): term {}, applied {}, election timeout {timeout} ticks",
            slot.incarnation, view.term, view.applied
        );
        self.note(line);
        self.drive(id, |_| {})
    }

    /// Kills node `id`: its store keeps only what sled had written to its files (what the
    /// node flushed), as after `kill -9`.
    fn crash(&mut self, id: u64) -> Result<(), String> {
        self.coverage.crashes += 1;
        let slot = &mut self.nodes[id as usize - 1];
        let image = self.root.join(format!("node{id}-{}", slot.incarnation + 1));
        copy_dir(&slot.dir, &image).map_err(|e| format!("node {id}: crash image: {e}"))?;
        for pending in slot.pending.drain(..) {
            self.checker
                .outcome(pending.data, pending.what, Outcome::Unknown);
        }
        // Dropping flushes into the old directory, which is thrown away with it.
        slot.node = None;
        slot.db = None;
        let lock = std::fs::File::open(slot.dir.join("db"))
            .map_err(|e| format!("node {id}: open its old db file: {e}"))?;
        // sled releases its file lock once its deferred drops run, shortly after.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock.try_lock().is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "node {id}: its sled db is still open 5 s after the node was dropped"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(lock);
        std::fs::remove_dir_all(&slot.dir)
            .map_err(|e| format!("node {id}: remove old dir: {e}"))?;
        slot.dir = image;
        slot.incarnation += 1;
        slot.outbox.lock().expect("outbox").clear();
        Ok(())
    }

    /// Runs `action` on node `id` if it is up, then what its run loop does after an event.
    fn drive(
        &mut self,
        id: u64,
        action: impl FnOnce(&mut RaftNode<SimTransport>),
    ) -> Result<(), String> {
        let Some(node) = self.nodes[id as usize - 1].node.as_mut() else {
            return Ok(());
        };
        action(node);
        // Before the ready: what is committed but not applied cannot have been compacted.
        self.record(id)?;
        let slot = &mut self.nodes[id as usize - 1];
        let node = slot.node.as_mut().expect("node is up");
        node.process_ready()
            .map_err(|e| format!("node {id}: ready handling failed: {e}"))?;
        self.record(id)?;
        let slot = &mut self.nodes[id as usize - 1];
        let view = slot.view();
        slot.recorded = slot.recorded.max(view.applied);
        let messages: Vec<Message> = std::mem::take(&mut *slot.outbox.lock().expect("outbox"));
        self.answers(id)?;
        if view.role == Role::Leader {
            self.checker.leader(view.term, id)?;
        }
        let status = (view.role, view.term);
        if self.nodes[id as usize - 1].last_status != Some(status) {
            self.nodes[id as usize - 1].last_status = Some(status);
            self.note(format!(
                "node {id} is {:?} in term {} (applied {})",
                view.role, view.term, view.applied
            ));
        }
        for message in messages {
            let deliveries = self.net.deliveries(id, message.to, &mut self.rng);
            if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                self.coverage.snapshots_sent += 1;
                self.coverage.snapshots_lost += u64::from(deliveries.is_empty());
                let line = format!(
                    "node {id} sends a snapshot at index {} to node {}{}",
                    message.get_snapshot().get_metadata().index,
                    message.to,
                    if deliveries.is_empty() { " (lost)" } else { "" }
                );
                self.note(line);
            }
            if std::env::var_os("SERIN_SIM_TRACE_MESSAGES").is_some() {
                let line = format!(
                    "{:?} {} -> {} term {} index {} commit {} entries {} reject {}: {}",
                    message.get_msg_type(),
                    id,
                    message.to,
                    message.term,
                    message.index,
                    message.commit,
                    message.entries.len(),
                    message.reject,
                    if deliveries.is_empty() {
                        "lost"
                    } else {
                        "sent"
                    }
                );
                self.note(line);
            }
            for delay in deliveries {
                self.schedule(delay, Event::Raft(Box::new(message.clone())));
            }
        }
        Ok(())
    }

    /// Hands node `id`'s newly committed entries to the checker.
    fn record(&mut self, id: u64) -> Result<(), String> {
        let slot = &mut self.nodes[id as usize - 1];
        let node = slot.node.as_ref().expect("node is up");
        let entries = node
            .committed_entries_from(slot.recorded + 1)
            .map_err(|e| format!("node {id}: read its committed entries: {e}"))?;
        for entry in entries {
            let data: &[u8] = if entry.get_entry_type() == EntryType::EntryNormal {
                &entry.data
            } else {
                &[]
            };
            self.checker.committed(id, entry.index, entry.term, data)?;
            slot.recorded = entry.index;
        }
        Ok(())
    }

    /// Collects the answers node `id` has sent to its proposers.
    fn answers(&mut self, id: u64) -> Result<(), String> {
        let slot = &mut self.nodes[id as usize - 1];
        let mut waiting = Vec::new();
        let mut answered = Vec::new();
        // Proposals whose leader stepped down before they committed.
        let mut undecided = 0;
        for mut pending in slot.pending.drain(..) {
            let outcome = match pending.reply.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    waiting.push(pending);
                    continue;
                }
                Err(oneshot::error::TryRecvError::Closed) => Outcome::Unknown,
                Ok(Ok(_)) => Outcome::Applied,
                Ok(Err(ProposeError::Rejected(_))) => Outcome::Rejected,
                Ok(Err(ProposeError::Dropped)) => Outcome::Dropped,
                Ok(Err(ProposeError::NotLeader { .. })) => Outcome::NotLeader,
                Ok(Err(ProposeError::Undecided)) => {
                    undecided += 1;
                    Outcome::Unknown
                }
                Ok(Err(
                    ProposeError::Stopped
                    | ProposeError::Raft(_)
                    | ProposeError::Membership(_)
                    | ProposeError::Unconfirmed(_),
                )) => Outcome::Unknown,
            };
            answered.push((pending, outcome));
        }
        slot.pending = waiting;
        let applied = slot.node.as_ref().map_or(0, |n| n.current_view().applied);
        self.coverage.dropped += undecided;
        for (pending, outcome) in answered {
            if matches!(outcome, Outcome::Applied | Outcome::Rejected) {
                // The answer comes with the view that includes the entry (module docs of node.rs).
                match self.checker.index_of(&pending.data) {
                    None => {
                        return Err(format!(
                            "{} was answered {outcome:?} before any node committed it",
                            pending.what
                        ));
                    }
                    Some(index) if index > applied => {
                        return Err(format!(
                            "{} was answered {outcome:?} at index {index} while node {id}'s view is at {applied}",
                            pending.what
                        ));
                    }
                    Some(_) => {}
                }
            }
            if outcome == Outcome::Dropped {
                self.coverage.dropped += 1;
            }
            if outcome != Outcome::NotLeader {
                self.note(format!("node {id} answered {outcome:?}: {}", pending.what));
            }
            self.checker.outcome(pending.data, pending.what, outcome);
        }
        Ok(())
    }

    /// Every node that believes it leads pushes its applied desired state to every agent.
    fn push_round(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(node) = self.nodes[i].node.as_ref() else {
                continue;
            };
            let view = node.current_view();
            if view.role != Role::Leader {
                continue;
            }
            let desired = Desired::of(&view.registry);
            for agent in 0..self.agents.len() {
                let to = AGENT_BASE + agent as u64 + 1;
                for delay in self.net.deliveries(view.id, to, &mut self.rng) {
                    self.schedule(
                        delay,
                        Event::Push {
                            agent,
                            from: view.id,
                            desired: Box::new(desired.clone()),
                        },
                    );
                }
            }
        }
    }

    /// An agent takes a desired state unless it holds a newer generation (the agent's fencing).
    fn receive(&mut self, agent: usize, from: u64, desired: Desired) -> Result<(), String> {
        let held = &mut self.agents[agent];
        // The coordinator sends a generation once (agents.rs): one generation, one state.
        if let Some(h) = held.as_ref()
            && h.generation == desired.generation
            && h.plans != desired.plans
        {
            return Err(format!(
                "agent {} got two different desired states at generation {}",
                agent + 1,
                desired.generation
            ));
        }
        if held
            .as_ref()
            .is_some_and(|h| h.generation > desired.generation)
        {
            return Ok(());
        }
        let changed = held
            .as_ref()
            .is_none_or(|h| h.generation != desired.generation);
        let generation = desired.generation;
        *held = Some(desired);
        if changed {
            self.note(format!(
                "agent {} took generation {generation} from node {from}",
                agent + 1
            ));
        }
        Ok(())
    }

    /// The workload: what a control loop (and operators) would propose, judged from the
    /// proposer's own, possibly stale, view.
    fn control(&mut self) -> Result<(), String> {
        let up: Vec<u64> = self
            .nodes
            .iter()
            .filter(|s| s.node.is_some())
            .map(|s| s.id)
            .collect();
        if up.is_empty() {
            return Ok(());
        }
        let leaders: Vec<u64> = up
            .iter()
            .copied()
            .filter(|&id| self.nodes[id as usize - 1].view().role == Role::Leader)
            .collect();
        let id = if !leaders.is_empty() && self.rng.random_bool(0.9) {
            leaders[self.rng.random_range(0..leaders.len())]
        } else {
            up[self.rng.random_range(0..up.len())]
        };
        let slot = &self.nodes[id as usize - 1];
        let registry = slot.view().registry.clone();
        let at = EPOCH_MS + self.now as Millis + slot.clock_offset;
        let service = SERVICES[self.rng.random_range(0..SERVICES.len())];
        self.nonce += 1;
        let Some(command) = self.decide(&registry, service, at) else {
            return Ok(());
        };
        let data = serde_json::to_vec(&command).map_err(|e| format!("encode command: {e}"))?;
        let what = format!(
            "#{} {} {} via node {id}",
            self.nonce,
            command.action(),
            command.rollout_id().map_or(service, |r| r.0.as_str())
        );
        let slot = &mut self.nodes[id as usize - 1];
        let node = slot.node.as_mut().expect("node is up");
        let reply = node.propose_command(command);
        slot.pending.push(Pending { reply, data, what });
        self.drive(id, |_| {})
    }

    fn decide(&mut self, registry: &Registry, service: &str, at: Millis) -> Option<Command> {
        let nonce = self.nonce;
        let reason = format!("sim #{nonce}");
        let analysis = StageAnalysis {
            data: marked(nonce),
            checks: Vec::new(),
        };
        let record = registry.services.get(service);
        let active = record
            .and_then(|s| s.active.as_ref())
            .and_then(|id| registry.rollouts.get(id));
        let Some(rollout) = active else {
            match self.rng.random_range(0..100) {
                0..40 => {}
                // Membership and undo change a service's traffic outside its rollouts.
                40..50 => {
                    let count = self.rng.random_range(1..=3);
                    let members = (1..=count)
                        .map(|i| UpstreamMember {
                            address: format!("10.0.0.{i}:8080"),
                            canary: i == count && count > 1,
                            instance: format!("{service}-{i}"),
                            agent: format!("host-{i}"),
                            version: None,
                        })
                        .collect();
                    return Some(Command::SetUpstreams {
                        service: service.into(),
                        members,
                        reason,
                        at,
                    });
                }
                50..58 => {
                    return Some(Command::Undo {
                        service: service.into(),
                        to_revision: 0,
                        actor: Actor::Operator("ops".into()),
                        reason,
                        at,
                    });
                }
                _ => return None,
            }
            let n = self.next_rollout;
            self.next_rollout += 1;
            let stages = self.rng.random_range(1..=4);
            let mut weight = 0;
            let stages = (0..stages)
                .map(|_| {
                    weight += self.rng.random_range(1..=25);
                    Stage {
                        weight,
                        min_duration: Duration::from_secs(10),
                        max_duration: None,
                        manual_gate: self.rng.random_bool(0.2),
                    }
                })
                .collect();
            let known = record.is_some_and(|s| !s.revisions.is_empty());
            return Some(Command::Start {
                id: RolloutId(format!("{service}-{n}")),
                service: service.into(),
                version: format!("v{n}"),
                stable_version: (!known).then(|| "v0".into()),
                strategy: Strategy {
                    stages,
                    checks: Vec::new(),
                    triggers: Vec::new(),
                    traffic: Traffic::default(),
                    hooks: Vec::new(),
                    deploy: None,
                    on_inconclusive: serin_coordinator::strategy::OnInconclusive::Pause,
                },
                actor: Actor::Operator(reason),
                at,
            });
        };
        let id = rollout.id.clone();
        let roll = self.rng.random_range(0..100);
        let command = match rollout.state {
            RolloutState::Progressing => match roll {
                // A stale repeat of the previous stage, as a control loop on an old view would.
                0..10 => Command::StagePassed {
                    id,
                    stage: rollout.stage_index.saturating_sub(1),
                    analysis,
                    at,
                },
                10..50 => Command::StagePassed {
                    id,
                    stage: rollout.stage_index,
                    analysis,
                    at,
                },
                50..75 => Command::Checkpoint {
                    id,
                    checkpoint: Checkpoint {
                        stage: rollout.stage_index,
                        stage_started_at: rollout.stage_started_at,
                        data: marked(nonce),
                        at,
                    },
                },
                75..85 => Command::Pause {
                    id,
                    actor: Actor::Operator("ops".into()),
                    reason,
                    at,
                },
                85..92 => Command::RollBack {
                    id,
                    reason,
                    analysis: Some(analysis),
                    at,
                },
                92..96 => Command::Abort {
                    id,
                    actor: Actor::Operator("ops".into()),
                    reason,
                    analysis: None,
                    at,
                },
                _ => Command::Promote {
                    id,
                    actor: Actor::Operator("ops".into()),
                    reason,
                    analysis: None,
                    at,
                },
            },
            RolloutState::Paused | RolloutState::AwaitingPromotion => match roll {
                0..60 => Command::Resume {
                    id,
                    actor: Actor::Operator("ops".into()),
                    reason,
                    at,
                },
                60..80 => Command::Abort {
                    id,
                    actor: Actor::Operator("ops".into()),
                    reason,
                    analysis: None,
                    at,
                },
                _ => return None,
            },
            RolloutState::Promoted | RolloutState::RolledBack | RolloutState::Aborted => {
                return None;
            }
        };
        Some(command)
    }

    fn fault(&mut self) -> Result<(), String> {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..25 => {
                let mut endpoints: Vec<Endpoint> = self.nodes.iter().map(|s| s.id).collect();
                endpoints.extend((0..self.agents.len()).map(|a| AGENT_BASE + a as u64 + 1));
                let what = self.net.partition(&endpoints, &mut self.rng);
                self.coverage.partitions += 1;
                self.note(format!("partition: {what}"));
            }
            25..40 => {
                self.net.heal();
                self.note("heal".into());
            }
            40..62 => {
                let up: Vec<u64> = self
                    .nodes
                    .iter()
                    .filter(|s| s.node.is_some())
                    .map(|s| s.id)
                    .collect();
                if let Some(&id) = up.get(self.rng.random_range(0..up.len().max(1))) {
                    let down_for = self.rng.random_range(300..=8_000);
                    self.note(format!("crash node {id}, restart in {down_for} ms"));
                    self.crash(id)?;
                    self.schedule(down_for, Event::Restart(id));
                }
            }
            62..77 => {
                let i = self.rng.random_range(0..self.nodes.len());
                let jump: Millis = self.rng.random_range(-3_600_000..=3_600_000);
                self.nodes[i].clock_offset += jump;
                self.coverage.clock_jumps += 1;
                let id = self.nodes[i].id;
                self.note(format!("node {id}'s clock jumps {jump} ms"));
            }
            77..92 => {
                self.net.profile = LinkProfile::random(&mut self.rng);
                let p = self.net.profile;
                self.note(format!(
                    "links: {:.0}% loss, {:.0}% duplicated, {}-{} ms, {:.0}% slow up to {} ms",
                    p.loss * 100.0,
                    p.duplication * 100.0,
                    p.delay_ms.0,
                    p.delay_ms.1,
                    p.slow * 100.0,
                    p.slow_ms
                ));
            }
            _ => {
                self.net.profile = LinkProfile::CALM;
                self.note("links calm".into());
            }
        }
        Ok(())
    }

    /// After the quiet period: one history, every node at its end with the state it replays
    /// to, one leader, every agent holding the committed desired state.
    fn final_check(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            self.answers(id)?;
        }
        let replayed = self.checker.replay()?;
        let last = self.checker.last_index();
        let views: Vec<_> = self.nodes.iter().map(Slot::view).collect();
        for view in &views {
            if view.applied != last {
                return Err(format!(
                    "after the quiet period node {} applied {} of {last} committed entries",
                    view.id, view.applied
                ));
            }
            if *view.registry != replayed {
                return Err(format!(
                    "node {}'s registry differs from replaying the committed history",
                    view.id
                ));
            }
        }
        let top = views.iter().map(|v| v.term).max().unwrap_or(0);
        let leaders: Vec<u64> = views
            .iter()
            .filter(|v| v.role == Role::Leader)
            .map(|v| v.id)
            .collect();
        if leaders.len() != 1 || views.iter().any(|v| v.term != top) {
            return Err(format!(
                "after the quiet period: leaders {leaders:?}, terms {:?}",
                views.iter().map(|v| (v.id, v.term)).collect::<Vec<_>>()
            ));
        }
        let desired = Desired::of(&replayed);
        for (i, held) in self.agents.iter().enumerate() {
            if held.as_ref() != Some(&desired) && !(held.is_none() && desired.plans.is_empty()) {
                return Err(format!(
                    "agent {} holds generation {:?}, the committed desired state is at {}",
                    i + 1,
                    held.as_ref().map(|h| h.generation.to_string()),
                    desired.generation
                ));
            }
        }
        for rollout in replayed.rollouts.values() {
            let advanced: Vec<usize> = rollout
                .events
                .iter()
                .filter(|e| e.kind == serin_coordinator::rollout::EventKind::StageAdvanced)
                .map(|e| e.stage_index)
                .collect();
            if advanced.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!(
                    "rollout {} advanced to stages {advanced:?}: a stage transition twice",
                    rollout.id
                ));
            }
        }
        self.note(format!(
            "end: {last} committed entries, leader node {}, generation {}",
            leaders[0], desired.generation
        ));
        Ok(())
    }
}

/// Analysis data that makes a command unique, so its log entry can be told apart.
fn marked(nonce: u64) -> Pair {
    let mut pair = Pair::default();
    pair.canary.requests = nonce;
    pair
}

/// A node's sled store without the background flusher: only the node's own flushes write to
/// the files, so what a crash keeps does not depend on wall-clock time.
fn open_store(dir: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .cache_capacity(4 << 20)
        .open()
}

/// Copies a store's directory as it is on disk: the crash image.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    let mut entries: Vec<_> = std::fs::read_dir(from)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crash model rests on this: sled keeps in its files only what was flushed, so the
    /// copied image loses the rest (dropping the open store would flush it).
    #[test]
    fn a_crash_image_keeps_what_was_flushed_and_loses_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let (live, image) = (root.path().join("live"), root.path().join("image"));
        let db = open_store(&live).unwrap();
        db.insert(b"flushed", b"1").unwrap();
        db.flush().unwrap();
        db.insert(b"unflushed", b"2").unwrap();
        copy_dir(&live, &image).unwrap();
        drop(db);
        let after = open_store(&image).unwrap();
        assert_eq!(after.get(b"flushed").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(after.get(b"unflushed").unwrap(), None);
    }
}
