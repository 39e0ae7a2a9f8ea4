//! The applier task: owns the traffic actuator and the store; applies desired states
//! serially, newest first (states that queue up while one applies are coalesced), records
//! each success in the store *before* acknowledging it, then acks.
//!
//! A failed apply is acknowledged with one failure per service the actuator names, then
//! tried again after 500 ms, doubling up to every 5 s, until it succeeds or a newer desired
//! state arrives (a host whose nginx was down must not keep the old traffic until the next
//! decision); every attempt is acknowledged, so a success clears the failure at the
//! coordinator. An apply in progress is allowed to finish at shutdown.
//!
//! The servers each carried service routes to are built per apply
//! ([`Upstreams::for_desired`]): the coordinator's inventory where the desired state sends it
//! (`from_inventory`), else this agent's `[[instances]]`. An inventory that cannot be routed
//! to (an unreadable server, no stable server) fails that service's apply without touching
//! the actuator.
//!
//! Resync: an actuator whose live traffic can drift without serin (HAProxy, whose runtime
//! weights a restart loses) asks for a [`TrafficActuator::resync_interval`]; the applier then
//! re-applies the last state it applied in this process at that interval, while no retry is
//! pending. An unchanged balancer answers `Unchanged`; a change is logged as drift put back.
//! Resyncs are not acknowledged (the generation already was).
//!
//! Pacing: an actuator whose every change costs something (nginx reloads) asks for a
//! [`TrafficActuator::min_change_interval`]. A new desired state that arrives less than that
//! after the previous change went live is held until the interval has passed; states that
//! arrive meanwhile replace it (the newest wins, the ones in between are never applied nor
//! acknowledged: the ack of the newer generation covers them at the coordinator). A state
//! that takes traffic away (a canary share down to 0, a server taken out, an override
//! removed) is applied at once, and so is one that re-acks, is stale, or cannot be routed
//! (its failure is acknowledged at once). A failed apply does not start the interval (most
//! failures, `nginx -t` refusing a file, change nothing live); its retries keep their own
//! backoff, and one that falls within the interval waits for it. The rule and why are in
//! `pacing`. A held state
//! is dropped at shutdown without being applied; the store keeps the previous one, and the
//! coordinator sends the newest again when the agent reconnects.
//!
//! Generations: a desired state older than the last applied one is ignored (a deposed
//! leader cannot undo a newer decision); the same generation is acknowledged again without
//! re-applying; a newer one is applied. A failed apply is not recorded, so the retries (and
//! the coordinator re-sending that generation) apply it again.
//!
//! Canary lease reverts (`runtime::lease`, [`crate::lease`]): a stable-only state derived
//! from the newest desired state, at its generation, arrives on its own channel. It is
//! applied at once (it only takes traffic away), neither recorded nor acknowledged, replaces
//! any retry, and is what a resync puts back. While it is live, the coordinator's state of
//! its generation is applied again instead of re-acknowledged, so a reconnected agent never
//! stays reverted while the coordinator counts the canary as live. A revert older than the
//! applied generation is ignored, like any stale state. The store records that a revert is
//! live (its generation; cleared with the next applied state), so an agent restarted while
//! reverted also applies that generation again (see docs/agent.md, "Canary lease").

use std::time::Duration;

use serin_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pacing::{hold_until, takes_traffic_away};
use crate::actuator::{ActuatorFailure, ActuatorOutcome, TrafficActuator};
use crate::error::error_chain;
use crate::store::{DesiredState, Generation, LocalStore};
use crate::traffic::Upstreams;

/// What to do with a desired state, given the last applied generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Older than what is applied: a deposed leader's, ignored.
    Stale,
    /// Already applied: acknowledge again, change nothing.
    Reack,
    Apply,
}

/// `reverted`: the generation a canary lease revert was derived from, while that revert is
/// live: the coordinator's state of that generation (or a newer one) is applied again.
fn decide(
    applied: Option<Generation>,
    reverted: Option<Generation>,
    incoming: Generation,
) -> Decision {
    if reverted.is_some_and(|r| incoming >= r) {
        return Decision::Apply;
    }
    match applied {
        Some(a) if incoming < a => Decision::Stale,
        Some(a) if incoming == a => Decision::Reack,
        _ => Decision::Apply,
    }
}

/// The applier task: owns the traffic actuator and the store.
pub(super) struct Applier<A> {
    /// The servers of each service from this agent's `[[instances]]`: routed to for a
    /// service the desired state does not send `from_inventory`.
    local_upstreams: Upstreams,
    store: LocalStore,
    /// `None` on a host that carries no traffic: desired states are recorded and acked.
    actuator: Option<A>,
    /// Last generation applied and recorded.
    applied: Option<Generation>,
    desired: watch::Receiver<Option<DesiredState>>,
    applied_tx: watch::Sender<Option<Generation>>,
    acks: mpsc::Sender<pb::Ack>,
    retry_delays: RetryDelays,
    /// The newest desired state, when applying it failed or it is held by the change
    /// interval: applied at `Retry::at`.
    retry: Option<Retry>,
    /// The last state applied by this process: what a resync puts back.
    last_applied: Option<DesiredState>,
    /// When the last change of live traffic (an apply or resync that was not `Unchanged`)
    /// finished: the start of the actuator's `min_change_interval`.
    last_change: Option<Instant>,
    /// Stable-only states from the canary lease (`runtime::lease`), when it may revert.
    reverts: Option<watch::Receiver<Option<DesiredState>>>,
    /// The generation of the lease revert that is live, until a coordinator state replaces
    /// it.
    reverted: Option<Generation>,
}

/// Delays between the attempts to apply a desired state that failed: `initial`, doubling up
/// to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RetryDelays {
    initial: Duration,
    max: Duration,
}

impl Default for RetryDelays {
    fn default() -> Self {
        RetryDelays {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryDelays {
    /// The delay after the attempt that followed `previous` (`None`: the first failure).
    fn after(&self, previous: Option<Duration>) -> Duration {
        previous.map_or(self.initial, |d| (d * 2).min(self.max))
    }
}

/// A desired state waiting to be applied at `at`: a failed one waiting to be tried again, or
/// one held by the actuator's change interval.
struct Retry {
    desired: DesiredState,
    /// The delay before this attempt, when it follows a failure (the backoff doubles it);
    /// `None` for a state held before its first attempt.
    delay: Option<Duration>,
    at: Instant,
}

impl<A: TrafficActuator> Applier<A> {
    /// An applier of the desired states received on `desired`, through `actuator`, routing
    /// to the coordinator's servers where it sends them and else to `local_upstreams`, with
    /// `applied` the generation the store last recorded.
    pub(super) fn new(
        local_upstreams: Upstreams,
        store: LocalStore,
        actuator: Option<A>,
        applied: Option<Generation>,
        desired: watch::Receiver<Option<DesiredState>>,
        applied_tx: watch::Sender<Option<Generation>>,
        acks: mpsc::Sender<pb::Ack>,
    ) -> Self {
        Applier {
            local_upstreams,
            store,
            actuator,
            applied,
            desired,
            applied_tx,
            acks,
            retry_delays: RetryDelays::default(),
            retry: None,
            last_applied: None,
            last_change: None,
            reverts: None,
            reverted: None,
        }
    }

    /// Also applies the canary lease's stable-only states received on `reverts`.
    pub(super) fn with_lease_reverts(
        mut self,
        reverts: watch::Receiver<Option<DesiredState>>,
    ) -> Self {
        self.reverts = Some(reverts);
        // A revert live when this agent stopped is live again: the nginx file on disk is the
        // stable-only one, so the coordinator's state of that generation must apply again.
        match self.store.lease_reverted() {
            Ok(reverted) => {
                if let Some(generation) = reverted {
                    tracing::info!(%generation, "this host was reverted to stable by its canary lease before the restart; the leader's state of that generation will be applied again");
                }
                self.reverted = reverted;
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "could not read whether a canary lease revert is live; assuming none");
            }
        }
        self
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let resync_every = self.actuator.as_ref().and_then(|a| a.resync_interval());
        let mut resync = tokio::time::interval(resync_every.unwrap_or(Duration::from_secs(3600)));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry.as_ref().map(|r| r.at);
            let may_resync =
                resync_every.is_some() && self.retry.is_none() && self.last_applied.is_some();
            let retrying = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => true,
                _ = resync.tick(), if may_resync => {
                    self.resync().await;
                    continue;
                }
                Ok(()) = async {
                    match &mut self.reverts {
                        Some(reverts) => reverts.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let revert = self.reverts.as_mut().and_then(|r| r.borrow_and_update().clone());
                    if let Some(revert) = revert {
                        self.revert(revert).await;
                    }
                    continue;
                }
            };
            // Only the newest state: those received during the last apply are coalesced.
            let desired = if retrying {
                self.retry.as_ref().map(|r| r.desired.clone())
            } else {
                self.desired.borrow_and_update().clone()
            };
            let Some(desired) = desired else {
                continue;
            };
            if self.behind_pending(&desired) {
                continue;
            }
            if let Some(at) = self.held_until(&desired, Instant::now()) {
                self.hold(desired, at);
                continue;
            }
            let failed = self.handle(&desired).await;
            self.schedule_retry(desired, failed);
        }
    }

    /// Whether `desired` is older than the state waiting to be applied (held or retried):
    /// applying it would go back in time, so it is ignored like any stale state.
    fn behind_pending(&self, desired: &DesiredState) -> bool {
        let Some(pending) = self.retry.as_ref().map(|r| r.desired.generation) else {
            return false;
        };
        let behind = desired.generation < pending;
        if behind {
            tracing::info!(
                generation = %desired.generation,
                %pending,
                "ignoring a desired state older than the one waiting to be applied"
            );
        }
        behind
    }

    /// Until when `desired` must wait for the actuator's change interval (see the module
    /// doc), or `None` to handle it now.
    fn held_until(&self, desired: &DesiredState, now: Instant) -> Option<Instant> {
        let actuator = self.actuator.as_ref()?;
        let at = hold_until(actuator.min_change_interval(), self.last_change, now)?;
        if decide(self.applied, self.reverted, desired.generation) != Decision::Apply {
            return None;
        }
        let live = self.last_applied.as_ref()?;
        let carried = actuator.services();
        // A state that cannot be routed fails without touching the actuator: at once.
        let next_upstreams =
            Upstreams::for_desired(desired, &self.local_upstreams, &carried).ok()?;
        let live_upstreams = Upstreams::for_desired(live, &self.local_upstreams, &carried).ok()?;
        if let Some(reason) = takes_traffic_away(
            &carried,
            (live, &live_upstreams),
            (desired, &next_upstreams),
        ) {
            tracing::info!(generation = %desired.generation, %reason, "takes traffic away: applying it without waiting");
            return None;
        }
        Some(at)
    }

    /// Holds `desired` until `at`, in place of any older state waiting (a newer state
    /// supersedes a retry of an older one); a retry of the same generation keeps its backoff.
    fn hold(&mut self, desired: DesiredState, at: Instant) {
        let delay = self
            .retry
            .take()
            .filter(|r| r.desired.generation == desired.generation)
            .and_then(|r| r.delay);
        tracing::debug!(generation = %desired.generation, wait = ?at.saturating_duration_since(Instant::now()), "holding the desired state for the change interval");
        self.retry = Some(Retry { desired, delay, at });
    }

    /// After handling `desired`: retries it later if it `failed`, else drops a pending retry
    /// unless `desired` is older than the retried state (an ignored, stale one).
    fn schedule_retry(&mut self, desired: DesiredState, failed: bool) {
        let pending = self.retry.take();
        if failed {
            let previous = pending
                .filter(|r| r.desired.generation == desired.generation)
                .and_then(|r| r.delay);
            let delay = self.retry_delays.after(previous);
            tracing::info!(generation = %desired.generation, retry_in = ?delay, "will retry the failed apply");
            self.retry = Some(Retry {
                desired,
                delay: Some(delay),
                at: Instant::now() + delay,
            });
        } else {
            self.retry = pending.filter(|r| desired.generation < r.desired.generation);
        }
    }

    /// Ignores, re-acks or applies `desired` according to its generation; `true` when
    /// applying it failed.
    async fn handle(&mut self, desired: &DesiredState) -> bool {
        let generation = desired.generation;
        match decide(self.applied, self.reverted, generation) {
            Decision::Stale => {
                tracing::info!(
                    %generation,
                    applied = ?self.applied,
                    "ignoring a desired state older than the applied one"
                );
                false
            }
            Decision::Reack => {
                tracing::debug!(%generation, "generation already applied; acknowledging again");
                self.ack(generation, Vec::new());
                false
            }
            Decision::Apply => {
                let failures = self.apply(desired).await;
                self.ack(generation, failures);
                // Only a success records the generation as applied.
                self.applied != Some(generation)
            }
        }
    }

    /// Applies a canary lease revert (see `runtime::lease`): the stable-only state derived
    /// from the newest desired state, at its generation. It is neither recorded in the store
    /// nor acknowledged (the coordinator did not ask for it); it becomes what a resync puts
    /// back, replaces any retry or held state, and makes the coordinator's state of its
    /// generation apply again when a leader sends it. Older than what is applied: ignored.
    async fn revert(&mut self, revert: DesiredState) {
        let generation = revert.generation;
        if self.applied.is_some_and(|a| generation < a) {
            tracing::info!(%generation, applied = ?self.applied, "ignoring a lease revert older than the applied generation");
            return;
        }
        self.retry = None;
        if let Some(actuator) = &mut self.actuator {
            let carried = actuator.services();
            match Upstreams::for_desired(&revert, &self.local_upstreams, &carried) {
                Ok(upstreams) => match actuator.apply(&revert, &upstreams).await {
                    Ok(outcome) => {
                        if matches!(outcome, ActuatorOutcome::Changed { .. }) {
                            self.last_change = Some(Instant::now());
                        }
                    }
                    Err(ActuatorFailure { error, .. }) => {
                        tracing::error!(%generation, %error, "could not revert this host's traffic to stable");
                        return;
                    }
                },
                Err(refusals) => {
                    for r in &refusals {
                        tracing::error!(%generation, error = %r.error, "could not revert this host's traffic to stable");
                    }
                    return;
                }
            }
        }
        tracing::info!(%generation, "this host's traffic is stable-only until a leader sends a desired state");
        let store = self.store.clone();
        let recorded = tokio::task::spawn_blocking(move || store.record_lease_reverted(generation))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| error_chain(&e)));
        if let Err(error) = recorded {
            tracing::warn!(%generation, %error, "could not record the lease revert in the local store: a restart before a leader answers would keep this host stable-only until the next generation");
        }
        self.reverted = Some(generation);
        self.last_applied = Some(revert);
    }

    /// Re-applies the last applied state (see the module doc); logs what it changed.
    async fn resync(&mut self) {
        let (Some(actuator), Some(desired)) = (&mut self.actuator, &self.last_applied) else {
            return;
        };
        let generation = desired.generation;
        let carried = actuator.services();
        let Ok(upstreams) = Upstreams::for_desired(desired, &self.local_upstreams, &carried) else {
            return;
        };
        match actuator.apply(desired, &upstreams).await {
            Ok(ActuatorOutcome::Unchanged) => {}
            Ok(ActuatorOutcome::Changed { elapsed }) => {
                self.last_change = Some(Instant::now());
                tracing::warn!(
                    %generation,
                    ?elapsed,
                    "the balancer's live traffic differed from the applied state; put it back"
                );
            }
            Err(ActuatorFailure { error, .. }) => {
                tracing::warn!(%generation, %error, "could not check or put back the applied traffic");
            }
        }
    }

    /// Applies `desired` and, on success, records it; returns the failures to acknowledge.
    async fn apply(&mut self, desired: &DesiredState) -> Vec<pb::ServiceFailure> {
        let generation = desired.generation;
        let started = Instant::now();
        let weights = desired
            .services
            .iter()
            .map(|s| format!("{}={}%", s.service, s.canary_weight))
            .collect::<Vec<_>>()
            .join(",");

        let mut reload = None;
        if let Some(actuator) = &mut self.actuator {
            let carried = actuator.services();
            let upstreams = match Upstreams::for_desired(desired, &self.local_upstreams, &carried) {
                Ok(upstreams) => upstreams,
                Err(refusals) => {
                    for r in &refusals {
                        tracing::warn!(%generation, weights, error = %r.error, "apply refused");
                    }
                    return refusals
                        .into_iter()
                        .map(|r| pb::ServiceFailure {
                            service: r.service,
                            error: r.error,
                        })
                        .collect();
                }
            };
            match actuator.apply(desired, &upstreams).await {
                Ok(ActuatorOutcome::Changed { elapsed }) => {
                    self.last_change = Some(Instant::now());
                    reload = Some(elapsed);
                }
                Ok(ActuatorOutcome::Unchanged) => {}
                Err(ActuatorFailure { services, error }) => {
                    tracing::warn!(%generation, weights, %error, "apply failed");
                    return services
                        .into_iter()
                        .map(|service| pb::ServiceFailure {
                            service,
                            error: error.clone(),
                        })
                        .collect();
                }
            }
        }

        let store = self.store.clone();
        let record = desired.clone();
        let recorded = tokio::task::spawn_blocking(move || store.record_applied(&record))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| error_chain(&e)));
        if let Err(error) = recorded {
            tracing::error!(%generation, %error, "applied, but could not record it in the local store");
            return desired
                .services
                .iter()
                .map(|s| pb::ServiceFailure {
                    service: s.service.clone(),
                    error: format!("applied, but could not record it in the local store: {error}"),
                })
                .collect();
        }

        self.applied = Some(generation);
        self.reverted = None;
        self.last_applied = Some(desired.clone());
        self.applied_tx.send_replace(Some(generation));
        tracing::info!(
            %generation,
            weights,
            reload = ?reload,
            elapsed = ?started.elapsed(),
            "applied generation"
        );
        Vec::new()
    }

    fn ack(&self, generation: Generation, failures: Vec<pb::ServiceFailure>) {
        let ack = pb::Ack {
            generation: Some(generation.into()),
            failures,
        };
        if let Err(e) = self.acks.try_send(ack) {
            tracing::warn!(%generation, "ack queue full or closed; ack dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;

    use super::super::ACK_QUEUE;
    use super::super::testing::WAIT;
    use super::*;
    use crate::actuator::fake::FakeActuator;
    use crate::store::{ServiceTraffic, UpstreamServer};
    use crate::test_support::traffic;
    use crate::traffic::{Server, Variant};

    fn generation(term: u64, index: u64) -> Generation {
        Generation { term, index }
    }

    #[test]
    fn decide_ignores_older_reacks_equal_applies_newer() {
        assert_eq!(decide(None, None, generation(1, 1)), Decision::Apply);
        assert_eq!(
            decide(Some(generation(2, 5)), None, generation(1, 9)),
            Decision::Stale
        );
        assert_eq!(
            decide(Some(generation(2, 5)), None, generation(2, 4)),
            Decision::Stale
        );
        assert_eq!(
            decide(Some(generation(2, 5)), None, generation(2, 5)),
            Decision::Reack
        );
        assert_eq!(
            decide(Some(generation(2, 5)), None, generation(2, 6)),
            Decision::Apply
        );
        assert_eq!(
            decide(Some(generation(2, 5)), None, generation(3, 0)),
            Decision::Apply
        );
    }

    struct ApplierHarness {
        applier: Applier<FakeActuator>,
        acks: mpsc::Receiver<pb::Ack>,
        applied: watch::Receiver<Option<Generation>>,
        desired: watch::Sender<Option<DesiredState>>,
        store: LocalStore,
        _dir: tempfile::TempDir,
    }

    impl ApplierHarness {
        fn new(actuator: Option<FakeActuator>) -> Self {
            Self::with_local(actuator, Upstreams::default())
        }

        /// An applier whose `[[instances]]` give `local`.
        fn with_local(actuator: Option<FakeActuator>, local: Upstreams) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = LocalStore::open(dir.path()).expect("store opens");
            let (desired, desired_rx) = watch::channel(None);
            let (applied_tx, applied) = watch::channel(None);
            let (ack_tx, acks) = mpsc::channel(ACK_QUEUE);
            ApplierHarness {
                applier: Applier {
                    retry_delays: RetryDelays {
                        initial: Duration::from_millis(10),
                        max: Duration::from_millis(40),
                    },
                    ..Applier::new(
                        local,
                        store.clone(),
                        actuator,
                        None,
                        desired_rx,
                        applied_tx,
                        ack_tx,
                    )
                },
                acks,
                applied,
                desired,
                store,
                _dir: dir,
            }
        }

        fn fake(&mut self) -> &mut FakeActuator {
            self.applier.actuator.as_mut().expect("a fake actuator")
        }

        /// Generations the fake actuator was asked to apply, in order.
        fn calls(&mut self) -> Vec<Generation> {
            self.fake().calls.iter().map(|d| d.generation).collect()
        }

        fn stored(&self) -> Option<Generation> {
            self.store
                .last_applied()
                .expect("store readable")
                .map(|d| d.generation)
        }

        /// The ack `handle` sent, as (generation, [(service, error)]).
        fn ack(&mut self) -> (Generation, Vec<(String, String)>) {
            let ack = self.acks.try_recv().expect("an ack was sent");
            (
                ack.generation.expect("acks carry a generation").into(),
                ack.failures
                    .into_iter()
                    .map(|f| (f.service, f.error))
                    .collect(),
            )
        }

        fn no_ack(&mut self) {
            assert_eq!(
                self.acks.try_recv().map(|a| a.generation),
                Err(mpsc::error::TryRecvError::Empty)
            );
        }

        /// Both the task's memory and the connection's view of the applied generation.
        fn applied(&self) -> Option<Generation> {
            assert_eq!(self.applier.applied, *self.applied.borrow());
            self.applier.applied
        }
    }

    fn desired_state(term: u64, index: u64, services: &[(&str, u32)]) -> DesiredState {
        DesiredState {
            generation: generation(term, index),
            services: services
                .iter()
                .map(|(service, weight)| traffic(service, *weight, None))
                .collect(),
        }
    }

    #[tokio::test]
    async fn newer_generation_is_applied_and_recorded_before_the_ack() {
        let h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        let shutdown = CancellationToken::new();
        let store = h.store.clone();
        let mut acks = h.acks;
        let desired = h.desired.clone();
        let task = tokio::spawn(h.applier.run(shutdown.clone()));
        for (index, weight) in [(1, 10), (2, 20)] {
            desired.send_replace(Some(desired_state(1, index, &[("web", weight)])));
            let ack = tokio::time::timeout(WAIT, acks.recv())
                .await
                .expect("an ack in time")
                .expect("applier running");
            assert_eq!(ack.generation, Some(pb::Generation { term: 1, index }));
            assert!(ack.failures.is_empty(), "{:?}", ack.failures);
            // Recorded before the ack went out.
            let stored = store.last_applied().expect("store readable");
            assert_eq!(stored.map(|d| d.generation), Some(generation(1, index)));
        }
        assert_eq!(*h.applied.borrow(), Some(generation(1, 2)));
        shutdown.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the applier stops on shutdown")
            .expect("applier task");
    }

    #[tokio::test]
    async fn failed_apply_is_acked_per_failing_service_not_recorded_and_retried() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web", "api"])));
        h.fake().fail_with = Some("nginx said no".into());

        // Attributed to the desired services the actuator carries.
        h.applier
            .handle(&desired_state(1, 1, &[("web", 10), ("bot", 5)]))
            .await;
        assert_eq!(
            h.ack(),
            (
                generation(1, 1),
                vec![("web".into(), "nginx said no".into())]
            )
        );
        assert_eq!((h.stored(), h.applied()), (None, None));

        // Re-sending the same generation retries it.
        h.applier
            .handle(&desired_state(1, 1, &[("web", 10), ("bot", 5)]))
            .await;
        assert_eq!(h.calls(), [generation(1, 1), generation(1, 1)]);
        assert_eq!(h.ack().1.len(), 1);

        h.fake().fail_with = None;
        h.applier
            .handle(&desired_state(1, 1, &[("web", 10), ("bot", 5)]))
            .await;
        assert_eq!(h.calls().len(), 3);
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.stored(), Some(generation(1, 1)));
        assert_eq!(h.applied(), Some(generation(1, 1)));

        // A state naming none of the carried services fails for all of them; the last
        // success stays recorded.
        h.fake().fail_with = Some("boom".into());
        h.applier.handle(&desired_state(1, 2, &[("bot", 5)])).await;
        assert_eq!(
            h.ack(),
            (
                generation(1, 2),
                vec![("web".into(), "boom".into()), ("api".into(), "boom".into())]
            )
        );
        assert_eq!(h.stored(), Some(generation(1, 1)));
        assert_eq!(h.applied(), Some(generation(1, 1)));

        // A refusal of the actuator's own (weight out of range) travels the same way.
        h.fake().fail_with = None;
        h.applier
            .handle(&desired_state(1, 3, &[("api", 150)]))
            .await;
        let (acked, failures) = h.ack();
        assert_eq!(acked, generation(1, 3));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].0, "api");
        assert!(failures[0].1.contains("150"), "{failures:?}");
        assert_eq!(h.stored(), Some(generation(1, 1)));
    }

    fn server(name: &str, port: u16, variant: Variant) -> Server {
        Server {
            name: name.into(),
            address: format!("10.0.0.1:{port}"),
            variant,
        }
    }

    fn upstreams(service: &str, servers: &[Server]) -> Upstreams {
        servers
            .iter()
            .map(|s| (service.to_owned(), s.clone()))
            .collect()
    }

    /// `service` at `weight`, routed to `servers` by the coordinator's inventory.
    fn from_inventory(service: &str, weight: u32, servers: &[Server]) -> ServiceTraffic {
        ServiceTraffic {
            servers: servers
                .iter()
                .map(|s| UpstreamServer {
                    instance: s.name.clone(),
                    address: s.address.clone(),
                    variant: s.variant,
                    weight: 1,
                    agent: "app-1".into(),
                })
                .collect(),
            from_inventory: true,
            ..traffic(service, weight, None)
        }
    }

    fn state(index: u64, services: Vec<ServiceTraffic>) -> DesiredState {
        DesiredState {
            generation: generation(1, index),
            services,
        }
    }

    fn local_web() -> Upstreams {
        upstreams("web", &[server("web-local", 8000, Variant::Stable)])
    }

    #[tokio::test]
    async fn the_servers_of_the_desired_state_are_routed_to_not_the_local_instances() {
        let mut h = ApplierHarness::with_local(Some(FakeActuator::new(&["web"])), local_web());
        let inventory = [
            server("web-s", 8001, Variant::Stable),
            server("web-c", 8002, Variant::Canary),
        ];
        h.applier
            .handle(&state(1, vec![from_inventory("web", 10, &inventory)]))
            .await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.fake().upstreams, [upstreams("web", &inventory)]);
        assert_eq!(h.stored(), Some(generation(1, 1)));
    }

    #[tokio::test]
    async fn without_the_inventory_flag_the_local_instances_are_routed_to() {
        let mut h = ApplierHarness::with_local(Some(FakeActuator::new(&["web"])), local_web());
        let ignored = [server("web-s", 8001, Variant::Stable)];
        h.applier
            .handle(&state(
                1,
                vec![ServiceTraffic {
                    from_inventory: false,
                    ..from_inventory("web", 0, &ignored)
                }],
            ))
            .await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        // A service the desired state does not mention is routed to its local servers too.
        h.applier.handle(&state(2, vec![])).await;
        assert_eq!(h.ack(), (generation(1, 2), vec![]));
        assert_eq!(h.fake().upstreams, [local_web(), local_web()]);
    }

    #[tokio::test]
    async fn a_later_desired_state_with_other_servers_is_applied_again() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        let first = [server("web-1", 8001, Variant::Stable)];
        let second = [
            server("web-1", 8001, Variant::Stable),
            server("web-2", 8002, Variant::Stable),
        ];
        h.applier
            .handle(&state(1, vec![from_inventory("web", 0, &first)]))
            .await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        // Same weights, one more server: a new generation that the actuator applies.
        h.applier
            .handle(&state(2, vec![from_inventory("web", 0, &second)]))
            .await;
        assert_eq!(h.ack(), (generation(1, 2), vec![]));
        assert_eq!(
            h.fake().upstreams,
            [upstreams("web", &first), upstreams("web", &second)]
        );
        assert_eq!(h.stored(), Some(generation(1, 2)));
    }

    #[tokio::test]
    async fn an_unusable_inventory_is_an_apply_failure_of_that_service_and_is_not_applied() {
        let mut h = ApplierHarness::with_local(
            Some(FakeActuator::new(&["web", "api"])),
            upstreams("api", &[server("api-local", 8000, Variant::Stable)]),
        );
        let canary_only = [server("web-c", 8002, Variant::Canary)];
        h.applier
            .handle(&state(1, vec![from_inventory("web", 10, &canary_only)]))
            .await;
        let (acked, failures) = h.ack();
        assert_eq!(acked, generation(1, 1));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].0, "web");
        assert!(failures[0].1.contains("no stable server"), "{failures:?}");

        let unreadable = ServiceTraffic {
            invalid_servers: Some(
                "service 'web': the coordinator sent an unusable upstream server 0 ...".into(),
            ),
            ..from_inventory("web", 10, &[])
        };
        h.applier.handle(&state(2, vec![unreadable])).await;
        let (acked, failures) = h.ack();
        assert_eq!(acked, generation(1, 2));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].1.contains("server 0"), "{failures:?}");

        assert!(h.calls().is_empty(), "the actuator was called");
        assert_eq!(h.stored(), None);
        assert_eq!(h.applied(), None);
    }

    #[tokio::test]
    async fn older_generation_is_ignored_without_an_ack() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(2, 5, &[("web", 50)])).await;
        assert_eq!(h.ack(), (generation(2, 5), vec![]));
        for (term, index) in [(2, 4), (1, 9)] {
            h.applier
                .handle(&desired_state(term, index, &[("web", 0)]))
                .await;
            h.no_ack();
        }
        assert_eq!(h.calls(), [generation(2, 5)]);
        assert_eq!(h.stored(), Some(generation(2, 5)));
        assert_eq!(h.applied(), Some(generation(2, 5)));
    }

    #[tokio::test]
    async fn equal_generation_is_reacked_without_calling_the_actuator() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        // Even when the actuator would now fail.
        h.fake().fail_with = Some("boom".into());
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.calls(), [generation(1, 1)]);
        assert_eq!(h.stored(), Some(generation(1, 1)));
    }

    #[test]
    fn after_a_lease_revert_its_generation_and_newer_ones_apply_again() {
        let g = generation(2, 5);
        assert_eq!(decide(Some(g), Some(g), g), Decision::Apply);
        assert_eq!(decide(Some(g), Some(g), generation(2, 6)), Decision::Apply);
        assert_eq!(decide(Some(g), Some(g), generation(2, 4)), Decision::Stale);
        // A revert of a state received but not applied yet (applied 2.4).
        assert_eq!(decide(Some(generation(2, 4)), Some(g), g), Decision::Apply);
        assert_eq!(
            decide(Some(generation(2, 4)), Some(g), generation(2, 4)),
            Decision::Reack
        );
    }

    #[tokio::test]
    async fn a_lease_revert_is_applied_unacked_unrecorded_and_the_same_generation_applies_again() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));

        let stable_only = crate::lease::stable_only_traffic(&desired_state(1, 4, &[("web", 10)]));
        h.applier.revert(stable_only.clone()).await;
        h.no_ack();
        assert_eq!(h.calls(), [generation(1, 4), generation(1, 4)]);
        let live = h.fake().calls.last().cloned().expect("applied");
        assert_eq!(live.services[0].canary_weight, 0);
        assert_eq!(h.stored(), Some(generation(1, 4)));
        assert_eq!(h.applied(), Some(generation(1, 4)));
        // A resync keeps the revert, not the canary.
        h.fake().drift();
        h.applier.resync().await;
        assert_eq!(
            h.fake().calls.last().map(|d| d.services[0].canary_weight),
            Some(0)
        );

        // The leader is back and sends the same generation: applied again, acked.
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        assert_eq!(
            h.fake().calls.last().map(|d| d.services[0].canary_weight),
            Some(10)
        );
        assert_eq!(h.calls().len(), 4);
        // Then it is only re-acked, as before the revert.
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        assert_eq!(h.calls().len(), 4);
    }

    /// An agent restarted while reverted: nginx holds the stable-only file, so the leader's
    /// state of the reverted generation must be applied again, not only acknowledged.
    #[tokio::test]
    async fn a_lease_revert_outlives_a_restart_and_the_same_generation_applies_again() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        let canary = desired_state(1, 4, &[("web", 10)]);
        h.applier.handle(&canary).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        h.applier
            .revert(crate::lease::stable_only_traffic(&canary))
            .await;
        assert_eq!(h.store.lease_reverted().unwrap(), Some(generation(1, 4)));

        let (_desired, desired_rx) = watch::channel(None);
        let (applied_tx, _applied) = watch::channel(None);
        let (ack_tx, mut acks) = mpsc::channel(ACK_QUEUE);
        let (_reverts, reverts_rx) = watch::channel(None);
        let mut restarted = Applier::new(
            Upstreams::default(),
            h.store.clone(),
            Some(FakeActuator::new(&["web"])),
            h.stored(),
            desired_rx,
            applied_tx,
            ack_tx,
        )
        .with_lease_reverts(reverts_rx);
        restarted.handle(&canary).await;
        let fake = restarted.actuator.as_ref().expect("a fake actuator");
        assert_eq!(fake.calls.len(), 1, "applied again after the restart");
        assert_eq!(fake.calls[0].services[0].canary_weight, 10);
        assert_eq!(acks.try_recv().unwrap().failures, vec![]);
        assert_eq!(
            h.store.lease_reverted().unwrap(),
            None,
            "cleared once applied"
        );

        // A restart after that only re-acknowledges the generation, as before any revert.
        let (_desired, desired_rx) = watch::channel(None);
        let (applied_tx, _applied) = watch::channel(None);
        let (ack_tx, _acks) = mpsc::channel(ACK_QUEUE);
        let (_reverts, reverts_rx) = watch::channel(None);
        let mut again = Applier::new(
            Upstreams::default(),
            h.store.clone(),
            Some(FakeActuator::new(&["web"])),
            h.stored(),
            desired_rx,
            applied_tx,
            ack_tx,
        )
        .with_lease_reverts(reverts_rx);
        again.handle(&canary).await;
        assert!(again.actuator.as_ref().unwrap().calls.is_empty());
    }

    #[tokio::test]
    async fn a_lease_revert_older_than_the_applied_generation_is_ignored() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        h.applier.revert(desired_state(1, 3, &[("web", 0)])).await;
        h.no_ack();
        assert_eq!(h.calls(), [generation(1, 4)]);
        // Not reverted: the same generation is only re-acked.
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        assert_eq!(h.calls(), [generation(1, 4)]);
    }

    #[tokio::test]
    async fn a_failed_lease_revert_leaves_the_coordinators_state_applied() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        h.fake().fail_with = Some("nginx -t failed".into());
        h.applier.revert(desired_state(1, 4, &[("web", 0)])).await;
        h.no_ack();
        h.fake().fail_with = None;
        h.applier.handle(&desired_state(1, 4, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 4), vec![]));
        assert_eq!(h.calls(), [generation(1, 4), generation(1, 4)]);
    }

    #[tokio::test]
    async fn a_resync_puts_drifted_traffic_back_without_an_ack_and_is_a_no_op_otherwise() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        // Nothing applied yet: nothing to put back.
        h.applier.resync().await;
        assert!(h.calls().is_empty());
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        h.fake().drift();
        h.applier.resync().await;
        assert_eq!(h.calls(), [generation(1, 1), generation(1, 1)]);
        h.no_ack();
        // Put back: the next resync finds it live (the fake answers Unchanged) and no ack.
        h.applier.resync().await;
        assert_eq!(h.calls().len(), 3);
        h.no_ack();
    }

    #[tokio::test]
    async fn without_an_actuator_states_are_recorded_and_acked() {
        let mut h = ApplierHarness::new(None);
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.stored(), Some(generation(1, 1)));
        assert_eq!(h.applied(), Some(generation(1, 1)));
    }

    /// Runs `h`'s applier until the returned token is cancelled.
    fn spawn_applier(
        h: ApplierHarness,
    ) -> (
        CancellationToken,
        JoinHandle<()>,
        mpsc::Receiver<pb::Ack>,
        watch::Sender<Option<DesiredState>>,
        LocalStore,
    ) {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(h.applier.run(shutdown.clone()));
        (shutdown, task, h.acks, h.desired, h.store)
    }

    async fn next_ack(acks: &mut mpsc::Receiver<pb::Ack>) -> (Generation, usize) {
        let ack = tokio::time::timeout(WAIT, acks.recv())
            .await
            .expect("an ack in time")
            .expect("applier running");
        (
            ack.generation.expect("a generation").into(),
            ack.failures.len(),
        )
    }

    #[tokio::test]
    async fn a_failed_apply_is_retried_with_backoff_until_it_succeeds_each_attempt_acked() {
        let mut fake = FakeActuator::new(&["web"]);
        fake.fail_with = Some("nginx master is gone".into());
        fake.fail_times = Some(3);
        let (shutdown, task, mut acks, desired, store) =
            spawn_applier(ApplierHarness::new(Some(fake)));

        let started = Instant::now();
        desired.send_replace(Some(desired_state(1, 1, &[("web", 0)])));
        for _ in 0..3 {
            assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 1));
        }
        assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 0));
        // 10 ms, 20 ms, then the 40 ms cap between the attempts.
        assert!(
            started.elapsed() >= Duration::from_millis(70),
            "{:?}",
            started.elapsed()
        );
        let stored = store.last_applied().expect("store readable");
        assert_eq!(stored.map(|d| d.generation), Some(generation(1, 1)));
        // Applied: no more attempts.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), acks.recv())
                .await
                .is_err(),
            "no ack after the success"
        );
        shutdown.cancel();
        task.await.expect("applier task");
    }

    #[tokio::test]
    async fn a_newer_generation_supersedes_the_retry_of_a_failed_one() {
        let mut fake = FakeActuator::new(&["web"]);
        fake.fail_with = Some("nginx master is gone".into());
        fake.fail_times = Some(1);
        let mut h = ApplierHarness::new(Some(fake));
        h.applier.retry_delays = RetryDelays {
            initial: Duration::from_millis(300),
            max: Duration::from_millis(300),
        };
        let (shutdown, task, mut acks, desired, _store) = spawn_applier(h);

        desired.send_replace(Some(desired_state(1, 1, &[("web", 10)])));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 1));
        desired.send_replace(Some(desired_state(1, 2, &[("web", 0)])));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 2), 0));
        // The retry of 1.1 would have succeeded and been acked: it was dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(800), acks.recv())
                .await
                .is_err(),
            "the superseded generation was retried"
        );
        shutdown.cancel();
        task.await.expect("applier task");
    }

    /// A running applier over a fake actuator that asks for one second between changes,
    /// with the fake's journal of (generation, when applied).
    struct Paced {
        shutdown: CancellationToken,
        task: JoinHandle<()>,
        acks: mpsc::Receiver<pb::Ack>,
        desired: watch::Sender<Option<DesiredState>>,
        store: LocalStore,
        journal: crate::actuator::fake::Journal,
        _dir: tempfile::TempDir,
    }

    const SECOND: Duration = Duration::from_secs(1);

    impl Paced {
        fn start() -> Self {
            let mut fake = FakeActuator::new(&["web"]);
            fake.min_change_interval = Some(SECOND);
            let journal = fake.journal.clone();
            let mut h = ApplierHarness::new(Some(fake));
            let dir = std::mem::replace(&mut h._dir, tempfile::tempdir().expect("tempdir"));
            let (shutdown, task, acks, desired, store) = spawn_applier(h);
            Paced {
                shutdown,
                task,
                acks,
                desired,
                store,
                journal,
                _dir: dir,
            }
        }

        fn send(&self, index: u64, weight: u32) {
            self.desired
                .send_replace(Some(desired_state(1, index, &[("web", weight)])));
        }

        /// The generations applied, each with when, relative to `since`.
        fn applied_since(&self, since: Instant) -> Vec<(u64, Duration)> {
            self.journal
                .lock()
                .expect("journal lock")
                .iter()
                .map(|(g, at)| (g.index, at.duration_since(since)))
                .collect()
        }

        /// Every ack waiting, as (index, failures), after letting the applier run until it
        /// waits on something (paused time: nothing advances the clock here).
        async fn acks(&mut self) -> Vec<(u64, usize)> {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let mut acks = Vec::new();
            while let Ok(ack) = self.acks.try_recv() {
                let generation: Generation = ack.generation.expect("a generation").into();
                acks.push((generation.index, ack.failures.len()));
            }
            acks
        }

        async fn stop(self) -> LocalStore {
            self.shutdown.cancel();
            self.task.await.expect("applier task");
            self.store
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_ten_states_in_a_second_is_two_applies_the_last_one_the_newest() {
        let mut p = Paced::start();
        let started = Instant::now();
        for index in 1..=10 {
            p.send(index, [5, 10, 25, 50][index as usize % 4]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The first at once; 2..=10 arrived within the second after it: only the newest,
        // once the second has passed.
        assert_eq!(next_ack(&mut p.acks).await, (generation(1, 1), 0));
        assert_eq!(next_ack(&mut p.acks).await, (generation(1, 10), 0));
        let applied = p.applied_since(started);
        assert_eq!(
            applied,
            [(1, Duration::ZERO), (10, SECOND)],
            "applied (index, at)"
        );
        // Nothing else is applied or acknowledged later.
        tokio::time::sleep(10 * SECOND).await;
        assert_eq!(p.acks().await, []);
        assert_eq!(p.applied_since(started).len(), 2);
        let store = p.stop().await;
        let stored = store.last_applied().expect("store readable");
        assert_eq!(stored.map(|d| d.generation), Some(generation(1, 10)));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_spread_out_are_each_applied_and_a_burst_never_applies_twice_in_a_second() {
        let mut p = Paced::start();
        let started = Instant::now();
        // 30 states 50 ms apart (a canary share going up), then one every 1.5 s.
        for index in 1..=30 {
            p.send(index, 1 + (index as u32 % 3));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for index in 31..=33 {
            p.send(index, 10 + index as u32);
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let applied = p.applied_since(started);
        let gaps: Vec<Duration> = applied.windows(2).map(|w| w[1].1 - w[0].1).collect();
        assert!(gaps.iter().all(|g| *g >= SECOND), "{applied:?}");
        // In order, the newest of each window, and the spread-out ones each at once.
        let indexes: Vec<u64> = applied.iter().map(|(i, _)| *i).collect();
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
        assert_eq!(indexes.first(), Some(&1));
        assert!(indexes.ends_with(&[31, 32, 33]), "{indexes:?}");
        // Every apply was acknowledged, and nothing else.
        let acked: Vec<u64> = p.acks().await.into_iter().map(|(i, _)| i).collect();
        assert_eq!(acked, indexes);
        p.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollback_is_applied_at_once_and_supersedes_the_held_state() {
        let mut p = Paced::start();
        let started = Instant::now();
        p.send(1, 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.send(2, 25); // held: 100 ms after the change
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.send(3, 0); // the rollback: at once, and 2 is never applied
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.acks().await, [(1, 0), (3, 0)]);
        assert_eq!(
            p.applied_since(started),
            [(1, Duration::ZERO), (3, Duration::from_millis(200))]
        );
        // A new rollout's first stage right after waits for the second after the rollback.
        p.send(4, 5);
        assert_eq!(next_ack(&mut p.acks).await, (generation(1, 4), 0));
        assert_eq!(
            p.applied_since(started).last(),
            Some(&(4, Duration::from_millis(1200)))
        );
        tokio::time::sleep(10 * SECOND).await;
        assert_eq!(p.acks().await, [], "the held generation 2 was never acked");
        p.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_state_arriving_while_one_is_held_is_ignored() {
        let mut p = Paced::start();
        let started = Instant::now();
        p.send(1, 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.send(5, 25); // held
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.send(4, 50); // a deposed leader's, older than the held one
        assert_eq!(next_ack(&mut p.acks).await, (generation(1, 1), 0));
        assert_eq!(next_ack(&mut p.acks).await, (generation(1, 5), 0));
        tokio::time::sleep(10 * SECOND).await;
        assert_eq!(p.acks().await, []);
        assert_eq!(p.applied_since(started), [(1, Duration::ZERO), (5, SECOND)]);
        p.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_runs_from_a_change_not_from_an_apply_that_changed_nothing() {
        let mut p = Paced::start();
        let started = Instant::now();
        p.send(1, 10);
        tokio::time::sleep(2 * SECOND).await;
        p.send(2, 10); // same traffic: the fake answers Unchanged
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.send(3, 25); // 2.1 s after the last change: at once
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.acks().await, [(1, 0), (2, 0), (3, 0)]);
        assert_eq!(
            p.applied_since(started),
            [
                (1, Duration::ZERO),
                (2, 2 * SECOND),
                (3, Duration::from_millis(2100))
            ]
        );
        p.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_state_that_then_fails_is_retried_with_backoff_and_acked_each_time() {
        let mut fake = FakeActuator::new(&["web"]);
        fake.min_change_interval = Some(SECOND);
        let journal = fake.journal.clone();
        let (shutdown, task, mut acks, desired, _store) =
            spawn_applier(ApplierHarness::new(Some(fake)));
        let started = Instant::now();
        desired.send_replace(Some(desired_state(1, 1, &[("web", 10)])));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 0));
        // 150 is refused by the actuator: held for the second, then failed and retried.
        desired.send_replace(Some(desired_state(1, 2, &[("web", 150)])));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 2), 1));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 2), 1));
        let at: Vec<(u64, Duration)> = journal
            .lock()
            .expect("journal lock")
            .iter()
            .map(|(g, at)| (g.index, at.duration_since(started)))
            .collect();
        // The harness's retry delays start at 10 ms.
        assert_eq!(
            at,
            [
                (1, Duration::ZERO),
                (2, SECOND),
                (2, SECOND + Duration::from_millis(10))
            ]
        );
        shutdown.cancel();
        task.await.expect("applier task");
    }

    #[test]
    fn apply_retry_delays_double_from_the_initial_to_the_cap() {
        let d = RetryDelays::default();
        assert_eq!(
            (d.initial, d.max),
            (Duration::from_millis(500), Duration::from_secs(5))
        );
        let mut delay = None;
        let delays: Vec<u64> = (0..6)
            .map(|_| {
                let next = d.after(delay);
                delay = Some(next);
                u64::try_from(next.as_millis()).expect("small")
            })
            .collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000]);
    }
}
