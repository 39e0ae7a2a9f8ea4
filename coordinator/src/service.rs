//! The gRPC services: agent sessions and the operator API. Errors become `tonic::Status` here
//! and only here; decisions are never made in a handler (they are commands through Raft).

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use serin_proto::v1::{
    self, AgentMessage, CoordinatorMessage, agent_message, agent_service_server::AgentService,
    control_service_server::ControlService,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::agents::{AgentInfo, ForgetError, SessionOrigin};
use crate::analysis::{HostPeak, Pair, Verdict, Window};
use crate::control::{LiveView, RATE_WINDOW, Shared, now_millis};
use crate::limits::{
    DEFAULT_LIST_LIMIT, KEEP_FIRST_EVENTS, KEEP_LAST_EVENTS, MAX_ACTOR, MAX_LIST_LIMIT,
    MAX_PAGE_TOKEN, MAX_REASON, MAX_ROLLOUT_ID, MAX_SERVICE, MAX_STRATEGY_TOML, MAX_VERSION,
    SUMMARY_REASON_CHARS, check_len,
};
use crate::metrics::Side;
use crate::raft::transport::AddressBook;
use crate::raft::{ClusterStatus, MembershipChange, ProposeError, Role};
use crate::rollout::revisions::UndoRefusal;
use crate::rollout::{
    Actor, Command, Cursor, Generation, Millis, Rejection, Rollout, RolloutId, TriggerReading,
};
use crate::strategy::Severity;
use crate::strategy::Strategy;

/// Implements both services over the shared coordinator state.
#[derive(Clone)]
pub struct Api {
    shared: Shared,
    /// Ends agent sessions at shutdown (open streams would otherwise hold the server).
    shutdown: CancellationToken,
    /// The per-session tasks, awaited at shutdown.
    sessions: TaskTracker,
    /// The members' addresses, to point clients at the leader.
    book: AddressBook,
}

impl Api {
    /// An API over `shared`; agent sessions end when `shutdown` fires and are tracked by
    /// `sessions`.
    pub fn new(shared: Shared, shutdown: CancellationToken, sessions: TaskTracker) -> Api {
        Api {
            shared,
            shutdown,
            sessions,
            book: AddressBook::default(),
        }
    }

    /// Points this API's "not the leader" answers at the members' addresses.
    pub fn with_addresses(mut self, book: AddressBook) -> Api {
        self.book = book;
        self
    }

    fn require_leader(&self) -> Result<(), Status> {
        let view = self.shared.raft.view();
        match view.role {
            Role::Leader => Ok(()),
            _ => Err(self.not_leader(view.leader)),
        }
    }

    /// For reads that must be current: only the leader answers, once a quorum confirmed it
    /// still leads and it applied everything committed before the read (read-index), so a
    /// deposed leader never serves its stale state as current.
    async fn require_current(&self) -> Result<(), Status> {
        self.require_leader()?;
        self.shared
            .raft
            .read_index()
            .await
            .map_err(|e| self.propose_status(e))
    }

    /// UNAVAILABLE naming the leader, with its address in the `serin-leader` metadata.
    fn not_leader(&self, leader: Option<u64>) -> Status {
        let address = leader.and_then(|l| self.book.get(l));
        let hint = match (leader, &address) {
            (Some(l), Some(a)) => format!(" (leader is node {l} at {a})"),
            (Some(l), None) => format!(" (leader is node {l})"),
            _ => " (no leader elected yet)".to_owned(),
        };
        let mut status =
            Status::unavailable(format!("this coordinator is not the leader{hint}; retry"));
        if let (Some(l), Some(a)) = (leader, address)
            && let (Ok(id), Ok(address)) = (l.to_string().parse(), a.parse())
        {
            status.metadata_mut().insert(LEADER_ID_METADATA, id);
            status.metadata_mut().insert(LEADER_METADATA, address);
        }
        status
    }

    fn propose_status(&self, error: ProposeError) -> Status {
        match error {
            ProposeError::Rejected(r) => rejection_status(r),
            ProposeError::NotLeader { leader } => self.not_leader(leader),
            // Not retried by clients: it may still commit under the next leader.
            ProposeError::Undecided => Status::aborted(error.to_string()),
            ProposeError::Dropped | ProposeError::Stopped | ProposeError::Unconfirmed(_) => {
                Status::unavailable(error.to_string())
            }
            ProposeError::Membership(_) => Status::failed_precondition(error.to_string()),
            ProposeError::Raft(_) => Status::internal(error.to_string()),
        }
    }

    async fn cluster_reply(&self) -> Result<v1::ClusterStatusReply, Status> {
        let status = self
            .shared
            .raft
            .cluster_status()
            .await
            .map_err(|e| self.propose_status(e))?;
        Ok(cluster_reply(&status, &self.book))
    }

    fn to_proto(&self, rollout: &Rollout) -> v1::Rollout {
        // A finished rollout has no live analysis; its evidence holds what was measured.
        let live = (!rollout.state.is_terminal())
            .then(|| self.shared.live(&rollout.id))
            .flatten();
        let mut proto = rollout_to_proto(rollout, live.as_ref());
        proto.apply = self.apply_progress(rollout);
        proto.deploy = self.deploy_view(rollout);
        proto
    }

    /// What serin deploys for `rollout`'s service, when it is the latest rollout and has
    /// `[deploy]`.
    fn deploy_view(&self, rollout: &Rollout) -> Option<v1::DeployView> {
        let deploy = rollout.strategy.deploy.as_ref()?;
        let view = self.shared.raft.view();
        let service = view.registry.services.get(&rollout.service)?;
        if service.latest.as_ref() != Some(&rollout.id) {
            return None;
        }
        let progress = self
            .shared
            .agents
            .deploy_progress(&view.registry, &rollout.service);
        Some(v1::DeployView {
            model: deploy.model.name().into(),
            waiting: progress.waiting,
            failures: progress.failures,
            settled: rollout.deploy_settled,
            shard_count: deploy.shards.map_or(0, |s| s.count),
            canary_shards: crate::deploy::shard_sides(rollout).0,
            moving_shards: crate::deploy::shard_sides(rollout).1,
        })
    }

    /// Desired vs actual for `rollout`, when it is its service's latest rollout.
    fn apply_progress(&self, rollout: &Rollout) -> Option<v1::ApplyProgress> {
        let view = self.shared.raft.view();
        let service = view.registry.services.get(&rollout.service)?;
        if service.latest.as_ref() != Some(&rollout.id) {
            return None;
        }
        let status = self
            .shared
            .agents
            .apply_status(&rollout.service, service.generation);
        Some(v1::ApplyProgress {
            generation: Some(service.generation.into()),
            agents: status.carrying as u32,
            applied: status.applied as u32,
            lagging: status
                .lagging
                .into_iter()
                .map(|l| v1::AgentLag {
                    agent: l.agent,
                    connected: l.connected,
                    error: l.error.unwrap_or_default(),
                    since_ms: l.since.unwrap_or(0),
                })
                .collect(),
        })
    }

    async fn propose(&self, command: Command) -> Result<v1::Rollout, Status> {
        let id = command
            .rollout_id()
            .cloned()
            .expect("operator commands are about a rollout");
        // Refuse what the state machine would refuse without writing it to the log; the
        // state machine checks again when it applies (the state may change in between).
        self.shared
            .raft
            .view()
            .registry
            .validate(&command)
            .map_err(rejection_status)?;
        self.shared
            .raft
            .propose(command)
            .await
            .map_err(|e| self.propose_status(e))?;
        let view = self.shared.raft.view();
        let rollout = view.registry.rollout(&id).map_err(rejection_status)?;
        Ok(self.to_proto(rollout))
    }
}

/// Trailing metadata of a "not the leader" status: the leader's gRPC address.
pub const LEADER_METADATA: &str = "serin-leader";
/// Trailing metadata of a "not the leader" status: the leader's raft id.
pub const LEADER_ID_METADATA: &str = "serin-leader-id";

/// The wire form of a node's [`ClusterStatus`].
fn cluster_reply(status: &ClusterStatus, book: &AddressBook) -> v1::ClusterStatusReply {
    let last_index = status.last_index;
    let member = |id: u64, suffrage: &str| {
        let progress = status.progress.as_ref().and_then(|p| p.get(&id));
        v1::ClusterMember {
            id,
            address: book.get(id).unwrap_or_default(),
            suffrage: suffrage.into(),
            is_leader: status.leader == Some(id),
            matched_index: progress.map_or(0, |p| p.matched),
            lag: progress.map_or(0, |p| last_index.saturating_sub(p.matched)),
            reachable: progress.is_some_and(|p| p.recent_active),
            progress_state: progress.map_or("", |p| p.state).into(),
        }
    };
    let mut members: Vec<v1::ClusterMember> = status
        .voters
        .iter()
        .map(|&id| member(id, "voter"))
        .chain(status.learners.iter().map(|&id| member(id, "learner")))
        .collect();
    members.sort_by_key(|m| m.id);
    v1::ClusterStatusReply {
        node_id: status.id,
        role: match status.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
        }
        .into(),
        leader_id: status.leader.unwrap_or(0),
        leader_address: status.leader.and_then(|l| book.get(l)).unwrap_or_default(),
        term: status.term,
        commit_index: status.commit,
        applied_index: status.applied,
        last_index,
        members,
        pending_change: status.pending_change.clone().unwrap_or_default(),
        progress_known: status.progress.is_some(),
    }
}

fn rejection_status(rejection: Rejection) -> Status {
    match rejection {
        Rejection::UnknownRollout(_) => Status::not_found(rejection.to_string()),
        Rejection::DuplicateRollout(_) => Status::already_exists(rejection.to_string()),
        Rejection::Undo(UndoRefusal::UnknownService(_)) => Status::not_found(rejection.to_string()),
        Rejection::Undo(UndoRefusal::UnknownRevision { .. }) => {
            Status::invalid_argument(rejection.to_string())
        }
        _ => Status::failed_precondition(rejection.to_string()),
    }
}

/// A service or version name: letters, digits, `.`, `_`, `-`, `+`, at least one (the length
/// limit is checked first, with its own message).
fn valid_name(field: &str, value: &str) -> Result<(), Status> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{field}: must be letters, digits, '.', '_', '-', '+' (at least one), got {value:?}"
        )))
    }
}

fn variant_stats(
    window: &Window,
    recent: &Window,
    scrape_error: &Option<String>,
) -> v1::VariantStats {
    v1::VariantStats {
        last_scrape_error: scrape_error.clone().unwrap_or_default(),
        requests: window.requests,
        errors: window.errors,
        error_rate: window.error_rate().unwrap_or(0.0),
        p95_ms: window.quantile(0.95).map_or(-1.0, |s| s * 1000.0),
        requests_per_second: recent.requests as f64 / RATE_WINDOW.as_secs_f64(),
    }
}

fn trigger_outcome(reading: &TriggerReading, failing_since: Option<Millis>) -> v1::TriggerOutcome {
    let (value, threshold) = match reading.result.verdict {
        Verdict::Pass { value, threshold } | Verdict::Fail { value, threshold } => {
            (Some(value), Some(threshold))
        }
        Verdict::NoData { .. } | Verdict::Inconclusive { .. } | Verdict::Skipped { .. } => {
            (None, None)
        }
    };
    let warning = reading.severity == Severity::Warning;
    v1::TriggerOutcome {
        name: reading.result.name.clone(),
        severity: match reading.severity {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
        .to_owned(),
        verdict: reading.result.verdict.label().to_owned(),
        detail: reading.result.describe(),
        value,
        threshold,
        unit: reading.result.metric.unit().to_owned(),
        window_ms: reading.window.as_millis() as u64,
        grace_ms: if warning {
            reading.grace.as_millis() as u64
        } else {
            0
        },
        failing_since_ms: failing_since.filter(|_| warning).unwrap_or(0),
    }
}

/// The history on the wire; where the cap dropped events, one `events_dropped` event says how
/// many.
fn events_to_proto(rollout: &Rollout) -> Vec<v1::RolloutEvent> {
    let mut events: Vec<v1::RolloutEvent> = rollout
        .events
        .iter()
        .map(|e| v1::RolloutEvent {
            at_ms: e.at,
            kind: serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            actor: e.actor.to_string(),
            reason: e.reason.clone(),
            stage_index: e.stage_index as u32,
            canary_weight: e.canary_weight,
            hook: e.hook.as_ref().map(hook_outcome),
        })
        .collect();
    if rollout.events_dropped > 0 && events.len() > KEEP_FIRST_EVENTS {
        let before = &events[KEEP_FIRST_EVENTS - 1];
        let marker = v1::RolloutEvent {
            at_ms: before.at_ms,
            kind: "events_dropped".into(),
            actor: "coordinator".into(),
            reason: format!(
                "{} events not kept: a rollout keeps its first {KEEP_FIRST_EVENTS} and its last {KEEP_LAST_EVENTS} events",
                rollout.events_dropped
            ),
            stage_index: before.stage_index,
            canary_weight: before.canary_weight,
            hook: None,
        };
        events.insert(KEEP_FIRST_EVENTS, marker);
    }
    events
}

/// A hook run on the wire.
fn hook_outcome(run: &crate::hooks::HookRun) -> v1::HookOutcome {
    v1::HookOutcome {
        name: run.name.clone(),
        on: run.on.name().to_owned(),
        attempts: run.attempts,
        status: run.status.map_or(0, u32::from),
        error: run.error.clone().unwrap_or_default(),
        body: run.body.clone(),
        duration_ms: run.duration_ms,
        passed: run.passed(),
    }
}

/// Converts a rollout (and the leader's live view of it) to its wire form.
pub fn rollout_to_proto(rollout: &Rollout, live: Option<&LiveView>) -> v1::Rollout {
    let live = live.map(|l| {
        let Pair { stable, canary } = &l.stage.data;
        v1::LiveAnalysis {
            stable: Some(variant_stats(stable, &l.recent.stable, &l.scrape_errors.0)),
            canary: Some(variant_stats(canary, &l.recent.canary, &l.scrape_errors.1)),
            checks: l
                .stage
                .checks
                .iter()
                .map(|c| v1::CheckOutcome {
                    name: c.name.clone(),
                    verdict: c.verdict.label().to_owned(),
                    detail: c.describe(),
                })
                .collect(),
            triggers: l
                .triggers
                .iter()
                .map(|(t, since)| trigger_outcome(t, *since))
                .collect(),
        }
    });
    v1::Rollout {
        id: rollout.id.0.clone(),
        service: rollout.service.clone(),
        version: rollout.version.clone(),
        stable_version: rollout.stable_version.clone(),
        state: rollout.state.name().to_owned(),
        stage_index: rollout.stage_index as u32,
        stage_count: rollout.strategy.stages.len() as u32,
        canary_weight: rollout.canary_weight(),
        last_reason: rollout.last_reason().to_owned(),
        started_at_ms: rollout.started_at,
        stage_started_at_ms: rollout.stage_started_at,
        events: events_to_proto(rollout),
        live,
        detail_json: serde_json::to_string(rollout).unwrap_or_default(),
        apply: None,
        deploy: None,
    }
}

/// A rollout as one line of a list: no history, evidence or live analysis.
pub fn rollout_summary(rollout: &Rollout) -> v1::RolloutSummary {
    let updated = rollout.events.last().map_or(rollout.started_at, |e| e.at);
    v1::RolloutSummary {
        id: rollout.id.0.clone(),
        service: rollout.service.clone(),
        version: rollout.version.clone(),
        stable_version: rollout.stable_version.clone(),
        state: rollout.state.name().to_owned(),
        stage_index: rollout.stage_index as u32,
        stage_count: rollout.strategy.stages.len() as u32,
        canary_weight: rollout.canary_weight(),
        last_reason: summary_line(rollout.last_reason(), SUMMARY_REASON_CHARS),
        started_at_ms: rollout.started_at,
        stage_started_at_ms: rollout.stage_started_at,
        updated_at_ms: updated,
        finished_at_ms: if rollout.state.is_terminal() {
            updated
        } else {
            0
        },
        not_applied: 0,
    }
}

/// `text` on one line (line breaks become ` ⏎ `), at most `max` characters, `…` when cut.
fn summary_line(text: &str, max: usize) -> String {
    let folded = text
        .trim()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" ⏎ ");
    if folded.chars().count() <= max {
        return folded;
    }
    let mut out: String = folded.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A revision as the operator API shows it.
fn revision_view(r: &crate::rollout::Revision) -> v1::RevisionView {
    v1::RevisionView {
        number: r.number,
        version: r.version.clone(),
        rollout_id: r
            .rollout
            .as_ref()
            .map(|id| id.0.clone())
            .unwrap_or_default(),
        undo_of: r.undo_of.unwrap_or(0),
        at_ms: r.at,
    }
}

/// Refuses a value over its limit with `INVALID_ARGUMENT` naming the field, limit and length.
fn length(field: &str, value: &str, limit: usize) -> Result<(), Status> {
    check_len(field, value, limit).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl ControlService for Api {
    async fn start_rollout(
        &self,
        request: Request<v1::StartRolloutRequest>,
    ) -> Result<Response<v1::RolloutReply>, Status> {
        let req = request.into_inner();
        length("service", &req.service, MAX_SERVICE)?;
        length("version", &req.version, MAX_VERSION)?;
        length("stable_version", &req.stable_version, MAX_VERSION)?;
        length("actor", &req.actor, MAX_ACTOR)?;
        length("strategy_toml", &req.strategy_toml, MAX_STRATEGY_TOML)?;
        valid_name("service", &req.service)?;
        valid_name("version", &req.version)?;
        if !req.stable_version.is_empty() {
            valid_name("stable_version", &req.stable_version)?;
        }
        let strategy = Strategy::from_toml(&req.strategy_toml).map_err(|e| {
            let lines: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
            Status::invalid_argument(format!("invalid strategy:\n{}", lines.join("\n")))
        })?;
        self.require_leader()?;
        let coverage = self.shared.agents.coverage(&req.service);
        let mut missing = vec![];
        let model = strategy.deploy.as_ref().map(|d| d.model);
        if model == Some(crate::strategy::DeployModel::Hosts) {
            // A host share runs the canary in place: no balancer or canary slot is needed
            // (a worker has no traffic to balance), only instances serin deploys.
            if !coverage.managed {
                missing.push("a managed instance (`managed = true`) for the hosts model");
            }
        } else if model == Some(crate::strategy::DeployModel::Shards) {
            // Shards move between managed bots of both variants; no balancer is involved.
            if !coverage.managed_stable {
                missing.push("a managed stable instance for the shards model");
            }
            if !coverage.managed_canary {
                missing.push("a managed canary instance for the shards model");
            }
        } else {
            if !coverage.balancer {
                missing.push("a load balancer ([nginx] services)");
            }
            if !coverage.stable {
                missing.push("a stable instance");
            }
            if !coverage.canary {
                missing.push("a canary instance");
            }
        }
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no connected agent provides {} for service '{}'; start or fix the agents first (`serin agent run`)",
                missing.join(", "),
                req.service
            )));
        }
        let suffix: u32 = rand::random::<u32>() & 0xff_ffff;
        let id = RolloutId(format!("{}-{suffix:06x}", req.service));
        let actor = if req.actor.is_empty() {
            "operator".to_owned()
        } else {
            req.actor
        };
        let rollout = self
            .propose(Command::Start {
                id,
                service: req.service,
                version: req.version,
                stable_version: Some(req.stable_version).filter(|s| !s.is_empty()),
                strategy,
                actor: Actor::Operator(actor),
                at: now_millis(),
            })
            .await?;
        Ok(Response::new(v1::RolloutReply {
            rollout: Some(rollout),
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<v1::GetRolloutRequest>,
    ) -> Result<Response<v1::RolloutReply>, Status> {
        let id = request.into_inner().id;
        length("id", &id, MAX_ROLLOUT_ID)?;
        let id = RolloutId(id);
        self.require_current().await?;
        let view = self.shared.raft.view();
        let rollout = view.registry.rollout(&id).map_err(rejection_status)?;
        Ok(Response::new(v1::RolloutReply {
            rollout: Some(self.to_proto(rollout)),
        }))
    }

    async fn list_rollouts(
        &self,
        request: Request<v1::ListRolloutsRequest>,
    ) -> Result<Response<v1::ListRolloutsReply>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n if n > MAX_LIST_LIMIT => {
                return Err(Status::invalid_argument(format!(
                    "limit: at most {MAX_LIST_LIMIT} rollouts per page, got {n}; page with page_token"
                )));
            }
            n => n,
        };
        length("page_token", &req.page_token, MAX_PAGE_TOKEN)?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                Cursor::from_token(&req.page_token)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        self.require_current().await?;
        let view = self.shared.raft.view();
        let page = view
            .registry
            .page(limit as usize, after.as_ref(), req.running_only);
        Ok(Response::new(v1::ListRolloutsReply {
            rollouts: page
                .rollouts
                .into_iter()
                .map(|r| v1::RolloutSummary {
                    not_applied: self.apply_progress(r).map_or(0, |a| a.lagging.len() as u32),
                    ..rollout_summary(r)
                })
                .collect(),
            next_page_token: page.next.map(|c| c.token()).unwrap_or_default(),
        }))
    }

    async fn steer_rollout(
        &self,
        request: Request<v1::SteerRolloutRequest>,
    ) -> Result<Response<v1::RolloutReply>, Status> {
        let req = request.into_inner();
        length("id", &req.id, MAX_ROLLOUT_ID)?;
        length("reason", &req.reason, MAX_REASON)?;
        length("actor", &req.actor, MAX_ACTOR)?;
        let id = RolloutId(req.id);
        // Unknown ids get NotFound even on a follower.
        self.shared
            .raft
            .view()
            .registry
            .rollout(&id)
            .map_err(rejection_status)?;
        let actor = Actor::Operator(if req.actor.is_empty() {
            "operator".to_owned()
        } else {
            req.actor
        });
        let at = now_millis();
        let action = v1::SteerAction::try_from(req.action).map_err(|_| {
            Status::invalid_argument(format!("action: unknown value {}", req.action))
        })?;
        let reason = |default: &str| {
            if req.reason.is_empty() {
                default.to_owned()
            } else {
                req.reason.clone()
            }
        };
        let command = match action {
            v1::SteerAction::Pause => Command::Pause {
                id,
                actor,
                reason: reason("paused by operator"),
                at,
            },
            v1::SteerAction::Resume => Command::Resume {
                id,
                actor,
                reason: reason("resumed by operator"),
                at,
            },
            v1::SteerAction::Promote => Command::Promote {
                analysis: self.shared.live(&id).map(|l| l.stage),
                id,
                actor,
                reason: reason("promoted by operator"),
                at,
            },
            v1::SteerAction::Abort => Command::Abort {
                analysis: self.shared.live(&id).map(|l| l.stage),
                id,
                actor,
                reason: reason("aborted by operator"),
                at,
            },
            v1::SteerAction::Unspecified => {
                return Err(Status::invalid_argument(
                    "action: one of pause, resume, promote, abort is required",
                ));
            }
        };
        let rollout = self.propose(command).await?;
        Ok(Response::new(v1::RolloutReply {
            rollout: Some(rollout),
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsReply>, Status> {
        // Agents hold sessions with the leader only: another member's list is empty.
        self.require_current().await?;
        let agents = self
            .shared
            .agents
            .list()
            .into_iter()
            .map(|a| v1::AgentInfo {
                name: a.name,
                labels: a.labels.into_iter().collect(),
                targets: a.targets,
                connected: a.connected,
                applied: a.applied.map(|g| v1::Generation {
                    term: g.term,
                    index: g.index,
                }),
                last_error: a.last_error.unwrap_or_default(),
                last_report_ms: a.last_report.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(v1::ListAgentsReply { agents }))
    }

    async fn list_services(
        &self,
        _request: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesReply>, Status> {
        self.require_current().await?;
        let view = self.shared.raft.view();
        let mut names = self.shared.agents.known_services();
        names.extend(view.registry.services.keys().cloned());
        let services = names
            .into_iter()
            .map(|name| {
                let record = view.registry.services.get(&name);
                let generation = record.map(|r| r.generation).unwrap_or_default();
                let members = record.and_then(|r| r.upstreams.as_ref());
                let mut instances: Vec<v1::FleetInstance> = self
                    .shared
                    .agents
                    .instances(&name, now_millis())
                    .into_iter()
                    .map(|i| v1::FleetInstance {
                        in_upstream: members
                            .is_some_and(|m| m.iter().any(|m| m.address == i.address)),
                        instance: i.name,
                        address: i.address,
                        variant: match i.variant {
                            crate::metrics::Side::Stable => v1::Variant::Stable as i32,
                            crate::metrics::Side::Canary => v1::Variant::Canary as i32,
                        },
                        agent: i.agent,
                        connected: i.connected,
                    })
                    .collect();
                instances.sort_by(|a, b| (a.variant, &a.address).cmp(&(b.variant, &b.address)));
                let balancers = self
                    .shared
                    .agents
                    .balancers_of(&name, generation)
                    .into_iter()
                    .map(|(agent, connected, applied, error)| v1::BalancerView {
                        agent,
                        connected,
                        applied,
                        error: error.unwrap_or_default(),
                    })
                    .collect();
                let history = record
                    .map(|r| {
                        let skip = r.history.len().saturating_sub(20);
                        r.history
                            .iter()
                            .skip(skip)
                            .map(|e| v1::ServiceHistoryEvent {
                                at_ms: e.at,
                                reason: e.reason.clone(),
                                generation: Some(e.generation.into()),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                v1::ServiceView {
                    stable_version: record
                        .and_then(|r| r.stable_version())
                        .unwrap_or_default()
                        .to_owned(),
                    generation: Some(generation.into()),
                    instances,
                    balancers,
                    history,
                    from_inventory: members.is_some(),
                    revisions: record
                        .map(|r| r.revisions.iter().map(revision_view).collect())
                        .unwrap_or_default(),
                    name,
                }
            })
            .collect();
        Ok(Response::new(v1::ListServicesReply { services }))
    }

    async fn undo_service(
        &self,
        request: Request<v1::UndoServiceRequest>,
    ) -> Result<Response<v1::UndoServiceReply>, Status> {
        let req = request.into_inner();
        length("service", &req.service, MAX_SERVICE)?;
        length("reason", &req.reason, MAX_REASON)?;
        length("actor", &req.actor, MAX_ACTOR)?;
        valid_name("service", &req.service)?;
        let command = Command::Undo {
            service: req.service.clone(),
            to_revision: req.to_revision,
            actor: Actor::Operator(if req.actor.is_empty() {
                "operator".to_owned()
            } else {
                req.actor
            }),
            reason: req.reason,
            at: now_millis(),
        };
        // Refuse what the state machine would refuse (an unknown service or revision even on
        // a follower) without writing it to the log; it checks again when it applies.
        self.shared
            .raft
            .view()
            .registry
            .validate(&command)
            .map_err(rejection_status)?;
        self.require_leader()?;
        self.shared
            .raft
            .propose(command)
            .await
            .map_err(|e| self.propose_status(e))?;
        let view = self.shared.raft.view();
        let record = view
            .registry
            .services
            .get(&req.service)
            .ok_or_else(|| Status::internal("the undone service vanished"))?;
        let revision = record.revisions.last().map(revision_view);
        let previous = record
            .revisions
            .len()
            .checked_sub(2)
            .map_or(0, |i| record.revisions[i].number);
        let serving = match (view.registry.pin(&req.service), &record.upstreams) {
            (Some(pin), Some(members)) => {
                crate::inventory::serving(members, &pin.version, &pin.mapping)
                    .into_iter()
                    .map(|m| format!("{} ({})", m.instance, m.address))
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(Response::new(v1::UndoServiceReply {
            service: req.service,
            revision,
            previous,
            serving,
        }))
    }

    async fn list_revisions(
        &self,
        request: Request<v1::ListRevisionsRequest>,
    ) -> Result<Response<v1::ListRevisionsReply>, Status> {
        let service = request.into_inner().service;
        length("service", &service, MAX_SERVICE)?;
        valid_name("service", &service)?;
        self.require_current().await?;
        let view = self.shared.raft.view();
        let record = view
            .registry
            .services
            .get(&service)
            .filter(|r| !r.revisions.is_empty())
            .ok_or_else(|| {
                Status::not_found(UndoRefusal::UnknownService(service.clone()).to_string())
            })?;
        Ok(Response::new(v1::ListRevisionsReply {
            revisions: record.revisions.iter().map(revision_view).collect(),
            pinned: record.pinned.unwrap_or(0),
            service,
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<v1::ClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatusReply>, Status> {
        Ok(Response::new(self.cluster_reply().await?))
    }

    async fn change_membership(
        &self,
        request: Request<v1::ChangeMembershipRequest>,
    ) -> Result<Response<v1::ClusterStatusReply>, Status> {
        let change = match request.into_inner().change {
            Some(v1::change_membership_request::Change::Add(add)) => {
                if add.id == 0 {
                    return Err(Status::invalid_argument(
                        "id: must be at least 1 (raft reserves 0)",
                    ));
                }
                crate::server::check_peer_address(&add.address)
                    .map_err(|e| Status::invalid_argument(format!("address: {e}")))?;
                MembershipChange::Add {
                    id: add.id,
                    address: add.address,
                }
            }
            Some(v1::change_membership_request::Change::Remove(id)) => {
                MembershipChange::Remove { id }
            }
            None => {
                return Err(Status::invalid_argument(
                    "change: say which member to add or remove",
                ));
            }
        };
        self.require_leader()?;
        self.shared
            .raft
            .change_membership(change)
            .await
            .map_err(|e| self.propose_status(e))?;
        Ok(Response::new(self.cluster_reply().await?))
    }

    async fn forget_agent(
        &self,
        request: Request<v1::ForgetAgentRequest>,
    ) -> Result<Response<v1::ForgetAgentReply>, Status> {
        let name = request.into_inner().name;
        self.require_leader()?;
        self.shared.agents.forget(&name).map_err(|e| match e {
            ForgetError::Unknown(_) => Status::not_found(e.to_string()),
            ForgetError::Connected(_) => Status::failed_precondition(e.to_string()),
        })?;
        Ok(Response::new(v1::ForgetAgentReply {}))
    }
}

impl Api {
    /// A registered agent's canary lease expired while it reached no leader: records it in the
    /// rollouts concerned, in the background ([`crate::control::record_lease_expiry`]).
    fn record_lease_expiry(&self, agent: &str, expiry: Option<v1::LeaseExpiry>) {
        let Some(expiry) = expiry else {
            return;
        };
        tracing::warn!(agent = %agent, action = %expiry.action, "the agent's canary lease expired while it reached no leader");
        tokio::spawn(crate::control::record_lease_expiry(
            self.shared.clone(),
            agent.to_owned(),
            expiry,
        ));
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Api {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let view = self.shared.raft.view();
        if view.role != Role::Leader {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx
                .send(Ok(CoordinatorMessage {
                    body: Some(v1::coordinator_message::Body::NotLeader(v1::NotLeader {
                        leader_hint: view
                            .leader
                            .and_then(|l| self.book.get(l))
                            .unwrap_or_default(),
                    })),
                }))
                .await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("the stream closed before Register"))??;
        let Some(agent_message::Body::Register(register)) = first.body else {
            return Err(Status::invalid_argument(
                "the first message of a session must be Register",
            ));
        };
        if register.agent.is_empty() {
            return Err(Status::invalid_argument(
                "register.agent: must not be empty",
            ));
        }
        for (i, t) in register.targets.iter().enumerate() {
            if t.variant != v1::Variant::Stable as i32 && t.variant != v1::Variant::Canary as i32 {
                return Err(Status::invalid_argument(format!(
                    "register.targets[{i}].variant: must be STABLE or CANARY"
                )));
            }
        }
        let name = register.agent.clone();
        let lease_expired = register.lease_expired.clone();
        let (tx, rx) = mpsc::channel(64);
        let info = AgentInfo {
            name: name.clone(),
            labels: register.labels.into_iter().collect::<BTreeMap<_, _>>(),
            targets: register.targets,
            balancer_services: register.balancer_services,
            connected: true,
            applied: register.last_applied.map(Generation::from),
            last_error: None,
            last_report: None,
        };
        let origin = SessionOrigin {
            instance_id: register.instance_id,
            peer: peer.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string()),
        };
        let targets = info.targets.len();
        let session = self
            .shared
            .agents
            .connect(info, origin, tx.clone(), &view.registry, now_millis())
            .map_err(|e| {
                tracing::warn!(agent = %name, error = %e, "agent refused");
                Status::already_exists(e.to_string())
            })?;
        tracing::info!(agent = %name, targets, "agent connected");
        self.record_lease_expiry(&name, lease_expired);
        let shared = self.shared.clone();
        let shutdown = self.shutdown.clone();
        // The session task ends when the agent's stream ends or at shutdown; it is tracked so
        // shutdown can wait for it.
        self.sessions.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    message = inbound.next() => message,
                };
                match message {
                    None => break,
                    Some(Ok(message)) => handle_agent_message(&shared, &name, message),
                    Some(Err(status)) => {
                        if let Some(refusal) = oversized(&status, &name) {
                            tracing::warn!(agent = %name, error = %refusal.message(), "agent session ended");
                            let _ = tx.try_send(Err(refusal));
                        } else {
                            tracing::info!(agent = %name, error = %status, "agent stream failed");
                        }
                        break;
                    }
                }
            }
            shared.agents.disconnect(&name, session, now_millis());
            tracing::info!(agent = %name, "agent disconnected");
        });
        let outbound = futures::StreamExt::take_until(
            ReceiverStream::new(rx),
            self.shutdown.clone().cancelled_owned(),
        );
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// The largest message the coordinator accepts from an agent or an operator, in bytes
/// (tonic's default, stated so errors can name it).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The status sent to an agent whose message exceeded [`MAX_MESSAGE_BYTES`], if `status` is that
/// error (tonic reports it as `OUT_OF_RANGE` with "message length too large").
fn oversized(status: &Status, agent: &str) -> Option<Status> {
    let too_large = matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) && status.message().contains("too large");
    too_large.then(|| {
        Status::resource_exhausted(format!(
            "a message from agent '{agent}' exceeds the coordinator's limit of {MAX_MESSAGE_BYTES} bytes ({}); report fewer instances per agent",
            status.message()
        ))
    })
}

/// Folds one message of an open session into the leader's state.
fn handle_agent_message(shared: &Shared, name: &str, message: AgentMessage) {
    match message.body {
        Some(agent_message::Body::Report(mut report)) => {
            let now = now_millis();
            // One status per managed instance; a report is bounded like every agent message.
            let mut workloads = std::mem::take(&mut report.workloads);
            workloads.truncate(crate::limits::MAX_WORKLOADS_PER_REPORT);
            for w in &mut workloads {
                crate::limits::bound_actions(&mut w.actions);
            }
            let scrapes: Vec<(String, bool)> = report
                .instances
                .iter()
                .map(|w| (w.instance.clone(), w.scrape_ok))
                .collect();
            shared
                .agents
                .reported(name, now, report.interval_ms as Millis, &scrapes, workloads);
            let mut metrics = shared.metrics();
            let mut breach = false;
            // The host's sample counts once per service and variant it hosts in this report.
            let host = report.host.and_then(|h| {
                HostPeak::sample(h.cpu_percent, h.memory_used_bytes, h.memory_total_bytes)
            });
            let mut sampled: Vec<(String, Side)> = Vec::new();
            for w in report.instances {
                let side = if w.variant == v1::Variant::Canary as i32 {
                    Side::Canary
                } else if w.variant == v1::Variant::Stable as i32 {
                    Side::Stable
                } else {
                    continue;
                };
                let window = if w.scrape_ok {
                    let buckets: Vec<(f64, u64)> =
                        w.latency.iter().map(|b| (b.le, b.count)).collect();
                    Window::from_counts(w.requests, w.errors, &buckets, w.latency_sum_seconds)
                } else {
                    metrics.record_scrape_error(
                        &w.service,
                        side,
                        format!("{}: {}", w.instance, w.scrape_error),
                        now,
                    );
                    Window::missing()
                };
                let mut window = window;
                if let Some(host) = host
                    && !sampled.iter().any(|(s, v)| *s == w.service && *v == side)
                {
                    sampled.push((w.service.clone(), side));
                    window.hosts = host;
                }
                breach |= side == Side::Canary && (window.errors > 0 || window.missing > 0);
                metrics.record(&w.service, side, window, now);
            }
            drop(metrics);
            if breach {
                // A canary in trouble is judged now rather than at the next tick.
                shared.wake.notify_one();
            }
        }
        Some(agent_message::Body::Ack(ack)) => {
            let generation = ack.generation.map(Generation::from).unwrap_or_default();
            let failures = ack
                .failures
                .into_iter()
                .map(|f| (f.service, f.error))
                .collect::<Vec<_>>();
            if failures.is_empty() {
                tracing::info!(agent = %name, %generation, "agent applied");
            }
            shared
                .agents
                .acknowledged(name, generation, failures, now_millis());
            shared.wake.notify_one();
        }
        Some(agent_message::Body::Register(_)) | None => {
            tracing::warn!(agent = %name, "unexpected message on an open session ignored");
        }
    }
}
