//! The fleet inventory's pure core: which servers a balancer sends a service's traffic to, with
//! which weights, and when an instance should leave or rejoin the upstreams.
//!
//! Design in docs/fleet.md. The inventory itself (every connected agent's instances and their
//! health) is the leader's soft state, rebuilt from registrations; the *decisions* it leads to
//! (an instance taken out, put back) are raft commands, so each is an event in the service's
//! history and gives the balancers a new, fenced generation. This module only computes: no I/O,
//! no clock (time is passed in), so every rule below is tested exhaustively.
//!
//! Rules:
//! - The membership ([`target_membership`]) holds the instances that are healthy or within the
//!   grace, but never drops the last stable one: the one seen healthy most recently stays in (a
//!   balancer with no stable server answers 502 to everyone).
//! - Per-server weights give the canary exactly the stage's share whatever the instance counts.
//!   At 0% the canary servers are left out, at 100% the stable ones (nginx refuses weight 0).
//! - The output is sorted, so equal inputs give equal desired states (an unchanged upstream is
//!   no reload on the balancer).

use std::time::Duration;

use crate::metrics::Side;
use crate::rollout::{Millis, UpstreamMember};

/// One app instance as the inventory knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The instance's name in its agent's config.
    pub name: String,
    /// The agent that declared (and scrapes) it.
    pub agent: String,
    /// `host:port` the balancers reach it at; unique in the fleet.
    pub address: String,
    /// Stable or canary.
    pub variant: Side,
    /// Whether its agent's session is open.
    pub connected: bool,
    /// Its agent's session is open but its reports stopped (a cut-off host).
    pub silent: bool,
    /// Since when it is unhealthy: its agent disconnected, or its scrapes fail. `None` while
    /// healthy.
    pub unhealthy_since: Option<Millis>,
    /// When it was last seen healthy (its agent's latest successful scrape of it).
    pub last_healthy: Option<Millis>,
    /// The version it runs, when its agent declares one.
    pub version: Option<String>,
}

/// One server of a balancer's upstream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UpstreamServer {
    /// Stable or canary (stable sorts first).
    pub variant: Variant,
    /// `host:port`.
    pub address: String,
    /// The instance's name.
    pub instance: String,
    /// The agent that declared it.
    pub agent: String,
    /// Relative weight, ≥ 1.
    pub weight: u64,
}

/// [`Side`] with an order, for sorting servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// Stable.
    Stable,
    /// Canary.
    Canary,
}

impl From<Side> for Variant {
    fn from(side: Side) -> Self {
        match side {
            Side::Stable => Variant::Stable,
            Side::Canary => Variant::Canary,
        }
    }
}

/// The upstream of one service for one traffic plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceUpstreams {
    /// The servers, sorted by (variant, address).
    pub servers: Vec<UpstreamServer>,
    /// True when the plan sends traffic to the canary but no canary server is available, so
    /// everything goes to stable.
    pub canary_missing: bool,
}

pub use serin_proto::weights::server_weights;

/// The upstream servers of a service's members (`instances`), weighted for `canary_weight`%.
pub fn upstreams(instances: &[Instance], canary_weight: u32) -> ServiceUpstreams {
    let stable: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.variant == Side::Stable)
        .collect();
    let canary: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.variant == Side::Canary)
        .collect();
    let canary_weight = canary_weight.min(100);
    let canary_missing = canary_weight > 0 && canary.is_empty();
    let (stable_weight, canary_server_weight) = match (canary_weight, stable.len(), canary.len()) {
        (_, _, 0) | (0, _, _) => (1, 0),
        (100, _, _) | (_, 0, _) => (0, 1),
        (w, s, c) => server_weights(w, s, c),
    };
    let server = |i: &Instance, weight: u64| UpstreamServer {
        variant: i.variant.into(),
        address: i.address.clone(),
        instance: i.name.clone(),
        agent: i.agent.clone(),
        weight,
    };
    let mut servers: Vec<UpstreamServer> = Vec::new();
    if stable_weight > 0 {
        servers.extend(stable.iter().map(|i| server(i, stable_weight)));
    }
    if canary_server_weight > 0 {
        servers.extend(canary.iter().map(|i| server(i, canary_server_weight)));
    }
    servers.sort();
    ServiceUpstreams {
        servers,
        canary_missing,
    }
}

/// The upstream membership the inventory calls for, if it differs from the committed one:
/// `(members, reason)` to propose as a `SetUpstreams` command.
///
/// An instance is a member when it is healthy, or when it has been unhealthy for less than
/// `remove_after` and was already a member or its agent is connected (an unreadable metrics
/// page does not stop an instance from serving); one unhealthy for longer is not. A committed
/// member the inventory does not know (a new leader that has not heard from its agent yet) stays
/// until `remove_after` after `known_since` (when this leader's inventory began). Whatever the
/// health, the membership keeps at least one stable instance if it had one: the one seen
/// healthy most recently.
pub fn target_membership(
    instances: &[Instance],
    committed: Option<&[UpstreamMember]>,
    remove_after: Duration,
    now: Millis,
    known_since: Millis,
) -> Option<(Vec<UpstreamMember>, String)> {
    let grace = remove_after.as_millis() as Millis;
    let was_member =
        |address: &str| committed.is_some_and(|c| c.iter().any(|m| m.address == address));
    let mut members: Vec<UpstreamMember> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for i in instances {
        // A metrics page that cannot be read does not mean the instance cannot serve: an
        // instance of a connected agent joins at once and leaves only after the grace.
        let keep = match i.unhealthy_since {
            None => true,
            Some(since) => (was_member(&i.address) || i.connected) && now - since < grace,
        };
        if keep {
            members.push(member(i));
        } else if was_member(&i.address) {
            let why = if !i.connected {
                "its agent has been disconnected"
            } else if i.silent {
                "no report from its agent"
            } else {
                "its scrapes have failed"
            };
            let since = i.unhealthy_since.unwrap_or(now);
            notes.push(format!(
                "removed {} ({}) of agent {}: {why} for {}",
                i.name,
                i.address,
                i.agent,
                humantime::format_duration(Duration::from_millis((now - since).max(0) as u64))
            ));
        }
    }
    let known = |address: &str| instances.iter().any(|i| i.address == address);
    for m in committed.into_iter().flatten() {
        if !known(&m.address) {
            if now - known_since < grace {
                members.push(m.clone());
            } else {
                notes.push(format!(
                    "removed {} ({}) of agent {}: not heard of for {}",
                    m.instance,
                    m.address,
                    m.agent,
                    humantime::format_duration(remove_after)
                ));
            }
        }
    }
    let had_stable = committed.is_some_and(|c| c.iter().any(|m| !m.canary));
    if had_stable && !members.iter().any(|m| !m.canary) {
        let last = instances
            .iter()
            .filter(|i| i.variant == Side::Stable)
            .max_by(|a, b| {
                a.last_healthy
                    .cmp(&b.last_healthy)
                    .then_with(|| b.address.cmp(&a.address))
            });
        if let Some(last) = last {
            notes.push(format!(
                "kept {} ({}): the last stable instance",
                last.name, last.address
            ));
            members.push(member(last));
        } else if let Some(m) = committed.into_iter().flatten().find(|m| !m.canary) {
            notes.push(format!(
                "kept {} ({}): the last stable instance",
                m.instance, m.address
            ));
            members.push(m.clone());
        }
    }
    members.sort();
    members.dedup();
    if committed == Some(members.as_slice()) {
        return None;
    }
    for m in &members {
        let before = committed
            .into_iter()
            .flatten()
            .find(|c| c.address == m.address);
        if let Some(before) = before
            && before.version != m.version
        {
            notes.push(format!(
                "{} ({}) of agent {} now runs {}",
                m.instance,
                m.address,
                m.agent,
                m.version.as_deref().unwrap_or("an undeclared version")
            ));
        }
        if !was_member(&m.address) {
            notes.push(format!(
                "added {} ({}) of agent {}",
                m.instance, m.address, m.agent
            ));
        }
    }
    notes.sort();
    notes.dedup();
    let reason = if notes.is_empty() {
        "upstreams set from the inventory".to_owned()
    } else {
        format!("upstreams: {}", notes.join("; "))
    };
    Some((members, reason))
}

fn member(i: &Instance) -> UpstreamMember {
    UpstreamMember {
        address: i.address.clone(),
        canary: i.variant == Side::Canary,
        instance: i.name.clone(),
        agent: i.agent.clone(),
        version: i.version.clone(),
    }
}

/// The committed members as inventory instances, for [`upstreams`].
pub fn members_as_instances(members: &[UpstreamMember]) -> Vec<Instance> {
    members
        .iter()
        .map(|m| Instance {
            name: m.instance.clone(),
            agent: m.agent.clone(),
            address: m.address.clone(),
            variant: if m.canary { Side::Canary } else { Side::Stable },
            connected: true,
            silent: false,
            unhealthy_since: None,
            last_healthy: None,
            version: m.version.clone(),
        })
        .collect()
}

/// What the service's latest rollout ran where: its stable version on the stable instances,
/// its canary version on the canary ones. Nothing since has moved binaries (serin does not
/// deploy yet), so it says what an instance that declares no version runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VariantVersions {
    /// The version the stable instances run, if known.
    pub stable: Option<String>,
    /// The version the canary instances run, if known.
    pub canary: Option<String>,
}

impl VariantVersions {
    /// The version an instance of `canary`'s side runs by this mapping.
    pub fn of(&self, canary: bool) -> Option<&str> {
        if canary {
            self.canary.as_deref()
        } else {
            self.stable.as_deref()
        }
    }
}

/// The version `member` runs: the one it declares, else the one its variant ran in the last
/// rollout (`mapping`); `None` when neither is known.
pub fn version_of<'a>(member: &'a UpstreamMember, mapping: &'a VariantVersions) -> Option<&'a str> {
    member
        .version
        .as_deref()
        .or_else(|| mapping.of(member.canary))
}

/// The members that run `version` (by [`version_of`]), in their order.
pub fn serving<'a>(
    members: &'a [UpstreamMember],
    version: &str,
    mapping: &VariantVersions,
) -> Vec<&'a UpstreamMember> {
    members
        .iter()
        .filter(|m| version_of(m, mapping) == Some(version))
        .collect()
}

/// Every version the members run (by [`version_of`]), sorted, without repeats; members whose
/// version is unknown are left out.
pub fn versions_running(members: &[UpstreamMember], mapping: &VariantVersions) -> Vec<String> {
    let mut versions: Vec<String> = members
        .iter()
        .filter_map(|m| version_of(m, mapping))
        .map(str::to_owned)
        .collect();
    versions.sort();
    versions.dedup();
    versions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(address: &str, variant: Side) -> Instance {
        Instance {
            name: format!("app-{address}"),
            agent: format!("host-{address}"),
            address: address.into(),
            variant,
            connected: true,
            silent: false,
            unhealthy_since: None,
            last_healthy: Some(1_000),
            version: None,
        }
    }

    fn stable(address: &str) -> Instance {
        inst(address, Side::Stable)
    }

    fn canary(address: &str) -> Instance {
        inst(address, Side::Canary)
    }

    fn canary_share(up: &ServiceUpstreams) -> f64 {
        let total: u64 = up.servers.iter().map(|s| s.weight).sum();
        let canary: u64 = up
            .servers
            .iter()
            .filter(|s| s.variant == Variant::Canary)
            .map(|s| s.weight)
            .sum();
        canary as f64 / total as f64
    }

    #[test]
    fn the_canary_gets_exactly_the_stage_share_whatever_the_instance_counts() {
        for n_stable in 1..=7 {
            for n_canary in 1..=5 {
                let mut fleet: Vec<Instance> =
                    (0..n_stable).map(|k| stable(&format!("s{k}"))).collect();
                fleet.extend((0..n_canary).map(|k| canary(&format!("c{k}"))));
                for w in [1, 5, 10, 25, 33, 50, 99] {
                    let up = upstreams(&fleet, w);
                    assert_eq!(up.servers.len(), n_stable + n_canary);
                    assert!(up.servers.iter().all(|s| s.weight >= 1));
                    let share = canary_share(&up);
                    assert!(
                        (share - f64::from(w) / 100.0).abs() < 1e-12,
                        "{n_stable} stable, {n_canary} canary at {w}%: {share}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_and_full_shares_leave_the_other_side_out() {
        let fleet = [stable("a"), stable("b"), canary("c")];
        let at0 = upstreams(&fleet, 0);
        assert!(at0.servers.iter().all(|s| s.variant == Variant::Stable));
        assert_eq!(at0.servers.len(), 2);
        let at100 = upstreams(&fleet, 100);
        assert_eq!(at100.servers.len(), 1);
        assert_eq!(at100.servers[0].variant, Variant::Canary);
        assert!(!at0.canary_missing && !at100.canary_missing);
    }

    #[test]
    fn without_a_canary_instance_everything_goes_to_stable_and_it_says_so() {
        let up = upstreams(&[stable("a")], 25);
        assert_eq!(up.servers.len(), 1);
        assert!(up.canary_missing);
        assert!(up.servers.iter().all(|s| s.variant == Variant::Stable));
    }

    #[test]
    fn the_output_is_sorted_and_independent_of_input_order() {
        let fleet = [canary("z"), stable("m"), canary("b"), stable("a")];
        let mut reversed = fleet.clone();
        reversed.reverse();
        let one = upstreams(&fleet, 5);
        assert_eq!(one, upstreams(&reversed, 5));
        let order: Vec<_> = one
            .servers
            .iter()
            .map(|s| (s.variant, s.address.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (Variant::Stable, "a"),
                (Variant::Stable, "m"),
                (Variant::Canary, "b"),
                (Variant::Canary, "z")
            ]
        );
    }

    fn committed(fleet: &[Instance]) -> Vec<UpstreamMember> {
        let mut m: Vec<_> = fleet.iter().map(member).collect();
        m.sort();
        m
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn healthy_instances_join_and_nothing_changes_when_the_membership_is_current() {
        let fleet = [stable("a"), stable("b"), canary("c")];
        let (members, reason) = target_membership(&fleet, None, GRACE, 0, 0).unwrap();
        assert_eq!(members, committed(&fleet));
        assert!(
            reason.contains("added app-a (a) of agent host-a"),
            "{reason}"
        );
        assert_eq!(
            target_membership(&fleet, Some(&members), GRACE, 1_000, 0),
            None
        );
    }

    #[test]
    fn an_unhealthy_member_stays_through_the_grace_then_leaves_and_returns_when_healthy() {
        let mut sick = stable("b");
        sick.connected = false;
        sick.unhealthy_since = Some(10_000);
        let healthy = [stable("a"), stable("b"), canary("c")];
        let current = committed(&healthy);
        let fleet = [stable("a"), sick, canary("c")];
        assert_eq!(
            target_membership(&fleet, Some(&current), GRACE, 39_999, 0),
            None
        );
        let (members, reason) =
            target_membership(&fleet, Some(&current), GRACE, 40_000, 0).unwrap();
        assert!(!members.iter().any(|m| m.address == "b"), "{members:?}");
        assert!(
            reason.contains(
                "removed app-b (b) of agent host-b: its agent has been disconnected for 30s"
            ),
            "{reason}"
        );
        // A disconnected instance past the grace does not join again; once healthy it does.
        assert_eq!(
            target_membership(&fleet, Some(&members), GRACE, 50_000, 0),
            None
        );
        let (back, reason) = target_membership(&healthy, Some(&members), GRACE, 60_000, 0).unwrap();
        assert_eq!(back, current);
        assert!(reason.contains("added app-b"), "{reason}");
    }

    #[test]
    fn the_last_stable_member_is_kept_whatever_its_health() {
        let mut a = stable("a");
        a.unhealthy_since = Some(0);
        a.last_healthy = Some(9_000);
        let mut b = stable("b");
        b.unhealthy_since = Some(0);
        let current = committed(&[stable("a"), stable("b"), canary("c")]);
        let (members, reason) =
            target_membership(&[a, b, canary("c")], Some(&current), GRACE, 60_000, 0).unwrap();
        let addresses: Vec<_> = members.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(addresses, ["a", "c"], "a was seen healthy last");
        assert!(
            reason.contains("kept app-a (a): the last stable instance"),
            "{reason}"
        );
    }

    fn running(address: &str, canary: bool, version: Option<&str>) -> UpstreamMember {
        UpstreamMember {
            address: address.into(),
            canary,
            instance: format!("app-{address}"),
            agent: format!("host-{address}"),
            version: version.map(str::to_owned),
        }
    }

    /// Every combination of (declared version, variant, mapping): a declared version always
    /// wins, the mapping decides only for members that declare none, and `serving` and
    /// `versions_running` agree with `version_of`.
    #[test]
    fn a_members_version_is_the_declared_one_else_what_its_variant_ran_in_the_last_rollout() {
        let versions = [None, Some("v1"), Some("v2"), Some("v3")];
        for declared in versions {
            for canary in [false, true] {
                for stable_ran in versions {
                    for canary_ran in versions {
                        let mapping = VariantVersions {
                            stable: stable_ran.map(str::to_owned),
                            canary: canary_ran.map(str::to_owned),
                        };
                        let m = running("a", canary, declared);
                        let expected = declared.or(if canary { canary_ran } else { stable_ran });
                        assert_eq!(
                            version_of(&m, &mapping),
                            expected,
                            "{declared:?} canary={canary} {mapping:?}"
                        );
                        for v in ["v1", "v2", "v3"] {
                            let members = [m.clone()];
                            let picked = serving(&members, v, &mapping);
                            assert_eq!(picked.len(), usize::from(expected == Some(v)));
                        }
                        let all = versions_running(std::slice::from_ref(&m), &mapping);
                        assert_eq!(
                            all,
                            expected.into_iter().map(str::to_owned).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn serving_picks_every_member_of_the_version_across_variants_in_order() {
        let mapping = VariantVersions {
            stable: Some("v1".into()),
            canary: Some("v2".into()),
        };
        let members = [
            running("a", false, None),
            running("b", false, Some("v2")),
            running("c", true, None),
            running("d", true, Some("v1")),
            running("e", true, Some("v3")),
        ];
        let addresses = |v: &str| -> Vec<&str> {
            serving(&members, v, &mapping)
                .iter()
                .map(|m| m.address.as_str())
                .collect()
        };
        assert_eq!(addresses("v1"), ["a", "d"]);
        assert_eq!(addresses("v2"), ["b", "c"]);
        assert_eq!(addresses("v3"), ["e"]);
        assert!(addresses("v4").is_empty());
        assert_eq!(versions_running(&members, &mapping), ["v1", "v2", "v3"]);
    }

    #[test]
    fn a_redeploy_that_changes_a_declared_version_is_a_membership_change_that_says_so() {
        let mut before = stable("a");
        before.version = Some("v1".into());
        let current = committed(&[before.clone()]);
        let mut after = before;
        after.version = Some("v2".into());
        let (members, reason) =
            target_membership(&[after], Some(&current), GRACE, 1_000, 0).unwrap();
        assert_eq!(members[0].version.as_deref(), Some("v2"));
        assert!(
            reason.contains("app-a (a) of agent host-a now runs v2"),
            "{reason}"
        );
    }

    #[test]
    fn a_new_leader_keeps_members_it_has_not_heard_of_for_the_grace() {
        let current = committed(&[stable("a"), stable("b")]);
        let heard = [stable("a")];
        assert_eq!(
            target_membership(&heard, Some(&current), GRACE, 29_000, 0),
            None
        );
        let (members, reason) =
            target_membership(&heard, Some(&current), GRACE, 30_000, 0).unwrap();
        assert_eq!(members, committed(&heard));
        assert!(reason.contains("not heard of for 30s"), "{reason}");
        // With no instance heard of at all, the last stable member stays.
        let (kept, _) = target_membership(&[], Some(&current), GRACE, 30_000, 0).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(!kept[0].canary);
    }

    #[test]
    fn an_instance_whose_agent_went_silent_is_removed_after_the_grace_saying_so() {
        let mut quiet = stable("b");
        quiet.silent = true;
        quiet.unhealthy_since = Some(10_000);
        let fleet = vec![stable("a"), quiet];
        let (members, _) = target_membership(&fleet, None, GRACE, 10_000, 0).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(
            target_membership(&fleet, Some(&members), GRACE, 10_000 + 29_999, 0),
            None,
            "removed before the grace"
        );
        let (after, reason) =
            target_membership(&fleet, Some(&members), GRACE, 10_000 + 30_000, 0).unwrap();
        assert_eq!(after.len(), 1);
        assert!(
            reason.contains("removed app-b (b) of agent host-b: no report from its agent for 30s"),
            "{reason}"
        );
    }
}
