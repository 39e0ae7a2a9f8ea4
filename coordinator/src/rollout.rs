//! The rollout state machine. Pure and deterministic: no I/O, no clock (every command carries the
//! time it was proposed at), so every node that applies the same log reaches the same state.
//!
//! ```text
//!              StagePassed (more stages)            StagePassed (gated stage)
//!   Start ──► progressing ───────────────► progressing ──────────────► awaiting_promotion
//!               │   ▲  │ StagePassed (last)                              │ Resume: next stage
//!         Pause │   │  └───────────────────────► promoted ◄── Promote ───┤ Promote: all stages
//!               ▼   │ Resume                                             │
//!              paused ───────── RollBack / Abort (from any live state) ──┴──► rolled_back / aborted
//! ```
//!
//! [`Registry`] holds every rollout and every service; [`Registry::apply`] is the only way it
//! changes and is what the Raft log applies. [`decide`] is the controller's pure judgement: given
//! a rollout, what was measured and the time, which command (if any) the leader should propose.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::{CheckResult, Pair, StageAnalysis, StageVerdict, Verdict, judge_stage};
use crate::hooks::{HookRun, HookState};
use crate::limits::{KEEP_FIRST_EVENTS, KEEP_LAST_EVENTS, MAX_EVENT_REASON, cut};
use crate::strategy::{DeployModel, HookOn, Severity, Strategy};

/// Milliseconds since the Unix epoch, as proposed by the leader.
pub type Millis = i64;

/// A rollout's identifier, e.g. `api-3f9a1c`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RolloutId(pub String);

impl fmt::Display for RolloutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A version of the desired traffic: the term and log index of the entry that set it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Generation {
    /// Raft term of the entry.
    pub term: u64,
    /// Raft log index of the entry.
    pub index: u64,
}

impl From<serin_proto::v1::Generation> for Generation {
    fn from(g: serin_proto::v1::Generation) -> Self {
        Generation {
            term: g.term,
            index: g.index,
        }
    }
}

impl From<Generation> for serin_proto::v1::Generation {
    fn from(g: Generation) -> Self {
        serin_proto::v1::Generation {
            term: g.term,
            index: g.index,
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.index)
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Observing the current stage.
    Progressing,
    /// Held at the current stage's weight by an operator or an inconclusive stage.
    Paused,
    /// A gated stage passed; waiting for an operator.
    AwaitingPromotion,
    /// The canary version became stable.
    Promoted,
    /// Automatically returned to stable.
    RolledBack,
    /// Returned to stable by an operator.
    Aborted,
}

impl RolloutState {
    /// The name used in the CLI, API and JSON.
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Paused => "paused",
            RolloutState::AwaitingPromotion => "awaiting_promotion",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// True once nothing can change the rollout any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Promoted | RolloutState::RolledBack | RolloutState::Aborted
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who caused a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Actor {
    /// A person, through the CLI or API.
    Operator(String),
    /// The leader's control loop.
    Controller,
    /// A hook of the strategy, by name: a failed `pre_*` hook ([`crate::hooks`]).
    Hook(String),
    /// An agent, by name: a deploy driver's action on its host.
    Agent(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Operator(name) => write!(f, "operator:{name}"),
            Actor::Controller => f.write_str("controller"),
            Actor::Hook(name) => write!(f, "hook:{name}"),
            Actor::Agent(name) => write!(f, "agent:{name}"),
        }
    }
}

/// What happened in one transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The rollout started at its first stage.
    Started,
    /// A stage passed and the next one began.
    StageAdvanced,
    /// A gated stage passed.
    AwaitingPromotion,
    /// Held.
    Paused,
    /// Released.
    Resumed,
    /// Finished: the canary is the new stable.
    Promoted,
    /// Automatically returned to stable.
    RolledBack,
    /// Returned to stable by an operator (or by a failed `pre_rollout` hook).
    Aborted,
    /// A hook ran; the event carries its outcome ([`Event::hook`]).
    Hook,
    /// After a promotion with the weighted `[deploy]` model, every stable instance runs the new
    /// version: the traffic returned to them and the canary instances go.
    Deployed,
    /// With the shards model: released shards were granted to their new side.
    ShardsGranted,
    /// A deploy driver's action on an agent's host (a command with its exit code and output, a
    /// container created or removed), or its failure.
    DeployAction,
    /// An agent's canary lease expired: it reached no leader for its `canary_lease.after`
    /// during the canary and held it or reverted its host to stable
    /// ([`Command::CanaryLeaseExpired`]).
    CanaryLeaseExpired,
}

/// One entry of a rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When the command was proposed.
    pub at: Millis,
    /// What happened.
    pub kind: EventKind,
    /// Who caused it.
    pub actor: Actor,
    /// Why: the check, value and threshold, or the operator's words.
    pub reason: String,
    /// The stage the rollout is at after the event.
    pub stage_index: usize,
    /// The canary weight after the event.
    pub canary_weight: u32,
    /// For [`EventKind::Hook`]: what the hook answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookRun>,
}

/// A snapshot of what was measured and decided, committed at each stage end and rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// When.
    pub at: Millis,
    /// The stage it describes.
    pub stage_index: usize,
    /// That stage's weight.
    pub canary_weight: u32,
    /// passed, rolled_back, ...
    pub outcome: String,
    /// Measurements and check results.
    pub analysis: StageAnalysis,
}

/// One rollout of a service to a new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Identifier.
    pub id: RolloutId,
    /// The service being changed.
    pub service: String,
    /// The canary version.
    pub version: String,
    /// The version stable instances run.
    pub stable_version: String,
    /// The validated strategy.
    pub strategy: Strategy,
    /// Where it is.
    pub state: RolloutState,
    /// Index into `strategy.stages`.
    pub stage_index: usize,
    /// When it started.
    pub started_at: Millis,
    /// When the current stage's observation (re)started.
    pub stage_started_at: Millis,
    /// History, oldest first, capped: the first [`KEEP_FIRST_EVENTS`] and the last
    /// [`KEEP_LAST_EVENTS`] events are kept, those in between are dropped and counted in
    /// `events_dropped` (so one rollout's record always fits an API reply).
    pub events: Vec<Event>,
    /// Events dropped from the middle of `events` by the cap.
    #[serde(default)]
    pub events_dropped: u64,
    /// Evidence, oldest first.
    pub evidence: Vec<Evidence>,
    /// The leader's running analysis of the current stage, as last checkpointed.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// Which hooks are still due ([`crate::hooks`]).
    #[serde(default)]
    pub hooks: HookState,
    /// For a promoted rollout with the weighted `[deploy]` model: every stable instance runs
    /// the new version healthy, so the traffic is back on them and the canary instances are
    /// removed ([`Command::DeploySettled`], [`crate::deploy`]).
    #[serde(default)]
    pub deploy_settled: bool,
    /// With the shards `[deploy]` model: which canary share's shards are granted to the
    /// canary instances ([`Command::ShardsGranted`], [`crate::deploy`]).
    #[serde(default)]
    pub shards: ShardGrants,
    /// The deploy driver actions recorded in the events ([`Command::DeployActions`]).
    #[serde(default)]
    pub deploy_actions: DeployActionLog,
}

/// Which driver actions a rollout's events already hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployActionLog {
    /// "agent/instance" → the highest action sequence number recorded.
    pub seen: BTreeMap<String, u64>,
    /// Successful actions recorded as events (at most [`MAX_ACTION_EVENTS`]; failures always
    /// are).
    pub recorded: u32,
    /// Successful actions not recorded past that bound.
    pub unrecorded: u64,
}

/// Successful driver actions a rollout's events hold at most; a large fleet's every start and
/// stop would otherwise push the stage events out of the bounded history.
pub const MAX_ACTION_EVENTS: u32 = 100;

/// One deploy driver action an agent reported, to record in a rollout's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployAction {
    /// The agent that took it.
    pub agent: String,
    /// The managed instance it was for.
    pub instance: String,
    /// The agent's sequence number of it.
    pub seq: u64,
    /// `deploy`, `start`, `stop`, `health`, `create`, `remove`.
    pub action: String,
    /// The command line or the container name.
    pub detail: String,
    /// A command's exit code.
    pub exit_code: Option<i32>,
    /// The tail of its output, or the error.
    pub output: String,
    /// How long it took.
    pub duration_ms: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// The version it was for.
    pub version: String,
}

impl DeployAction {
    /// One line for the event: `start on bot-1 for v2 ok (exit 0, 14 ms): setsid … | output
    /// tail` (`for v2`: the version the instance was moving to; a `stop` stops the old one).
    pub fn describe(&self) -> String {
        let mut text = format!("{} on {}", self.action, self.instance);
        if !self.version.is_empty() {
            text.push_str(&format!(" for {}", self.version));
        }
        text.push_str(if self.ok { " ok" } else { " FAILED" });
        let mut facts = Vec::new();
        if let Some(code) = self.exit_code {
            facts.push(format!("exit {code}"));
        }
        if self.duration_ms > 0 {
            facts.push(format!("{} ms", self.duration_ms));
        }
        if !facts.is_empty() {
            text.push_str(&format!(" ({})", facts.join(", ")));
        }
        if !self.detail.is_empty() && self.detail != self.instance {
            text.push_str(&format!(": {}", self.detail));
        }
        let output = self.output.trim();
        if !output.is_empty() {
            text.push_str(&format!(" | {output}"));
        }
        text
    }
}

/// The committed side of the shards model's handover (docs/deploy.md): the canary share whose
/// shard set is *granted*. When the rollout's target share changes (a stage, a promotion, a
/// rollback), the shards that change side are released first (they are in neither side's
/// set), and granted to their new side by a second commit once the agents' reports confirm
/// every release, so no shard is ever held by both sides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardGrants {
    /// The canary share (0..=100) whose shards the canary instances serve.
    pub weight: u32,
    /// The share granted before, to tell which shards the last grant moved (they are paced).
    pub previous: u32,
    /// When the last grant was committed.
    pub at: Millis,
    /// How long its paced starts take (the last shard's start delay), in milliseconds.
    pub schedule_ms: u64,
}

/// The measurements of a stage so far, committed every few seconds so that a new leader (or a
/// restarted one) resumes the stage's analysis instead of starting from zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The stage it belongs to.
    pub stage: usize,
    /// That stage's observation start, so a resumed stage does not inherit old data.
    pub stage_started_at: Millis,
    /// Stable and canary totals since the stage started.
    pub data: Pair,
    /// When it was taken.
    pub at: Millis,
}

impl Checkpoint {
    /// Whether this checkpoint describes the rollout's current stage observation.
    pub fn matches(&self, rollout: &Rollout) -> bool {
        self.stage == rollout.stage_index && self.stage_started_at == rollout.stage_started_at
    }
}

impl Rollout {
    /// With the shards model: the canary share whose shards the canary side should serve now
    /// (the stage's weight while live, 100 from a promotion until it settles, else 0).
    pub fn shard_target_weight(&self) -> u32 {
        if self.state == RolloutState::Promoted && self.deploy_settled {
            0
        } else {
            self.canary_weight()
        }
    }

    /// The share of traffic the canary should get now.
    pub fn canary_weight(&self) -> u32 {
        match self.state {
            RolloutState::Promoted => 100,
            RolloutState::RolledBack | RolloutState::Aborted => 0,
            // No traffic moves to the canary before its pre_rollout hooks passed.
            _ if !self.hooks.pre_rollout_pending.is_empty() => 0,
            _ => self.strategy.weight(self.stage_index),
        }
    }

    /// Whether the strategy's header and cookie overrides route requests: in every state that
    /// is not terminal (progressing, paused and awaiting promotion, at any stage weight), so
    /// testers reach a canary an operator holds for inspection; never once the rollout is
    /// promoted, rolled back or aborted (a rolled-back canary gets no traffic at all).
    pub fn overrides_active(&self) -> bool {
        !self.state.is_terminal()
    }

    /// The reason of the last transition (hook runs are not transitions: a post_rollback hook
    /// does not hide why the rollout rolled back).
    pub fn last_reason(&self) -> &str {
        self.events
            .iter()
            .rev()
            .find(|e| e.kind != EventKind::Hook)
            .map_or("", |e| e.reason.as_str())
    }

    fn keep_evidence(
        &mut self,
        at: Millis,
        canary_weight: u32,
        outcome: &str,
        analysis: Option<StageAnalysis>,
    ) {
        if let Some(analysis) = analysis {
            self.evidence.push(Evidence {
                at,
                stage_index: self.stage_index,
                canary_weight,
                outcome: outcome.into(),
                analysis,
            });
        }
    }

    pub(crate) fn record(&mut self, at: Millis, kind: EventKind, actor: Actor, reason: String) {
        self.record_with(at, kind, actor, reason, None);
    }

    pub(crate) fn record_with(
        &mut self,
        at: Millis,
        kind: EventKind,
        actor: Actor,
        reason: String,
        hook: Option<HookRun>,
    ) {
        let canary_weight = self.canary_weight();
        if self.events.len() >= KEEP_FIRST_EVENTS + KEEP_LAST_EVENTS {
            // The oldest of the recent events goes; the first ones (the start) stay.
            self.events.remove(KEEP_FIRST_EVENTS);
            self.events_dropped += 1;
        }
        self.events.push(Event {
            at,
            kind,
            actor,
            reason: cut(&reason, MAX_EVENT_REASON),
            stage_index: self.stage_index,
            canary_weight,
            hook,
        });
    }
}

/// A promoted version in a service's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// 1-based revision number.
    pub number: u32,
    /// The version.
    pub version: String,
    /// The rollout that promoted it (none for the initial version and for an undo).
    pub rollout: Option<RolloutId>,
    /// The revision an undo went back to (`serin rollout undo`); none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<u32>,
    /// When.
    pub at: Millis,
}

/// Everything known of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Promoted versions, oldest first.
    pub revisions: Vec<Revision>,
    /// The rollout now running, if any.
    pub active: Option<RolloutId>,
    /// The most recent rollout (active or finished), which decides the traffic.
    pub latest: Option<RolloutId>,
    /// When the desired traffic last changed.
    pub generation: Generation,
    /// The committed upstream membership for balancers (docs/fleet.md); `None` until the
    /// leader first commits one, and balancers then use their own instances.
    #[serde(default)]
    pub upstreams: Option<Vec<UpstreamMember>>,
    /// Changes of the service outside its rollouts (upstream membership), newest last, at most
    /// [`MAX_SERVICE_HISTORY`].
    #[serde(default)]
    pub history: Vec<ServiceEvent>,
    /// Set by an undo: the revision whose version all the traffic goes to, until the next
    /// rollout starts (docs/fleet.md, "Revisions").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<u32>,
}

/// How many [`ServiceEvent`]s a service keeps.
pub const MAX_SERVICE_HISTORY: usize = 200;

/// One instance in a service's committed upstream membership.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UpstreamMember {
    /// `host:port` the balancers send traffic to.
    pub address: String,
    /// True for a canary instance.
    pub canary: bool,
    /// The instance's name in its agent's config.
    pub instance: String,
    /// The agent that declared it.
    pub agent: String,
    /// The version it runs, when its agent's `[[instances]]` declares one (`version = …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A change of a service recorded outside its rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceEvent {
    /// When.
    pub at: Millis,
    /// What changed and why.
    pub reason: String,
    /// The generation it gave the service.
    pub generation: Generation,
}

impl Service {
    /// The current stable version, if known.
    pub fn stable_version(&self) -> Option<&str> {
        self.revisions.last().map(|r| r.version.as_str())
    }
}

/// The desired traffic of one service, as agents apply it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPlan {
    /// Service name.
    pub service: String,
    /// Canary share, 0..=100.
    pub canary_weight: u32,
    /// Stable version.
    pub stable_version: String,
    /// Canary version (empty without a rollout).
    pub canary_version: String,
    /// The rollout behind it.
    pub rollout: Option<RolloutId>,
    /// Sticky split key while a rollout sends traffic to the canary.
    pub sticky_key: Option<String>,
    /// The request header whose value `canary` or `stable` picks the variant, while the
    /// rollout is active (see [`Rollout::overrides_active`]).
    #[serde(default)]
    pub override_header: Option<String>,
    /// The cookie with the same meaning, while the rollout is active.
    #[serde(default)]
    pub override_cookie: Option<String>,
    /// When it last changed.
    pub generation: Generation,
}

/// A change to the replicated state: the payload of every Raft log entry.
// `Start` carries the whole strategy (with its `[deploy]`, several hundred bytes): a command
// lives only while it is proposed and applied, one at a time, so its size costs nothing
// measurable, and boxing the strategy would change every constructor.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    /// Begin a rollout at its first stage.
    Start {
        /// New rollout's id (chosen by the proposer).
        id: RolloutId,
        /// Service.
        service: String,
        /// Canary version.
        version: String,
        /// Stable version, when the service has no history yet.
        stable_version: Option<String>,
        /// Validated strategy.
        strategy: Strategy,
        /// Who.
        actor: Actor,
        /// When.
        at: Millis,
    },
    /// The controller judged stage `stage` passed.
    StagePassed {
        /// Rollout.
        id: RolloutId,
        /// The stage that passed (a stale proposal for another stage is rejected).
        stage: usize,
        /// Evidence.
        analysis: StageAnalysis,
        /// When.
        at: Millis,
    },
    /// Hold at the current weight.
    Pause {
        /// Rollout.
        id: RolloutId,
        /// Who.
        actor: Actor,
        /// Why.
        reason: String,
        /// When.
        at: Millis,
    },
    /// Release a pause, or approve a gated stage.
    Resume {
        /// Rollout.
        id: RolloutId,
        /// Who.
        actor: Actor,
        /// Why.
        reason: String,
        /// When.
        at: Millis,
    },
    /// Skip the remaining stages and make the canary stable.
    Promote {
        /// Rollout.
        id: RolloutId,
        /// Who.
        actor: Actor,
        /// Why.
        reason: String,
        /// What the leader had measured of the current stage, kept as evidence.
        #[serde(default)]
        analysis: Option<StageAnalysis>,
        /// When.
        at: Millis,
    },
    /// An operator returns traffic to stable.
    Abort {
        /// Rollout.
        id: RolloutId,
        /// Who.
        actor: Actor,
        /// Why.
        reason: String,
        /// What the leader had measured of the current stage, kept as evidence.
        #[serde(default)]
        analysis: Option<StageAnalysis>,
        /// When.
        at: Millis,
    },
    /// The leader's running analysis of the current stage (changes no state but the checkpoint).
    Checkpoint {
        /// Rollout.
        id: RolloutId,
        /// The measurements.
        checkpoint: Checkpoint,
    },
    /// The leader sets a service's upstream membership from its inventory.
    SetUpstreams {
        /// Service.
        service: String,
        /// Every instance in the upstreams, sorted.
        members: Vec<UpstreamMember>,
        /// What changed and why.
        reason: String,
        /// When.
        at: Millis,
    },
    /// An operator sends the service's traffic back to an earlier revision's version
    /// (`serin rollout undo`); see [`revisions`].
    Undo {
        /// Service.
        service: String,
        /// The revision to go back to; 0 means the one before the current.
        to_revision: u32,
        /// Who.
        actor: Actor,
        /// Why.
        reason: String,
        /// When.
        at: Millis,
    },
    /// A hook ran (after all its attempts); a failed `pre_rollout` hook aborts the rollout and a
    /// failed `pre_advance` hook pauses it ([`crate::hooks`]).
    HookRan {
        /// Rollout.
        id: RolloutId,
        /// The stage it ran at (a `pre_advance` result for a stage already left is stale).
        stage: usize,
        /// What it answered.
        run: HookRun,
        /// When it finished.
        at: Millis,
    },
    /// After a promotion with the weighted `[deploy]` model, every stable instance runs the new
    /// version healthy: the traffic returns to them and the canary instances are removed.
    DeploySettled {
        /// Rollout (promoted).
        id: RolloutId,
        /// What the leader saw, e.g. "all 3 stable instances run v2 healthy".
        reason: String,
        /// When.
        at: Millis,
    },
    /// With the shards `[deploy]` model: the agents confirmed that every shard changing side
    /// is released, so the shards of canary share `weight` are granted to the canary side
    /// (and the others to the stable side).
    ShardsGranted {
        /// Rollout (any state: a rollback's and a settled promotion's shards return too).
        id: RolloutId,
        /// The canary share granted; must be the rollout's target share.
        weight: u32,
        /// The last paced start's delay, in milliseconds.
        schedule_ms: u64,
        /// What moved, e.g. "shards 3, 7 to canary".
        reason: String,
        /// When.
        at: Millis,
    },
    /// Agents reported deploy driver actions for the rollout's instances: each is recorded
    /// once (by agent, instance and sequence number), in any state.
    DeployActions {
        /// Rollout.
        id: RolloutId,
        /// The actions, oldest first.
        actions: Vec<DeployAction>,
        /// When the leader saw them.
        at: Millis,
    },
    /// An agent told the leader that its canary lease expired while it reached no leader
    /// (`Register.lease_expired`, docs/agent.md): recorded once as an event, in any state.
    /// Changes no traffic.
    CanaryLeaseExpired {
        /// Rollout.
        id: RolloutId,
        /// The agent.
        agent: String,
        /// What it did, e.g. "agent web-1 lost the leader for 5m at generation 3.42 and
        /// reverted to stable (web at 10%); ...".
        reason: String,
        /// When the leader heard it.
        at: Millis,
    },
    /// The controller returns traffic to stable.
    RollBack {
        /// Rollout.
        id: RolloutId,
        /// The failed check or trigger, its value and threshold.
        reason: String,
        /// What was measured when it decided.
        analysis: Option<StageAnalysis>,
        /// When.
        at: Millis,
    },
}

impl Command {
    /// The rollout the command is about.
    pub fn rollout_id(&self) -> Option<&RolloutId> {
        match self {
            Command::Start { id, .. }
            | Command::StagePassed { id, .. }
            | Command::Pause { id, .. }
            | Command::Resume { id, .. }
            | Command::Promote { id, .. }
            | Command::Abort { id, .. }
            | Command::Checkpoint { id, .. }
            | Command::HookRan { id, .. }
            | Command::DeploySettled { id, .. }
            | Command::ShardsGranted { id, .. }
            | Command::DeployActions { id, .. }
            | Command::CanaryLeaseExpired { id, .. }
            | Command::RollBack { id, .. } => Some(id),
            Command::SetUpstreams { .. } | Command::Undo { .. } => None,
        }
    }

    /// A short name of the command, for logs and errors.
    pub fn action(&self) -> &'static str {
        match self {
            Command::Start { .. } => "start",
            Command::StagePassed { .. } => "advance",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Promote { .. } => "promote",
            Command::Abort { .. } => "abort",
            Command::Checkpoint { .. } => "checkpoint",
            Command::HookRan { .. } => "record a hook run of",
            Command::DeploySettled { .. } => "settle the deployment of",
            Command::ShardsGranted { .. } => "grant the shards of",
            Command::DeployActions { .. } => "record deploy actions of",
            Command::CanaryLeaseExpired { .. } => "record a canary lease expiry of",
            Command::RollBack { .. } => "roll back",
            Command::SetUpstreams { .. } => "set upstreams",
            Command::Undo { .. } => "undo",
        }
    }
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// An undo that cannot be applied.
    #[error(transparent)]
    Undo(#[from] revisions::UndoRefusal),
    /// No rollout has this id.
    #[error("rollout '{0}' not found")]
    UnknownRollout(RolloutId),
    /// A membership change that changes nothing.
    #[error("service '{0}' already has these upstreams")]
    UpstreamsUnchanged(String),
    /// The id is taken.
    #[error("rollout '{0}' already exists")]
    DuplicateRollout(RolloutId),
    /// Another rollout of the service is running.
    #[error(
        "service '{service}' already has rollout '{active}' in progress; finish or abort it first"
    )]
    ServiceBusy {
        /// Service.
        service: String,
        /// The running rollout.
        active: RolloutId,
    },
    /// The command does not apply in the rollout's state.
    #[error("cannot {action} rollout '{id}': it is {state}")]
    InvalidTransition {
        /// Rollout.
        id: RolloutId,
        /// Its state.
        state: RolloutState,
        /// What was asked.
        action: &'static str,
    },
    /// A controller proposal about a stage the rollout has already left.
    #[error("rollout '{id}' is at stage {current}, not {proposed}")]
    StaleStage {
        /// Rollout.
        id: RolloutId,
        /// Where it is.
        current: usize,
        /// What the proposal assumed.
        proposed: usize,
    },
    /// A hook result for a hook the strategy does not have.
    #[error("rollout '{id}' has no hook named '{hook}'")]
    UnknownHook {
        /// Rollout.
        id: RolloutId,
        /// The hook's name.
        hook: String,
    },
    /// A hook result that is no longer awaited (it already passed, or the rollout moved on):
    /// the second report of an at-least-once run.
    #[error("rollout '{id}' is not waiting for {on} hook '{hook}'")]
    HookNotDue {
        /// Rollout.
        id: RolloutId,
        /// The hook's name.
        hook: String,
        /// When it runs.
        on: HookOn,
    },
    /// A `ShardsGranted` that does not match the rollout (no shards model, a stale share).
    #[error("cannot grant shards of rollout '{id}': {why}")]
    NoShardsToGrant {
        /// Rollout.
        id: RolloutId,
        /// Why.
        why: String,
    },
    /// A `DeploySettled` for a rollout that has nothing to settle.
    #[error("cannot settle the deployment of rollout '{id}': {why}")]
    NothingToSettle {
        /// Rollout.
        id: RolloutId,
        /// Why: not promoted, no weighted `[deploy]`, or already settled.
        why: String,
    },
    /// A start for a service with no known stable version and none given.
    #[error("service '{0}' has no stable version yet: pass --stable-version")]
    UnknownStableVersion(String),
    /// The given stable version is not the one serin knows the service runs.
    #[error(
        "service '{service}' runs {known} (its last promoted revision), not {given}; leave out --stable-version or pass {known}"
    )]
    StableVersionMismatch {
        /// Service.
        service: String,
        /// What serin recorded.
        known: String,
        /// What the operator said.
        given: String,
    },
    /// The canary version is the version already stable.
    #[error("service '{service}' already runs {version} as stable; nothing to roll out")]
    AlreadyStable {
        /// Service.
        service: String,
        /// Version.
        version: String,
    },
}

/// What a successful command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The rollout it changed (for a service's membership change: its latest rollout, if any).
    pub id: Option<RolloutId>,
    /// The rollout's state afterwards (`None` for a service's membership change).
    pub state: Option<RolloutState>,
    /// Whether the desired traffic of the service changed.
    pub traffic_changed: bool,
}

/// The whole replicated state: rollouts and services.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    /// Every rollout ever started.
    pub rollouts: Table<RolloutId, Rollout>,
    /// Every service ever rolled out.
    pub services: Table<String, Service>,
    /// The coordinator members' gRPC addresses, by raft id: what the conf changes carried
    /// (and the bootstrap members), so a member restored from a snapshot knows them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<u64, String>,
}

impl Registry {
    /// A rollout by id.
    pub fn rollout(&self, id: &RolloutId) -> Result<&Rollout, Rejection> {
        self.rollouts
            .get(id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))
    }

    /// Rollouts not yet finished.
    pub fn active(&self) -> impl Iterator<Item = &Rollout> {
        self.rollouts.values().filter(|r| !r.state.is_terminal())
    }

    /// Checks `command` against the current state without changing it.
    pub fn validate(&self, command: &Command) -> Result<(), Rejection> {
        self.clone()
            .apply(command.clone(), Generation::default())
            .map(|_| ())
    }

    /// Applies one committed command. `generation` is the (term, index) of its log entry. A
    /// rejected command changes nothing.
    pub fn apply(
        &mut self,
        command: Command,
        generation: Generation,
    ) -> Result<Applied, Rejection> {
        if let Command::Start { .. } = command {
            return self.start(command, generation);
        }
        if let Command::HookRan { id, stage, run, at } = command {
            return self.hook_ran(id, stage, run, at, generation);
        }
        if let Command::DeploySettled { id, reason, at } = command {
            return self.deploy_settled(id, reason, at, generation);
        }
        if let Command::DeployActions { id, actions, at } = command {
            return self.deploy_actions(id, actions, at);
        }
        if let Command::CanaryLeaseExpired {
            id,
            agent,
            reason,
            at,
        } = command
        {
            return self.canary_lease_expired(id, agent, reason, at);
        }
        if let Command::ShardsGranted {
            id,
            weight,
            schedule_ms,
            reason,
            at,
        } = command
        {
            return self.shards_granted(id, weight, schedule_ms, reason, at, generation);
        }
        if let Command::SetUpstreams {
            service,
            members,
            reason,
            at,
        } = command
        {
            return self.set_upstreams(service, members, reason, at, generation);
        }
        if let Command::Undo {
            service,
            to_revision,
            actor,
            reason,
            at,
        } = command
        {
            return self.undo(&service, to_revision, actor, reason, at, generation);
        }
        let id = command
            .rollout_id()
            .expect("every other command is about a rollout")
            .clone();
        let action = command.action();
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))?;
        let invalid = |r: &Rollout| Rejection::InvalidTransition {
            id: r.id.clone(),
            state: r.state,
            action,
        };
        if rollout.state.is_terminal() {
            return Err(invalid(rollout));
        }
        let weight_before = rollout.canary_weight();
        let state_before = rollout.state;
        match command {
            Command::Start { .. }
            | Command::SetUpstreams { .. }
            | Command::Undo { .. }
            | Command::DeploySettled { .. }
            | Command::ShardsGranted { .. }
            | Command::DeployActions { .. }
            | Command::CanaryLeaseExpired { .. }
            | Command::HookRan { .. } => {
                unreachable!("handled above")
            }
            Command::StagePassed {
                stage,
                analysis,
                at,
                ..
            } => {
                if rollout.state != RolloutState::Progressing {
                    return Err(invalid(rollout));
                }
                if stage != rollout.stage_index {
                    return Err(Rejection::StaleStage {
                        id,
                        current: rollout.stage_index,
                        proposed: stage,
                    });
                }
                let current = &rollout.strategy.stages[stage];
                let summary = summarize(&analysis);
                rollout.evidence.push(Evidence {
                    at,
                    stage_index: stage,
                    canary_weight: current.weight,
                    outcome: "passed".into(),
                    analysis,
                });
                let reason = format!(
                    "stage {} ({}%) passed: {summary}",
                    stage + 1,
                    current.weight
                );
                if current.manual_gate {
                    rollout.state = RolloutState::AwaitingPromotion;
                    rollout.record(at, EventKind::AwaitingPromotion, Actor::Controller, reason);
                } else if stage + 1 == rollout.strategy.stages.len() {
                    rollout.state = RolloutState::Promoted;
                    rollout.record(at, EventKind::Promoted, Actor::Controller, reason);
                } else {
                    rollout.stage_index += 1;
                    rollout.stage_started_at = at;
                    rollout.record(at, EventKind::StageAdvanced, Actor::Controller, reason);
                }
            }
            Command::Pause {
                actor, reason, at, ..
            } => {
                if rollout.state != RolloutState::Progressing {
                    return Err(invalid(rollout));
                }
                rollout.state = RolloutState::Paused;
                rollout.record(at, EventKind::Paused, actor, reason);
            }
            Command::Resume {
                actor, reason, at, ..
            } => match rollout.state {
                RolloutState::Paused => {
                    rollout.state = RolloutState::Progressing;
                    rollout.stage_started_at = at;
                    rollout.record(at, EventKind::Resumed, actor, reason);
                }
                RolloutState::AwaitingPromotion => {
                    if rollout.stage_index + 1 == rollout.strategy.stages.len() {
                        rollout.state = RolloutState::Promoted;
                        rollout.record(at, EventKind::Promoted, actor, reason);
                    } else {
                        rollout.state = RolloutState::Progressing;
                        rollout.stage_index += 1;
                        rollout.stage_started_at = at;
                        rollout.record(at, EventKind::StageAdvanced, actor, reason);
                    }
                }
                _ => return Err(invalid(rollout)),
            },
            Command::Promote {
                actor,
                reason,
                analysis,
                at,
                ..
            } => {
                rollout.keep_evidence(at, weight_before, "promoted_by_operator", analysis);
                rollout.state = RolloutState::Promoted;
                rollout.record(at, EventKind::Promoted, actor, reason);
            }
            Command::Abort {
                actor,
                reason,
                analysis,
                at,
                ..
            } => {
                rollout.keep_evidence(at, weight_before, "aborted", analysis);
                rollout.state = RolloutState::Aborted;
                rollout.record(at, EventKind::Aborted, actor, reason);
            }
            Command::Checkpoint { checkpoint, .. } => {
                if !checkpoint.matches(rollout) {
                    return Err(Rejection::StaleStage {
                        id,
                        current: rollout.stage_index,
                        proposed: checkpoint.stage,
                    });
                }
                rollout.checkpoint = Some(checkpoint);
            }
            Command::RollBack {
                reason,
                analysis,
                at,
                ..
            } => {
                rollout.keep_evidence(at, weight_before, "rolled_back", analysis);
                rollout.state = RolloutState::RolledBack;
                rollout.record(at, EventKind::RolledBack, Actor::Controller, reason);
            }
        }
        let state = rollout.state;
        if state.is_terminal() {
            rollout.hooks.finished(&rollout.strategy, state);
        }
        let traffic_changed = rollout.canary_weight() != weight_before || state != state_before;
        let (service_name, version, promoted_at) = (
            rollout.service.clone(),
            rollout.version.clone(),
            rollout.events.last().map_or(0, |e| e.at),
        );
        if let Some(service) = self.services.get_mut(&service_name) {
            if state.is_terminal() {
                service.active = None;
            }
            if state == RolloutState::Promoted {
                let number = service.revisions.len() as u32 + 1;
                service.revisions.push(Revision {
                    number,
                    version,
                    rollout: Some(id.clone()),
                    undo_of: None,
                    at: promoted_at,
                });
            }
            if traffic_changed {
                service.generation = generation;
            }
        }
        Ok(Applied {
            id: Some(id),
            state: Some(state),
            traffic_changed,
        })
    }

    fn set_upstreams(
        &mut self,
        service: String,
        members: Vec<UpstreamMember>,
        reason: String,
        at: Millis,
        generation: Generation,
    ) -> Result<Applied, Rejection> {
        let mut members = members;
        members.sort();
        members.dedup();
        let record = self
            .services
            .get_or_insert_with(service.clone(), || Service {
                name: service.clone(),
                revisions: Vec::new(),
                active: None,
                latest: None,
                generation,
                upstreams: None,
                history: Vec::new(),
                pinned: None,
            });
        if record.upstreams.as_ref() == Some(&members) {
            return Err(Rejection::UpstreamsUnchanged(service));
        }
        record.upstreams = Some(members);
        record.generation = generation;
        record.history.push(ServiceEvent {
            at,
            reason,
            generation,
        });
        if record.history.len() > MAX_SERVICE_HISTORY {
            let excess = record.history.len() - MAX_SERVICE_HISTORY;
            record.history.drain(..excess);
        }
        Ok(Applied {
            id: record.latest.clone(),
            state: None,
            traffic_changed: true,
        })
    }

    fn start(&mut self, command: Command, generation: Generation) -> Result<Applied, Rejection> {
        let Command::Start {
            id,
            service,
            version,
            stable_version,
            strategy,
            actor,
            at,
        } = command
        else {
            unreachable!("start() only takes Start");
        };
        if self.rollouts.contains_key(&id) {
            return Err(Rejection::DuplicateRollout(id));
        }
        let record = self.services.get(&service);
        if let Some(active) = record.and_then(|s| s.active.clone()) {
            return Err(Rejection::ServiceBusy { service, active });
        }
        let known = record.and_then(|s| s.stable_version()).map(str::to_owned);
        let stable = match (known, stable_version) {
            (Some(known), Some(given)) if known != given => {
                return Err(Rejection::StableVersionMismatch {
                    service,
                    known,
                    given,
                });
            }
            (Some(known), _) => known,
            (None, Some(given)) => given,
            (None, None) => return Err(Rejection::UnknownStableVersion(service)),
        };
        if stable == version {
            return Err(Rejection::AlreadyStable { service, version });
        }
        let record = self
            .services
            .get_or_insert_with(service.clone(), || Service {
                name: service.clone(),
                revisions: vec![Revision {
                    number: 1,
                    version: stable.clone(),
                    rollout: None,
                    undo_of: None,
                    at,
                }],
                active: None,
                latest: None,
                generation,
                upstreams: None,
                history: Vec::new(),
                pinned: None,
            });
        if record.revisions.is_empty() {
            // A record made by an upstream membership change before any rollout.
            record.revisions.push(Revision {
                number: 1,
                version: stable.clone(),
                rollout: None,
                undo_of: None,
                at,
            });
        }
        // A new rollout ends an undo's pin: traffic is split by variant again.
        record.pinned = None;
        record.active = Some(id.clone());
        record.latest = Some(id.clone());
        record.generation = generation;
        let stages = strategy.stages.len();
        let hook_state = HookState::started(&strategy);
        let mut rollout = Rollout {
            id: id.clone(),
            service,
            version: version.clone(),
            stable_version: stable,
            strategy,
            state: RolloutState::Progressing,
            stage_index: 0,
            started_at: at,
            stage_started_at: at,
            events: Vec::new(),
            events_dropped: 0,
            evidence: Vec::new(),
            checkpoint: None,
            hooks: hook_state,
            deploy_settled: false,
            shards: ShardGrants::default(),
            deploy_actions: DeployActionLog::default(),
        };
        let mut reason = format!("rolling out {version} in {stages} stages");
        if !rollout.hooks.pre_rollout_pending.is_empty() {
            reason.push_str(&format!(
                "; the canary gets no traffic until its pre_rollout hooks pass: {}",
                rollout.hooks.pre_rollout_pending.join(", ")
            ));
        }
        rollout.record(at, EventKind::Started, actor, reason);
        self.rollouts.insert(id.clone(), rollout);
        Ok(Applied {
            id: Some(id),
            state: Some(RolloutState::Progressing),
            traffic_changed: true,
        })
    }

    /// Applies [`Command::DeploySettled`]: valid only for a promoted rollout with a weighted
    /// `[deploy]` not yet settled; moves the service's traffic back to the stable instances.
    fn deploy_settled(
        &mut self,
        id: RolloutId,
        reason: String,
        at: Millis,
        generation: Generation,
    ) -> Result<Applied, Rejection> {
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))?;
        let refuse = |why: String| Rejection::NothingToSettle {
            id: id.clone(),
            why,
        };
        if rollout.state != RolloutState::Promoted {
            return Err(refuse(format!(
                "it is {}; only a promoted rollout settles",
                rollout.state
            )));
        }
        match rollout.strategy.deploy.as_ref().map(|d| d.model) {
            None => {
                return Err(refuse(
                    "its strategy has no [deploy]: serin deploys nothing for it".into(),
                ));
            }
            Some(DeployModel::Hosts) => {
                return Err(refuse(
                    "it deploys with model \"hosts\": its instances run the new version in place"
                        .into(),
                ));
            }
            Some(DeployModel::Weighted | DeployModel::Shards) => {}
        }
        if rollout.deploy_settled {
            return Err(refuse(
                "it is already settled: the stable instances carry the traffic".into(),
            ));
        }
        rollout.deploy_settled = true;
        rollout.record(at, EventKind::Deployed, Actor::Controller, reason);
        if let Some(event) = rollout.events.last_mut() {
            // All the traffic is on the stable instances now.
            event.canary_weight = 0;
        }
        let service = rollout.service.clone();
        if let Some(record) = self.services.get_mut(&service) {
            record.generation = generation;
        }
        Ok(Applied {
            id: Some(id),
            state: Some(RolloutState::Promoted),
            traffic_changed: true,
        })
    }

    /// Applies [`Command::DeployActions`]: records each action not recorded yet as an event
    /// (successful ones up to [`MAX_ACTION_EVENTS`], failures always). Changes no traffic.
    fn deploy_actions(
        &mut self,
        id: RolloutId,
        actions: Vec<DeployAction>,
        at: Millis,
    ) -> Result<Applied, Rejection> {
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))?;
        for action in actions {
            let key = format!("{}/{}", action.agent, action.instance);
            let seen = rollout.deploy_actions.seen.entry(key).or_insert(0);
            if action.seq <= *seen {
                continue;
            }
            *seen = action.seq;
            if action.ok {
                if rollout.deploy_actions.recorded >= MAX_ACTION_EVENTS {
                    rollout.deploy_actions.unrecorded += 1;
                    continue;
                }
                rollout.deploy_actions.recorded += 1;
            }
            rollout.record(
                at,
                EventKind::DeployAction,
                Actor::Agent(action.agent.clone()),
                action.describe(),
            );
        }
        let state = rollout.state;
        Ok(Applied {
            id: Some(id),
            state: Some(state),
            traffic_changed: false,
        })
    }

    /// Applies [`Command::CanaryLeaseExpired`]: records the event unless the rollout already
    /// holds this agent's event with the same words (an agent tells an expiry until a leader
    /// answers, so a leader that died in between may hear it twice). Changes no traffic.
    fn canary_lease_expired(
        &mut self,
        id: RolloutId,
        agent: String,
        reason: String,
        at: Millis,
    ) -> Result<Applied, Rejection> {
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))?;
        let actor = Actor::Agent(agent);
        let told = rollout.events.iter().any(|e| {
            e.kind == EventKind::CanaryLeaseExpired && e.actor == actor && e.reason == reason
        });
        if !told {
            rollout.record(at, EventKind::CanaryLeaseExpired, actor, reason);
        }
        let state = rollout.state;
        Ok(Applied {
            id: Some(id),
            state: Some(state),
            traffic_changed: false,
        })
    }

    /// Applies [`Command::ShardsGranted`]: valid for a rollout with the shards `[deploy]`
    /// model whose target share is `weight` and differs from the granted one.
    fn shards_granted(
        &mut self,
        id: RolloutId,
        weight: u32,
        schedule_ms: u64,
        reason: String,
        at: Millis,
        generation: Generation,
    ) -> Result<Applied, Rejection> {
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))?;
        let refuse = |why: String| Rejection::NoShardsToGrant {
            id: id.clone(),
            why,
        };
        let model = rollout.strategy.deploy.as_ref().map(|d| d.model);
        if model != Some(DeployModel::Shards) {
            return Err(refuse("its strategy has no shards [deploy] model".into()));
        }
        let target = rollout.shard_target_weight();
        if weight != target {
            return Err(refuse(format!(
                "its target canary share is {target}%, not {weight}% (superseded)"
            )));
        }
        if rollout.shards.weight == weight {
            return Err(refuse(format!("{weight}% is already granted")));
        }
        rollout.shards = ShardGrants {
            weight,
            previous: rollout.shards.weight,
            at,
            schedule_ms,
        };
        rollout.record(at, EventKind::ShardsGranted, Actor::Controller, reason);
        let state = rollout.state;
        let service = rollout.service.clone();
        if let Some(record) = self.services.get_mut(&service) {
            record.generation = generation;
        }
        Ok(Applied {
            id: Some(id),
            state: Some(state),
            traffic_changed: true,
        })
    }

    /// The `[deploy]` that decides what `service`'s managed instances run: its latest
    /// rollout's ([`crate::deploy`]); `None` when serin deploys nothing for it.
    pub fn deploy_spec(&self, service: &str) -> Option<&crate::strategy::Deploy> {
        let record = self.services.get(service)?;
        let rollout = self.rollouts.get(record.latest.as_ref()?)?;
        rollout.strategy.deploy.as_ref()
    }

    /// The desired traffic of one service.
    pub fn traffic(&self, service: &str) -> Option<TrafficPlan> {
        let record = self.services.get(service)?;
        if let Some(plan) = self.pinned_traffic(record) {
            return Some(plan);
        }
        let stable = record.stable_version().unwrap_or_default().to_owned();
        let rollout = record.latest.as_ref().and_then(|id| self.rollouts.get(id));
        let plan = match rollout {
            Some(r) => {
                // Settled: the stable instances run the new version and carry all of it. With
                // the hosts model every instance runs it as stable from the promotion on.
                let hosts = r
                    .strategy
                    .deploy
                    .as_ref()
                    .is_some_and(|d| d.model == DeployModel::Hosts);
                let settled = r.state == RolloutState::Promoted && (r.deploy_settled || hosts);
                let weight = if settled { 0 } else { r.canary_weight() };
                TrafficPlan {
                    service: service.to_owned(),
                    canary_weight: weight,
                    stable_version: stable,
                    canary_version: if settled {
                        String::new()
                    } else {
                        r.version.clone()
                    },
                    rollout: Some(r.id.clone()),
                    sticky_key: if weight > 0 && weight < 100 {
                        r.strategy.traffic.sticky_key.clone()
                    } else {
                        None
                    },
                    override_header: r
                        .strategy
                        .traffic
                        .override_header
                        .clone()
                        .filter(|_| r.overrides_active()),
                    override_cookie: r
                        .strategy
                        .traffic
                        .override_cookie
                        .clone()
                        .filter(|_| r.overrides_active()),
                    generation: record.generation,
                }
            }
            None => TrafficPlan {
                service: service.to_owned(),
                canary_weight: 0,
                stable_version: stable,
                canary_version: String::new(),
                rollout: None,
                sticky_key: None,
                override_header: None,
                override_cookie: None,
                generation: record.generation,
            },
        };
        Some(plan)
    }
}

fn summarize(analysis: &StageAnalysis) -> String {
    if analysis.checks.is_empty() {
        return "no checks configured; minimum time elapsed".into();
    }
    analysis
        .checks
        .iter()
        .map(CheckResult::describe)
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------------
// The controller's judgement.
// ---------------------------------------------------------------------------------------------

/// A trigger's result over its sliding window.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerReading {
    /// The trigger's check result.
    pub result: CheckResult,
    /// Its severity.
    pub severity: Severity,
    /// Grace for warnings.
    pub grace: Duration,
    /// The window it read, for the reason text.
    pub window: Duration,
}

/// Everything the leader measured for one rollout at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The current stage's data and checks.
    pub stage: StageAnalysis,
    /// Every trigger's reading.
    pub triggers: Vec<TriggerReading>,
    /// Agents that failed to apply this rollout's traffic: (agent, error).
    pub apply_failures: Vec<(String, String)>,
    /// Managed instances that do not yet run their assignment ([`crate::deploy`]) healthy, one
    /// line each, e.g. `api-2 on host-b: starting v2 (12s)`: the stage cannot pass meanwhile.
    pub deploy_waiting: Vec<String>,
    /// Managed instances whose assignment failed, one line each, e.g. `api-2 on host-b:
    /// container not healthy after 60s: …`: the rollout rolls back.
    pub deploy_failures: Vec<String>,
    /// Set while a leader that took over this running rollout has not yet seen its trigger
    /// windows' worth of fresh reports ([`takeover_wait`]): the stage cannot pass meanwhile
    /// (a critical trigger may still roll back at once).
    pub takeover: Option<String>,
}

/// Whether a leader (leading since `leader_since`) must still wait before passing a stage of
/// a rollout started at `rollout_started_at`: when it took over the running rollout, until its
/// trigger windows (the longest is `longest_window`) hold only reports it received itself.
/// The reason when it must.
pub fn takeover_wait(
    leader_since: Millis,
    rollout_started_at: Millis,
    longest_window: Duration,
    now: Millis,
) -> Option<String> {
    let window = longest_window.as_millis() as Millis;
    if leader_since <= rollout_started_at || now - leader_since >= window {
        return None;
    }
    Some(format!(
        "this leader took over {:.1}s ago; its trigger windows fill with fresh reports for {}",
        (now - leader_since) as f64 / 1000.0,
        humantime::format_duration(longest_window)
    ))
}

/// Soft controller memory per rollout: since when each warning trigger has been failing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriggerMemory {
    warning_since: HashMap<String, Millis>,
}

impl TriggerMemory {
    /// Since when the warning trigger `name` has been failing, if it is.
    pub fn failing_since(&self, name: &str) -> Option<Millis> {
        self.warning_since.get(name).copied()
    }
}

/// Decides what the leader should propose for `rollout` now, if anything.
pub fn decide(
    rollout: &Rollout,
    observation: &Observation,
    memory: &mut TriggerMemory,
    now: Millis,
) -> Option<Command> {
    if rollout.state.is_terminal() {
        return None;
    }
    let weight = rollout.canary_weight();
    let at_stage = format!("at stage {} ({weight}%)", rollout.stage_index + 1);
    let roll_back = |reason: String| Command::RollBack {
        id: rollout.id.clone(),
        reason,
        analysis: Some(observation.stage.clone()),
        at: now,
    };
    if let Some((agent, error)) = observation.apply_failures.first() {
        return Some(roll_back(format!(
            "agent '{agent}' could not apply the traffic change {at_stage}: {error}"
        )));
    }
    if let Some(failure) = observation.deploy_failures.first() {
        return Some(roll_back(format!(
            "could not deploy {} {at_stage}: {failure}",
            rollout.version
        )));
    }
    let mut fired = None;
    for reading in &observation.triggers {
        let name = &reading.result.name;
        if !matches!(reading.result.verdict, Verdict::Fail { .. }) {
            memory.warning_since.remove(name);
            continue;
        }
        let window = humantime::format_duration(reading.window);
        match reading.severity {
            Severity::Critical => {
                fired.get_or_insert_with(|| {
                    format!(
                        "critical trigger {} over the last {window} {at_stage}",
                        reading.result.describe()
                    )
                });
            }
            Severity::Warning => {
                let since = *memory.warning_since.entry(name.clone()).or_insert(now);
                if now - since >= reading.grace.as_millis() as Millis {
                    fired.get_or_insert_with(|| {
                        format!(
                            "warning trigger {} held for {} (grace {}) {at_stage}",
                            reading.result.describe(),
                            humantime::format_duration(Duration::from_millis(
                                (now - since).max(0) as u64
                            )),
                            humantime::format_duration(reading.grace)
                        )
                    });
                }
            }
        }
    }
    if let Some(reason) = fired {
        return Some(roll_back(reason));
    }
    // A scored check's failure is valid whenever it is read (an anytime-valid fail score, or a
    // ceiling detector): it rolls back at once, before the stage's minimum time and while
    // paused, as a critical trigger does.
    let sequential_failure = observation.stage.checks.iter().find(|c| {
        matches!(c.verdict, Verdict::Fail { .. })
            && rollout.strategy.checks.iter().any(|k| {
                k.name == c.name && matches!(k.rule, crate::strategy::Rule::Sequential { .. })
            })
    });
    if let Some(failed) = sequential_failure {
        return Some(roll_back(format!("check {} {at_stage}", failed.describe())));
    }
    if rollout.state != RolloutState::Progressing {
        return None;
    }
    let stage = &rollout.strategy.stages[rollout.stage_index];
    let elapsed = now - rollout.stage_started_at;
    if elapsed < stage.min_duration.as_millis() as Millis {
        return None;
    }
    // A stage whose managed instances do not all run their version healthy cannot pass: its
    // checks would judge a canary that is not (all) there yet.
    let deploying = observation.deploy_waiting.first().map(|first| {
        match observation.deploy_waiting.len() - 1 {
            0 => format!("waiting for the deployment: {first}"),
            more => format!("waiting for the deployment: {first} (and {more} more)"),
        }
    });
    if observation.takeover.is_some() {
        return None;
    }
    match judge_stage(&observation.stage) {
        StageVerdict::Pass if deploying.is_none() => Some(Command::StagePassed {
            id: rollout.id.clone(),
            stage: rollout.stage_index,
            analysis: observation.stage.clone(),
            at: now,
        }),
        StageVerdict::Fail(check) => {
            Some(roll_back(format!("check {} {at_stage}", check.describe())))
        }
        StageVerdict::Pass | StageVerdict::NotYet => match stage.max_duration {
            Some(max) if elapsed >= max.as_millis() as Millis => {
                let waiting: Vec<_> = deploying
                    .into_iter()
                    .chain(
                        observation
                            .stage
                            .checks
                            .iter()
                            .filter(|c| matches!(c.verdict.label(), "no_data" | "inconclusive"))
                            .map(CheckResult::describe),
                    )
                    .collect();
                let reason = format!(
                    "inconclusive {at_stage} after {}: {}",
                    humantime::format_duration(max),
                    waiting.join("; ")
                );
                Some(match rollout.strategy.on_inconclusive {
                    crate::strategy::OnInconclusive::Pause => Command::Pause {
                        id: rollout.id.clone(),
                        actor: Actor::Controller,
                        reason,
                        at: now,
                    },
                    crate::strategy::OnInconclusive::RollBack => {
                        roll_back(format!("{reason} (on_inconclusive = roll_back)"))
                    }
                })
            }
            _ => None,
        },
    }
}

mod listing;
pub use listing::{BadToken, Cursor, Page};
pub mod table;
pub use table::Table;
pub mod revisions;

#[cfg(test)]
mod tests;
