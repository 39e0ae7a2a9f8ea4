//! The leader's control loop: for every live rollout, gather what agents measured, run the
//! analysis and the controller's [`decide`], and propose the resulting command through Raft.
//!
//! It wakes every [`EVALUATE_EVERY`] and whenever a report arrives, so a critical trigger acts on
//! the report that shows it rather than on the next timer tick. Followers run nothing here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agents::AgentRegistry;
use crate::analysis::{Pair, StageAnalysis, analyse_stage, evaluate_check};
use crate::metrics::{MetricsStore, Side, StageKey};
use crate::raft::{ProposeError, RaftHandle, Role};
use crate::rollout::{
    Checkpoint, Command, Millis, Observation, Rollout, RolloutId, TriggerMemory, TriggerReading,
    decide,
};

/// The control loop's timer.
pub const EVALUATE_EVERY: Duration = Duration::from_millis(250);
/// How often the leader commits a checkpoint of each live stage's analysis.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// How long a scrape error stays in the live view.
pub const SCRAPE_ERROR_WINDOW: Duration = Duration::from_secs(10);
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

/// Runs the control loop until `shutdown`.
pub async fn run(shared: Shared, shutdown: CancellationToken) {
    let mut memories: HashMap<RolloutId, TriggerMemory> = HashMap::new();
    let mut checkpointed: HashMap<RolloutId, (Millis, Pair)> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVALUATE_EVERY) => {}
            _ = shared.wake.notified() => {}
        }
        let view = shared.raft.view();
        if view.role != Role::Leader {
            memories.clear();
            checkpointed.clear();
            continue;
        }
        let now = now_millis();
        shared.metrics().prune(now);
        let active: Vec<Rollout> = view.registry.active().cloned().collect();
        memories.retain(|id, _| active.iter().any(|r| &r.id == id));
        shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| active.iter().any(|r| &r.id == id));
        checkpointed.retain(|id, _| active.iter().any(|r| &r.id == id));
        for rollout in active {
            let memory = memories.entry(rollout.id.clone()).or_default();
            let (observation, mut live) = observe(&shared, &view.registry, &rollout, now);
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
            let Some(command) =
                decision.or_else(|| checkpoint_due(&rollout, &observation, &mut checkpointed, now))
            else {
                continue;
            };
            if !matches!(command, Command::Checkpoint { .. }) {
                tracing::info!(rollout = %rollout.id, command = command.action(), "proposing");
            }
            match shared.raft.propose(command).await {
                Ok(applied) => {
                    tracing::info!(rollout = %applied.id, state = %applied.state, "decision applied")
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

/// Gathers the observation of one rollout at `now`.
fn observe(
    shared: &Shared,
    registry: &crate::rollout::Registry,
    rollout: &Rollout,
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
        let recent = metrics.since(&rollout.service, now - RATE_WINDOW.as_millis() as Millis);
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
    let stage = analyse_stage(
        &rollout.strategy.checks,
        stage_data,
        rollout.strategy.weight(rollout.stage_index),
    );
    let triggers = rollout
        .strategy
        .triggers
        .iter()
        .zip(&windows)
        .map(|(t, data)| TriggerReading {
            result: evaluate_check(&t.check, data),
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
    let observation = Observation {
        stage: stage.clone(),
        triggers,
        apply_failures: shared.agents.failures(&rollout.service, generation),
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
}
