//! The leader's control loop: for every live rollout, gather what agents measured, run the
//! analysis and the controller's [`decide`], and propose the resulting command through Raft.
//!
//! It runs on a timer ([`EVALUATE_EVERY`]), never once per report: reports are folded into
//! per-second totals on arrival ([`MetricsStore`]) and a tick reads those, so its cost does not
//! grow with the fleet. A canary report carrying errors wakes it early, at most every
//! [`EARLY_WAKE_GAP`], so a hard-down canary is acted on within milliseconds of the report that
//! shows it. Followers run nothing here.
//!
//! Between [`decide`] and the log sit the rollout's hooks ([`crate::hooks::gate`]): a stage pass
//! with `pre_advance` hooks, and a rollout whose `pre_rollout` hooks are pending, become hook
//! batches run in their own tasks ([`HookTasks`]), never awaited by the loop, so a slow hook
//! delays neither the loop nor another rollout's triggers. Finished rollouts with `post_*`
//! hooks due get theirs the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agents::AgentRegistry;
use crate::analysis::scores::RolloutScores;
use crate::analysis::{Pair, StageAnalysis, analyse_stage, evaluate_check};
use crate::hooks::{
    HookPayload, HookRun, HookRunner, HookTasks, HttpHookRunner, Step, gate, post_due,
};
use crate::metrics::{MetricsStore, SECOND, Side, StageKey};
use crate::raft::{ProposeError, RaftHandle, Role};
use crate::rollout::{
    Checkpoint, Command, Millis, Observation, Rollout, RolloutId, TriggerMemory, TriggerReading,
    decide,
};

/// The control loop's timer.
pub const EVALUATE_EVERY: Duration = Duration::from_millis(250);
/// The least time between two evaluations when reports wake the loop early.
pub const EARLY_WAKE_GAP: Duration = Duration::from_millis(50);
/// How often, at most, the leader commits a checkpoint of each live stage's analysis (only when
/// its totals changed): a restarted leader loses at most this much of a stage's data. Cost
/// measured in docs/benchmarks.md.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long a scrape error stays in the live view.
pub const SCRAPE_ERROR_WINDOW: Duration = Duration::from_secs(10);
/// Span before a stage whose stable error rate is the baseline of its sequential pass scores.
pub const BASELINE_SPAN: Duration = Duration::from_secs(60);
/// Span of the request-rate figure in the live view.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The current wall-clock time in milliseconds since the epoch.
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// What the leader last measured for a rollout, for status displays.
#[derive(Debug, Clone, Default)]
pub struct LiveView {
    /// The current stage's data and check results.
    pub stage: StageAnalysis,
    /// The last [`RATE_WINDOW`] of data.
    pub recent: Pair,
    /// The latest recent scrape error of (stable, canary) instances.
    pub scrape_errors: (Option<String>, Option<String>),
    /// Every trigger's reading, and since when a failing warning trigger has failed.
    pub triggers: Vec<(TriggerReading, Option<Millis>)>,
    /// When it was computed.
    pub at: Millis,
}

/// Shared state the control loop reads and writes.
#[derive(Clone)]
pub struct Shared {
    /// The raft node.
    pub raft: RaftHandle,
    /// Agent measurements.
    pub metrics: Arc<Mutex<MetricsStore>>,
    /// Agent sessions.
    pub agents: Arc<AgentRegistry>,
    /// Latest live view per rollout.
    pub live: Arc<Mutex<HashMap<RolloutId, LiveView>>>,
    /// Wakes the control loop early (a report arrived).
    pub wake: Arc<Notify>,
}

impl Shared {
    /// Locks the metrics store (never poisoned in practice: only data is mutated under it).
    pub fn metrics(&self) -> std::sync::MutexGuard<'_, MetricsStore> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live view of a rollout, if the leader computed one.
    pub fn live(&self, id: &RolloutId) -> Option<LiveView> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

/// Runs the control loop until `shutdown`, calling hooks over HTTP ([`HttpHookRunner`]).
pub async fn run(shared: Shared, shutdown: CancellationToken) {
    match HttpHookRunner::new() {
        Ok(runner) => run_with_hooks(shared, Arc::new(runner), shutdown).await,
        Err(e) => {
            // Building a client without TLS or custom roots does not fail in practice; if it
            // does, rollouts must still be watched, and hooks then fail with this reason.
            tracing::error!(error = %e, "cannot build the HTTP client for hooks");
            run_with_hooks(shared, Arc::new(BrokenRunner(e.to_string())), shutdown).await
        }
    }
}

/// A runner whose every call fails with the reason the HTTP client could not be built.
struct BrokenRunner(String);

impl HookRunner for BrokenRunner {
    async fn call(&self, hook: &crate::strategy::Hook, _: &HookPayload) -> HookRun {
        HookRun {
            name: hook.name.clone(),
            on: hook.on,
            attempts: 0,
            status: None,
            error: Some(format!("no HTTP client: {}", self.0)),
            body: String::new(),
            duration_ms: 0,
        }
    }
}

/// Runs the control loop until `shutdown`, calling hooks with `runner`. Hook batches run in
/// their own tasks ([`HookTasks`]); they are cancelled when this node stops leading and awaited
/// on shutdown.
pub async fn run_with_hooks<R: HookRunner>(
    shared: Shared,
    runner: Arc<R>,
    shutdown: CancellationToken,
) {
    let mut memories: HashMap<RolloutId, TriggerMemory> = HashMap::new();
    let mut scores: HashMap<RolloutId, RolloutScores> = HashMap::new();
    let mut checkpointed: HashMap<RolloutId, (Millis, Pair)> = HashMap::new();
    let mut hooks = HookTasks::new(runner, shared.raft.clone());
    // When this node last became the leader: a rollout it took over waits for fresh reports.
    let mut leader_since: Option<Millis> = None;
    let mut last_evaluation = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                hooks.shutdown().await;
                return;
            }
            _ = tokio::time::sleep_until(last_evaluation + EVALUATE_EVERY) => {}
            _ = shared.wake.notified() => {
                // Early, but not more often than the gap: a hard-down canary on many hosts
                // sends many such reports a second.
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        hooks.shutdown().await;
                        return;
                    }
                    _ = tokio::time::sleep_until(last_evaluation + EARLY_WAKE_GAP) => {}
                }
            }
        }
        last_evaluation = tokio::time::Instant::now();
        let view = shared.raft.view();
        if view.role != Role::Leader {
            memories.clear();
            scores.clear();
            checkpointed.clear();
            hooks.abort_all();
            leader_since = None;
            continue;
        }
        let leader_since = *leader_since.get_or_insert_with(now_millis);
        hooks.tidy(&view.registry);
        for finished in view
            .registry
            .rollouts
            .values()
            .filter(|r| !r.hooks.post_pending.is_empty())
        {
            if let Some(batch) = post_due(finished) {
                hooks.start(batch);
            }
        }
        let now = now_millis();
        settle_deployments(&shared, &view.registry, now).await;
        grant_shards(&shared, &view.registry, now).await;
        record_deploy_actions(&shared, &view.registry, now).await;
        let active: Vec<Rollout> = view.registry.active().cloned().collect();
        shared.metrics().prune(now, retention(&active));
        memories.retain(|id, _| active.iter().any(|r| &r.id == id));
        scores.retain(|id, _| active.iter().any(|r| &r.id == id));
        shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| active.iter().any(|r| &r.id == id));
        checkpointed.retain(|id, _| active.iter().any(|r| &r.id == id));
        for rollout in active {
            let memory = memories.entry(rollout.id.clone()).or_default();
            // A leader that takes over a rollout scores it from the current stage on.
            let rollout_scores = scores.entry(rollout.id.clone()).or_insert_with(|| {
                RolloutScores::new(&rollout.strategy.checks, rollout.stage_started_at)
            });
            let (mut observation, mut live) =
                observe(&shared, &view.registry, &rollout, rollout_scores, now);
            let longest = observation.triggers.iter().map(|t| t.window).max();
            observation.takeover = longest.and_then(|window| {
                crate::rollout::takeover_wait(leader_since, rollout.started_at, window, now)
            });
            let decision = decide(&rollout, &observation, memory, now);
            live.triggers = observation
                .triggers
                .iter()
                .map(|t| (t.clone(), memory.failing_since(&t.result.name)))
                .collect();
            shared
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(rollout.id.clone(), live);
            let command = match gate(&rollout, decision) {
                Some(Step::Propose(command)) => Some(command),
                Some(Step::Run(batch)) => {
                    hooks.start(batch);
                    None
                }
                None => None,
            };
            let Some(command) =
                command.or_else(|| checkpoint_due(&rollout, &observation, &mut checkpointed, now))
            else {
                continue;
            };
            let checkpoint = matches!(command, Command::Checkpoint { .. });
            if !checkpoint {
                tracing::info!(rollout = %rollout.id, command = command.action(), "proposing");
            }
            match shared.raft.propose(command).await {
                Ok(applied) if checkpoint => {
                    tracing::debug!(rollout = ?applied.id, "checkpoint committed")
                }
                Ok(applied) => {
                    tracing::info!(rollout = ?applied.id, state = ?applied.state, "decision applied")
                }
                Err(ProposeError::Rejected(rejection)) => {
                    // Another decision got there first (e.g. an operator's abort).
                    tracing::debug!(rollout = %rollout.id, %rejection, "decision superseded")
                }
                Err(e) => tracing::warn!(rollout = %rollout.id, error = %e, "proposal failed"),
            }
        }
    }
}

/// How much history the metrics store must keep for `active` rollouts: their longest trigger
/// window, and at least the baseline span of sequential checks (longer than the rate's).
pub fn retention(active: &[Rollout]) -> Duration {
    active
        .iter()
        .flat_map(|r| r.strategy.triggers.iter().map(|t| t.window))
        .fold(BASELINE_SPAN + Duration::from_secs(1), Duration::max)
}

/// Where a trigger's sliding window starts: `window` before `now`, but never before the rollout
/// started (an earlier rollout's canary errors are not this rollout's).
pub fn trigger_since(rollout: &Rollout, window: Duration, now: Millis) -> Millis {
    (now - window.as_millis() as Millis).max(rollout.started_at)
}

/// A checkpoint of the stage's data when [`CHECKPOINT_EVERY`] has passed and it changed.
fn checkpoint_due(
    rollout: &Rollout,
    observation: &Observation,
    last: &mut HashMap<RolloutId, (Millis, Pair)>,
    now: Millis,
) -> Option<Command> {
    let data = &observation.stage.data;
    if let Some((at, previous)) = last.get(&rollout.id)
        && (now - at < CHECKPOINT_EVERY.as_millis() as Millis || previous == data)
    {
        return None;
    }
    if data.stable.requests + data.canary.requests == 0 {
        return None;
    }
    last.insert(rollout.id.clone(), (now, data.clone()));
    Some(Command::Checkpoint {
        id: rollout.id.clone(),
        checkpoint: Checkpoint {
            stage: rollout.stage_index,
            stage_started_at: rollout.stage_started_at,
            data: data.clone(),
            at: now,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Deployments (docs/deploy.md): how far the managed instances are, from the agents' reports.
// ---------------------------------------------------------------------------------------------

/// Which managed instances of `rollout`'s service do not yet run their assignment
/// ([`crate::deploy::assignments`]) healthy, and which canary instances failed to, one line
/// each: (`deploy_waiting`, `deploy_failures`) of [`Observation`].
fn deploy_progress(
    shared: &Shared,
    registry: &crate::rollout::Registry,
    rollout: &Rollout,
) -> (Vec<String>, Vec<String>) {
    let progress = shared.agents.deploy_progress(registry, &rollout.service);
    (progress.waiting, progress.failures)
}

/// Proposes [`Command::DeploySettled`] for every service whose promotion's deployment is done
/// ([`crate::deploy::settle_due`]).
async fn settle_deployments(shared: &Shared, registry: &crate::rollout::Registry, now: Millis) {
    for service in registry.services.keys() {
        // Only a promotion waiting to settle costs a look at its instances.
        if crate::deploy::settle_due(registry, service, true, now).is_none() {
            continue;
        }
        let ready = shared
            .agents
            .deploy_progress(registry, service)
            .stable_ready;
        let Some(command) = crate::deploy::settle_due(registry, service, ready, now) else {
            continue;
        };
        tracing::info!(%service, command = command.action(), "proposing");
        match shared.raft.propose(command).await {
            Ok(applied) => tracing::info!(rollout = ?applied.id, "deployment settled"),
            Err(ProposeError::Rejected(rejection)) => {
                tracing::debug!(%service, %rejection, "settle superseded")
            }
            Err(e) => tracing::warn!(%service, error = %e, "proposal failed"),
        }
    }
}

/// Proposes [`Command::ShardsGranted`] for every shards-model service whose releases the
/// agents confirmed ([`crate::deploy::shard_handover`]).
async fn grant_shards(shared: &Shared, registry: &crate::rollout::Registry, now: Millis) {
    for service in registry.services.keys() {
        let step = shared.agents.shard_handover(registry, service, now);
        let crate::deploy::Handover::Due(command) = step else {
            continue;
        };
        tracing::info!(%service, command = command.action(), "proposing");
        match shared.raft.propose(*command).await {
            Ok(applied) => tracing::info!(rollout = ?applied.id, "shards granted"),
            Err(ProposeError::Rejected(rejection)) => {
                tracing::debug!(%service, %rejection, "shard grant superseded")
            }
            Err(e) => tracing::warn!(%service, error = %e, "proposal failed"),
        }
    }
}

/// Records in each deploying service's latest rollout the driver actions its agents reported
/// and its events lack ([`Command::DeployActions`]).
async fn record_deploy_actions(shared: &Shared, registry: &crate::rollout::Registry, now: Millis) {
    for service in registry.services.keys() {
        let Some(command) = shared.agents.unrecorded_actions(registry, service, now) else {
            continue;
        };
        if let Err(e) = shared.raft.propose(command).await {
            tracing::warn!(%service, error = %e, "recording deploy actions failed");
        }
    }
}

/// The events an agent's canary lease expiry becomes (`Register.lease_expired`,
/// docs/agent.md): one [`Command::CanaryLeaseExpired`] per service it names, in the rollout
/// the agent's desired state named when that rollout is of the service, else in the service's
/// latest rollout; a service with neither is skipped. Pure.
pub fn lease_expiry_commands(
    registry: &crate::rollout::Registry,
    agent: &str,
    expiry: &serin_proto::v1::LeaseExpiry,
    at: Millis,
) -> Vec<Command> {
    let lost_for = humantime::format_duration(Duration::from_millis(expiry.after_ms));
    let generation = expiry.generation.map_or_else(
        || "no generation".to_owned(),
        |g| format!("generation {}.{}", g.term, g.index),
    );
    let did = match expiry.action.as_str() {
        "revert" => "reverted to stable".to_owned(),
        "hold" => "held the canary".to_owned(),
        other => format!("did {other:?}"),
    };
    let expired_at = UNIX_EPOCH + Duration::from_millis(expiry.expired_at_ms);
    let expired_at = humantime::format_rfc3339_seconds(expired_at);
    let mut commands = Vec::new();
    for s in &expiry.services {
        let named = crate::rollout::RolloutId(s.rollout_id.clone());
        let id = match registry.rollouts.get(&named) {
            Some(r) if r.service == s.service => Some(named),
            _ => registry
                .services
                .get(&s.service)
                .and_then(|record| record.latest.clone()),
        };
        let Some(id) = id else {
            continue;
        };
        commands.push(Command::CanaryLeaseExpired {
            id,
            agent: agent.to_owned(),
            reason: format!(
                "agent {agent} lost the leader for {lost_for} at {generation} and {did} \
                 ({} at {}%); the lease expired at {expired_at}",
                s.service, s.canary_weight
            ),
            at,
        });
    }
    commands
}

/// Proposes the events of an agent's canary lease expiry ([`lease_expiry_commands`]), as the
/// leader that heard its `Register`; a failure is logged (the agent tells it to the next
/// leader only if this session ends before it got a desired state).
pub async fn record_lease_expiry(
    shared: Shared,
    agent: String,
    expiry: serin_proto::v1::LeaseExpiry,
) {
    let registry = std::sync::Arc::clone(&shared.raft.view().registry);
    for command in lease_expiry_commands(&registry, &agent, &expiry, now_millis()) {
        match shared.raft.propose(command).await {
            Ok(applied) => {
                tracing::warn!(%agent, rollout = ?applied.id, action = %expiry.action, "recorded an agent's canary lease expiry");
            }
            Err(e) => {
                tracing::warn!(%agent, error = %e, "recording an agent's canary lease expiry failed");
            }
        }
    }
}

/// Gathers the observation of one rollout at `now`.
fn observe(
    shared: &Shared,
    registry: &crate::rollout::Registry,
    rollout: &Rollout,
    scores: &mut RolloutScores,
    now: Millis,
) -> (Observation, LiveView) {
    let key = StageKey {
        rollout: rollout.id.clone(),
        stage: rollout.stage_index,
        started_at: rollout.stage_started_at,
    };
    let (stage_data, windows, recent, scrape_errors) = {
        let mut metrics = shared.metrics();
        let checkpoint = rollout
            .checkpoint
            .as_ref()
            .filter(|c| c.matches(rollout))
            .map(|c| &c.data);
        let stage_data = metrics.stage(&rollout.service, &key, checkpoint);
        let windows: Vec<Pair> = rollout
            .strategy
            .triggers
            .iter()
            .map(|t| metrics.since(&rollout.service, trigger_since(rollout, t.window, now)))
            .collect();
        // The last complete seconds, so the rate divides by the span it covers.
        let this_second = now.div_euclid(SECOND) * SECOND;
        let recent = metrics.span(
            &rollout.service,
            this_second - RATE_WINDOW.as_millis() as Millis,
            this_second,
        );
        if !scores.is_empty() {
            let stage_start = rollout.stage_started_at;
            let baseline = metrics
                .span(
                    &rollout.service,
                    stage_start - BASELINE_SPAN.as_millis() as Millis,
                    stage_start,
                )
                .stable;
            scores.advance(
                (rollout.stage_index, stage_start),
                &baseline,
                metrics.seconds(&rollout.service, stage_start - SECOND),
                now,
            );
        }
        let since = now - SCRAPE_ERROR_WINDOW.as_millis() as Millis;
        let errors = (
            metrics
                .scrape_error(&rollout.service, Side::Stable, since)
                .map(str::to_owned),
            metrics
                .scrape_error(&rollout.service, Side::Canary, since)
                .map(str::to_owned),
        );
        (stage_data, windows, recent, errors)
    };
    let weight = rollout.strategy.weight(rollout.stage_index);
    let mut stage = analyse_stage(&rollout.strategy.checks, stage_data, weight);
    for scored in scores.results(weight) {
        if let Some(slot) = stage.checks.iter_mut().find(|c| c.name == scored.name) {
            *slot = scored;
        }
    }
    let triggers = rollout
        .strategy
        .triggers
        .iter()
        .zip(&windows)
        .map(|(t, data)| TriggerReading {
            result: evaluate_check(&t.check, data, rollout.strategy.weight(rollout.stage_index)),
            severity: t.severity,
            grace: t.grace,
            window: t.window,
        })
        .collect();
    let generation = registry
        .services
        .get(&rollout.service)
        .map(|s| s.generation)
        .unwrap_or_default();
    let (deploy_waiting, deploy_failures) = deploy_progress(shared, registry, rollout);
    let observation = Observation {
        stage: stage.clone(),
        triggers,
        apply_failures: shared.agents.failures(&rollout.service, generation),
        deploy_waiting,
        deploy_failures,
        takeover: None,
    };
    let live = LiveView {
        stage,
        recent,
        scrape_errors,
        triggers: Vec::new(),
        at: now,
    };
    (observation, live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Actor, Command, Generation, Registry};
    use crate::strategy::Strategy;

    fn lease_registry() -> Registry {
        let mut reg = Registry::default();
        for (id, service) in [("web-1", "web"), ("web-2", "web"), ("api-1", "api")] {
            reg.apply(
                Command::Start {
                    id: RolloutId(id.into()),
                    service: service.into(),
                    version: "v2".into(),
                    stable_version: Some("v1".into()),
                    strategy: Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap(),
                    actor: Actor::Controller,
                    at: 100_000,
                },
                Generation::default(),
            )
            .ok();
            if id == "web-1" {
                reg.apply(
                    Command::Abort {
                        id: RolloutId(id.into()),
                        actor: Actor::Controller,
                        reason: "test".into(),
                        analysis: None,
                        at: 100_001,
                    },
                    Generation::default(),
                )
                .unwrap();
            }
        }
        reg
    }

    fn lease_service(service: &str, rollout: &str, weight: u32) -> serin_proto::v1::LeaseService {
        serin_proto::v1::LeaseService {
            service: service.into(),
            rollout_id: rollout.into(),
            canary_weight: weight,
        }
    }

    #[test]
    fn a_lease_expiry_becomes_one_event_per_service_in_the_rollout_it_names_or_the_latest() {
        let reg = lease_registry();
        let expiry = serin_proto::v1::LeaseExpiry {
            // 2026-12-03T12:00:03Z
            expired_at_ms: 1_796_299_203_000,
            after_ms: 300_000,
            action: "revert".into(),
            generation: Some(serin_proto::v1::Generation { term: 3, index: 42 }),
            services: vec![
                lease_service("web", "web-1", 10),
                lease_service("api", "", 5),
                lease_service("gone", "gone-1", 5),
                // A rollout id of another service is not trusted: the service's latest.
                lease_service("api", "web-2", 7),
            ],
        };
        let commands = lease_expiry_commands(&reg, "host-1", &expiry, 200_000);
        let got: Vec<(String, String, String, Millis)> = commands
            .into_iter()
            .map(|c| match c {
                Command::CanaryLeaseExpired {
                    id,
                    agent,
                    reason,
                    at,
                } => (id.0, agent, reason, at),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "web-1".to_owned(),
                    "host-1".to_owned(),
                    "agent host-1 lost the leader for 5m at generation 3.42 and reverted to \
                     stable (web at 10%); the lease expired at 2026-12-03T12:00:03Z"
                        .to_owned(),
                    200_000
                ),
                (
                    "api-1".to_owned(),
                    "host-1".to_owned(),
                    "agent host-1 lost the leader for 5m at generation 3.42 and reverted to \
                     stable (api at 5%); the lease expired at 2026-12-03T12:00:03Z"
                        .to_owned(),
                    200_000
                ),
                (
                    "api-1".to_owned(),
                    "host-1".to_owned(),
                    "agent host-1 lost the leader for 5m at generation 3.42 and reverted to \
                     stable (api at 7%); the lease expired at 2026-12-03T12:00:03Z"
                        .to_owned(),
                    200_000
                ),
            ]
        );
    }

    #[test]
    fn a_held_lease_expiry_says_so() {
        let reg = lease_registry();
        let expiry = serin_proto::v1::LeaseExpiry {
            expired_at_ms: 0,
            after_ms: 3_000,
            action: "hold".into(),
            generation: None,
            services: vec![lease_service("api", "api-1", 5)],
        };
        let commands = lease_expiry_commands(&reg, "h", &expiry, 1);
        let [Command::CanaryLeaseExpired { reason, .. }] = commands.as_slice() else {
            panic!("one command expected: {commands:?}");
        };
        assert_eq!(
            reason,
            "agent h lost the leader for 3s at no generation and held the canary (api at 5%); \
             the lease expired at 1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn trigger_windows_never_reach_before_the_rollout() {
        let mut reg = Registry::default();
        reg.apply(
            Command::Start {
                id: RolloutId("r".into()),
                service: "api".into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy: Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap(),
                actor: Actor::Controller,
                at: 100_000,
            },
            Generation::default(),
        )
        .unwrap();
        let r = &reg.rollouts[&RolloutId("r".into())];
        let minute = Duration::from_secs(60);
        assert_eq!(trigger_since(r, minute, 130_000), 100_000);
        assert_eq!(trigger_since(r, minute, 200_000), 140_000);
    }

    #[test]
    fn a_checkpoint_is_due_every_second_and_only_when_the_stage_totals_changed() {
        use crate::analysis::Window;
        let mut reg = Registry::default();
        reg.apply(
            Command::Start {
                id: RolloutId("r".into()),
                service: "api".into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy: Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap(),
                actor: Actor::Controller,
                at: 0,
            },
            Generation::default(),
        )
        .unwrap();
        let rollout = &reg.rollouts[&RolloutId("r".into())];
        let served = |requests| {
            let mut o = Observation::default();
            o.stage.data.canary = Window::from_counts(requests, 0, &[], 0.0);
            o
        };
        let mut last = HashMap::new();
        let due = |o: &Observation, last: &mut _, now| checkpoint_due(rollout, o, last, now);
        assert!(
            due(&served(0), &mut last, 1_000).is_none(),
            "nothing measured yet"
        );
        assert!(
            due(&served(10), &mut last, 1_000).is_some(),
            "the first data"
        );
        assert!(
            due(&served(20), &mut last, 1_999).is_none(),
            "within the second"
        );
        let Some(Command::Checkpoint { checkpoint, .. }) = due(&served(20), &mut last, 2_000)
        else {
            panic!("a second later the changed totals are checkpointed");
        };
        assert_eq!(
            (checkpoint.at, checkpoint.data.canary.requests),
            (2_000, 20)
        );
        assert!(
            due(&served(20), &mut last, 9_000).is_none(),
            "unchanged totals"
        );
        assert!(
            due(&served(21), &mut last, 9_001).is_some(),
            "changed again"
        );
    }

    /// A `Write` into a shared buffer, for capturing logs.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Checkpoints come every second per live rollout: at info they would bury the decisions.
    /// The node and the loop run in this test's task, so its thread's subscriber sees both.
    #[tokio::test]
    async fn checkpoints_are_logged_at_debug_and_not_as_decisions() {
        use crate::analysis::Window;
        use crate::raft::node::{NoPeers, NodeConfig, RaftNode};
        use crate::raft::storage::open_db;
        use crate::rollout::RolloutState;

        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path(), Duration::from_secs(10)).unwrap();
        let (node, raft) = RaftNode::open(&db, &NodeConfig::single(1), NoPeers).unwrap();
        let node_shutdown = CancellationToken::new();
        let shared = Shared {
            raft: raft.clone(),
            metrics: Arc::new(Mutex::new(MetricsStore::new(Duration::from_secs(60)))),
            agents: Arc::new(AgentRegistry::default()),
            live: Arc::new(Mutex::new(HashMap::new())),
            wake: Arc::new(Notify::new()),
        };
        let tasks = CancellationToken::new();
        let test = async {
            let mut view = raft.subscribe();
            view.wait_for(|v| v.role == Role::Leader).await.unwrap();
            let started = now_millis();
            let applied = raft
                .propose(Command::Start {
                    id: RolloutId("r".into()),
                    service: "api".into(),
                    version: "v2".into(),
                    stable_version: Some("v1".into()),
                    strategy: Strategy::from_toml(
                        "[[stages]]\nweight = 10\nmin_duration = \"1h\"\n",
                    )
                    .unwrap(),
                    actor: Actor::Controller,
                    at: started,
                })
                .await
                .unwrap();
            assert_eq!(applied.state, Some(RolloutState::Progressing));
            shared.metrics().record(
                "api",
                Side::Canary,
                Window::from_counts(100, 0, &[], 0.0),
                started,
            );
            tokio::time::timeout(
                Duration::from_secs(10),
                view.wait_for(|v| {
                    v.registry.rollouts[&RolloutId("r".into())]
                        .checkpoint
                        .is_some()
                }),
            )
            .await
            .expect("the loop checkpoints the stage")
            .unwrap();
            // The loop logs the commit once its proposal is answered, just after the view.
            let committed = || {
                String::from_utf8_lossy(&logs.0.lock().unwrap()).contains("checkpoint committed")
            };
            for _ in 0..100 {
                if committed() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tasks.cancel();
            node_shutdown.cancel();
        };
        let (node_result, (), ()) = tokio::join!(
            node.run(node_shutdown.clone()),
            run(shared.clone(), tasks.clone()),
            test
        );
        node_result.unwrap();

        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let lines = |level: &str, message: &str| {
            text.lines()
                .filter(|l| l.contains(level) && l.contains(message))
                .count()
        };
        assert_eq!(lines("INFO", "decision applied"), 0, "{text}");
        assert_eq!(
            lines("INFO", "applied"),
            1,
            "only the start, at info:\n{text}"
        );
        assert!(lines("DEBUG", "checkpoint committed") >= 1, "{text}");
        assert!(lines("DEBUG", "checkpoint applied") >= 1, "{text}");
    }

    /// Reports keep waking the loop, so its next pass starts as soon as a proposal is answered:
    /// it must read the rolled-back rollout then, not propose the same rollback a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rollback_decision_is_committed_exactly_once() {
        use crate::analysis::Window;
        use crate::raft::node::{self, NoPeers, NodeConfig};
        use crate::raft::storage::{SledStorage, open_db};
        use crate::rollout::RolloutState;
        use raft::Storage;

        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path(), Duration::from_secs(10)).unwrap();
        let node_shutdown = CancellationToken::new();
        let (raft, node_task) =
            node::start(&db, &NodeConfig::single(1), NoPeers, node_shutdown.clone()).unwrap();
        let mut view = raft.subscribe();
        view.wait_for(|v| v.role == Role::Leader).await.unwrap();
        let strategy = Strategy::from_toml(
            "[[stages]]\nweight = 10\n[[triggers]]\nname = \"errors\"\nmetric = \"error_rate\"\n\
             max = 0.2\nwindow = \"10s\"\n",
        )
        .unwrap();
        let started = now_millis();
        raft.propose(Command::Start {
            id: RolloutId("r".into()),
            service: "api".into(),
            version: "v2".into(),
            stable_version: Some("v1".into()),
            strategy,
            actor: Actor::Controller,
            at: started,
        })
        .await
        .unwrap();
        let shared = Shared {
            raft: raft.clone(),
            metrics: Arc::new(Mutex::new(MetricsStore::new(Duration::from_secs(60)))),
            agents: Arc::new(AgentRegistry::default()),
            live: Arc::new(Mutex::new(HashMap::new())),
            wake: Arc::new(Notify::new()),
        };
        // Every canary request failed: the critical trigger fires at once.
        shared.metrics().record(
            "api",
            Side::Canary,
            Window::from_counts(100, 100, &[], 0.0),
            started,
        );
        let tasks = CancellationToken::new();
        let reports = {
            let (wake, tasks) = (shared.wake.clone(), tasks.clone());
            tokio::spawn(async move {
                while !tasks.is_cancelled() {
                    wake.notify_one();
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            })
        };
        // The loop runs in the test's own task, off the runtime's workers, so the node's answer
        // wakes it on another thread as a busy server's would (not in the node worker's LIFO
        // slot, which would hide the race).
        let watch = async {
            tokio::time::timeout(
                Duration::from_secs(10),
                view.wait_for(|v| {
                    v.registry
                        .rollouts
                        .get(&RolloutId("r".into()))
                        .is_some_and(|r| r.state == RolloutState::RolledBack)
                }),
            )
            .await
            .expect("the trigger rolls the rollout back")
            .unwrap();
            // Give a second proposal every chance to land.
            tokio::time::sleep(Duration::from_millis(500)).await;
            tasks.cancel();
        };
        tokio::join!(run(shared.clone(), tasks.clone()), watch);
        reports.await.unwrap();
        node_shutdown.cancel();
        node_task.await.unwrap().unwrap();

        let storage = SledStorage::open(&db).unwrap();
        let (first, last) = (
            storage.first_index().unwrap(),
            storage.last_index().unwrap(),
        );
        let rollbacks = storage
            .entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .filter_map(|e| serde_json::from_slice::<Command>(&e.data).ok())
            .filter(|c| matches!(c, Command::RollBack { .. }))
            .count();
        assert_eq!(rollbacks, 1, "rollback entries in the log");
    }
}
