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
//! - **shards**: the instances keep their declared variant, as with weighted; a stage's share
//!   is a share of the shards 0..count, the first [`canary_hosts`]`(count, weight)` of an
//!   order fixed by a stable hash of (rollout id, shard), so the canary set only grows. A
//!   side's shards are spread over its instances by `shard % instances`. The committed
//!   [`ShardGrants`] says which share is *granted*: a shard whose side differs between the
//!   target share and the granted one is in neither side's set (released), until
//!   [`shard_handover`] finds every release confirmed by the reports and proposes the grant.
//!   A stable instance is replaced at a promotion only once the canary side was granted all
//!   shards; a canary instance runs until no shard is granted to it.
//! - **after an undo** (the service is pinned): every instance the pinned version as stable;
//!   with the weighted and shards models the canary instances run nothing (all shards on the
//!   stable instances).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::rollout::{Command, Millis, Registry, Rollout, RolloutState, ShardGrants};
use crate::strategy::{DeployModel, ShardSpec};

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
    /// Shards model: the shards it must serve, in shard order; empty with the other models.
    pub shards: Vec<ShardStart>,
}

/// A shard an instance must serve, and how long after its agent first sees the grant it may
/// start it (the pacing of the session start limit; 0 for a shard it already serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStart {
    /// The shard.
    pub shard: u32,
    /// The start delay, in milliseconds.
    pub start_after_ms: u64,
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
        shards: Vec::new(),
    };
    if let Some(pin) = registry.pin(service) {
        let mut out: Vec<Assignment> = instances
            .iter()
            .map(|m| match model {
                DeployModel::Weighted | DeployModel::Shards if m.canary => assign(m, None, true),
                _ => assign(m, Some(&pin.version), false),
            })
            .collect();
        if let Some(spec) = &deploy.shards {
            let sets = shard_sets(rollout, spec, instances, 0, ShardGrants::default());
            for (a, set) in out.iter_mut().zip(sets) {
                a.shards = set;
            }
        }
        return out;
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
        DeployModel::Shards => {
            let Some(spec) = &deploy.shards else {
                return Vec::new();
            };
            let grants = rollout.shards;
            let promoting = rollout.state == RolloutState::Promoted && !rollout.deploy_settled;
            // A stable instance is replaced at a promotion only once it serves no shard.
            let stable_now = if promoting && grants.weight < 100 {
                rollout.stable_version.as_str()
            } else {
                stable
            };
            let canary_runs = live || promoting || grants.weight > 0;
            let sets = shard_sets(
                rollout,
                spec,
                instances,
                rollout.shard_target_weight(),
                grants,
            );
            instances
                .iter()
                .zip(sets)
                .map(|(m, set)| {
                    let mut a = match (m.canary, canary_runs) {
                        (false, _) => assign(m, Some(stable_now), false),
                        (true, true) => assign(m, Some(&rollout.version), true),
                        (true, false) => assign(m, None, true),
                    };
                    a.shards = set;
                    a
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

/// The canary side's shards at `weight`%: the first [`canary_hosts`]`(count, weight)` of the
/// rollout's shard order, so a larger share is a superset.
pub fn canary_shards(rollout: &Rollout, count: u32, weight: u32) -> BTreeSet<u32> {
    shard_order(rollout, count)
        .into_iter()
        .take(canary_hosts(count as usize, weight))
        .collect()
}

/// Shards `0..count` by a stable hash of (rollout id, shard), ties by shard.
fn shard_order(rollout: &Rollout, count: u32) -> Vec<u32> {
    let mut order: Vec<(u64, u32)> = (0..count)
        .map(|shard| {
            let key = mix(fnv1a(&[
                rollout.id.0.as_bytes(),
                shard.to_string().as_bytes(),
            ]));
            (key, shard)
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, shard)| shard).collect()
}

/// Time between two paced starts in one bucket: the start interval plus a fifth of it (at
/// least [`MIN_START_MARGIN`]), so that the skew between two agents' pushes never brings two
/// starts closer than the limit.
pub fn start_spacing(spec: &ShardSpec) -> Duration {
    spec.start_interval + (spec.start_interval / 5).max(MIN_START_MARGIN)
}

/// The least margin [`start_spacing`] adds: the skew between two agents' pushes on a loaded
/// leader reached 103 ms (tests/deploy_shards.rs under the parallel CI run, a 500 ms interval
/// with the former 100 ms margin).
pub const MIN_START_MARGIN: Duration = Duration::from_millis(200);

/// The start delay of every shard (indexed by shard) that moves from canary share `from` to
/// `to`: with `max_concurrency`, the n-th moving shard of a bucket (in the rollout's shard
/// order) waits n × [`start_spacing`]; unmoved shards and unpaced services wait 0.
fn start_delays(rollout: &Rollout, spec: &ShardSpec, from: u32, to: u32) -> Vec<u64> {
    let before = canary_shards(rollout, spec.count, from);
    let after = canary_shards(rollout, spec.count, to);
    paced(rollout, spec, |shard| {
        before.contains(&shard) != after.contains(&shard)
    })
}

/// The start delays of the rollout's latest placement step: before its first grant, every
/// shard (the first placement may start them all: new bots, or bots that restarted); after
/// it, the shards the last grant moved.
fn latest_delays(rollout: &Rollout, spec: &ShardSpec, grants: ShardGrants) -> Vec<u64> {
    if grants.at == 0 {
        paced(rollout, spec, |_| true)
    } else {
        start_delays(rollout, spec, grants.previous, grants.weight)
    }
}

/// With `max_concurrency`, the n-th shard of a bucket that `moves` (in the rollout's shard
/// order) waits n × [`start_spacing`]; the others, and every shard of an unpaced service, 0.
fn paced(rollout: &Rollout, spec: &ShardSpec, moves: impl Fn(u32) -> bool) -> Vec<u64> {
    let mut delays = vec![0; spec.count as usize];
    let Some(buckets) = spec.max_concurrency else {
        return delays;
    };
    let spacing = u64::try_from(start_spacing(spec).as_millis()).unwrap_or(u64::MAX);
    let mut rank = vec![0u64; buckets as usize];
    for shard in shard_order(rollout, spec.count) {
        if moves(shard) {
            let bucket = (shard % buckets) as usize;
            delays[shard as usize] = rank[bucket].saturating_mul(spacing);
            rank[bucket] += 1;
        }
    }
    delays
}

/// The shards each of `instances` serves (in their order) at target share `target` with
/// `grants` committed: a shard on the same side in both serves there, on the instance
/// `shard % side size` of its side's instances in the given order; one whose side differs is
/// released (in no set). The shards of the latest placement step carry their paced start
/// delay ([`latest_delays`]).
fn shard_sets(
    rollout: &Rollout,
    spec: &ShardSpec,
    instances: &[ManagedInstance],
    target: u32,
    grants: ShardGrants,
) -> Vec<Vec<ShardStart>> {
    let wanted = canary_shards(rollout, spec.count, target);
    let granted = canary_shards(rollout, spec.count, grants.weight);
    let delays = latest_delays(rollout, spec, grants);
    let side = |canary: bool| -> Vec<usize> {
        (0..instances.len())
            .filter(|&i| instances[i].canary == canary)
            .collect()
    };
    let (stables, canaries) = (side(false), side(true));
    let mut sets = vec![Vec::new(); instances.len()];
    for shard in 0..spec.count {
        let owners = match (wanted.contains(&shard), granted.contains(&shard)) {
            (true, true) => &canaries,
            (false, false) => &stables,
            _ => continue,
        };
        if owners.is_empty() {
            continue;
        }
        let owner = owners[shard as usize % owners.len()];
        sets[owner].push(ShardStart {
            shard,
            start_after_ms: delays[shard as usize],
        });
    }
    sets
}

/// What one managed instance's agent last reported about it, for [`shard_handover`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceReport {
    /// The version that runs there; empty when nothing runs.
    pub version: String,
    /// It runs that version healthy.
    pub healthy: bool,
    /// The shards it holds.
    pub shards: Vec<u32>,
}

/// Where the shards model's handover of a service stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Handover {
    /// Nothing moves: no shards model, or the target share is granted.
    Idle,
    /// Shards are released and not yet grantable, and why.
    Waiting(String),
    /// Every release is confirmed: the grant to propose.
    Due(Box<Command>),
}

/// The next step of `service`'s shard handover, from its managed `instances` and their agents'
/// latest `reports` (same order; `None`: no report). A grant is due when the rollout's target
/// share differs from the granted one, the last grant's paced starts (with `max_concurrency`)
/// are over plus one [`start_spacing`], no instance holds a shard outside its set (every release confirmed), and
/// every instance the grant gives shards to runs its version healthy.
pub fn shard_handover(
    registry: &Registry,
    service: &str,
    instances: &[ManagedInstance],
    reports: &[Option<InstanceReport>],
    now: Millis,
) -> Handover {
    let Some(record) = registry.services.get(service) else {
        return Handover::Idle;
    };
    let Some(rollout) = record
        .latest
        .as_ref()
        .and_then(|id| registry.rollouts.get(id))
    else {
        return Handover::Idle;
    };
    let Some(spec) = rollout.strategy.deploy.as_ref().and_then(|d| d.shards) else {
        return Handover::Idle;
    };
    let (target, grants) = (rollout.shard_target_weight(), rollout.shards);
    if record.pinned.is_some() || target == grants.weight {
        return Handover::Idle;
    }
    // The last placement step's paced starts (the first placement's, before any grant) are
    // over, plus one spacing, so a grant's first start in a bucket keeps the limit too.
    let spacing = Millis::try_from(start_spacing(&spec).as_millis()).unwrap_or(Millis::MAX);
    let (since, schedule_ms) = if grants.at == 0 {
        let first = latest_delays(rollout, &spec, grants);
        (rollout.started_at, first.into_iter().max().unwrap_or(0))
    } else {
        (grants.at, grants.schedule_ms)
    };
    let free_at = since
        .saturating_add(Millis::try_from(schedule_ms).unwrap_or(Millis::MAX))
        .saturating_add(spacing);
    if spec.max_concurrency.is_some() && now < free_at {
        return Handover::Waiting(format!(
            "shard handover: the last grant's paced starts end in {} ms",
            free_at - now
        ));
    }
    let current = assignments(registry, service, instances);
    let mut next_rollout = rollout.clone();
    next_rollout.shards = ShardGrants {
        weight: target,
        previous: grants.weight,
        at: now,
        schedule_ms: 0,
    };
    let next = shard_sets(&next_rollout, &spec, instances, target, next_rollout.shards);
    for (i, a) in current.iter().enumerate() {
        let place = format!("{} on {}", a.instance, a.agent);
        let Some(report) = reports.get(i).and_then(Option::as_ref) else {
            return Handover::Waiting(format!(
                "shard handover: {place} has not reported its shards"
            ));
        };
        let still: Vec<u32> = report
            .shards
            .iter()
            .copied()
            .filter(|s| !a.shards.iter().any(|g| g.shard == *s))
            .collect();
        if !still.is_empty() {
            return Handover::Waiting(format!(
                "shard handover: {place} still holds {}",
                shard_list(&still)
            ));
        }
        let gains = next[i]
            .iter()
            .any(|g| !a.shards.iter().any(|c| c.shard == g.shard));
        let wanted = a.version.as_deref().unwrap_or_default();
        if gains && (report.version != wanted || !report.healthy) {
            return Handover::Waiting(format!(
                "shard handover: {place} must run {wanted} healthy before it gets shards"
            ));
        }
    }
    let delays = start_delays(rollout, &spec, grants.weight, target);
    let before = canary_shards(rollout, spec.count, grants.weight);
    let after = canary_shards(rollout, spec.count, target);
    let moved: Vec<u32> = before.symmetric_difference(&after).copied().collect();
    let schedule_ms = moved.iter().map(|&s| delays[s as usize]).max().unwrap_or(0);
    let to = if target > grants.weight {
        "canary"
    } else {
        "stable"
    };
    Handover::Due(Box::new(Command::ShardsGranted {
        id: rollout.id.clone(),
        weight: target,
        schedule_ms,
        reason: format!(
            "{} released and granted to the {to} side (canary share {}% → {target}%{})",
            shard_list(&moved),
            grants.weight,
            if schedule_ms > 0 {
                format!(", starts paced over {:.1} s", schedule_ms as f64 / 1000.0)
            } else {
                String::new()
            }
        ),
        at: now,
    }))
}

/// With the shards model: the shards the canary side serves now (on the canary side at both
/// the target and the granted share) and those moving between sides; both empty otherwise.
pub fn shard_sides(rollout: &Rollout) -> (Vec<u32>, Vec<u32>) {
    let Some(spec) = rollout.strategy.deploy.as_ref().and_then(|d| d.shards) else {
        return (Vec::new(), Vec::new());
    };
    let wanted = canary_shards(rollout, spec.count, rollout.shard_target_weight());
    let granted = canary_shards(rollout, spec.count, rollout.shards.weight);
    (
        wanted.intersection(&granted).copied().collect(),
        wanted.symmetric_difference(&granted).copied().collect(),
    )
}

/// "shard 3" or "shards 1, 4, 9", at most 16 listed.
pub fn shard_list(shards: &[u32]) -> String {
    const SHOWN: usize = 16;
    let listed: Vec<String> = shards.iter().take(SHOWN).map(u32::to_string).collect();
    let more = if shards.len() > SHOWN {
        format!(" … ({} in all)", shards.len())
    } else {
        String::new()
    };
    match shards.len() {
        1 => format!("shard {}", listed[0]),
        _ => format!("shards {}{more}", listed.join(", ")),
    }
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
    let settles = match rollout.strategy.deploy.as_ref().map(|d| d.model) {
        Some(DeployModel::Weighted) => true,
        // The stable instances are replaced only once the canary side holds every shard.
        Some(DeployModel::Shards) => rollout.shards.weight == 100,
        _ => false,
    };
    if rollout.state != RolloutState::Promoted || !settles || rollout.deploy_settled {
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

#[cfg(test)]
mod shard_tests;
