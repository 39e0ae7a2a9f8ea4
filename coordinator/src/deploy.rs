//! Which version every managed instance must run now: the coordinator's pure core of "serin
//! deploys the versions". No I/O and no clock: it reads the committed [`Registry`] and the
//! managed instances agents declared, so every leader computes the same assignments.
//!
//! Why here and not in the agents: an assignment follows from replicated state only (the
//! service's latest rollout, its `[deploy]`, its stage, the service's revisions and pin), so a
//! new leader or a restarted agent reaches the same answer, and the `hosts` model's choice of
//! canary instances must be one choice across hosts, not one per agent.
//!
//! The rules (`strategy.deploy` of the service's latest rollout decides; without one serin
//! deploys nothing and touches nothing):
//! - **weighted**: an instance declared stable runs the service's stable version (after a
//!   promotion that is the new version: stable instances are replaced with it). An instance
//!   declared canary runs the rollout's version while the rollout is live, and while it is
//!   promoted but not yet settled ([`settle_due`], [`Command::DeploySettled`]): until every
//!   stable instance runs the new version, the canary ones carry the traffic. Otherwise it runs
//!   nothing.
//! - **hosts**: the instances (declared variant ignored) in one order fixed by a stable hash
//!   of (rollout id, agent, instance) (FNV-1a, then a finalizer); while the rollout is live the first
//!   [`canary_hosts`]`(n, weight)` run the canary, the others the stable version, so the same
//!   instances stay canary as the weight grows. Rolled back or aborted: all run the previous
//!   stable version; promoted: all the new version, as stable.
//! - **after an undo** (the service is pinned): every instance the pinned version as stable;
//!   with the weighted model the canary instances run nothing.

use crate::rollout::{Command, Millis, Registry, Rollout, RolloutState};
use crate::strategy::DeployModel;

/// A managed instance an agent declared for a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ManagedInstance {
    /// The agent that declared it.
    pub agent: String,
    /// Its name in the agent's `[[instances]]`.
    pub instance: String,
    /// The variant it is declared as (the weighted model keeps canary instances apart).
    pub canary: bool,
}

/// What one managed instance must run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The agent that declared the instance.
    pub agent: String,
    /// The instance's name.
    pub instance: String,
    /// None = serin runs nothing there now.
    pub version: Option<String>,
    /// The variant it runs as now (its metrics are counted as that variant).
    pub canary: bool,
}

/// What every managed instance of `service` must run now, from the committed registry, in the
/// order of `instances`. Empty when the service's latest rollout has no `[deploy]` (serin then
/// deploys nothing and touches nothing) or the service is unknown.
pub fn assignments(
    registry: &Registry,
    service: &str,
    instances: &[ManagedInstance],
) -> Vec<Assignment> {
    let Some(record) = registry.services.get(service) else {
        return Vec::new();
    };
    let Some(rollout) = record
        .latest
        .as_ref()
        .and_then(|id| registry.rollouts.get(id))
    else {
        return Vec::new();
    };
    let Some(deploy) = &rollout.strategy.deploy else {
        return Vec::new();
    };
    let model = deploy.model;
    let assign = |m: &ManagedInstance, version: Option<&str>, canary: bool| Assignment {
        agent: m.agent.clone(),
        instance: m.instance.clone(),
        version: version.map(str::to_owned),
        canary,
    };
    if let Some(pin) = registry.pin(service) {
        return instances
            .iter()
            .map(|m| match model {
                DeployModel::Weighted if m.canary => assign(m, None, true),
                _ => assign(m, Some(&pin.version), false),
            })
            .collect();
    }
    // The stable version of the service: after a promotion, the new version.
    let stable = record
        .stable_version()
        .unwrap_or(rollout.stable_version.as_str());
    let live = !rollout.state.is_terminal();
    match model {
        DeployModel::Weighted => {
            let canary_runs =
                live || (rollout.state == RolloutState::Promoted && !rollout.deploy_settled);
            instances
                .iter()
                .map(|m| match (m.canary, canary_runs) {
                    (false, _) => assign(m, Some(stable), false),
                    (true, true) => assign(m, Some(&rollout.version), true),
                    (true, false) => assign(m, None, true),
                })
                .collect()
        }
        DeployModel::Hosts => {
            let canaries = if live {
                canary_hosts(instances.len(), rollout.canary_weight())
            } else {
                0
            };
            let chosen = canary_order(rollout, instances);
            let mut is_canary = vec![false; instances.len()];
            for &i in chosen.iter().take(canaries) {
                is_canary[i] = true;
            }
            instances
                .iter()
                .zip(is_canary)
                .map(|(m, canary)| {
                    if canary {
                        assign(m, Some(&rollout.version), true)
                    } else {
                        assign(m, Some(stable), false)
                    }
                })
                .collect()
        }
    }
}

/// How many of `n` instances run the canary at `weight`% in the hosts model: 0 at 0%, else
/// ceil(n × weight / 100), at least 1, at most n.
pub fn canary_hosts(n: usize, weight: u32) -> usize {
    if weight == 0 || n == 0 {
        return 0;
    }
    let share = (n as u64 * u64::from(weight)).div_ceil(100);
    (share as usize).clamp(1, n)
}

/// Indices into `instances`, in the order the hosts model makes them canary: by a stable hash
/// of (rollout id, agent, instance), ties by name. The order depends on the rollout only, so a
/// growing weight takes a longer prefix of the same order.
fn canary_order(rollout: &Rollout, instances: &[ManagedInstance]) -> Vec<usize> {
    let mut order: Vec<(u64, &str, &str, usize)> = instances
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let key = mix(fnv1a(&[
                rollout.id.0.as_bytes(),
                m.agent.as_bytes(),
                m.instance.as_bytes(),
            ]));
            (key, m.agent.as_str(), m.instance.as_str(), i)
        })
        .collect();
    order.sort();
    order.into_iter().map(|(.., i)| i).collect()
}

/// 64-bit FNV-1a over `parts`, each followed by a 0xff byte (which UTF-8 never contains, so
/// ("ab", "c") and ("a", "bc") differ). Stable across builds and platforms, unlike std's
/// `RandomState`; the hosts model's choice must be the same on every leader.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in parts {
        for &byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

/// MurmurHash3's 64-bit finalizer. FNV-1a alone mixes its last bytes into the low bits only,
/// so ordering by it would group instances by agent (the instance names differ near the end):
/// the finalizer spreads every input bit over the whole value.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The [`Command::DeploySettled`] the leader should propose for `service` now, if any: its
/// latest rollout is promoted with the weighted `[deploy]` model, not settled, the service is
/// not pinned by an undo, and `all_stable_ready` (every stable managed instance runs the new
/// version healthy, as the agents report it).
pub fn settle_due(
    registry: &Registry,
    service: &str,
    all_stable_ready: bool,
    now: Millis,
) -> Option<Command> {
    if !all_stable_ready {
        return None;
    }
    let record = registry.services.get(service)?;
    if record.pinned.is_some() {
        return None;
    }
    let rollout = registry.rollouts.get(record.latest.as_ref()?)?;
    let weighted = rollout
        .strategy
        .deploy
        .as_ref()
        .is_some_and(|d| d.model == DeployModel::Weighted);
    if rollout.state != RolloutState::Promoted || !weighted || rollout.deploy_settled {
        return None;
    }
    Some(Command::DeploySettled {
        id: rollout.id.clone(),
        reason: format!(
            "every stable instance runs {} healthy: the traffic returns to them and the canary instances are removed",
            rollout.version
        ),
        at: now,
    })
}

#[cfg(test)]
mod tests;
