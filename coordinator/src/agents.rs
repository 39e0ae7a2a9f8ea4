//! Connected agents: what they serve, what they applied, and the channel to push desired state.
//!
//! Agent sessions are soft state held by the leader. Desired state is derived from the
//! replicated [`Registry`]: each agent gets the traffic plans of the services it hosts, versioned
//! by the newest of their generations, and only when that generation is newer than what was last
//! sent on the current session.
//!
//! Costs are bounded by what changed, never by the fleet: a new session pushes to that agent
//! only, and a change of the registry pushes only to the agents of the services whose traffic
//! generation changed (found through a service → agents index). The first release recomputed
//! every agent's desired state on every connect, so connecting N agents cost O(N²): 10,000
//! simulated agents took 25-29 s to connect (benches/fleet_sim.rs measures it now).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serin_proto::v1::{
    self, CoordinatorMessage, DesiredState, ServiceTraffic, coordinator_message::Body,
};
use tokio::sync::mpsc;

use crate::rollout::{Generation, Millis, Registry};

mod workloads;
pub use workloads::{DeployPlans, DeployProgress, deploy_of, spec_to_wire};

/// The channel to one agent's stream.
pub type AgentSender = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

/// How long a disconnected agent stays in the list by default.
pub const FORGET_DISCONNECTED_AFTER: Duration = Duration::from_secs(3600);

/// What the coordinator knows of one agent.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Local app instances.
    pub targets: Vec<v1::Target>,
    /// Services whose traffic its load balancer carries.
    pub balancer_services: Vec<String>,
    /// Whether a session is open.
    pub connected: bool,
    /// The last generation it applied in full.
    pub applied: Option<Generation>,
    /// The last apply error it reported, if any.
    pub last_error: Option<String>,
    /// When its last report arrived.
    pub last_report: Option<Millis>,
}

impl AgentInfo {
    /// Every service the agent hosts an instance of or balances.
    pub fn services(&self) -> BTreeSet<String> {
        self.targets
            .iter()
            .map(|t| t.service.clone())
            .chain(self.balancer_services.iter().cloned())
            .collect()
    }
}

/// Who is opening a session, beyond its [`AgentInfo`].
#[derive(Debug, Clone, Default)]
pub struct SessionOrigin {
    /// The agent's per-data-directory id (empty from agents that do not send one).
    pub instance_id: String,
    /// The peer's address as seen by the server, for error messages.
    pub peer: String,
}

/// Why a session was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectError {
    /// Another agent with the same name (a different instance id) is connected.
    #[error(
        "an agent named '{agent}' is already connected from {peer}; give each agent a unique `name` in its config (or stop the other one)"
    )]
    NameTaken {
        /// The name.
        agent: String,
        /// Where the connected one is.
        peer: String,
    },
    /// An instance address another connected agent already declared.
    #[error(
        "agent '{agent}' declares instance address {address}, which agent '{other}' already declares; each instance must be declared (and scraped) by exactly one agent"
    )]
    AddressTaken {
        /// The address.
        address: String,
        /// The agent refused.
        agent: String,
        /// The agent that declared it first.
        other: String,
    },
}

/// Why `forget` refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForgetError {
    /// No such agent.
    #[error("no agent named '{0}' is known to this coordinator")]
    Unknown(String),
    /// It is connected; forgetting it would be undone by its next report.
    #[error("agent '{0}' is connected; stop it first, then forget it")]
    Connected(String),
}

/// One failed service on one agent.
#[derive(Debug, Clone, PartialEq)]
struct Failure {
    generation: Generation,
    error: String,
    since: Millis,
}

/// An agent that carries a service and has not applied its current traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Lagging {
    /// The agent.
    pub agent: String,
    /// Whether its session is open.
    pub connected: bool,
    /// The error it reported for this service, if it failed.
    pub error: Option<String>,
    /// Since when: the first failure, else when the change was sent, else when it disconnected.
    pub since: Option<Millis>,
}

/// How far the agents that carry a service are with its current traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyStatus {
    /// Agents (connected or not, not yet forgotten) that host or balance the service.
    pub carrying: usize,
    /// Of those, the ones that applied the generation.
    pub applied: usize,
    /// The others, by name.
    pub lagging: Vec<Lagging>,
}

impl ApplyStatus {
    /// True when every agent that carries the service applied its current traffic.
    pub fn complete(&self) -> bool {
        self.lagging.is_empty()
    }
}

struct Entry {
    info: AgentInfo,
    origin: SessionOrigin,
    session: u64,
    sender: Option<AgentSender>,
    last_sent: Option<(Generation, Millis)>,
    /// The latest acknowledged generation, with or without failures.
    acked: Option<Generation>,
    /// Services that failed in the latest acknowledgement.
    failures: HashMap<String, Failure>,
    disconnected_at: Option<Millis>,
    /// instance name → (since when its scrapes fail, when it was last scraped fine).
    scrape_health: HashMap<String, (Option<Millis>, Option<Millis>)>,
    /// The report interval its latest report declared.
    report_interval: Option<Millis>,
    /// What runs behind its managed instances, from its latest report.
    workloads: Vec<v1::WorkloadStatus>,
}

impl Entry {
    fn has_applied(&self, service: &str, generation: Generation) -> bool {
        self.acked.is_some_and(|a| a >= generation) && !self.failures.contains_key(service)
    }
}

/// How long a connected agent may go without a report before its instances count as unhealthy:
/// three of its report intervals, and never less than 1.5 s (a report can be late by a
/// scrape's timeout on a busy host).
pub fn silent_after(report_interval: Millis) -> Millis {
    (3 * report_interval).max(1500)
}

/// All agents seen by this leader and not yet forgotten.
#[derive(Default)]
pub struct AgentRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    agents: BTreeMap<String, Entry>,
    /// service → the agents that host or balance it.
    by_service: HashMap<String, BTreeSet<String>>,
    /// service → the traffic generation last fanned out to its agents.
    pushed: HashMap<String, Generation>,
    /// Agents whose last send found a full channel, to try again.
    retry: BTreeSet<String>,
    /// instance address → the agent that declared it.
    by_address: HashMap<String, String>,
    next_session: u64,
}

impl Inner {
    fn index(&mut self, name: &str, services: &BTreeSet<String>) {
        for service in services {
            self.by_service
                .entry(service.clone())
                .or_default()
                .insert(name.to_owned());
        }
    }

    fn unindex(&mut self, name: &str, services: &BTreeSet<String>) {
        for service in services {
            if let Some(agents) = self.by_service.get_mut(service) {
                agents.remove(name);
                if agents.is_empty() {
                    self.by_service.remove(service);
                }
            }
        }
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let entry = self.agents.remove(name)?;
        self.unindex(name, &entry.info.services());
        for t in &entry.info.targets {
            if self.by_address.get(&t.address).is_some_and(|a| a == name) {
                self.by_address.remove(&t.address);
            }
        }
        self.retry.remove(name);
        Some(entry)
    }

    /// Sends `name` its desired state if it is newer than what this session was sent.
    fn push_to(&mut self, name: &str, registry: &Registry, plans: &DeployPlans, now: Millis) {
        let Some(entry) = self.agents.get(name) else {
            return;
        };
        let mut own;
        let plans = if plans.is_empty() {
            own = DeployPlans::default();
            self.plan(registry, &entry.info.services(), &mut own);
            &own
        } else {
            plans
        };
        let Some(entry) = self.agents.get_mut(name) else {
            return;
        };
        let Some(sender) = &entry.sender else {
            return;
        };
        let desired = desired_state(
            registry,
            &entry.info.services(),
            &entry.info.balancer_services,
            plans,
            name,
        );
        let generation = generation_of(&desired);
        if entry.last_sent.is_some_and(|(sent, _)| sent >= generation) {
            self.retry.remove(name);
            return;
        }
        let message = CoordinatorMessage {
            body: Some(Body::Desired(desired)),
        };
        match sender.try_send(Ok(message)) {
            Ok(()) => {
                entry.last_sent = Some((generation, now));
                self.retry.remove(name);
            }
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "could not queue desired state; will retry");
                self.retry.insert(name.to_owned());
            }
        }
    }
}

/// Which kinds of agents serve a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coverage {
    /// A connected agent balances its traffic.
    pub balancer: bool,
    /// A connected agent hosts a stable instance.
    pub stable: bool,
    /// A connected agent hosts a canary instance.
    pub canary: bool,
    /// A connected agent hosts an instance serin deploys (`managed`).
    pub managed: bool,
    /// A connected agent hosts a managed instance declared stable.
    pub managed_stable: bool,
    /// A connected agent hosts a managed instance declared canary.
    pub managed_canary: bool,
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Only plain data is mutated under this lock; a panic elsewhere leaves it consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session for `info` and sends it its desired state from `registry`; returns the
    /// session number to pass to [`AgentRegistry::disconnect`].
    ///
    /// A session of the same name replaces the older one when it comes from the same agent
    /// (the same instance id: a restart, or a reconnect the server has not noticed yet). While a
    /// different agent of that name is connected, the new one is refused: two agents summed
    /// under one name would corrupt every count.
    pub fn connect(
        &self,
        mut info: AgentInfo,
        origin: SessionOrigin,
        sender: AgentSender,
        registry: &Registry,
        now: Millis,
    ) -> Result<u64, ConnectError> {
        let mut inner = self.lock();
        if let Some(previous) = inner.agents.get(&info.name)
            && previous.info.connected
        {
            let same_agent = origin.instance_id.is_empty()
                || previous.origin.instance_id.is_empty()
                || previous.origin.instance_id == origin.instance_id;
            if !same_agent {
                return Err(ConnectError::NameTaken {
                    agent: info.name.clone(),
                    peer: previous.origin.peer.clone(),
                });
            }
            tracing::warn!(agent = %info.name, "agent reconnected; closing its previous session");
        }
        for t in &info.targets {
            if let Some(other) = inner.by_address.get(&t.address)
                && other != &info.name
                && inner.agents.get(other).is_some_and(|e| e.info.connected)
            {
                return Err(ConnectError::AddressTaken {
                    address: t.address.clone(),
                    agent: info.name.clone(),
                    other: other.clone(),
                });
            }
        }
        let targets = info.targets.clone();
        inner.next_session += 1;
        let session = inner.next_session;
        info.connected = true;
        let acked = info.applied;
        let name = info.name.clone();
        inner.remove(&name);
        inner.index(&name, &info.services());
        inner.agents.insert(
            name.clone(),
            Entry {
                info,
                origin,
                session,
                sender: Some(sender),
                last_sent: None,
                acked,
                failures: HashMap::new(),
                disconnected_at: None,
                scrape_health: HashMap::new(),
                report_interval: None,
                workloads: Vec::new(),
            },
        );
        for t in &targets {
            inner.by_address.insert(t.address.clone(), name.clone());
        }
        inner.push_to(&name, registry, &DeployPlans::default(), now);
        Ok(session)
    }

    /// Closes a session (no-op when a newer session replaced it).
    pub fn disconnect(&self, name: &str, session: u64, now: Millis) {
        let mut inner = self.lock();
        if let Some(entry) = inner.agents.get_mut(name)
            && entry.session == session
        {
            entry.sender = None;
            entry.info.connected = false;
            entry.disconnected_at = Some(now);
            inner.retry.remove(name);
        }
    }

    /// Notes that a report arrived, covering `interval` milliseconds (its `interval_ms`).
    pub fn reported(
        &self,
        name: &str,
        at: Millis,
        interval: Millis,
        scrapes: &[(String, bool)],
        workloads: Vec<v1::WorkloadStatus>,
    ) {
        if let Some(entry) = self.lock().agents.get_mut(name) {
            entry.workloads = workloads;
            entry.info.last_report = Some(at);
            entry.report_interval = Some(interval);
            for (instance, ok) in scrapes {
                let health = entry.scrape_health.entry(instance.clone()).or_default();
                if *ok {
                    *health = (None, Some(at));
                } else if health.0.is_none() {
                    health.0 = Some(at);
                }
            }
        }
    }

    /// The inventory's instances of `service`: every known agent's targets of it, with health.
    ///
    /// An instance whose agent is connected but has sent no report for [`silent_after`] of
    /// its report interval is unhealthy since its agent's last report: a host cut off from the
    /// network keeps its session open until the HTTP/2 keepalive gives up (15 s), and its
    /// instances should not wait for that to leave the upstreams.
    pub fn instances(&self, service: &str, now: Millis) -> Vec<crate::inventory::Instance> {
        let inner = self.lock();
        let mut out = Vec::new();
        for name in inner.by_service.get(service).into_iter().flatten() {
            let Some(entry) = inner.agents.get(name) else {
                continue;
            };
            for t in entry.info.targets.iter().filter(|t| t.service == service) {
                let (failing_since, last_ok) = entry
                    .scrape_health
                    .get(&t.name)
                    .copied()
                    .unwrap_or((None, None));
                let silent = entry.info.connected
                    && entry.info.last_report.is_some_and(|last| {
                        now - last > silent_after(entry.report_interval.unwrap_or(1000))
                    });
                let unhealthy_since = if !entry.info.connected {
                    entry.disconnected_at
                } else if silent {
                    match (failing_since, entry.info.last_report) {
                        (Some(f), Some(r)) => Some(f.min(r)),
                        (f, r) => f.or(r),
                    }
                } else {
                    failing_since
                };
                out.push(crate::inventory::Instance {
                    name: t.name.clone(),
                    agent: name.clone(),
                    address: t.address.clone(),
                    variant: if t.variant == v1::Variant::Canary as i32 {
                        crate::metrics::Side::Canary
                    } else {
                        crate::metrics::Side::Stable
                    },
                    connected: entry.info.connected,
                    silent,
                    unhealthy_since,
                    last_healthy: last_ok,
                    version: Some(t.version.clone()).filter(|v| !v.is_empty()),
                });
            }
        }
        out
    }

    /// Every service some known agent hosts or balances.
    pub fn known_services(&self) -> BTreeSet<String> {
        self.lock().by_service.keys().cloned().collect()
    }

    /// The agents whose load balancer carries `service`: (agent, connected, applied
    /// `generation`, its apply error for the service).
    pub fn balancers_of(
        &self,
        service: &str,
        generation: Generation,
    ) -> Vec<(String, bool, bool, Option<String>)> {
        let inner = self.lock();
        inner
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| inner.agents.get(name).map(|e| (name, e)))
            .filter(|(_, e)| e.info.balancer_services.iter().any(|s| s == service))
            .map(|(name, e)| {
                (
                    name.clone(),
                    e.info.connected,
                    e.has_applied(service, generation),
                    e.failures.get(service).map(|f| f.error.clone()),
                )
            })
            .collect()
    }

    /// Services some connected agent's load balancer carries.
    pub fn balanced_services(&self) -> BTreeSet<String> {
        self.lock()
            .agents
            .values()
            .filter(|e| e.info.connected)
            .flat_map(|e| e.info.balancer_services.iter().cloned())
            .collect()
    }

    /// Records an acknowledgement: `failures` are the services that did not apply, (service,
    /// error); every other service of the agent applied `generation`.
    pub fn acknowledged(
        &self,
        name: &str,
        generation: Generation,
        failures: Vec<(String, String)>,
        now: Millis,
    ) {
        let mut inner = self.lock();
        let Some(entry) = inner.agents.get_mut(name) else {
            return;
        };
        if entry.acked.is_some_and(|a| a > generation) {
            return; // a late ack of an older generation says nothing about the current one
        }
        entry.acked = Some(generation);
        if failures.is_empty() {
            entry.info.applied = Some(generation);
            entry.info.last_error = None;
        } else {
            entry.info.last_error = Some(
                failures
                    .iter()
                    .map(|(s, e)| format!("{s}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        let mut still_failing = HashMap::new();
        for (service, error) in failures {
            let since = entry
                .failures
                .get(&service)
                .map_or(now, |previous| previous.since);
            tracing::warn!(agent = name, %service, %generation, %error, "agent failed to apply");
            still_failing.insert(
                service,
                Failure {
                    generation,
                    error,
                    since,
                },
            );
        }
        entry.failures = still_failing;
    }

    /// Agents that failed to apply `service`'s traffic at `generation` or later: (agent, error).
    pub fn failures(&self, service: &str, generation: Generation) -> Vec<(String, String)> {
        let inner = self.lock();
        let Some(names) = inner.by_service.get(service) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| {
                let entry = inner.agents.get(name)?;
                entry
                    .failures
                    .get(service)
                    .filter(|f| f.generation >= generation)
                    .map(|f| (name.clone(), f.error.clone()))
            })
            .collect()
    }

    /// How far the agents carrying `service` are with its traffic at `generation`.
    pub fn apply_status(&self, service: &str, generation: Generation) -> ApplyStatus {
        let inner = self.lock();
        let mut status = ApplyStatus::default();
        for name in inner.by_service.get(service).into_iter().flatten() {
            let Some(entry) = inner.agents.get(name) else {
                continue;
            };
            status.carrying += 1;
            if entry.has_applied(service, generation) {
                status.applied += 1;
                continue;
            }
            let failure = entry.failures.get(service);
            let sent = entry
                .last_sent
                .filter(|(g, _)| *g >= generation)
                .map(|(_, at)| at);
            status.lagging.push(Lagging {
                agent: name.clone(),
                connected: entry.info.connected,
                error: failure.map(|f| f.error.clone()),
                since: failure.map(|f| f.since).or(if entry.info.connected {
                    sent
                } else {
                    entry.disconnected_at
                }),
            });
        }
        status
    }

    /// Which connected agents serve `service`.
    pub fn coverage(&self, service: &str) -> Coverage {
        let inner = self.lock();
        let mut c = Coverage::default();
        for entry in inner
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| inner.agents.get(name))
            .filter(|e| e.info.connected)
        {
            c.balancer |= entry.info.balancer_services.iter().any(|s| s == service);
            for t in entry.info.targets.iter().filter(|t| t.service == service) {
                c.stable |= t.variant == v1::Variant::Stable as i32;
                c.canary |= t.variant == v1::Variant::Canary as i32;
                c.managed |= t.managed;
                c.managed_stable |= t.managed && t.variant == v1::Variant::Stable as i32;
                c.managed_canary |= t.managed && t.variant == v1::Variant::Canary as i32;
            }
        }
        c
    }

    /// A copy of every agent's info.
    pub fn list(&self) -> Vec<AgentInfo> {
        self.lock()
            .agents
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    /// Forgets an agent that is not connected.
    pub fn forget(&self, name: &str) -> Result<(), ForgetError> {
        let mut inner = self.lock();
        match inner.agents.get(name) {
            None => Err(ForgetError::Unknown(name.to_owned())),
            Some(e) if e.info.connected => Err(ForgetError::Connected(name.to_owned())),
            Some(_) => {
                inner.remove(name);
                tracing::info!(agent = name, "agent forgotten");
                Ok(())
            }
        }
    }

    /// Forgets the agents disconnected for longer than `after`; returns their names.
    pub fn forget_disconnected(&self, after: Duration, now: Millis) -> Vec<String> {
        let mut inner = self.lock();
        let limit = after.as_millis() as Millis;
        let stale: Vec<String> = inner
            .agents
            .iter()
            .filter(|(_, e)| e.disconnected_at.is_some_and(|at| now - at > limit))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &stale {
            inner.remove(name);
            tracing::info!(agent = %name, after = %humantime::format_duration(after), "disconnected agent forgotten");
        }
        stale
    }

    /// How far `service`'s managed instances are from what serin deploys there now
    /// (docs/deploy.md); all empty when serin deploys nothing for it.
    pub fn deploy_progress(&self, registry: &Registry, service: &str) -> DeployProgress {
        self.lock().deploy_progress(registry, service)
    }

    /// The command recording the deploy driver actions the agents reported for `service`'s
    /// latest rollout and its events lack, if any.
    pub fn unrecorded_actions(
        &self,
        registry: &Registry,
        service: &str,
        now: Millis,
    ) -> Option<crate::rollout::Command> {
        self.lock().unrecorded_actions(registry, service, now)
    }

    /// The next step of `service`'s shard handover (docs/deploy.md), from the agents' latest
    /// reports.
    pub fn shard_handover(
        &self,
        registry: &Registry,
        service: &str,
        now: Millis,
    ) -> crate::deploy::Handover {
        self.lock().shard_handover(registry, service, now)
    }

    /// Sends their new desired state to the agents of the services whose traffic changed since
    /// the last call, and retries sends that found a full channel. Costs O(services + agents
    /// concerned), not O(fleet).
    pub fn push_desired(&self, registry: &Registry, now: Millis) {
        let mut inner = self.lock();
        let mut concerned: BTreeSet<String> = std::mem::take(&mut inner.retry);
        for (service, record) in registry.services.iter() {
            if inner.pushed.get(service) == Some(&record.generation) {
                continue;
            }
            inner.pushed.insert(service.clone(), record.generation);
            concerned.extend(inner.by_service.get(service).into_iter().flatten().cloned());
        }
        // Placement is computed once per service here, not once per agent.
        let mut plans = DeployPlans::default();
        let services: BTreeSet<String> = concerned
            .iter()
            .filter_map(|name| inner.agents.get(name))
            .flat_map(|e| e.info.services())
            .collect();
        inner.plan(registry, &services, &mut plans);
        for name in concerned {
            inner.push_to(&name, registry, &plans, now);
        }
    }
}

/// The desired state for an agent hosting `services`.
///
/// For the services in `balanced` (its load balancer carries them) with a committed upstream
/// membership, it also carries the upstream servers, weighted for the current canary share.
pub fn desired_state(
    registry: &Registry,
    services: &BTreeSet<String>,
    balanced: &[String],
    plans: &DeployPlans,
    agent: &str,
) -> DesiredState {
    let mut generation = Generation::default();
    let services = services
        .iter()
        .map(|name| match registry.traffic(name) {
            Some(plan) => {
                generation = generation.max(plan.generation);
                let members = registry
                    .services
                    .get(name)
                    .and_then(|s| s.upstreams.as_ref())
                    .filter(|_| balanced.contains(name));
                let from_inventory = members.is_some();
                let record = registry.services.get(name);
                let mapping = record
                    .map(|r| registry.variant_versions(r))
                    .unwrap_or_default();
                // After an undo, a balancer fed from the inventory routes only to the members
                // that run the pinned version, all on the stable side (docs/fleet.md).
                let pinned = registry.pin(name).and_then(|pin| {
                    let serving = crate::inventory::serving(members?, &pin.version, &pin.mapping);
                    (!serving.is_empty()).then(|| {
                        serving
                            .into_iter()
                            .map(|m| v1::UpstreamServer {
                                instance: m.instance.clone(),
                                address: m.address.clone(),
                                variant: v1::Variant::Stable as i32,
                                weight: 1,
                                agent: m.agent.clone(),
                                version: pin.version.clone(),
                            })
                            .collect::<Vec<_>>()
                    })
                });
                if let Some(servers) = pinned {
                    return ServiceTraffic {
                        service: plan.service,
                        canary_weight: 0,
                        stable_version: plan.stable_version,
                        canary_version: String::new(),
                        rollout_id: String::new(),
                        sticky_key: String::new(),
                        servers,
                        from_inventory,
                        override_header: String::new(),
                        override_cookie: String::new(),
                        workloads: Vec::new(),
                        deploy: None,
                    };
                }
                let upstreams = members.map(|m| {
                    crate::inventory::upstreams(
                        &crate::inventory::members_as_instances(m),
                        plan.canary_weight,
                    )
                });
                // No canary server in the membership: everything goes to stable, and the
                // balancer is told so (the rollout's checks see no canary data: no_data).
                let canary_weight = match &upstreams {
                    Some(u) if u.canary_missing => 0,
                    _ => plan.canary_weight,
                };
                // Every member is sent, so the balancer always knows both sides; a member of
                // the side that gets nothing at this share has weight 0.
                let servers = match (members, upstreams) {
                    (Some(members), Some(u)) => {
                        let weight_of = |address: &str| {
                            u.servers
                                .iter()
                                .find(|s| s.address == address)
                                .map_or(0, |s| s.weight)
                        };
                        members
                            .iter()
                            .map(|m| v1::UpstreamServer {
                                instance: m.instance.clone(),
                                address: m.address.clone(),
                                variant: if m.canary {
                                    v1::Variant::Canary as i32
                                } else {
                                    v1::Variant::Stable as i32
                                },
                                weight: weight_of(&m.address),
                                agent: m.agent.clone(),
                                version: crate::inventory::version_of(m, &mapping)
                                    .unwrap_or_default()
                                    .to_owned(),
                            })
                            .collect()
                    }
                    _ => Vec::new(),
                };
                ServiceTraffic {
                    service: plan.service,
                    canary_weight,
                    stable_version: plan.stable_version,
                    canary_version: plan.canary_version,
                    rollout_id: plan.rollout.map(|r| r.0).unwrap_or_default(),
                    sticky_key: plan.sticky_key.unwrap_or_default(),
                    servers,
                    from_inventory,
                    override_header: plan.override_header.unwrap_or_default(),
                    override_cookie: plan.override_cookie.unwrap_or_default(),
                    workloads: Vec::new(),
                    deploy: None,
                }
            }
            None => ServiceTraffic {
                service: name.clone(),
                ..ServiceTraffic::default()
            },
        })
        .map(|mut traffic: ServiceTraffic| {
            if let Some((spec, workloads)) = plans.for_agent(&traffic.service, agent) {
                traffic.deploy = Some(spec);
                traffic.workloads = workloads;
            }
            traffic
        })
        .collect();
    DesiredState {
        generation: Some(v1::Generation {
            term: generation.term,
            index: generation.index,
        }),
        services,
    }
}

fn generation_of(desired: &DesiredState) -> Generation {
    desired
        .generation
        .map(|g| Generation {
            term: g.term,
            index: g.index,
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Actor, Command, RolloutId};
    use crate::strategy::Strategy;

    fn info(name: &str) -> AgentInfo {
        AgentInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            targets: vec![v1::Target {
                name: "c".into(),
                service: "api".into(),
                variant: v1::Variant::Canary as i32,
                address: format!("{name}.example:80"),
                ..Default::default()
            }],
            balancer_services: vec!["api".into()],
            connected: false,
            applied: None,
            last_error: None,
            last_report: None,
        }
    }

    fn balancer_of(name: &str, service: &str) -> AgentInfo {
        AgentInfo {
            targets: vec![],
            balancer_services: vec![service.into()],
            ..info(name)
        }
    }

    fn origin(id: &str) -> SessionOrigin {
        SessionOrigin {
            instance_id: id.into(),
            peer: format!("10.0.0.1:{}", id.len()),
        }
    }

    fn start(reg: &mut Registry, service: &str, index: u64) {
        reg.apply(
            Command::Start {
                id: RolloutId(format!("{service}-{index}")),
                service: service.into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy: Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap(),
                actor: Actor::Controller,
                at: 0,
            },
            Generation { term: 1, index },
        )
        .unwrap();
    }

    fn registry_at(index: u64) -> Registry {
        let mut reg = Registry::default();
        start(&mut reg, "api", index);
        reg
    }

    type Receiver = mpsc::Receiver<Result<CoordinatorMessage, tonic::Status>>;

    fn received(rx: &mut Receiver) -> Vec<DesiredState> {
        let mut out = vec![];
        while let Ok(Ok(m)) = rx.try_recv() {
            if let Some(Body::Desired(d)) = m.body {
                out.push(d);
            }
        }
        out
    }

    fn connect(agents: &AgentRegistry, info: AgentInfo, reg: &Registry) -> (u64, Receiver) {
        let (tx, rx) = mpsc::channel(8);
        let id = info.name.clone();
        let session = agents.connect(info, origin(&id), tx, reg, 0).unwrap();
        (session, rx)
    }

    const G7: Generation = Generation { term: 1, index: 7 };

    #[test]
    fn a_connected_agent_whose_reports_stop_makes_its_instances_unhealthy_since_its_last_report() {
        let agents = AgentRegistry::default();
        let reg = registry_at(7);
        let (_session, _rx) = connect(&agents, info("a"), &reg);
        let health = |now| {
            let i = agents.instances("api", now).remove(0);
            (i.connected, i.silent, i.unhealthy_since)
        };
        // Connected, no report yet: healthy (it has just connected).
        assert_eq!(health(60_000), (true, false, None));
        agents.reported("a", 10_000, 500, &[("c".into(), true)], Vec::new());
        // Three intervals of 500 ms are under the 1.5 s floor: 1.5 s of silence is allowed.
        assert_eq!(health(11_500), (true, false, None));
        assert_eq!(health(11_501), (true, true, Some(10_000)));
        // A report ends the silence.
        agents.reported("a", 12_000, 500, &[("c".into(), true)], Vec::new());
        assert_eq!(health(12_100), (true, false, None));
        // A slow reporter (10 s interval) may be quiet for 30 s.
        agents.reported("a", 20_000, 10_000, &[("c".into(), true)], Vec::new());
        assert_eq!(health(50_000), (true, false, None));
        assert_eq!(health(50_001), (true, true, Some(20_000)));
        // Failing scrapes before the silence: unhealthy since the first failure.
        agents.reported("a", 60_000, 1000, &[("c".into(), false)], Vec::new());
        assert_eq!(health(60_500), (true, false, Some(60_000)));
        assert_eq!(health(70_000), (true, true, Some(60_000)));
    }

    #[test]
    fn desired_state_is_pushed_once_per_generation() {
        let agents = AgentRegistry::default();
        let reg = registry_at(7);
        let (_, mut rx) = connect(&agents, info("a"), &reg);
        agents.push_desired(&reg, 0);
        agents.push_desired(&reg, 0);
        let got = received(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].services[0].canary_weight, 5);
        assert_eq!(got[0].generation.unwrap().index, 7);
        agents.push_desired(&registry_at(9), 0);
        assert_eq!(received(&mut rx).len(), 1);
    }

    #[test]
    fn the_desired_state_carries_the_override_names_while_the_rollout_runs_and_empty_after() {
        let strategy = Strategy::from_toml(
            "[[stages]]\nweight = 5\n[traffic]\noverride_header = \"X-Serin-Variant\"\n\
             override_cookie = \"serin_variant\"\n",
        )
        .unwrap();
        let mut reg = Registry::default();
        reg.apply(
            Command::Start {
                id: RolloutId("api-1".into()),
                service: "api".into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy,
                actor: Actor::Controller,
                at: 0,
            },
            Generation { term: 1, index: 1 },
        )
        .unwrap();
        let services = BTreeSet::from(["api".to_owned()]);
        let api = desired_state(&reg, &services, &[], &DeployPlans::default(), "")
            .services
            .remove(0);
        assert_eq!(
            (api.override_header.as_str(), api.override_cookie.as_str()),
            ("X-Serin-Variant", "serin_variant")
        );
        reg.apply(
            Command::RollBack {
                id: RolloutId("api-1".into()),
                reason: "test".into(),
                analysis: None,
                at: 1,
            },
            Generation { term: 1, index: 2 },
        )
        .unwrap();
        let api = desired_state(&reg, &services, &[], &DeployPlans::default(), "")
            .services
            .remove(0);
        assert_eq!(
            (api.override_header.as_str(), api.override_cookie.as_str()),
            ("", "")
        );
        assert_eq!(api.canary_weight, 0);
    }

    #[test]
    fn a_new_session_is_pushed_to_that_agent_only() {
        let agents = AgentRegistry::default();
        let reg = registry_at(7);
        let (_, mut first) = connect(&agents, info("a"), &reg);
        assert_eq!(received(&mut first).len(), 1);
        let (_, mut second) = connect(&agents, info("b"), &reg);
        assert_eq!(received(&mut second).len(), 1);
        assert!(received(&mut first).is_empty(), "a was pushed again");
    }

    #[test]
    fn a_change_is_pushed_only_to_the_agents_of_that_service() {
        let agents = AgentRegistry::default();
        let mut reg = registry_at(7);
        start(&mut reg, "web", 8);
        let (_, mut api) = connect(&agents, balancer_of("lb-api", "api"), &reg);
        let (_, mut web) = connect(&agents, balancer_of("lb-web", "web"), &reg);
        agents.push_desired(&reg, 0);
        received(&mut api);
        received(&mut web);
        let id = RolloutId("web-8".into());
        reg.apply(
            Command::Abort {
                id,
                actor: Actor::Controller,
                reason: "test".into(),
                analysis: None,
                at: 1,
            },
            Generation { term: 1, index: 9 },
        )
        .unwrap();
        agents.push_desired(&reg, 1);
        assert_eq!(received(&mut web).len(), 1);
        assert!(received(&mut api).is_empty(), "api's balancer was pushed");
    }

    #[test]
    fn a_second_agent_with_a_taken_name_is_refused_and_a_restart_replaces_the_session() {
        let agents = AgentRegistry::default();
        let reg = Registry::default();
        let (tx, _rx) = mpsc::channel(8);
        let first = agents
            .connect(info("a"), origin("id-1"), tx.clone(), &reg, 0)
            .unwrap();
        let err = agents
            .connect(info("a"), origin("id-22"), tx.clone(), &reg, 0)
            .unwrap_err();
        assert_eq!(
            err,
            ConnectError::NameTaken {
                agent: "a".into(),
                peer: "10.0.0.1:4".into()
            }
        );
        assert!(
            err.to_string()
                .contains("already connected from 10.0.0.1:4")
        );
        let restarted = agents
            .connect(info("a"), origin("id-1"), tx.clone(), &reg, 0)
            .unwrap();
        assert_ne!(first, restarted);
        agents.disconnect("a", restarted, 5);
        agents
            .connect(info("a"), origin("id-22"), tx, &reg, 6)
            .expect("the name is free once the other agent left");
    }

    #[test]
    fn apply_status_names_each_agent_that_has_not_applied_with_its_error_and_since_when() {
        let agents = AgentRegistry::default();
        let reg = registry_at(7);
        let (_, _a) = connect(&agents, info("a"), &reg);
        let (_, _b) = connect(&agents, balancer_of("b", "api"), &reg);
        let (c_session, _c) = connect(&agents, balancer_of("c", "api"), &reg);
        let (_, _w) = connect(&agents, balancer_of("w", "web"), &reg);
        agents.acknowledged("a", G7, vec![], 10);
        agents.acknowledged(
            "b",
            G7,
            vec![("api".into(), "nginx: master gone".into())],
            20,
        );
        agents.acknowledged(
            "b",
            G7,
            vec![("api".into(), "nginx: still gone".into())],
            30,
        );
        agents.disconnect("c", c_session, 40);
        let status = agents.apply_status("api", G7);
        assert_eq!((status.carrying, status.applied), (3, 1));
        assert_eq!(
            status.lagging,
            [
                Lagging {
                    agent: "b".into(),
                    connected: true,
                    error: Some("nginx: still gone".into()),
                    since: Some(20),
                },
                Lagging {
                    agent: "c".into(),
                    connected: false,
                    error: None,
                    since: Some(40),
                },
            ]
        );
        assert_eq!(agents.failures("api", G7).len(), 1);
        agents.acknowledged("b", G7, vec![], 50);
        assert!(agents.failures("api", G7).is_empty());
        assert_eq!(agents.apply_status("api", G7).applied, 2);
    }

    #[test]
    fn disconnected_agents_are_forgotten_after_the_limit_or_on_request() {
        let agents = AgentRegistry::default();
        let reg = Registry::default();
        let (a, _ra) = connect(&agents, info("a"), &reg);
        let (b, _rb) = connect(&agents, info("b"), &reg);
        let (_, _rc) = connect(&agents, info("c"), &reg);
        assert_eq!(agents.forget("c"), Err(ForgetError::Connected("c".into())));
        assert_eq!(agents.forget("x"), Err(ForgetError::Unknown("x".into())));
        agents.disconnect("a", a, 1_000);
        agents.disconnect("b", b, 5_000);
        let hour = Duration::from_secs(3600);
        assert!(agents.forget_disconnected(hour, 3_601_000).is_empty());
        assert_eq!(agents.forget_disconnected(hour, 3_601_001), ["a"]);
        assert_eq!(agents.forget("b"), Ok(()));
        let names: Vec<_> = agents.list().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["c"]);
        assert!(agents.coverage("api").canary);
    }

    #[test]
    fn unknown_services_get_all_traffic_on_stable_and_coverage_tracks_sessions() {
        let agents = AgentRegistry::default();
        let (session, _rx) = connect(&agents, info("a"), &Registry::default());
        let d = desired_state(
            &Registry::default(),
            &["api".to_owned()].into(),
            &[],
            &DeployPlans::default(),
            "",
        );
        assert_eq!(d.services[0].canary_weight, 0);
        assert_eq!(d.generation.unwrap().index, 0);
        assert_eq!(
            agents.coverage("api"),
            Coverage {
                balancer: true,
                stable: false,
                canary: true,
                ..Coverage::default()
            }
        );
        agents.disconnect("a", session + 1, 0); // a stale session id changes nothing
        assert!(agents.coverage("api").balancer);
        agents.disconnect("a", session, 0);
        assert_eq!(agents.coverage("api"), Coverage::default());
    }
}
