//! Exhaustive tests of the placement: rounding, the prefix property, every state of both
//! models, undo pins, determinism, and when a promotion settles.

use std::collections::BTreeSet;
use std::time::Duration;

use super::*;
use crate::rollout::{Actor, Generation, RolloutId};
use crate::strategy::{Stage, Strategy};

const T0: Millis = 1_000_000;

fn strategy(weights: &[u32], model: Option<&str>) -> Strategy {
    let mut s = Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap();
    s.stages = weights
        .iter()
        .map(|&weight| Stage {
            weight,
            min_duration: Duration::from_secs(10),
            max_duration: None,
            manual_gate: false,
        })
        .collect();
    s.deploy = model.map(|model| {
        Strategy::from_toml(&format!(
            "[[stages]]\nweight = 5\n[deploy]\nmodel = \"{model}\"\n\
             [deploy.command]\nstart = \"start {{version}}\"\nstop = \"stop\"\n"
        ))
        .unwrap()
        .deploy
        .unwrap()
    });
    s
}

/// Applies commands at successive log indexes.
struct Log {
    reg: Registry,
    index: u64,
}

impl Log {
    fn new() -> Log {
        Log {
            reg: Registry::default(),
            index: 0,
        }
    }

    fn apply(&mut self, command: Command) {
        self.index += 1;
        let generation = Generation {
            term: 1,
            index: self.index,
        };
        if let Err(e) = self.reg.apply(command, generation) {
            panic!("rejected: {e}");
        }
    }

    fn start(&mut self, rid: &str, version: &str, weights: &[u32], model: Option<&str>) {
        let stable = (!self.reg.services.contains_key("api")).then(|| "v1".into());
        self.apply(Command::Start {
            id: RolloutId(rid.into()),
            service: "api".into(),
            version: version.into(),
            stable_version: stable,
            strategy: strategy(weights, model),
            actor: Actor::Operator("ana".into()),
            at: T0,
        });
    }

    fn operator(&mut self, rid: &str, action: &str) {
        let (id, actor, reason, at) = (
            RolloutId(rid.into()),
            Actor::Operator("ana".into()),
            format!("{action} by hand"),
            T0 + 1,
        );
        self.apply(match action {
            "promote" => Command::Promote {
                id,
                actor,
                reason,
                analysis: None,
                at,
            },
            "abort" => Command::Abort {
                id,
                actor,
                reason,
                analysis: None,
                at,
            },
            "rollback" => Command::RollBack {
                id,
                reason,
                analysis: None,
                at,
            },
            "pause" => Command::Pause {
                id,
                actor,
                reason,
                at,
            },
            "settle" => Command::DeploySettled { id, reason, at },
            _ => unreachable!("{action}"),
        });
    }

    fn rollout_mut(&mut self, rid: &str) -> &mut Rollout {
        self.reg.rollouts.get_mut(&RolloutId(rid.into())).unwrap()
    }
}

/// `n` managed instances over three agents; every third one declared canary.
fn fleet(n: usize) -> Vec<ManagedInstance> {
    (0..n)
        .map(|i| ManagedInstance {
            agent: format!("host-{}", i % 3),
            instance: format!("api-{i}"),
            canary: i % 3 == 2,
        })
        .collect()
}

/// (instance, version, canary) of each assignment, in order.
fn table(assignments: &[Assignment]) -> Vec<(String, Option<String>, bool)> {
    assignments
        .iter()
        .map(|a| (a.instance.clone(), a.version.clone(), a.canary))
        .collect()
}

fn canaries(assignments: &[Assignment]) -> BTreeSet<(String, String)> {
    assignments
        .iter()
        .filter(|a| a.canary)
        .map(|a| (a.agent.clone(), a.instance.clone()))
        .collect()
}

fn some(v: &str) -> Option<String> {
    Some(v.to_owned())
}

// --- canary_hosts -------------------------------------------------------------------------------

#[test]
fn canary_hosts_rounds_up_with_at_least_one_and_at_most_all() {
    for (n, weight, expected) in [
        (0, 50, 0),
        (10, 0, 0),
        (10, 1, 1),
        (10, 10, 1),
        (10, 11, 2),
        (8, 10, 1),
        (8, 50, 4),
        (3, 33, 1),
        (3, 34, 2),
        (3, 67, 3),
        (20, 100, 20),
        (1, 1, 1),
        (5, 150, 5),
    ] {
        assert_eq!(canary_hosts(n, weight), expected, "n={n} weight={weight}");
    }
}

#[test]
fn canary_hosts_is_the_ceiling_share_and_grows_with_the_weight_for_every_fleet_size() {
    for n in 1..=20usize {
        assert_eq!(canary_hosts(n, 0), 0);
        let mut previous = 0;
        for weight in 1..=100u32 {
            let k = canary_hosts(n, weight);
            assert!((1..=n).contains(&k), "n={n} weight={weight}: {k}");
            let share = n * weight as usize;
            assert!(k * 100 >= share, "n={n} weight={weight}: {k} is short");
            assert!(
                k == 1 || (k - 1) * 100 < share,
                "n={n} weight={weight}: {k} is one too many"
            );
            assert!(k >= previous, "n={n} weight={weight}: shrank");
            previous = k;
        }
        assert_eq!(previous, n, "100% is every instance");
    }
}

// --- hosts model --------------------------------------------------------------------------------

#[test]
fn the_same_hosts_stay_canary_as_the_weight_grows_for_every_fleet_size() {
    let weights: Vec<u32> = (1..=100).collect();
    for n in 1..=20 {
        let mut log = Log::new();
        log.start("api-1", "v2", &weights, Some("hosts"));
        let instances = fleet(n);
        // Weight 0: the canary gets nothing while a pre_rollout hook is pending.
        log.rollout_mut("api-1").hooks.pre_rollout_pending = vec!["ticket".into()];
        let at_zero = assignments(&log.reg, "api", &instances);
        assert!(canaries(&at_zero).is_empty(), "n={n} at 0%");
        assert!(
            at_zero
                .iter()
                .all(|a| a.version.as_deref() == Some("v1") && !a.canary)
        );
        log.rollout_mut("api-1").hooks.pre_rollout_pending.clear();
        let mut previous = BTreeSet::new();
        for (stage, &weight) in weights.iter().enumerate() {
            log.rollout_mut("api-1").stage_index = stage;
            let now = assignments(&log.reg, "api", &instances);
            let chosen = canaries(&now);
            assert_eq!(
                chosen.len(),
                canary_hosts(n, weight),
                "n={n} weight={weight}"
            );
            assert!(
                previous.is_subset(&chosen),
                "n={n} weight={weight}: {previous:?} not within {chosen:?}"
            );
            for a in &now {
                let expected = if a.canary { "v2" } else { "v1" };
                assert_eq!(a.version.as_deref(), Some(expected), "n={n} {a:?}");
            }
            previous = chosen;
        }
    }
}

#[test]
fn the_hosts_choice_ignores_the_declared_variant_and_the_order_of_the_instances() {
    let mut log = Log::new();
    log.start("api-1", "v2", &[30, 60], Some("hosts"));
    let instances = fleet(10);
    let chosen = canaries(&assignments(&log.reg, "api", &instances));
    let mut flipped: Vec<_> = instances
        .iter()
        .cloned()
        .map(|mut m| {
            m.canary = !m.canary;
            m
        })
        .collect();
    flipped.reverse();
    let again = assignments(&log.reg, "api", &flipped);
    assert_eq!(canaries(&again), chosen);
    assert_eq!(
        again
            .iter()
            .map(|a| a.instance.as_str())
            .collect::<Vec<_>>(),
        flipped
            .iter()
            .map(|m| m.instance.as_str())
            .collect::<Vec<_>>(),
        "assignments come in the order of the instances given"
    );
}

#[test]
fn the_hosts_choice_is_pinned_by_a_stable_hash_of_rollout_agent_and_instance() {
    // The same inputs give the same choice on every leader and build: this exact set.
    let mut log = Log::new();
    log.start("api-1", "v2", &[30, 60], Some("hosts"));
    let chosen: Vec<_> = canaries(&assignments(&log.reg, "api", &fleet(10)))
        .into_iter()
        .map(|(_, instance)| instance)
        .collect();
    assert_eq!(chosen, PINNED_CHOICE);
    // Another rollout of the same fleet chooses afresh.
    let mut other = Log::new();
    other.start("api-2", "v2", &[30, 60], Some("hosts"));
    let theirs: Vec<_> = canaries(&assignments(&other.reg, "api", &fleet(10)))
        .into_iter()
        .map(|(_, instance)| instance)
        .collect();
    assert_eq!(theirs.len(), 3);
    assert_ne!(theirs, chosen);
    // The choice spreads over the agents instead of following their names.
    let agents: BTreeSet<_> = canaries(&assignments(&log.reg, "api", &fleet(30)))
        .into_iter()
        .map(|(agent, _)| agent)
        .collect();
    assert_eq!(agents.len(), 3, "{agents:?}");
    // The hash itself: FNV-1a 64 with a 0xff after each part.
    assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
    assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
}

const PINNED_CHOICE: [&str; 3] = ["api-9", "api-5", "api-8"];

#[test]
fn a_hosts_rollback_or_abort_restores_the_previous_version_everywhere() {
    for action in ["rollback", "abort"] {
        let mut log = Log::new();
        log.start("api-1", "v2", &[50, 100], Some("hosts"));
        assert_eq!(canaries(&assignments(&log.reg, "api", &fleet(6))).len(), 3);
        log.operator("api-1", action);
        let after = assignments(&log.reg, "api", &fleet(6));
        assert_eq!(after.len(), 6);
        assert!(
            after
                .iter()
                .all(|a| a.version.as_deref() == Some("v1") && !a.canary),
            "{action}: {after:?}"
        );
    }
}

#[test]
fn a_hosts_promotion_runs_the_new_version_everywhere_as_stable() {
    let mut log = Log::new();
    log.start("api-1", "v2", &[50, 100], Some("hosts"));
    log.operator("api-1", "pause");
    assert_eq!(
        canaries(&assignments(&log.reg, "api", &fleet(6))).len(),
        3,
        "a paused rollout holds its share"
    );
    log.operator("api-1", "promote");
    let after = assignments(&log.reg, "api", &fleet(6));
    assert!(
        after
            .iter()
            .all(|a| a.version.as_deref() == Some("v2") && !a.canary),
        "{after:?}"
    );
}

// --- weighted model -----------------------------------------------------------------------------

fn weighted_fleet() -> Vec<ManagedInstance> {
    ["s1", "s2", "c1"]
        .iter()
        .map(|name| ManagedInstance {
            agent: "host-a".into(),
            instance: (*name).into(),
            canary: name.starts_with('c'),
        })
        .collect()
}

#[test]
fn weighted_canary_instances_run_the_canary_beside_the_stable_ones_while_live() {
    let mut log = Log::new();
    log.start("api-1", "v2", &[10, 50], Some("weighted"));
    let expected = vec![
        ("s1".to_owned(), some("v1"), false),
        ("s2".to_owned(), some("v1"), false),
        ("c1".to_owned(), some("v2"), true),
    ];
    assert_eq!(
        table(&assignments(&log.reg, "api", &weighted_fleet())),
        expected
    );
    log.operator("api-1", "pause");
    assert_eq!(
        table(&assignments(&log.reg, "api", &weighted_fleet())),
        expected
    );
}

#[test]
fn a_weighted_promotion_replaces_the_stable_instances_and_removes_the_canary_once_settled() {
    let mut log = Log::new();
    log.start("api-1", "v2", &[10, 50], Some("weighted"));
    log.operator("api-1", "promote");
    assert_eq!(
        table(&assignments(&log.reg, "api", &weighted_fleet())),
        [
            ("s1".to_owned(), some("v2"), false),
            ("s2".to_owned(), some("v2"), false),
            ("c1".to_owned(), some("v2"), true),
        ],
        "promoted, not settled: the canary keeps running while the stable ones are replaced"
    );
    log.operator("api-1", "settle");
    assert_eq!(
        table(&assignments(&log.reg, "api", &weighted_fleet())),
        [
            ("s1".to_owned(), some("v2"), false),
            ("s2".to_owned(), some("v2"), false),
            ("c1".to_owned(), None, true),
        ]
    );
}

#[test]
fn a_weighted_rollback_or_abort_removes_the_canary_and_keeps_the_old_stable() {
    for action in ["rollback", "abort"] {
        let mut log = Log::new();
        log.start("api-1", "v2", &[10, 50], Some("weighted"));
        log.operator("api-1", action);
        assert_eq!(
            table(&assignments(&log.reg, "api", &weighted_fleet())),
            [
                ("s1".to_owned(), some("v1"), false),
                ("s2".to_owned(), some("v1"), false),
                ("c1".to_owned(), None, true),
            ],
            "{action}"
        );
    }
}

#[test]
fn a_rollout_without_deploy_or_an_unknown_service_assigns_nothing() {
    let mut log = Log::new();
    assert!(assignments(&log.reg, "api", &fleet(4)).is_empty());
    log.start("api-1", "v2", &[10, 50], None);
    assert!(assignments(&log.reg, "api", &fleet(4)).is_empty());
    log.operator("api-1", "promote");
    assert!(assignments(&log.reg, "api", &fleet(4)).is_empty());
    // The service's latest rollout decides: a later one with [deploy] deploys.
    log.start("api-2", "v3", &[10, 50], Some("weighted"));
    assert_eq!(assignments(&log.reg, "api", &fleet(4)).len(), 4);
    assert!(assignments(&log.reg, "other", &fleet(4)).is_empty());
    // And a later one without gives nothing again.
    log.operator("api-2", "abort");
    log.start("api-3", "v4", &[10, 50], None);
    assert!(assignments(&log.reg, "api", &fleet(4)).is_empty());
}

// --- undo ---------------------------------------------------------------------------------------

#[test]
fn after_an_undo_every_instance_runs_the_pinned_version_and_weighted_canaries_none() {
    for model in ["weighted", "hosts"] {
        let mut log = Log::new();
        log.start("api-1", "v2", &[10, 50], Some(model));
        log.operator("api-1", "promote");
        log.start("api-2", "v3", &[10, 50], Some(model));
        log.operator("api-2", "promote");
        // v1 runs nowhere now, but serin deploys it itself: the undo is not refused.
        log.apply(Command::Undo {
            service: "api".into(),
            to_revision: 1,
            actor: Actor::Operator("ana".into()),
            reason: "bad release".into(),
            at: T0 + 100,
        });
        let expected_canary = match model {
            "weighted" => ("c1".to_owned(), None, true),
            _ => ("c1".to_owned(), some("v1"), false),
        };
        assert_eq!(
            table(&assignments(&log.reg, "api", &weighted_fleet())),
            [
                ("s1".to_owned(), some("v1"), false),
                ("s2".to_owned(), some("v1"), false),
                expected_canary,
            ],
            "{model}"
        );
        let plan = log.reg.traffic("api").unwrap();
        assert_eq!(
            (plan.canary_weight, plan.stable_version.as_str()),
            (0, "v1"),
            "{model}: the pinned traffic goes to the stable instances serin runs v1 on"
        );
    }
}

// --- settle_due ---------------------------------------------------------------------------------

#[test]
fn settling_is_due_once_a_weighted_promotion_has_every_stable_instance_ready() {
    let mut log = Log::new();
    log.start("api-1", "v2", &[10, 50], Some("weighted"));
    assert_eq!(settle_due(&log.reg, "api", true, T0), None, "still live");
    log.operator("api-1", "promote");
    assert_eq!(settle_due(&log.reg, "api", false, T0), None, "not ready");
    assert_eq!(settle_due(&log.reg, "other", true, T0), None);
    let command = settle_due(&log.reg, "api", true, T0 + 5).expect("due");
    let Command::DeploySettled { id, reason, at } = &command else {
        panic!("{command:?}")
    };
    assert_eq!((id.0.as_str(), *at), ("api-1", T0 + 5));
    assert!(
        reason.contains("every stable instance runs v2 healthy"),
        "{reason}"
    );
    log.apply(command);
    assert_eq!(
        settle_due(&log.reg, "api", true, T0 + 6),
        None,
        "settled once"
    );
}

#[test]
fn settling_is_never_due_for_hosts_without_deploy_or_after_an_undo() {
    for model in [Some("hosts"), None] {
        let mut log = Log::new();
        log.start("api-1", "v2", &[10, 50], model);
        log.operator("api-1", "promote");
        assert_eq!(settle_due(&log.reg, "api", true, T0), None, "{model:?}");
    }
    let mut log = Log::new();
    log.start("api-1", "v2", &[10, 50], Some("weighted"));
    log.operator("api-1", "promote");
    log.apply(Command::Undo {
        service: "api".into(),
        to_revision: 0,
        actor: Actor::Operator("ana".into()),
        reason: String::new(),
        at: T0 + 100,
    });
    assert_eq!(settle_due(&log.reg, "api", true, T0 + 200), None);
}
