//! What serin deploys behind the agents' managed instances (docs/deploy.md): the wire form of
//! the placement ([`crate::deploy::assignments`]) each agent is sent, and how far the fleet
//! is from it, read from the agents' latest reports.
//!
//! The placement of a service is computed once per push round ([`DeployPlans`]) and then
//! split by agent, so pushing a change to every agent of a service costs O(instances), not
//! O(instances × agents).

use std::collections::HashMap;

use serin_proto::v1;

use super::Inner;
use crate::deploy::{
    Assignment, Handover, InstanceReport, ManagedInstance, assignments, shard_handover, shard_list,
};
use crate::rollout::Registry;
use crate::strategy::{Deploy, DeployDriver};

/// The deployment of some services, split by agent.
#[derive(Debug, Default)]
pub struct DeployPlans {
    by_service: HashMap<String, ServicePlan>,
}

#[derive(Debug)]
struct ServicePlan {
    spec: v1::DeploySpec,
    by_agent: HashMap<String, Vec<v1::Workload>>,
}

impl DeployPlans {
    /// True when it holds no service.
    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }

    /// The deploy spec and this agent's workloads of `service`, when serin deploys it.
    pub fn for_agent(
        &self,
        service: &str,
        agent: &str,
    ) -> Option<(v1::DeploySpec, Vec<v1::Workload>)> {
        let plan = self.by_service.get(service)?;
        Some((
            plan.spec.clone(),
            plan.by_agent.get(agent).cloned().unwrap_or_default(),
        ))
    }
}

/// How far a service's managed instances are from their placement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeployProgress {
    /// Instances that do not yet run their assignment healthy, one text each.
    pub waiting: Vec<String>,
    /// Canary instances whose deploy failed, one text each (a rollout rolls back on them).
    pub failures: Vec<String>,
    /// Every stable-side instance runs its assignment healthy.
    pub stable_ready: bool,
}

/// Most driver actions one [`crate::rollout::Command::DeployActions`] carries (the rest go in
/// the next control tick's).
pub const MAX_ACTIONS_PER_PROPOSAL: usize = 64;

/// The wire form of a strategy's `[deploy]`.
pub fn spec_to_wire(deploy: &Deploy) -> v1::DeploySpec {
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let driver = match &deploy.driver {
        DeployDriver::Docker(d) => v1::deploy_spec::Driver::Docker(v1::DockerDeploy {
            image: d.image.clone(),
            port: u32::from(d.port.unwrap_or(0)),
            args: d.args.clone(),
            stop_timeout_ms: millis(d.stop_timeout),
        }),
        DeployDriver::Command(c) => v1::deploy_spec::Driver::Command(v1::CommandDeploy {
            start: c.start.clone(),
            stop: c.stop.clone(),
            deploy: c.deploy.clone().unwrap_or_default(),
            health: c.health.clone().unwrap_or_default(),
            timeout_ms: millis(c.timeout),
        }),
    };
    v1::DeploySpec {
        driver: Some(driver),
        health_path: deploy.health_path.clone().unwrap_or_default(),
        health_timeout_ms: millis(deploy.health_timeout),
        env: deploy
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        shard_count: deploy.shards.map_or(0, |s| s.count),
    }
}

/// The `[deploy]` of the service's latest rollout, when it has one.
pub fn deploy_of<'a>(registry: &'a Registry, service: &str) -> Option<&'a Deploy> {
    let record = registry.services.get(service)?;
    let latest = registry.rollouts.get(record.latest.as_ref()?)?;
    latest.strategy.deploy.as_ref()
}

impl Inner {
    /// Every known agent's managed instances of `service`, in agent then instance order.
    pub(super) fn managed_instances(&self, service: &str) -> Vec<ManagedInstance> {
        let mut out = Vec::new();
        for name in self.by_service.get(service).into_iter().flatten() {
            let Some(entry) = self.agents.get(name) else {
                continue;
            };
            for t in entry
                .info
                .targets
                .iter()
                .filter(|t| t.service == service && t.managed)
            {
                out.push(ManagedInstance {
                    agent: name.clone(),
                    instance: t.name.clone(),
                    canary: t.variant == v1::Variant::Canary as i32,
                });
            }
        }
        out
    }

    /// The placement of `service`'s managed instances now, when serin deploys it.
    pub(super) fn assignments(&self, registry: &Registry, service: &str) -> Vec<Assignment> {
        if deploy_of(registry, service).is_none() {
            return Vec::new();
        }
        assignments(registry, service, &self.managed_instances(service))
    }

    /// Adds the plan of each of `services` that serin deploys.
    pub(super) fn plan<'s>(
        &self,
        registry: &Registry,
        services: impl IntoIterator<Item = &'s String>,
        plans: &mut DeployPlans,
    ) {
        for service in services {
            if plans.by_service.contains_key(service) {
                continue;
            }
            let Some(deploy) = deploy_of(registry, service) else {
                continue;
            };
            let mut by_agent: HashMap<String, Vec<v1::Workload>> = HashMap::new();
            for a in self.assignments(registry, service) {
                by_agent.entry(a.agent).or_default().push(v1::Workload {
                    instance: a.instance,
                    version: a.version.unwrap_or_default(),
                    variant: if a.canary {
                        v1::Variant::Canary as i32
                    } else {
                        v1::Variant::Stable as i32
                    },
                    shards: a
                        .shards
                        .iter()
                        .map(|g| v1::ShardGrant {
                            shard: g.shard,
                            start_after_ms: g.start_after_ms,
                        })
                        .collect(),
                });
            }
            plans.by_service.insert(
                service.clone(),
                ServicePlan {
                    spec: spec_to_wire(deploy),
                    by_agent,
                },
            );
        }
    }

    /// The next step of `service`'s shard handover ([`shard_handover`]), from the agents'
    /// latest reports; a disconnected agent's instances count as not reported.
    pub(super) fn shard_handover(&self, registry: &Registry, service: &str, now: i64) -> Handover {
        if deploy_of(registry, service)
            .and_then(|d| d.shards)
            .is_none()
        {
            return Handover::Idle;
        }
        let instances = self.managed_instances(service);
        let reports: Vec<Option<InstanceReport>> = instances
            .iter()
            .map(|m| {
                let entry = self.agents.get(&m.agent).filter(|e| e.info.connected)?;
                let s = entry.workloads.iter().find(|w| w.instance == m.instance)?;
                Some(InstanceReport {
                    version: s.version.clone(),
                    healthy: s.state == v1::WorkloadState::Healthy as i32,
                    shards: s.shards.clone(),
                })
            })
            .collect();
        shard_handover(registry, service, &instances, &reports, now)
    }

    /// The deploy driver actions the agents reported for `service`'s latest rollout that its
    /// events do not hold yet (at most [`MAX_ACTIONS_PER_PROPOSAL`], oldest first per
    /// instance), as the command recording them; `None` when there are none.
    pub(super) fn unrecorded_actions(
        &self,
        registry: &Registry,
        service: &str,
        now: i64,
    ) -> Option<crate::rollout::Command> {
        deploy_of(registry, service)?;
        let record = registry.services.get(service)?;
        let rollout = registry.rollouts.get(record.latest.as_ref()?)?;
        let mut actions = Vec::new();
        for name in self.by_service.get(service).into_iter().flatten() {
            let Some(entry) = self.agents.get(name) else {
                continue;
            };
            for status in entry.workloads.iter().filter(|w| w.service == service) {
                let key = format!("{name}/{}", status.instance);
                let seen = rollout.deploy_actions.seen.get(&key).copied().unwrap_or(0);
                actions.extend(
                    status
                        .actions
                        .iter()
                        .filter(|a| a.seq > seen && a.rollout_id == rollout.id.0)
                        .map(|a| crate::rollout::DeployAction {
                            agent: name.clone(),
                            instance: status.instance.clone(),
                            seq: a.seq,
                            action: a.action.clone(),
                            detail: a.detail.clone(),
                            exit_code: a.exit_code,
                            output: a.output.clone(),
                            duration_ms: a.duration_ms,
                            ok: a.ok,
                            version: a.version.clone(),
                        }),
                );
            }
        }
        if actions.is_empty() {
            return None;
        }
        actions.truncate(MAX_ACTIONS_PER_PROPOSAL);
        Some(crate::rollout::Command::DeployActions {
            id: rollout.id.clone(),
            actions,
            at: now,
        })
    }

    /// How far `service`'s managed instances are from their placement.
    pub(super) fn deploy_progress(&self, registry: &Registry, service: &str) -> DeployProgress {
        let mut progress = DeployProgress {
            stable_ready: true,
            ..Default::default()
        };
        let sharded = deploy_of(registry, service).is_some_and(|d| d.shards.is_some());
        for a in self.assignments(registry, service) {
            let place = format!("{} on {}", a.instance, a.agent);
            let entry = self.agents.get(&a.agent);
            let status = entry.and_then(|e| e.workloads.iter().find(|w| w.instance == a.instance));
            let wanted = a.version.clone().unwrap_or_default();
            let verdict = match (entry, status) {
                (Some(e), _) if !e.info.connected => {
                    Err(format!("{place}: its agent is disconnected"))
                }
                (_, None) => Err(format!("{place}: no workload report yet")),
                (_, Some(s)) => judge(&place, &wanted, s),
            };
            if sharded && verdict.is_ok() {
                // The shards it serves are not what it should: a start still paced or under
                // way, or a release not yet done. Not a stable-readiness matter: a promotion
                // replaces stable instances that serve no shard.
                let mut held: Vec<u32> = status.map(|s| s.shards.clone()).unwrap_or_default();
                held.sort_unstable();
                held.dedup();
                let wanted: Vec<u32> = a.shards.iter().map(|g| g.shard).collect();
                if held != wanted {
                    let missing: Vec<u32> = wanted
                        .iter()
                        .copied()
                        .filter(|s| !held.contains(s))
                        .collect();
                    let extra: Vec<u32> = held
                        .iter()
                        .copied()
                        .filter(|s| !wanted.contains(s))
                        .collect();
                    let mut parts = Vec::new();
                    if !missing.is_empty() {
                        parts.push(format!("starting {}", shard_list(&missing)));
                    }
                    if !extra.is_empty() {
                        parts.push(format!("releasing {}", shard_list(&extra)));
                    }
                    progress
                        .waiting
                        .push(format!("{place}: {}", parts.join(", ")));
                }
            }
            match verdict {
                Ok(()) => {}
                Err(text) => {
                    let failed = status.is_some_and(|s| {
                        s.state == v1::WorkloadState::Failed as i32 && s.target_version == wanted
                    });
                    if failed && a.canary {
                        progress.failures.push(text);
                    } else {
                        if !a.canary {
                            progress.stable_ready = false;
                        }
                        progress.waiting.push(text);
                    }
                }
            }
        }
        if let Some(moving) = shards_moving(registry, service) {
            progress.waiting.push(moving);
        }
        progress
    }
}

/// "shard handover: shards 3, 7 moving to the canary side" while the target share of a
/// shards-model rollout is not the granted one.
fn shards_moving(registry: &Registry, service: &str) -> Option<String> {
    let record = registry.services.get(service)?;
    let rollout = registry.rollouts.get(record.latest.as_ref()?)?;
    let spec = rollout.strategy.deploy.as_ref()?.shards?;
    let (target, granted) = (rollout.shard_target_weight(), rollout.shards.weight);
    if record.pinned.is_some() || target == granted {
        return None;
    }
    let before = crate::deploy::canary_shards(rollout, spec.count, granted);
    let after = crate::deploy::canary_shards(rollout, spec.count, target);
    let moved: Vec<u32> = before.symmetric_difference(&after).copied().collect();
    Some(format!(
        "shard handover: {} moving to the {} side (released, granted once every release is reported)",
        shard_list(&moved),
        if target > granted { "canary" } else { "stable" }
    ))
}

/// Whether the reported status `s` is the assignment `wanted` (empty: nothing runs), and if
/// not, what it is doing instead.
fn judge(place: &str, wanted: &str, s: &v1::WorkloadStatus) -> Result<(), String> {
    let healthy = s.state == v1::WorkloadState::Healthy as i32;
    if wanted.is_empty() {
        return if s.version.is_empty() {
            Ok(())
        } else {
            Err(format!("{place}: removing {}", s.version))
        };
    }
    if s.version == wanted && healthy && s.target_version == wanted {
        return Ok(());
    }
    let state = match v1::WorkloadState::try_from(s.state) {
        Ok(v1::WorkloadState::Failed) => "failed",
        Ok(v1::WorkloadState::Healthy) => "healthy",
        Ok(v1::WorkloadState::Starting) => "starting",
        _ => "absent",
    };
    let detail = if s.detail.is_empty() {
        String::new()
    } else {
        format!(": {}", s.detail)
    };
    Err(format!(
        "{place}: {wanted} wanted, {state} {} for {}s{detail}",
        if s.version.is_empty() {
            "(nothing runs)"
        } else {
            &s.version
        },
        s.for_ms / 1000
    ))
}
