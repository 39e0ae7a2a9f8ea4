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
//! Generations: a desired state older than the last applied one is ignored (a deposed
//! leader cannot undo a newer decision); the same generation is acknowledged again without
//! re-applying; a newer one is applied. A failed apply is not recorded, so the retries (and
//! the coordinator re-sending that generation) apply it again.

use std::time::Duration;

use serin_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

fn decide(applied: Option<Generation>, incoming: Generation) -> Decision {
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
    /// The newest desired state, when applying it failed: tried again at `Retry::at`.
    retry: Option<Retry>,
    /// The last state applied by this process: what a resync puts back.
    last_applied: Option<DesiredState>,
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

/// A failed desired state waiting to be applied again.
struct Retry {
    desired: DesiredState,
    delay: Duration,
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
        }
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
            let failed = self.handle(&desired).await;
            self.schedule_retry(desired, failed);
        }
    }

    /// After handling `desired`: retries it later if it `failed`, else drops a pending retry
    /// unless `desired` is older than the retried state (an ignored, stale one).
    fn schedule_retry(&mut self, desired: DesiredState, failed: bool) {
        let pending = self.retry.take();
        if failed {
            let previous = pending
                .filter(|r| r.desired.generation == desired.generation)
                .map(|r| r.delay);
            let delay = self.retry_delays.after(previous);
            tracing::info!(generation = %desired.generation, retry_in = ?delay, "will retry the failed apply");
            self.retry = Some(Retry {
                desired,
                delay,
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
        match decide(self.applied, generation) {
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
            Ok(ActuatorOutcome::Changed { elapsed }) => tracing::warn!(
                %generation,
                ?elapsed,
                "the balancer's live traffic differed from the applied state; put it back"
            ),
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
                Ok(ActuatorOutcome::Changed { elapsed }) => reload = Some(elapsed),
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
        assert_eq!(decide(None, generation(1, 1)), Decision::Apply);
        assert_eq!(
            decide(Some(generation(2, 5)), generation(1, 9)),
            Decision::Stale
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(2, 4)),
            Decision::Stale
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(2, 5)),
            Decision::Reack
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(2, 6)),
            Decision::Apply
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(3, 0)),
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
