//! Exhaustive tests of `Undo`: which revision it goes to, every refusal (each changes nothing),
//! the traffic of a pinned service, and a rollout after an undo.

use std::collections::BTreeSet;
use std::time::Duration;

use super::super::*;
use super::UndoRefusal;
use crate::agents::{DeployPlans, desired_state};
use crate::strategy::{Stage, Strategy, Traffic};

const T0: Millis = 1_000_000;

fn strategy() -> Strategy {
    Strategy {
        stages: vec![Stage {
            weight: 50,
            min_duration: Duration::from_secs(10),
            max_duration: None,
            manual_gate: false,
        }],
        checks: vec![],
        triggers: vec![],
        traffic: Traffic::default(),
        hooks: Vec::new(),
        deploy: None,
        on_inconclusive: crate::strategy::OnInconclusive::Pause,
    }
}

fn generation(index: u64) -> Generation {
    Generation { term: 1, index }
}

/// Applies `command` at the next log index.
fn apply(reg: &mut Registry, command: Command) -> Result<Applied, Rejection> {
    let index = reg
        .services
        .values()
        .map(|s| s.generation.index)
        .max()
        .unwrap_or(0)
        + 1;
    reg.apply(command, generation(index))
}

fn start(reg: &mut Registry, rid: &str, version: &str, stable: Option<&str>) {
    apply(
        reg,
        Command::Start {
            id: RolloutId(rid.into()),
            service: "api".into(),
            version: version.into(),
            stable_version: stable.map(str::to_owned),
            strategy: strategy(),
            actor: Actor::Operator("ana".into()),
            at: T0,
        },
    )
    .unwrap();
}

fn finish(reg: &mut Registry, rid: &str, promote: bool) {
    let (id, actor, reason, analysis, at) = (
        RolloutId(rid.into()),
        Actor::Operator("ana".into()),
        "by hand".to_owned(),
        None,
        T0 + 1,
    );
    let command = if promote {
        Command::Promote {
            id,
            actor,
            reason,
            analysis,
            at,
        }
    } else {
        Command::Abort {
            id,
            actor,
            reason,
            analysis,
            at,
        }
    };
    apply(reg, command).unwrap();
}

/// `api` promoted through `versions` (the first is revision 1), one rollout each.
fn promoted(versions: &[&str]) -> Registry {
    let mut reg = Registry::default();
    for (i, pair) in versions.windows(2).enumerate() {
        let rid = format!("r{}", i + 2);
        start(&mut reg, &rid, pair[1], (i == 0).then_some(pair[0]));
        finish(&mut reg, &rid, true);
    }
    reg
}

fn undo(to_revision: u32) -> Command {
    Command::Undo {
        service: "api".into(),
        to_revision,
        actor: Actor::Operator("ana".into()),
        reason: "bad release".into(),
        at: T0 + 100,
    }
}

fn versions(reg: &Registry) -> Vec<(u32, String, Option<u32>)> {
    reg.services["api"]
        .revisions
        .iter()
        .map(|r| (r.number, r.version.clone(), r.undo_of))
        .collect()
}

fn member(address: &str, canary: bool, version: Option<&str>) -> UpstreamMember {
    UpstreamMember {
        address: address.into(),
        canary,
        instance: format!("api-{address}"),
        agent: format!("host-{address}"),
        version: version.map(str::to_owned),
    }
}

fn set_members(reg: &mut Registry, members: Vec<UpstreamMember>) {
    apply(
        reg,
        Command::SetUpstreams {
            service: "api".into(),
            members,
            reason: "test".into(),
            at: T0 + 50,
        },
    )
    .unwrap();
}

/// Refused, and the registry is exactly as before.
fn refused(reg: &Registry, command: Command) -> UndoRefusal {
    let mut copy = reg.clone();
    let err = apply(&mut copy, command).unwrap_err();
    assert_eq!(&copy, reg, "a refused undo changed the registry");
    match err {
        Rejection::Undo(refusal) => refusal,
        other => panic!("not an undo refusal: {other:?}"),
    }
}

#[test]
fn undo_appends_the_old_version_as_a_new_revision_and_pins_the_traffic_to_it() {
    let mut reg = promoted(&["v1", "v2"]);
    let applied = apply(&mut reg, undo(1)).unwrap();
    assert!(applied.traffic_changed);
    assert_eq!(
        versions(&reg),
        [
            (1, "v1".into(), None),
            (2, "v2".into(), None),
            (3, "v1".into(), Some(1))
        ]
    );
    let service = &reg.services["api"];
    assert_eq!(service.pinned, Some(3));
    assert_eq!(service.stable_version(), Some("v1"));
    let event = service.history.last().unwrap();
    assert_eq!(
        event.reason,
        "undo to revision 1 (v1) by operator:ana, as revision 3: bad release"
    );
    assert_eq!(event.generation, service.generation);
    // v1 ran on the stable instances in r2: all the traffic goes there, no rollout.
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (
            plan.canary_weight,
            plan.stable_version.as_str(),
            &plan.rollout
        ),
        (0, "v1", &None)
    );
    assert_eq!(plan.generation, service.generation);
}

#[test]
fn the_default_is_the_previous_revision_so_undo_twice_goes_back_and_forth() {
    let mut reg = promoted(&["v1", "v2"]);
    apply(&mut reg, undo(0)).unwrap();
    assert_eq!(reg.services["api"].stable_version(), Some("v1"));
    apply(&mut reg, undo(0)).unwrap();
    assert_eq!(
        versions(&reg).last().unwrap(),
        &(4, "v2".into(), Some(2)),
        "the previous of revision 3 is revision 2"
    );
    // v2 ran on the canary instances: the whole share goes to them.
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (plan.canary_weight, plan.canary_version.as_str()),
        (100, "v2")
    );
}

/// From every current revision of a five-version history, to every earlier revision whose
/// version differs: the undo lands there, with instances declaring every version.
#[test]
fn any_earlier_revision_can_be_reached_when_instances_declare_their_versions() {
    let all = ["v1", "v2", "v3", "v4", "v5"];
    let fleet: Vec<UpstreamMember> = all
        .iter()
        .enumerate()
        .map(|(i, v)| member(&format!("10.0.0.{i}:80"), i % 2 == 1, Some(v)))
        .collect();
    for last in 2..=all.len() {
        for target in 1..last {
            let mut reg = promoted(&all[..last]);
            set_members(&mut reg, fleet.clone());
            apply(&mut reg, undo(target as u32)).unwrap();
            let want = all[target - 1];
            assert_eq!(
                versions(&reg).last().unwrap(),
                &((last + 1) as u32, want.to_owned(), Some(target as u32)),
                "{last} revisions, undo to {target}"
            );
            let pin = reg.pin("api").unwrap();
            assert_eq!(pin.version, want);
            let desired = desired_state(
                &reg,
                &BTreeSet::from(["api".to_owned()]),
                &["api".into()],
                &DeployPlans::default(),
                "",
            );
            let api = &desired.services[0];
            assert_eq!(api.canary_weight, 0);
            assert!(api.rollout_id.is_empty());
            let servers: Vec<(&str, i32, &str)> = api
                .servers
                .iter()
                .map(|s| (s.address.as_str(), s.variant, s.version.as_str()))
                .collect();
            assert_eq!(
                servers,
                [(
                    fleet[target - 1].address.as_str(),
                    serin_proto::v1::Variant::Stable as i32,
                    want
                )],
                "only the instance that runs {want}, on the stable side"
            );
        }
    }
}

#[test]
fn members_without_a_declared_version_are_placed_by_the_last_rollout() {
    let mut reg = promoted(&["v1", "v2"]);
    set_members(
        &mut reg,
        vec![
            member("a:80", false, None),
            member("b:80", false, None),
            member("c:80", true, None),
            member("d:80", true, Some("v1")),
        ],
    );
    apply(&mut reg, undo(1)).unwrap();
    let desired = desired_state(
        &reg,
        &BTreeSet::from(["api".to_owned()]),
        &["api".into()],
        &DeployPlans::default(),
        "",
    );
    let addresses: Vec<&str> = desired.services[0]
        .servers
        .iter()
        .map(|s| s.address.as_str())
        .collect();
    assert_eq!(addresses, ["a:80", "b:80", "d:80"]);
    // An app agent (no balancer) gets only the plan.
    let app = desired_state(
        &reg,
        &BTreeSet::from(["api".to_owned()]),
        &[],
        &DeployPlans::default(),
        "",
    );
    assert!(app.services[0].servers.is_empty());
    assert_eq!(app.services[0].stable_version, "v1");
}

#[test]
fn every_refusal_names_the_problem_and_changes_nothing() {
    // Unknown service, and a service known only from its upstreams.
    let mut reg = Registry::default();
    assert_eq!(
        refused(&reg, undo(1)),
        UndoRefusal::UnknownService("api".into())
    );
    set_members(&mut reg, vec![member("a:80", false, None)]);
    assert!(matches!(
        refused(&reg, undo(1)),
        UndoRefusal::UnknownService(_)
    ));

    // Only revision 1: a rollout that was aborted promoted nothing.
    let mut reg = Registry::default();
    start(&mut reg, "r2", "v2", Some("v1"));
    let busy = refused(&reg, undo(1));
    assert_eq!(
        busy.to_string(),
        "service 'api' has rollout 'r2' in progress; abort rollout r2 first (`serin rollout abort r2`)"
    );
    finish(&mut reg, "r2", false);
    assert_eq!(
        refused(&reg, undo(0)).to_string(),
        "service 'api' has only revision 1 (v1); there is nothing to undo"
    );

    let mut reg = promoted(&["v1", "v2"]);
    for asked in [3, 4, 99, u32::MAX] {
        assert_eq!(
            refused(&reg, undo(asked)).to_string(),
            format!(
                "to_revision: revision {asked} does not exist: service 'api' has revisions 1..=2"
            )
        );
    }
    assert_eq!(
        refused(&reg, undo(2)).to_string(),
        "service 'api' is already at revision 2 (v2), the version of revision 2; nothing to undo"
    );
    // After undoing to 1 (revision 3 = v1), revision 1 has the current version too.
    apply(&mut reg, undo(1)).unwrap();
    assert!(matches!(
        refused(&reg, undo(1)),
        UndoRefusal::AlreadyAt {
            current: 3,
            asked: 1,
            ..
        }
    ));

    // A rollout in progress after an undo blocks the next one.
    start(&mut reg, "r9", "v9", None);
    assert!(matches!(
        refused(&reg, undo(2)),
        UndoRefusal::RolloutActive { .. }
    ));
}

#[test]
fn an_undo_to_a_version_no_instance_runs_is_refused_naming_what_runs() {
    // Without an inventory, the last rollout (v2 over v3's predecessor) says where versions run.
    let reg = promoted(&["v1", "v2", "v3"]);
    let err = refused(&reg, undo(1));
    assert_eq!(
        err,
        UndoRefusal::NotRunning {
            service: "api".into(),
            revision: 1,
            version: "v1".into(),
            running: "v2, v3".into(),
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("no instance of service 'api' is known to run v1"),
        "{text}"
    );
    assert!(
        text.contains("redeploying arrives with containers"),
        "{text}"
    );
    // With an inventory whose instances declare other versions, the same.
    let mut reg = promoted(&["v1", "v2"]);
    set_members(
        &mut reg,
        vec![
            member("a:80", false, Some("v2")),
            member("b:80", true, Some("v3")),
        ],
    );
    assert!(matches!(
        refused(&reg, undo(1)),
        UndoRefusal::NotRunning { ref running, .. } if running == "v2, v3"
    ));
    // Once an instance declares v1, it is allowed.
    set_members(
        &mut reg,
        vec![
            member("a:80", false, Some("v2")),
            member("c:80", true, Some("v1")),
        ],
    );
    apply(&mut reg, undo(1)).unwrap();
}

#[test]
fn a_rollout_after_an_undo_starts_from_the_undone_to_version_and_ends_the_pin() {
    let mut reg = promoted(&["v1", "v2"]);
    apply(&mut reg, undo(1)).unwrap();
    let mut wrong = reg.clone();
    assert!(matches!(
        apply(
            &mut wrong,
            Command::Start {
                id: RolloutId("r3".into()),
                service: "api".into(),
                version: "v3".into(),
                stable_version: Some("v2".into()),
                strategy: strategy(),
                actor: Actor::Controller,
                at: T0,
            }
        ),
        Err(Rejection::StableVersionMismatch { ref known, .. }) if known == "v1"
    ));
    start(&mut reg, "r3", "v3", None);
    let service = &reg.services["api"];
    assert_eq!(service.pinned, None);
    assert_eq!(reg.rollouts[&RolloutId("r3".into())].stable_version, "v1");
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (
            plan.canary_weight,
            plan.stable_version.as_str(),
            plan.canary_version.as_str()
        ),
        (50, "v1", "v3")
    );
    finish(&mut reg, "r3", true);
    assert_eq!(
        versions(&reg).last().unwrap(),
        &(4, "v3".into(), None),
        "promotion after an undo appends as usual"
    );
}

#[test]
fn a_registry_saved_before_revisions_had_undo_loads() {
    let reg = promoted(&["v1", "v2"]);
    let mut json: serde_json::Value = serde_json::to_value(&reg).unwrap();
    assert!(json["services"]["api"].get("pinned").is_none());
    assert!(
        json["services"]["api"]["revisions"][0]
            .get("undo_of")
            .is_none()
    );
    json["services"]["api"]
        .as_object_mut()
        .unwrap()
        .remove("history");
    let back: Registry = serde_json::from_value(json).unwrap();
    assert_eq!(
        back.services["api"].revisions,
        reg.services["api"].revisions
    );
    assert_eq!(back.services["api"].pinned, None);
}

#[test]
fn an_undo_command_round_trips_through_the_log_format() {
    let command = undo(2);
    let text = serde_json::to_string(&command).unwrap();
    assert!(text.contains(r#""command":"undo""#), "{text}");
    assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), command);
    assert_eq!(command.rollout_id(), None);
    assert_eq!(command.action(), "undo");
}
