//! Connected agents: what they serve, what they applied, and the channel to push desired state.
//!
//! Agent sessions are soft state held by the leader. Desired state is derived from the
//! replicated [`Registry`]: each agent gets the traffic plans of the services it hosts, versioned
//! by the newest of their generations, and only when that generation is newer than what was last
//! sent on the current session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use serin_proto::v1::{
    self, CoordinatorMessage, DesiredState, ServiceTraffic, coordinator_message::Body,
};
use tokio::sync::mpsc;

use crate::rollout::{Generation, Millis, Registry};

/// The channel to one agent's stream.
pub type AgentSender = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

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
    /// The last generation it acknowledged.
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

struct Entry {
    info: AgentInfo,
    session: u64,
    sender: Option<AgentSender>,
    last_sent: Option<Generation>,
    failures: HashMap<String, (Generation, String)>,
}

/// All agents ever seen by this leader.
#[derive(Default)]
pub struct AgentRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    agents: BTreeMap<String, Entry>,
    next_session: u64,
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
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Only plain data is mutated under this lock; a panic elsewhere leaves it consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session for `info` (replacing any older session of the same name); returns the
    /// session number to pass to [`AgentRegistry::disconnect`].
    pub fn connect(&self, mut info: AgentInfo, sender: AgentSender) -> u64 {
        let mut inner = self.lock();
        inner.next_session += 1;
        let session = inner.next_session;
        info.connected = true;
        let previous = inner.agents.remove(&info.name);
        if previous.as_ref().is_some_and(|p| p.info.connected) {
            tracing::warn!(agent = %info.name, "agent reconnected; closing its previous session");
        }
        inner.agents.insert(
            info.name.clone(),
            Entry {
                info,
                session,
                sender: Some(sender),
                last_sent: None,
                failures: HashMap::new(),
            },
        );
        session
    }

    /// Closes a session (no-op when a newer session replaced it).
    pub fn disconnect(&self, name: &str, session: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.agents.get_mut(name)
            && entry.session == session
        {
            entry.sender = None;
            entry.info.connected = false;
        }
    }

    /// Notes that a report arrived.
    pub fn reported(&self, name: &str, at: Millis) {
        if let Some(entry) = self.lock().agents.get_mut(name) {
            entry.info.last_report = Some(at);
        }
    }

    /// Records an acknowledgement.
    pub fn acknowledged(
        &self,
        name: &str,
        generation: Generation,
        failures: Vec<(String, String)>,
    ) {
        let mut inner = self.lock();
        let Some(entry) = inner.agents.get_mut(name) else {
            return;
        };
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
            // A failed generation must be re-sent if asked again.
            entry.last_sent = entry.info.applied;
        }
        for (service, error) in failures {
            tracing::warn!(agent = name, %service, %generation, %error, "agent failed to apply");
            entry.failures.insert(service, (generation, error));
        }
    }

    /// Agents that failed to apply `service`'s traffic at `generation`: (agent, error).
    pub fn failures(&self, service: &str, generation: Generation) -> Vec<(String, String)> {
        self.lock()
            .agents
            .values()
            .filter_map(|e| {
                e.failures
                    .get(service)
                    .filter(|(g, _)| *g == generation)
                    .map(|(_, err)| (e.info.name.clone(), err.clone()))
            })
            .collect()
    }

    /// Which connected agents serve `service`.
    pub fn coverage(&self, service: &str) -> Coverage {
        let inner = self.lock();
        let mut c = Coverage::default();
        for e in inner.agents.values().filter(|e| e.info.connected) {
            c.balancer |= e.info.balancer_services.iter().any(|s| s == service);
            for t in e.info.targets.iter().filter(|t| t.service == service) {
                c.stable |= t.variant == v1::Variant::Stable as i32;
                c.canary |= t.variant == v1::Variant::Canary as i32;
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

    /// Sends each connected agent its desired state if it changed since the last send.
    pub fn push_desired(&self, registry: &Registry) {
        let mut inner = self.lock();
        for entry in inner.agents.values_mut() {
            let Some(sender) = &entry.sender else {
                continue;
            };
            let desired = desired_state(registry, &entry.info.services());
            let generation = generation_of(&desired);
            if entry.last_sent.is_some_and(|sent| sent >= generation) {
                continue;
            }
            let message = CoordinatorMessage {
                body: Some(Body::Desired(desired)),
            };
            match sender.try_send(Ok(message)) {
                Ok(()) => entry.last_sent = Some(generation),
                Err(e) => {
                    tracing::warn!(agent = %entry.info.name, error = %e, "could not queue desired state; will retry");
                }
            }
        }
    }
}

/// The desired state for an agent hosting `services`.
pub fn desired_state(registry: &Registry, services: &BTreeSet<String>) -> DesiredState {
    let mut generation = Generation::default();
    let services = services
        .iter()
        .map(|name| match registry.traffic(name) {
            Some(plan) => {
                generation = generation.max(plan.generation);
                ServiceTraffic {
                    service: plan.service,
                    canary_weight: plan.canary_weight,
                    stable_version: plan.stable_version,
                    canary_version: plan.canary_version,
                    rollout_id: plan.rollout.map(|r| r.0).unwrap_or_default(),
                    sticky_key: plan.sticky_key.unwrap_or_default(),
                }
            }
            None => ServiceTraffic {
                service: name.clone(),
                ..ServiceTraffic::default()
            },
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
                address: "127.0.0.1:1".into(),
            }],
            balancer_services: vec!["api".into()],
            connected: false,
            applied: None,
            last_error: None,
            last_report: None,
        }
    }

    fn registry_at(index: u64) -> Registry {
        let mut reg = Registry::default();
        reg.apply(
            Command::Start {
                id: RolloutId("r1".into()),
                service: "api".into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy: Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap(),
                actor: Actor::Controller,
                at: 0,
            },
            Generation { term: 1, index },
        )
        .unwrap();
        reg
    }

    fn received(
        rx: &mut mpsc::Receiver<Result<CoordinatorMessage, tonic::Status>>,
    ) -> Vec<DesiredState> {
        let mut out = vec![];
        while let Ok(Ok(m)) = rx.try_recv() {
            if let Some(Body::Desired(d)) = m.body {
                out.push(d);
            }
        }
        out
    }

    #[test]
    fn desired_state_is_pushed_once_per_generation() {
        let agents = AgentRegistry::default();
        let (tx, mut rx) = mpsc::channel(8);
        agents.connect(info("a"), tx);
        let reg = registry_at(7);
        agents.push_desired(&reg);
        agents.push_desired(&reg);
        let got = received(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].services[0].canary_weight, 5);
        assert_eq!(got[0].generation.unwrap().index, 7);
        agents.push_desired(&registry_at(9));
        assert_eq!(received(&mut rx).len(), 1);
    }

    #[test]
    fn a_failed_generation_is_sent_again_and_reported() {
        let agents = AgentRegistry::default();
        let (tx, mut rx) = mpsc::channel(8);
        agents.connect(info("a"), tx);
        let reg = registry_at(7);
        agents.push_desired(&reg);
        let g = Generation { term: 1, index: 7 };
        agents.acknowledged("a", g, vec![("api".into(), "nginx -t failed".into())]);
        assert_eq!(
            agents.failures("api", g),
            [("a".to_owned(), "nginx -t failed".to_owned())]
        );
        assert!(
            agents
                .failures("api", Generation { term: 1, index: 8 })
                .is_empty()
        );
        agents.push_desired(&reg);
        assert_eq!(received(&mut rx).len(), 2);
    }

    #[test]
    fn unknown_services_get_all_traffic_on_stable_and_coverage_tracks_sessions() {
        let agents = AgentRegistry::default();
        let (tx, _rx) = mpsc::channel(8);
        let session = agents.connect(info("a"), tx);
        let d = desired_state(&Registry::default(), &["api".to_owned()].into());
        assert_eq!(d.services[0].canary_weight, 0);
        assert_eq!(d.generation.unwrap().index, 0);
        assert_eq!(
            agents.coverage("api"),
            Coverage {
                balancer: true,
                stable: false,
                canary: true
            }
        );
        agents.disconnect("a", session + 1); // a stale session id changes nothing
        assert!(agents.coverage("api").balancer);
        agents.disconnect("a", session);
        assert_eq!(agents.coverage("api"), Coverage::default());
    }
}
