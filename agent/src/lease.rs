//! The canary lease, pure: when an agent has had no session with a leader for
//! `canary_lease.after` while its last desired state runs a canary, it either holds that
//! state or reverts this host to stable (`canary_lease.on_expiry`, docs/agent.md).
//!
//! Why: a canary is an experiment the leader watches. Without a leader nobody measures it,
//! rolls it back or promotes it; an operator who cannot reach the coordinator may prefer
//! that the untested version stops taking traffic (`revert`, the default) or that nothing
//! moves without a decision (`hold`). Either way the agent says so in its log at once, and
//! tells the next leader it reaches (`Register.lease_expired`), which records an event in
//! the rollout's history.
//!
//! This module holds the decisions, with time passed in:
//! - [`LeaseClock`]: when the lease expires. It runs from the agent's start and from every
//!   end of a leader session, is cleared by a session that registered with a leader (its
//!   coordinator sent a desired state: a `NotLeader` answer is no leader), and expires once
//!   per outage.
//! - [`canary_services`]: whether a desired state runs a canary, and which services: a
//!   canary share above 0 or a canary workload, of a canary version that is not the stable
//!   one (after a weighted promotion, before it settles, the canary carries 100% of a version
//!   that already is the stable one: nothing to revert).
//! - [`stable_only_traffic`] and [`stable_only_workloads`]: the "stable-only" state a revert
//!   applies, derived from the last one: what a rollback would leave on this host. Traffic:
//!   canary share 0, no sticky split, no variant override (the balancer sends everything to
//!   the stable servers). Workloads: an instance declared canary that runs the canary (the
//!   weighted model) runs nothing; an instance declared stable that runs the canary in place
//!   (the hosts model) runs the service's stable version as stable. A sharded service's
//!   workloads are left as they are: moving shards between bots needs the leader's two-step
//!   handover (no shard may be served twice), so the agent cannot do it alone; its traffic
//!   share is set to 0 like any other.
//!
//! The reverted state keeps the generation it was derived from: it never goes ahead of the
//! coordinator, and the applier re-applies the coordinator's state of that same generation
//! when a leader sends it again (`runtime::applier`).

use std::time::Duration;

use serin_proto::v1 as pb;
use tokio::time::Instant;

use crate::config::InstanceConfig;
use crate::store::DesiredState;
use crate::traffic::Variant;

/// When the canary lease expires: `after` without a leader session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseClock {
    after: Duration,
    /// Since when no session with a leader is registered; `None` while one is.
    lost_since: Option<Instant>,
    /// Whether the lease already expired in this outage (it expires once per outage).
    expired: bool,
}

impl LeaseClock {
    /// A clock for a lease of `after`, started at `now` (an agent starts without a leader).
    pub fn new(after: Duration, now: Instant) -> LeaseClock {
        LeaseClock {
            after,
            lost_since: Some(now),
            expired: false,
        }
    }

    /// A session registered with a leader: the lease holds again.
    pub fn leader_registered(&mut self) {
        self.lost_since = None;
        self.expired = false;
    }

    /// The leader session ended at `now`; an outage already running keeps its start.
    pub fn leader_lost(&mut self, now: Instant) {
        self.lost_since.get_or_insert(now);
    }

    /// When the lease expires, while no leader is registered and it has not expired yet.
    pub fn deadline(&self) -> Option<Instant> {
        if self.expired {
            return None;
        }
        self.lost_since.map(|since| since + self.after)
    }

    /// How long the agent has been without a leader at `now`, if it is.
    pub fn without_leader(&self, now: Instant) -> Option<Duration> {
        self.lost_since
            .map(|since| now.saturating_duration_since(since))
    }

    /// `true` exactly once per outage: at the first `now` at or after the deadline.
    pub fn poll(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(deadline) if now >= deadline => {
                self.expired = true;
                true
            }
            _ => false,
        }
    }
}

/// One service in a canary, as an expiry names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CanaryService {
    pub service: String,
    /// The rollout of the desired state; empty when it names none.
    pub rollout_id: String,
    /// The canary share, in percent.
    pub canary_weight: u32,
}

impl From<CanaryService> for pb::LeaseService {
    fn from(s: CanaryService) -> Self {
        pb::LeaseService {
            service: s.service,
            rollout_id: s.rollout_id,
            canary_weight: s.canary_weight,
        }
    }
}

/// Whether a service's canary version differs from its stable one (an empty canary version
/// with a share is still a canary: the versions are unknown, not equal).
fn distinct_canary(stable_version: &str, canary_version: &str) -> bool {
    canary_version.is_empty() || canary_version != stable_version
}

/// The services a canary runs in: those `traffic` gives a canary share, and those whose
/// `workloads` run a canary version (see the module doc); sorted by service, each once.
pub fn canary_services(
    traffic: Option<&DesiredState>,
    workloads: Option<&pb::DesiredState>,
) -> Vec<CanaryService> {
    let mut out: Vec<CanaryService> = Vec::new();
    for s in traffic.into_iter().flat_map(|d| &d.services) {
        if s.canary_weight > 0 && distinct_canary(&s.stable_version, &s.canary_version) {
            out.push(CanaryService {
                service: s.service.clone(),
                rollout_id: s.rollout_id.clone(),
                canary_weight: s.canary_weight,
            });
        }
    }
    for s in workloads.into_iter().flat_map(|d| &d.services) {
        if out.iter().any(|c| c.service == s.service) {
            continue;
        }
        let runs_canary = s.deploy.is_some()
            && s.workloads.iter().any(|w| {
                w.variant == pb::Variant::Canary as i32
                    && !w.version.is_empty()
                    && w.version != s.stable_version
            });
        if runs_canary {
            out.push(CanaryService {
                service: s.service.clone(),
                rollout_id: s.rollout_id.clone(),
                canary_weight: s.canary_weight,
            });
        }
    }
    out.sort();
    out
}

/// `desired` with the stable side carrying all traffic: canary share 0, no sticky split, no
/// variant override; the generation and the servers are kept.
pub fn stable_only_traffic(desired: &DesiredState) -> DesiredState {
    let mut out = desired.clone();
    for s in &mut out.services {
        s.canary_weight = 0;
        s.sticky_key = None;
        s.override_header = None;
        s.override_cookie = None;
    }
    out
}

/// `desired` with what a rollback would leave running on this host's managed `instances`
/// (see the module doc), traffic made stable-only as by [`stable_only_traffic`].
pub fn stable_only_workloads(
    desired: &pb::DesiredState,
    instances: &[InstanceConfig],
) -> pb::DesiredState {
    let mut out = desired.clone();
    for s in &mut out.services {
        s.canary_weight = 0;
        s.sticky_key.clear();
        s.override_header.clear();
        s.override_cookie.clear();
        let sharded = s.deploy.as_ref().is_some_and(|d| d.shard_count > 0);
        if sharded {
            continue;
        }
        for w in &mut s.workloads {
            if w.variant != pb::Variant::Canary as i32 || w.version.is_empty() {
                continue;
            }
            let declared = instances
                .iter()
                .find(|i| i.name == w.instance && i.service == s.service)
                .map(|i| i.variant);
            match declared {
                Some(Variant::Stable) if !s.stable_version.is_empty() => {
                    w.version.clone_from(&s.stable_version);
                    w.variant = pb::Variant::Stable as i32;
                }
                _ => w.version.clear(),
            }
        }
    }
    out
}

/// The services as a log line: `web 10% (rollout web-3), api 5%`.
pub fn describe(services: &[CanaryService]) -> String {
    services
        .iter()
        .map(|s| {
            if s.rollout_id.is_empty() {
                format!("{} {}%", s.service, s.canary_weight)
            } else {
                format!(
                    "{} {}% (rollout {})",
                    s.service, s.canary_weight, s.rollout_id
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::MetricNames;
    use crate::store::{Generation, ServiceTraffic};

    const AFTER: Duration = Duration::from_secs(300);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_lease_expires_after_the_agent_started_without_a_leader() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::new(AFTER, t0);
        assert_eq!(clock.deadline(), Some(t0 + AFTER));
        assert!(!clock.poll(t0));
        assert!(!clock.poll(t0 + AFTER - Duration::from_millis(1)));
        assert!(clock.poll(t0 + AFTER));
        assert_eq!(clock.without_leader(t0 + AFTER), Some(AFTER));
    }

    #[test]
    fn the_lease_expires_once_per_outage() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::new(AFTER, t0);
        assert!(clock.poll(t0 + AFTER + secs(10)));
        assert_eq!(clock.deadline(), None);
        assert!(!clock.poll(t0 + AFTER + secs(11)));
        assert!(!clock.poll(t0 + 10 * AFTER));
        // Losing the leader again while expired starts no second expiry.
        clock.leader_lost(t0 + 10 * AFTER);
        assert!(!clock.poll(t0 + 20 * AFTER));
    }

    #[test]
    fn a_leader_session_holds_the_lease_and_its_end_starts_the_clock_again() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::new(AFTER, t0);
        clock.leader_registered();
        assert_eq!(clock.deadline(), None);
        assert_eq!(clock.without_leader(t0 + secs(1)), None);
        assert!(!clock.poll(t0 + 100 * AFTER));
        let lost = t0 + secs(1000);
        clock.leader_lost(lost);
        assert_eq!(clock.deadline(), Some(lost + AFTER));
        assert!(!clock.poll(lost + AFTER - secs(1)));
        assert!(clock.poll(lost + AFTER));
        // After an expiry, a leader re-arms the lease for the next outage.
        clock.leader_registered();
        let again = lost + secs(5000);
        clock.leader_lost(again);
        assert!(clock.poll(again + AFTER));
    }

    #[test]
    fn an_outage_keeps_its_start_when_told_twice() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::new(AFTER, t0);
        clock.leader_registered();
        clock.leader_lost(t0 + secs(10));
        clock.leader_lost(t0 + secs(200));
        assert_eq!(clock.deadline(), Some(t0 + secs(10) + AFTER));
    }

    #[test]
    fn a_short_leader_session_resets_the_outage() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::new(AFTER, t0);
        clock.leader_registered();
        clock.leader_lost(t0 + secs(299));
        assert!(!clock.poll(t0 + secs(300)));
        assert!(clock.poll(t0 + secs(599)));
    }

    fn service(name: &str, weight: u32, stable: &str, canary: &str) -> ServiceTraffic {
        ServiceTraffic {
            service: name.into(),
            canary_weight: weight,
            stable_version: stable.into(),
            canary_version: canary.into(),
            rollout_id: format!("{name}-1"),
            sticky_key: Some("$cookie_uid".into()),
            override_header: Some("X-Serin-Variant".into()),
            override_cookie: Some("serin_variant".into()),
            ..ServiceTraffic::default()
        }
    }

    fn state(services: Vec<ServiceTraffic>) -> DesiredState {
        DesiredState {
            generation: Generation { term: 3, index: 42 },
            services,
        }
    }

    #[test]
    fn a_canary_share_of_another_version_is_a_canary() {
        let d = state(vec![
            service("web", 10, "v1", "v2"),
            service("api", 0, "v1", "v2"),
            // Promoted, not settled: the canary carries all of the version now stable.
            service("batch", 100, "v2", "v2"),
            service("odd", 5, "v1", ""),
        ]);
        let found = canary_services(Some(&d), None);
        assert_eq!(
            found,
            [
                CanaryService {
                    service: "odd".into(),
                    rollout_id: "odd-1".into(),
                    canary_weight: 5
                },
                CanaryService {
                    service: "web".into(),
                    rollout_id: "web-1".into(),
                    canary_weight: 10
                },
            ]
        );
        assert_eq!(
            describe(&found),
            "odd 5% (rollout odd-1), web 10% (rollout web-1)"
        );
        assert!(canary_services(None, None).is_empty());
        assert!(
            canary_services(Some(&state(vec![service("api", 0, "v1", "v2")])), None).is_empty()
        );
    }

    fn workload(instance: &str, version: &str, variant: pb::Variant) -> pb::Workload {
        pb::Workload {
            instance: instance.into(),
            version: version.into(),
            variant: variant as i32,
            shards: vec![],
        }
    }

    fn deployed(
        name: &str,
        weight: u32,
        shard_count: u32,
        workloads: Vec<pb::Workload>,
    ) -> pb::ServiceTraffic {
        pb::ServiceTraffic {
            service: name.into(),
            canary_weight: weight,
            stable_version: "v1".into(),
            canary_version: "v2".into(),
            rollout_id: format!("{name}-1"),
            sticky_key: "$cookie_uid".into(),
            override_header: "X-Serin-Variant".into(),
            override_cookie: "serin_variant".into(),
            workloads,
            deploy: Some(pb::DeploySpec {
                shard_count,
                ..pb::DeploySpec::default()
            }),
            ..pb::ServiceTraffic::default()
        }
    }

    fn wire(services: Vec<pb::ServiceTraffic>) -> pb::DesiredState {
        pb::DesiredState {
            generation: Some(pb::Generation { term: 3, index: 42 }),
            services,
        }
    }

    fn instance(name: &str, service: &str, variant: Variant) -> InstanceConfig {
        InstanceConfig {
            name: name.into(),
            service: service.into(),
            variant,
            address: "127.0.0.1:1".into(),
            metrics_url: "http://127.0.0.1:1/metrics".into(),
            metrics: MetricNames::default(),
            version: None,
            managed: true,
        }
    }

    #[test]
    fn a_canary_workload_is_a_canary_even_at_a_zero_share() {
        let w = wire(vec![
            deployed(
                "hosts",
                0,
                0,
                vec![workload("h-1", "v2", pb::Variant::Canary)],
            ),
            deployed("idle", 0, 0, vec![workload("i-1", "", pb::Variant::Canary)]),
            deployed(
                "plain",
                0,
                0,
                vec![workload("p-1", "v1", pb::Variant::Stable)],
            ),
        ]);
        let found = canary_services(None, Some(&w));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].service, "hosts");
        // A service named by its traffic is named once.
        let t = state(vec![service("hosts", 20, "v1", "v2")]);
        let found = canary_services(Some(&t), Some(&w));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].canary_weight, 20);
        // Workloads without a deploy spec are never serin's.
        let mut undeployed = w.clone();
        undeployed.services[0].deploy = None;
        assert!(canary_services(None, Some(&undeployed)).is_empty());
    }

    #[test]
    fn stable_only_traffic_sends_everything_to_stable_and_keeps_the_rest() {
        let mut d = state(vec![
            service("web", 10, "v1", "v2"),
            service("api", 0, "v1", ""),
        ]);
        d.services[0].from_inventory = true;
        let stable = stable_only_traffic(&d);
        assert_eq!(stable.generation, d.generation);
        assert_eq!(stable.services.len(), 2);
        for (s, before) in stable.services.iter().zip(&d.services) {
            assert_eq!(s.canary_weight, 0);
            assert_eq!(s.sticky_key, None);
            assert_eq!(s.override_header, None);
            assert_eq!(s.override_cookie, None);
            assert_eq!(
                (
                    &s.service,
                    &s.stable_version,
                    &s.canary_version,
                    &s.rollout_id
                ),
                (
                    &before.service,
                    &before.stable_version,
                    &before.canary_version,
                    &before.rollout_id
                )
            );
            assert_eq!(
                (&s.servers, s.from_inventory),
                (&before.servers, before.from_inventory)
            );
        }
        assert!(canary_services(Some(&stable), None).is_empty());
        // Idempotent.
        assert_eq!(stable_only_traffic(&stable), stable);
    }

    #[test]
    fn stable_only_workloads_leave_what_a_rollback_would() {
        let instances = [
            instance("w-stable", "weighted", Variant::Stable),
            instance("w-canary", "weighted", Variant::Canary),
            instance("h-1", "hosts", Variant::Stable),
            instance("h-2", "hosts", Variant::Stable),
            instance("b-canary", "bots", Variant::Canary),
        ];
        let w = wire(vec![
            deployed(
                "weighted",
                10,
                0,
                vec![
                    workload("w-stable", "v1", pb::Variant::Stable),
                    workload("w-canary", "v2", pb::Variant::Canary),
                ],
            ),
            deployed(
                "hosts",
                50,
                0,
                vec![
                    workload("h-1", "v2", pb::Variant::Canary),
                    workload("h-2", "v1", pb::Variant::Stable),
                ],
            ),
            deployed(
                "bots",
                25,
                16,
                vec![workload("b-canary", "v2", pb::Variant::Canary)],
            ),
        ]);
        let stable = stable_only_workloads(&w, &instances);
        assert_eq!(stable.generation, w.generation);
        let of = |service: &str| {
            stable
                .services
                .iter()
                .find(|s| s.service == service)
                .expect("service kept")
                .workloads
                .iter()
                .map(|w| (w.instance.as_str(), w.version.as_str(), w.variant))
                .collect::<Vec<_>>()
        };
        let (s, c) = (pb::Variant::Stable as i32, pb::Variant::Canary as i32);
        // Weighted: the canary instance runs nothing, the stable one is untouched.
        assert_eq!(of("weighted"), [("w-stable", "v1", s), ("w-canary", "", c)]);
        // Hosts: the instance running the canary in place gets the stable version back.
        assert_eq!(of("hosts"), [("h-1", "v1", s), ("h-2", "v1", s)]);
        // Shards: held, the leader's handover moves shards.
        assert_eq!(of("bots"), [("b-canary", "v2", c)]);
        for s in &stable.services {
            assert_eq!(s.canary_weight, 0, "{}", s.service);
            assert!(s.sticky_key.is_empty() && s.override_header.is_empty());
            assert!(s.override_cookie.is_empty());
            assert!(s.deploy.is_some());
        }
        // Only the sharded service still runs a canary workload.
        let left = canary_services(None, Some(&stable));
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].service, "bots");
        assert_eq!(stable_only_workloads(&stable, &instances), stable);
    }

    #[test]
    fn a_canary_workload_of_an_unknown_instance_or_without_a_stable_version_runs_nothing() {
        let mut w = wire(vec![deployed(
            "hosts",
            50,
            0,
            vec![
                workload("gone", "v2", pb::Variant::Canary),
                workload("h-1", "v2", pb::Variant::Canary),
            ],
        )]);
        w.services[0].stable_version.clear();
        let stable = stable_only_workloads(&w, &[instance("h-1", "hosts", Variant::Stable)]);
        let versions: Vec<&str> = stable.services[0]
            .workloads
            .iter()
            .map(|w| w.version.as_str())
            .collect();
        assert_eq!(versions, ["", ""]);
    }
}
