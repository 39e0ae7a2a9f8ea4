//! The set of traffic actuators an agent can drive, chosen by its config: [`Balancer`].
//!
//! Why an enum rather than a boxed registry (`Box<dyn TrafficActuator>`): the set is closed
//! and compiled in (every balancer lives in this crate, each with its own settings section),
//! so nothing needs registering at run time; [`TrafficActuator::apply`] returns
//! `impl Future`, which is not object-safe without boxing every apply's future; and an
//! exhaustive `match` makes a new balancer a compile error at each place that has to handle
//! it, instead of a lookup that can miss at run time. The runtime holds one
//! `Option<Balancer>` (none on a host that carries no traffic) and never names a concrete
//! actuator except where it builds it from its config section.
//!
//! Adding a balancer: a variant here wrapping its actuator, its arms in the matches below
//! and in [`Balancer::kind`], its settings section in `config` (exactly one balancer
//! section per agent), and its construction in the runtime's start. It must pass
//! `actuator::conformance::check` like the others (nginx and HAProxy do, against the real
//! programs).

use crate::actuator::{ActuatorFailure, ActuatorOutcome, TrafficActuator};
use std::time::Duration;

use crate::haproxy::HaproxyActuator;
use crate::nginx::NginxActuator;
use crate::store::DesiredState;
use crate::traffic::Upstreams;

/// One of the traffic actuators, as chosen by the agent's config.
#[derive(Debug)]
pub enum Balancer {
    /// `[nginx]`: a local nginx, driven by a rendered site file and reloads.
    Nginx(NginxActuator),
    /// `[haproxy]`: a local HAProxy, driven through its runtime API (weights, server slots)
    /// and reloaded only for structural changes.
    Haproxy(HaproxyActuator),
}

impl Balancer {
    /// The balancer's kind, as named in the config: `"nginx"` or `"haproxy"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Balancer::Nginx(_) => "nginx",
            Balancer::Haproxy(_) => "haproxy",
        }
    }
}

/// Dispatches to the wrapped actuator, which keeps the contract itself.
impl TrafficActuator for Balancer {
    fn services(&self) -> Vec<String> {
        match self {
            Balancer::Nginx(nginx) => nginx.services(),
            Balancer::Haproxy(haproxy) => haproxy.services(),
        }
    }

    fn resync_interval(&self) -> Option<Duration> {
        match self {
            Balancer::Nginx(nginx) => nginx.resync_interval(),
            Balancer::Haproxy(haproxy) => haproxy.resync_interval(),
        }
    }

    fn min_change_interval(&self) -> Option<Duration> {
        match self {
            Balancer::Nginx(nginx) => nginx.min_change_interval(),
            Balancer::Haproxy(haproxy) => haproxy.min_change_interval(),
        }
    }

    async fn apply(
        &mut self,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> Result<ActuatorOutcome, ActuatorFailure> {
        match self {
            Balancer::Nginx(nginx) => nginx.apply(desired, upstreams).await,
            Balancer::Haproxy(haproxy) => haproxy.apply(desired, upstreams).await,
        }
    }
}
