//! The shards model's placement and handover: the canary set only grows, no shard is ever
//! held by two instances whatever order the agents apply in, every shard is served once the
//! fleet converged, starts are paced per bucket, and the stable instances are replaced only
//! once they serve nothing.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::analysis::StageAnalysis;
use crate::rollout::{Actor, Generation, RolloutId};
use crate::strategy::Strategy;

const T0: Millis = 1_000_000;

fn sharded(count: u32, max_concurrency: Option<u32>, weights: &[u32]) -> Strategy {
    let stages: String = weights
        .iter()
        .map(|w| format!("[[stages]]\nweight = {w}\nmin_duration = \"10s\"\n"))
        .collect();
    let pacing = max_concurrency
        .map(|m| format!("max_concurrency = {m}\nstart_interval = \"1s\"\n"))
        .unwrap_or_default();
    Strategy::from_toml(&format!(
        "{stages}[deploy]\nmodel = \"shards\"\n[deploy.shards]\ncount = {count}\n{pacing}\
         [deploy.command]\nstart = \"start {{version}}\"\nstop = \"stop\"\n"
    ))
    .unwrap()
}

/// A registry with rollout "bot-1" of v2 over stable v1, and the commands applied so far.
struct World {
    reg: Registry,
    index: u64,
    now: Millis,
}

impl World {
    fn start(strategy: Strategy) -> World {
        let mut w = World {
            reg: Registry::default(),
            index: 0,
            now: T0,
        };
        w.apply(Command::Start {
            id: id(),
            service: "bot".into(),
            version: "v2".into(),
            stable_version: Some("v1".into()),
            strategy,
            actor: Actor::Operator("ana".into()),
            at: T0,
        })
        .unwrap();
        w
    }

    fn apply(&mut self, command: Command) -> Result<(), crate::rollout::Rejection> {
        self.index += 1;
        let generation = Generation {
            term: 1,
            index: self.index,
        };
        self.reg.apply(command, generation).map(|_| ())
    }

    fn rollout(&self) -> &Rollout {
        &self.reg.rollouts[&id()]
    }

    fn pass_stage(&mut self) -> Result<(), crate::rollout::Rejection> {
        let stage = self.rollout().stage_index;
        self.apply(Command::StagePassed {
            id: id(),
            stage,
            analysis: StageAnalysis::default(),
            at: self.now,
        })
    }

    fn act(&mut self, action: &str) -> Result<(), crate::rollout::Rejection> {
        let (reason, at) = (format!("{action} in a test"), self.now);
        self.apply(match action {
            "promote" => Command::Promote {
                id: id(),
                actor: Actor::Operator("ana".into()),
                reason,
                analysis: None,
                at,
            },
            "rollback" => Command::RollBack {
                id: id(),
                reason,
                analysis: None,
                at,
            },
            "settle" => Command::DeploySettled {
                id: id(),
                reason,
                at,
            },
            _ => unreachable!("{action}"),
        })
    }

    fn placement(&self, fleet: &[ManagedInstance]) -> Vec<Assignment> {
        assignments(&self.reg, "bot", fleet)
    }
}

fn id() -> RolloutId {
    RolloutId("bot-1".into())
}

/// `stables` stable and `canaries` canary instances over two agents.
fn bots(stables: usize, canaries: usize) -> Vec<ManagedInstance> {
    let make = |i: usize, canary: bool| ManagedInstance {
        agent: format!("host-{}", i % 2),
        instance: format!("{}-{i}", if canary { "canary" } else { "stable" }),
        canary,
    };
    (0..stables)
        .map(|i| make(i, false))
        .chain((0..canaries).map(|i| make(i, true)))
        .collect()
}

fn set(a: &Assignment) -> BTreeSet<u32> {
    a.shards.iter().map(|g| g.shard).collect()
}

/// What each instance serves, as the agents would report it after applying `placement`.
fn applied(placement: &[Assignment]) -> Vec<Option<InstanceReport>> {
    placement
        .iter()
        .map(|a| {
            Some(InstanceReport {
                version: a.version.clone().unwrap_or_default(),
                healthy: a.version.is_some(),
                shards: set(a).into_iter().collect(),
            })
        })
        .collect()
}

#[test]
fn the_canary_shard_set_is_the_ceiling_share_and_only_grows() {
    let w = World::start(sharded(16, None, &[1, 25, 50, 100]));
    let rollout = w.rollout();
    for count in [1, 2, 7, 16, 100, 4096] {
        let mut before = BTreeSet::new();
        for weight in 0..=100 {
            let now = canary_shards(rollout, count, weight);
            assert_eq!(
                now.len(),
                canary_hosts(count as usize, weight),
                "{count} at {weight}%"
            );
            assert!(
                now.is_superset(&before),
                "{count} shards: {weight}% dropped a shard"
            );
            assert!(now.iter().all(|&s| s < count));
            before = now;
        }
    }
    assert_eq!(canary_shards(rollout, 16, 1).len(), 1);
    assert_eq!(canary_shards(rollout, 16, 25).len(), 4);
    assert_eq!(canary_shards(rollout, 16, 50).len(), 8);
}

#[test]
fn the_canary_shards_are_fixed_by_the_rollout_and_differ_between_rollouts() {
    let a = World::start(sharded(64, None, &[50]));
    let b = World::start(sharded(64, None, &[50]));
    assert_eq!(
        canary_shards(a.rollout(), 64, 50),
        canary_shards(b.rollout(), 64, 50)
    );
    let mut other = a.rollout().clone();
    other.id = RolloutId("bot-2".into());
    assert_ne!(
        canary_shards(a.rollout(), 64, 50),
        canary_shards(&other, 64, 50)
    );
}

#[test]
fn a_stage_change_releases_the_moving_shards_and_the_grant_gives_them_to_the_canary() {
    let mut w = World::start(sharded(16, None, &[25, 50]));
    let fleet = bots(2, 2);
    // At the start, nothing is granted: the canary's shards are released by stable.
    let p = w.placement(&fleet);
    let served: BTreeSet<u32> = p.iter().flat_map(set).collect();
    let moving = canary_shards(w.rollout(), 16, 25);
    assert_eq!(served.len(), 12);
    assert!(served.is_disjoint(&moving));
    assert!(p.iter().filter(|a| a.canary).all(|a| a.shards.is_empty()));
    assert!(p.iter().all(|a| a.version.is_some()));
    // Not grantable while a stable instance still holds them.
    let mut reports = applied(&p);
    reports[0]
        .as_mut()
        .unwrap()
        .shards
        .push(*moving.first().unwrap());
    let moving_held = reports[0].as_ref().unwrap().shards.clone();
    if !set(&p[0]).is_superset(&moving_held.iter().copied().collect()) {
        assert!(matches!(
            shard_handover(&w.reg, "bot", &fleet, &reports, w.now),
            Handover::Waiting(text) if text.contains("still holds")
        ));
    }
    // Nor while a canary instance is not healthy.
    let mut reports = applied(&p);
    reports[2].as_mut().unwrap().healthy = false;
    reports[3].as_mut().unwrap().healthy = false;
    assert!(matches!(
        shard_handover(&w.reg, "bot", &fleet, &reports, w.now),
        Handover::Waiting(text) if text.contains("healthy")
    ));
    // Nor without a report.
    let mut reports = applied(&p);
    reports[1] = None;
    assert!(matches!(
        shard_handover(&w.reg, "bot", &fleet, &reports, w.now),
        Handover::Waiting(text) if text.contains("not reported")
    ));
    // Confirmed: the grant is due and gives the canary side exactly the 25% set.
    let Handover::Due(grant) = shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now) else {
        panic!("grant not due");
    };
    w.apply(*grant).unwrap();
    let p = w.placement(&fleet);
    let canary: BTreeSet<u32> = p.iter().filter(|a| a.canary).flat_map(set).collect();
    let stable: BTreeSet<u32> = p.iter().filter(|a| !a.canary).flat_map(set).collect();
    assert_eq!(canary, moving);
    assert_eq!(stable.len() + canary.len(), 16);
    assert!(stable.is_disjoint(&canary));
    assert_eq!(
        shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now),
        Handover::Idle
    );
    assert!(
        w.rollout()
            .events
            .last()
            .unwrap()
            .reason
            .contains("granted to the canary side")
    );
}

#[test]
fn a_grant_for_another_share_or_another_model_is_refused() {
    let mut w = World::start(sharded(16, None, &[25, 50]));
    let grant = |weight| Command::ShardsGranted {
        id: id(),
        weight,
        schedule_ms: 0,
        reason: "test".into(),
        at: T0,
    };
    let err = w.apply(grant(50)).unwrap_err().to_string();
    assert!(err.contains("target canary share is 25%"), "{err}");
    w.apply(grant(25)).unwrap();
    let err = w.apply(grant(25)).unwrap_err().to_string();
    assert!(err.contains("already granted"), "{err}");
    let mut hosts = World::start(Strategy::from_toml(
        "[[stages]]\nweight = 25\n[deploy]\nmodel = \"hosts\"\n[deploy.command]\nstart = \"s\"\nstop = \"t\"\n",
    ).unwrap());
    let err = hosts.apply(grant(25)).unwrap_err().to_string();
    assert!(err.contains("no shards [deploy] model"), "{err}");
}

#[test]
fn paced_starts_space_the_moving_shards_of_a_bucket_and_hold_the_next_grant() {
    let mut w = World::start(sharded(16, Some(2), &[50, 100]));
    let fleet = bots(2, 2);
    let p = w.placement(&fleet);
    // The first placement paces every start: 8 per bucket.
    let first: Vec<u64> = p
        .iter()
        .flat_map(|a| a.shards.iter().map(|g| g.start_after_ms))
        .collect();
    assert_eq!(first.iter().max(), Some(&(7 * 1200)), "{first:?}");
    assert!(matches!(
        shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now),
        Handover::Waiting(text) if text.contains("paced starts")
    ));
    w.now = T0 + 8 * 1200;
    let Handover::Due(grant) = shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now) else {
        panic!("grant not due");
    };
    let Command::ShardsGranted { schedule_ms, .. } = &*grant else {
        unreachable!()
    };
    // 8 shards move over 2 buckets of 1 s (+20%): ranks 0..n in each bucket.
    let spacing = 1200;
    let schedule_ms = *schedule_ms;
    w.apply(*grant).unwrap();
    let p = w.placement(&fleet);
    let mut by_bucket: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for g in p.iter().filter(|a| a.canary).flat_map(|a| a.shards.clone()) {
        by_bucket
            .entry(g.shard % 2)
            .or_default()
            .push(g.start_after_ms);
    }
    let mut longest = 0;
    for delays in by_bucket.values_mut() {
        delays.sort_unstable();
        let expected: Vec<u64> = (0..delays.len() as u64).map(|n| n * spacing).collect();
        assert_eq!(*delays, expected);
        longest = longest.max(*delays.last().unwrap());
    }
    assert_eq!(schedule_ms, longest);
    assert!(
        p.iter()
            .filter(|a| !a.canary)
            .flat_map(|a| a.shards.clone())
            .all(|g| g.start_after_ms == 0)
    );
    // The next stage's grant waits until the paced starts are over plus one spacing.
    w.pass_stage().unwrap();
    let p = w.placement(&fleet);
    let free_at = w.now + schedule_ms as Millis + spacing as Millis;
    w.now = free_at - 1;
    assert!(matches!(
        shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now),
        Handover::Waiting(text) if text.contains("paced starts")
    ));
    w.now = free_at;
    assert!(matches!(
        shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now),
        Handover::Due(_)
    ));
}

#[test]
fn a_promotion_replaces_the_stable_bots_only_once_they_serve_nothing_then_shards_return() {
    let mut w = World::start(sharded(8, None, &[50]));
    let fleet = bots(2, 1);
    let converge = |w: &mut World| {
        while let Handover::Due(grant) =
            shard_handover(&w.reg, "bot", &fleet, &applied(&w.placement(&fleet)), w.now)
        {
            w.apply(*grant).unwrap();
        }
    };
    converge(&mut w);
    w.act("promote").unwrap();
    let p = w.placement(&fleet);
    assert!(
        p.iter()
            .filter(|a| !a.canary)
            .all(|a| a.version.as_deref() == Some("v1")),
        "the stable bots still serve shards: not replaced yet"
    );
    assert!(crate::deploy::settle_due(&w.reg, "bot", true, w.now).is_none());
    converge(&mut w);
    let p = w.placement(&fleet);
    assert!(
        p.iter()
            .filter(|a| !a.canary)
            .all(|a| a.version.as_deref() == Some("v2") && a.shards.is_empty())
    );
    assert_eq!(p.iter().filter(|a| a.canary).flat_map(set).count(), 8);
    let settle = crate::deploy::settle_due(&w.reg, "bot", true, w.now).expect("settle due");
    w.apply(settle).unwrap();
    // Settled: the canary releases everything; it runs until the stable side is granted.
    let p = w.placement(&fleet);
    assert!(p.iter().all(|a| a.shards.is_empty()));
    assert_eq!(
        p.iter().find(|a| a.canary).unwrap().version.as_deref(),
        Some("v2")
    );
    converge(&mut w);
    let p = w.placement(&fleet);
    assert_eq!(p.iter().filter(|a| !a.canary).flat_map(set).count(), 8);
    assert_eq!(p.iter().find(|a| a.canary).unwrap().version, None);
}

#[test]
fn a_rollback_returns_the_canary_shards_to_stable_and_removes_the_canary_after() {
    let mut w = World::start(sharded(16, None, &[25, 50]));
    let fleet = bots(2, 2);
    let grant = shard_handover(&w.reg, "bot", &fleet, &applied(&w.placement(&fleet)), w.now);
    let Handover::Due(grant) = grant else {
        panic!()
    };
    w.apply(*grant).unwrap();
    w.act("rollback").unwrap();
    let p = w.placement(&fleet);
    assert_eq!(p.iter().filter(|a| !a.canary).flat_map(set).count(), 12);
    assert!(
        p.iter()
            .filter(|a| a.canary)
            .all(|a| a.shards.is_empty() && a.version.is_some())
    );
    let grant = shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now);
    let Handover::Due(grant) = grant else {
        panic!()
    };
    w.apply(*grant).unwrap();
    let p = w.placement(&fleet);
    assert_eq!(p.iter().filter(|a| !a.canary).flat_map(set).count(), 16);
    assert!(
        p.iter()
            .filter(|a| !a.canary)
            .all(|a| a.version.as_deref() == Some("v1"))
    );
    assert!(p.iter().filter(|a| a.canary).all(|a| a.version.is_none()));
}

/// Agents that apply their placement at random moments, a controller that grants whenever
/// due, stage passes, promotions and rollbacks at random: no shard is ever held by two
/// instances, the canary set never shrinks while live, and once every agent applied the last
/// placement every shard is held exactly once, on the side the rollout says.
#[test]
fn no_shard_is_ever_held_twice_whatever_order_the_agents_apply_in() {
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = [1, 3, 16, 40][rng.random_range(0..4)];
        let fleet = bots(rng.random_range(1..4), rng.random_range(1..3));
        let mut w = World::start(sharded(count, None, &[1, 25, 50, 100]));
        let mut held: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); fleet.len()];
        // Before the rollout the stable bots served everything.
        let stable_before: BTreeSet<u32> = (0..count).collect();
        let stables: Vec<usize> = (0..fleet.len()).filter(|&i| !fleet[i].canary).collect();
        for shard in stable_before {
            held[stables[shard as usize % stables.len()]].insert(shard);
        }
        let mut ended = false;
        for _step in 0..200 {
            let reports: Vec<Option<InstanceReport>> = w
                .placement(&fleet)
                .iter()
                .zip(&held)
                .map(|(a, h)| {
                    Some(InstanceReport {
                        version: a.version.clone().unwrap_or_default(),
                        healthy: a.version.is_some(),
                        shards: h.iter().copied().collect(),
                    })
                })
                .collect();
            match rng.random_range(0..10) {
                0..=4 => {
                    // One agent applies: it drops what it must release, takes what it is given.
                    let i = rng.random_range(0..fleet.len());
                    held[i] = set(&w.placement(&fleet)[i]);
                }
                5..=6 => {
                    if let Handover::Due(grant) =
                        shard_handover(&w.reg, "bot", &fleet, &reports, w.now)
                    {
                        w.apply(*grant).unwrap();
                    }
                }
                7 => {
                    let _ = w.pass_stage();
                }
                8 if !ended => {
                    ended = true;
                    let _ = w.act(if rng.random_bool(0.5) {
                        "promote"
                    } else {
                        "rollback"
                    });
                }
                _ => {
                    if let Some(settle) = crate::deploy::settle_due(&w.reg, "bot", true, w.now) {
                        w.apply(settle).unwrap();
                    }
                }
            }
            let mut owners: BTreeMap<u32, usize> = BTreeMap::new();
            for h in &held {
                for &s in h {
                    *owners.entry(s).or_default() += 1;
                }
            }
            assert!(
                owners.values().all(|&n| n == 1),
                "seed {seed}: a shard held twice: {held:?}"
            );
        }
        // Converge: every agent applies, the controller grants and settles until idle.
        for _ in 0..8 {
            for (i, a) in w.placement(&fleet).iter().enumerate() {
                held[i] = set(a);
            }
            if let Some(settle) = crate::deploy::settle_due(&w.reg, "bot", true, w.now) {
                w.apply(settle).unwrap();
            }
            let p = w.placement(&fleet);
            if let Handover::Due(grant) = shard_handover(&w.reg, "bot", &fleet, &applied(&p), w.now)
            {
                w.apply(*grant).unwrap();
            }
        }
        let p = w.placement(&fleet);
        let mut all: Vec<u32> = p.iter().flat_map(set).collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..count).collect::<Vec<_>>(),
            "seed {seed}: not every shard served once"
        );
        let canary: BTreeSet<u32> = p.iter().filter(|a| a.canary).flat_map(set).collect();
        let r = w.rollout();
        let expected = if r.state.is_terminal() {
            BTreeSet::new()
        } else {
            canary_shards(r, count, r.shard_target_weight())
        };
        assert_eq!(canary, expected, "seed {seed}: {:?}", r.state);
    }
}
