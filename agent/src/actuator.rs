//! The traffic edge: [`TrafficActuator`], what makes a desired state's traffic real on this
//! host.
//!
//! The runtime's applier decides *whether* to apply a desired state (generations, the
//! store, acks); an actuator only does the applying. [`crate::nginx::NginxActuator`] is the
//! real implementation today (HAProxy's runtime API, docker containers and shard assignment
//! are planned), driven by the runtime through [`crate::balancer::Balancer`], the set the
//! config chooses from. Every implementation keeps the contract written on the trait; the
//! test-only `conformance::check` suite holds each one to it, and a test-only in-memory
//! `fake::FakeActuator` lets the applier be tested without nginx.

use std::time::Duration;

use crate::store::DesiredState;
use crate::traffic::Upstreams;

/// Makes a desired state's traffic real for the services this host carries.
///
/// Contract (checked by `conformance::check` for every implementation):
/// - [`services`](Self::services) is fixed for the actuator's lifetime, non-empty and
///   without duplicates.
/// - [`apply`](Self::apply) acts on the carried services only: a service in the desired
///   state that is not carried is ignored, and a carried service the desired state does
///   not mention gets all its traffic on stable (no rollout).
/// - Traffic goes to `upstreams`' servers of each carried service, whoever listed them
///   (the coordinator's inventory, or else the agent's own `[[instances]]`).
/// - `Ok` means the new traffic is live (or was already: [`ActuatorOutcome::Unchanged`]
///   when the carried services' traffic equals what is live, whatever the generation).
/// - A desired state the actuator cannot take (at least: a canary weight above 100 for a
///   carried service) is an `Err` that names the failed services and leaves the previous
///   traffic live, so re-applying the previous state is `Unchanged`.
/// - Calls are serialised by `&mut self`; an apply in progress is allowed to finish.
pub trait TrafficActuator: Send + 'static {
    /// The services whose traffic this actuator carries, in a fixed order.
    fn services(&self) -> Vec<String>;

    /// Makes `desired`'s traffic live for the carried services, routed to their servers in
    /// `upstreams`.
    fn apply(
        &mut self,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> impl Future<Output = Result<ActuatorOutcome, ActuatorFailure>> + Send;

    /// How often the runtime re-applies the last applied desired state, for an actuator
    /// whose live traffic can drift without serin (HAProxy's runtime weights are lost when
    /// it restarts): `None` (the default) re-applies only when a new state arrives. A
    /// re-apply of unchanged traffic must be [`ActuatorOutcome::Unchanged`] and cheap.
    fn resync_interval(&self) -> Option<Duration> {
        None
    }

    /// The shortest time the runtime leaves between two changes of live traffic, for an
    /// actuator whose every change costs something (nginx: each reload resets idle
    /// keep-alive connections): the applier then holds a new desired state until this long
    /// after the previous change went live, applies only the newest of those that arrived
    /// meanwhile, and lets a change that takes traffic away (a rollback) through at once.
    /// `None` (the default) applies every state as soon as the previous apply finished.
    fn min_change_interval(&self) -> Option<Duration> {
        None
    }
}

/// Outcome of a successful [`TrafficActuator::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActuatorOutcome {
    /// The carried services' traffic already was what the desired state asks for; nothing
    /// was touched.
    Unchanged,
    /// The traffic changed; `elapsed` is how long the change took to become live (for
    /// nginx, from the reload command until the new generation settled).
    Changed { elapsed: Duration },
}

/// A failed [`TrafficActuator::apply`]: acknowledged to the coordinator as one failure per
/// service, each with the same error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActuatorFailure {
    /// The services the apply failed for.
    pub services: Vec<String>,
    /// The full error text, causes included.
    pub error: String,
}

impl ActuatorFailure {
    /// A failure of an actuator that applies all its services at once (nginx, one site
    /// file): attributed to the desired state's services that the actuator carries, or, if
    /// it names none of them, to every carried service.
    pub fn attributed(carried: &[String], desired: &DesiredState, error: String) -> Self {
        let mut services: Vec<String> = desired
            .services
            .iter()
            .filter(|s| carried.contains(&s.service))
            .map(|s| s.service.clone())
            .collect();
        if services.is_empty() {
            services = carried.to_vec();
        }
        ActuatorFailure { services, error }
    }
}

/// An in-memory [`TrafficActuator`] for unit tests of the applier: records every call and
/// can be told to fail. Otherwise it keeps the trait's contract (checked below).
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::traffic::Server;

    /// What the fake has made "live": per carried service, (canary weight, sticky key,
    /// servers).
    type Live = Vec<(u32, Option<String>, Vec<Server>)>;

    /// See [`FakeActuator::journal`].
    pub(crate) type Journal =
        std::sync::Arc<std::sync::Mutex<Vec<(crate::store::Generation, tokio::time::Instant)>>>;

    pub(crate) struct FakeActuator {
        services: Vec<String>,
        /// Every `apply` call's desired state, in order.
        pub(crate) calls: Vec<DesiredState>,
        /// Every `apply` call's upstreams, in order.
        pub(crate) upstreams: Vec<Upstreams>,
        /// Every `apply` call's generation and when it began (tokio's clock, so paused time
        /// in tests), in order; shared, so a test can read it while the fake is owned by a
        /// running applier.
        pub(crate) journal: Journal,
        /// When set, every `apply` fails with this text (attributed like nginx's failures)
        /// and changes nothing.
        pub(crate) fail_with: Option<String>,
        /// When set, only this many more calls fail with `fail_with`; later ones succeed.
        pub(crate) fail_times: Option<u32>,
        live: Option<Live>,
        /// What [`TrafficActuator::resync_interval`] answers.
        pub(crate) resync: Option<Duration>,
        /// What [`TrafficActuator::min_change_interval`] answers.
        pub(crate) min_change_interval: Option<Duration>,
    }

    impl FakeActuator {
        /// Forgets what is live, as a balancer restarted without its state would.
        pub(crate) fn drift(&mut self) {
            self.live = None;
        }

        pub(crate) fn new(services: &[&str]) -> Self {
            FakeActuator {
                services: services.iter().map(|s| (*s).to_owned()).collect(),
                calls: Vec::new(),
                upstreams: Vec::new(),
                journal: Journal::default(),
                fail_with: None,
                fail_times: None,
                live: None,
                resync: None,
                min_change_interval: None,
            }
        }
    }

    impl TrafficActuator for FakeActuator {
        fn services(&self) -> Vec<String> {
            self.services.clone()
        }

        fn resync_interval(&self) -> Option<Duration> {
            self.resync
        }

        fn min_change_interval(&self) -> Option<Duration> {
            self.min_change_interval
        }

        async fn apply(
            &mut self,
            desired: &DesiredState,
            upstreams: &Upstreams,
        ) -> Result<ActuatorOutcome, ActuatorFailure> {
            self.calls.push(desired.clone());
            self.upstreams.push(upstreams.clone());
            self.journal
                .lock()
                .expect("journal lock")
                .push((desired.generation, tokio::time::Instant::now()));
            let fail = |error| ActuatorFailure::attributed(&self.services, desired, error);
            if let Some(error) = &self.fail_with {
                match &mut self.fail_times {
                    None => return Err(fail(error.clone())),
                    Some(0) => {}
                    Some(n) => {
                        *n -= 1;
                        return Err(fail(error.clone()));
                    }
                }
            }
            let mut next = Live::new();
            for service in &self.services {
                let traffic = desired.services.iter().find(|s| &s.service == service);
                let weight = traffic.map_or(0, |t| t.canary_weight);
                if weight > 100 {
                    return Err(fail(format!(
                        "service '{service}': canary_weight {weight} is out of range (0..=100)"
                    )));
                }
                next.push((
                    weight,
                    traffic.and_then(|t| t.sticky_key.clone()),
                    upstreams.of(service).to_vec(),
                ));
            }
            if self.live.as_ref() == Some(&next) {
                return Ok(ActuatorOutcome::Unchanged);
            }
            self.live = Some(next);
            Ok(ActuatorOutcome::Changed {
                elapsed: Duration::ZERO,
            })
        }
    }
}

/// The contract of [`TrafficActuator`], as one suite run against every implementation.
#[cfg(test)]
pub(crate) mod conformance {
    use std::collections::HashSet;

    use super::*;
    use crate::store::{Generation, ServiceTraffic};

    /// A service name no actuator under test carries.
    const NOT_CARRIED: &str = "serin-conformance-not-carried";

    fn traffic(service: &str, canary_weight: u32) -> ServiceTraffic {
        ServiceTraffic {
            service: service.to_owned(),
            canary_weight,
            stable_version: "v1".into(),
            canary_version: "v2".into(),
            rollout_id: "conformance".into(),
            sticky_key: None,
            ..Default::default()
        }
    }

    fn state(index: u64, services: Vec<ServiceTraffic>) -> DesiredState {
        DesiredState {
            generation: Generation { term: 7, index },
            services,
        }
    }

    /// Runs the contract against a fresh `actuator`. `upstreams` must hold at least one
    /// stable and one canary server of the first carried service.
    pub(crate) async fn check<A: TrafficActuator>(actuator: &mut A, upstreams: &Upstreams) {
        let carried = actuator.services();
        assert!(!carried.is_empty(), "an actuator carries some service");
        let unique: HashSet<&String> = carried.iter().collect();
        assert_eq!(
            unique.len(),
            carried.len(),
            "duplicate services: {carried:?}"
        );
        assert!(!carried.iter().any(|s| s == NOT_CARRIED));
        let first = carried[0].as_str();

        // A first state is applied.
        let result = actuator
            .apply(&state(1, vec![traffic(first, 10)]), upstreams)
            .await;
        assert!(result.is_ok(), "first apply: {result:?}");

        // The same traffic at a newer generation changes nothing.
        let result = actuator
            .apply(&state(2, vec![traffic(first, 10)]), upstreams)
            .await;
        assert_eq!(result, Ok(ActuatorOutcome::Unchanged), "same traffic");

        // Other traffic is a change.
        let result = actuator
            .apply(&state(3, vec![traffic(first, 20)]), upstreams)
            .await;
        assert!(
            matches!(result, Ok(ActuatorOutcome::Changed { .. })),
            "new weight: {result:?}"
        );
        assert_eq!(
            actuator.services(),
            carried,
            "services are fixed for the actuator's lifetime"
        );

        // A weight out of range is refused, attributed to the carried service only.
        let result = actuator
            .apply(
                &state(4, vec![traffic(first, 101), traffic(NOT_CARRIED, 5)]),
                upstreams,
            )
            .await;
        let failure = result.expect_err("canary_weight 101 must be refused");
        assert_eq!(failure.services, [first], "{failure:?}");
        assert!(!failure.error.is_empty(), "{failure:?}");

        // The failure left the previous traffic live; services not carried are ignored,
        // even invalid ones.
        let result = actuator
            .apply(
                &state(5, vec![traffic(NOT_CARRIED, 101), traffic(first, 20)]),
                upstreams,
            )
            .await;
        assert_eq!(
            result,
            Ok(ActuatorOutcome::Unchanged),
            "after a failure, the previous traffic is still live"
        );

        // A carried service the state does not mention goes all-stable: a change from 20%.
        let result = actuator
            .apply(&state(6, vec![traffic(NOT_CARRIED, 50)]), upstreams)
            .await;
        assert!(
            matches!(result, Ok(ActuatorOutcome::Changed { .. })),
            "unmentioned service back to stable: {result:?}"
        );
        let result = actuator
            .apply(&state(7, vec![traffic(first, 0)]), upstreams)
            .await;
        assert_eq!(
            result,
            Ok(ActuatorOutcome::Unchanged),
            "weight 0 is the same as not mentioned"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeActuator;
    use super::*;
    use crate::store::{Generation, ServiceTraffic};
    use crate::traffic::{Server, Variant};

    fn desired(services: &[&str]) -> DesiredState {
        DesiredState {
            generation: Generation { term: 1, index: 1 },
            services: services
                .iter()
                .map(|s| ServiceTraffic {
                    service: (*s).to_owned(),
                    canary_weight: 10,
                    stable_version: "v1".into(),
                    canary_version: "v2".into(),
                    rollout_id: "r1".into(),
                    sticky_key: None,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn failures_name_the_desired_carried_services_or_else_all_carried() {
        let carried = ["web".to_owned(), "api".to_owned()];
        let named = ActuatorFailure::attributed(&carried, &desired(&["bot", "api"]), "e".into());
        assert_eq!(named.services, ["api"]);
        assert_eq!(named.error, "e");
        let none = ActuatorFailure::attributed(&carried, &desired(&["bot"]), "e".into());
        assert_eq!(none.services, ["web", "api"]);
        let empty = ActuatorFailure::attributed(&carried, &desired(&[]), "e".into());
        assert_eq!(empty.services, ["web", "api"]);
    }

    #[tokio::test]
    async fn fake_actuator_keeps_the_contract() {
        let upstreams: Upstreams = [Variant::Stable, Variant::Canary]
            .map(|variant| {
                let server = Server {
                    name: format!("web-{variant:?}"),
                    address: "127.0.0.1:9".into(),
                    variant,
                };
                ("web".to_owned(), server)
            })
            .into_iter()
            .collect();
        conformance::check(&mut FakeActuator::new(&["web", "api"]), &upstreams).await;
    }
}
