//! Exhaustive tests of the rollout state machine and the controller's decisions.

use std::time::Duration;

use super::*;
use crate::analysis::{Pair, Window, analyse_stage};
use crate::strategy::{Check, Metric, Rule, Stage, Traffic, Trigger};

const T0: Millis = 1_000_000;

fn stage(weight: u32, min_secs: u64) -> Stage {
    Stage {
        weight,
        min_duration: Duration::from_secs(min_secs),
        max_duration: None,
        manual_gate: false,
    }
}

fn strategy(weights: &[u32]) -> Strategy {
    Strategy {
        stages: weights.iter().map(|&w| stage(w, 10)).collect(),
        checks: vec![Check {
            name: "errors".into(),
            metric: Metric::ErrorRate,
            rule: Rule::Max { limit: 0.05 },
            min_requests: 10,
        }],
        triggers: vec![],
        traffic: Traffic::default(),
        hooks: Vec::new(),
        deploy: None,
        on_inconclusive: crate::strategy::OnInconclusive::Pause,
    }
}

fn id(s: &str) -> RolloutId {
    RolloutId(s.into())
}

fn generation(index: u64) -> Generation {
    Generation { term: 1, index }
}

fn start_cmd(rid: &str, service: &str, strategy: Strategy) -> Command {
    Command::Start {
        id: id(rid),
        service: service.into(),
        version: "v2".into(),
        stable_version: Some("v1".into()),
        strategy,
        actor: Actor::Operator("ana".into()),
        at: T0,
    }
}

fn started(weights: &[u32]) -> Registry {
    let mut reg = Registry::default();
    reg.apply(start_cmd("r1", "api", strategy(weights)), generation(1))
        .unwrap();
    reg
}

fn operator(kind: &str, at: Millis) -> Command {
    let (id, actor, reason) = (
        id("r1"),
        Actor::Operator("ana".into()),
        format!("{kind} by hand"),
    );
    match kind {
        "pause" => Command::Pause {
            id,
            actor,
            reason,
            at,
        },
        "resume" => Command::Resume {
            id,
            actor,
            reason,
            at,
        },
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
            analysis: Some(StageAnalysis::default()),
            at,
        },
        _ => unreachable!(),
    }
}

fn passed(stage: usize, at: Millis) -> Command {
    Command::StagePassed {
        id: id("r1"),
        stage,
        analysis: StageAnalysis::default(),
        at,
    }
}

fn rollback(at: Millis) -> Command {
    Command::RollBack {
        id: id("r1"),
        reason: "errors: fail".into(),
        analysis: Some(StageAnalysis::default()),
        at,
    }
}

/// A registry with rollout r1 in each reachable state.
fn in_state(state: RolloutState) -> Registry {
    let mut reg = started(&[10, 50]);
    let cmd = match state {
        RolloutState::Progressing => return reg,
        RolloutState::Paused => operator("pause", T0 + 1),
        RolloutState::AwaitingPromotion => {
            reg.rollouts.get_mut(&id("r1")).unwrap().strategy.stages[0].manual_gate = true;
            passed(0, T0 + 1)
        }
        RolloutState::Promoted => operator("promote", T0 + 1),
        RolloutState::RolledBack => rollback(T0 + 1),
        RolloutState::Aborted => operator("abort", T0 + 1),
    };
    reg.apply(cmd, generation(2)).unwrap();
    assert_eq!(reg.rollouts[&id("r1")].state, state);
    reg
}

const ALL_STATES: [RolloutState; 6] = [
    RolloutState::Progressing,
    RolloutState::Paused,
    RolloutState::AwaitingPromotion,
    RolloutState::Promoted,
    RolloutState::RolledBack,
    RolloutState::Aborted,
];

#[test]
fn every_command_in_every_state() {
    use RolloutState::*;
    // (command, state) → resulting state, or None when the command must be rejected.
    let table: [(&str, [Option<RolloutState>; 6]); 6] = [
        //                 progressing        paused             awaiting           promoted rolled_back aborted
        ("pause", [Some(Paused), None, None, None, None, None]),
        (
            "resume",
            [None, Some(Progressing), Some(Progressing), None, None, None],
        ),
        (
            "promote",
            [
                Some(Promoted),
                Some(Promoted),
                Some(Promoted),
                None,
                None,
                None,
            ],
        ),
        (
            "abort",
            [
                Some(Aborted),
                Some(Aborted),
                Some(Aborted),
                None,
                None,
                None,
            ],
        ),
        ("passed", [Some(Progressing), None, None, None, None, None]),
        (
            "rollback",
            [
                Some(RolledBack),
                Some(RolledBack),
                Some(RolledBack),
                None,
                None,
                None,
            ],
        ),
    ];
    for (kind, row) in table {
        for (state, expected) in ALL_STATES.into_iter().zip(row) {
            let mut reg = in_state(state);
            let before = reg.clone();
            let cmd = match kind {
                "passed" => passed(reg.rollouts[&id("r1")].stage_index, T0 + 5),
                "rollback" => rollback(T0 + 5),
                k => operator(k, T0 + 5),
            };
            let result = reg.apply(cmd, generation(9));
            match expected {
                Some(after) => {
                    let applied = result.unwrap_or_else(|e| panic!("{kind} in {state}: {e}"));
                    assert_eq!(applied.state, Some(after), "{kind} in {state}");
                    let r = &reg.rollouts[&id("r1")];
                    assert_eq!(r.state, after, "{kind} in {state}");
                    assert_eq!(r.events.len(), before.rollouts[&id("r1")].events.len() + 1);
                }
                None => {
                    let err = result.expect_err(&format!("{kind} in {state} must be rejected"));
                    assert!(
                        matches!(err, Rejection::InvalidTransition { .. }),
                        "{kind} in {state}: {err}"
                    );
                    assert_eq!(reg, before, "a rejected command changes nothing");
                }
            }
        }
    }
}

#[test]
fn a_good_canary_walks_every_stage_to_promotion() {
    let mut reg = started(&[1, 5, 25, 50, 100]);
    let weights: Vec<u32> = (0..5)
        .map(|i| {
            let w = reg.rollouts[&id("r1")].canary_weight();
            reg.apply(
                passed(i, T0 + 1000 * (i as i64 + 1)),
                generation(2 + i as u64),
            )
            .unwrap();
            w
        })
        .collect();
    assert_eq!(weights, [1, 5, 25, 50, 100]);
    let r = &reg.rollouts[&id("r1")];
    assert_eq!(r.state, RolloutState::Promoted);
    assert_eq!(r.canary_weight(), 100);
    assert_eq!(r.evidence.len(), 5);
    let kinds: Vec<_> = r.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Started,
            EventKind::StageAdvanced,
            EventKind::StageAdvanced,
            EventKind::StageAdvanced,
            EventKind::StageAdvanced,
            EventKind::Promoted
        ]
    );
    let svc = &reg.services["api"];
    assert_eq!(svc.stable_version(), Some("v2"));
    assert_eq!(svc.revisions.len(), 2);
    assert_eq!(svc.active, None);
    assert_eq!(svc.generation, generation(6));
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (plan.canary_weight, plan.stable_version.as_str()),
        (100, "v2")
    );
}

#[test]
fn a_stage_passing_at_the_last_stage_below_100_promotes() {
    let mut reg = started(&[10, 50]);
    reg.apply(passed(0, T0 + 1), generation(2)).unwrap();
    reg.apply(passed(1, T0 + 2), generation(3)).unwrap();
    assert_eq!(reg.rollouts[&id("r1")].state, RolloutState::Promoted);
    assert_eq!(reg.rollouts[&id("r1")].canary_weight(), 100);
}

#[test]
fn stale_stage_proposals_are_rejected() {
    let mut reg = started(&[10, 50]);
    reg.apply(passed(0, T0 + 1), generation(2)).unwrap();
    let before = reg.clone();
    let err = reg.apply(passed(0, T0 + 2), generation(3)).unwrap_err();
    assert_eq!(
        err,
        Rejection::StaleStage {
            id: id("r1"),
            current: 1,
            proposed: 0
        }
    );
    assert_eq!(reg, before);
}

#[test]
fn manual_gates_wait_for_resume_or_promote() {
    let mut s = strategy(&[10, 50, 100]);
    s.stages[0].manual_gate = true;
    let mut reg = Registry::default();
    reg.apply(start_cmd("r1", "api", s), generation(1)).unwrap();
    reg.apply(passed(0, T0 + 1), generation(2)).unwrap();
    let r = &reg.rollouts[&id("r1")];
    assert_eq!(r.state, RolloutState::AwaitingPromotion);
    assert_eq!(r.canary_weight(), 10, "the gate holds the stage's weight");
    reg.apply(operator("resume", T0 + 50), generation(3))
        .unwrap();
    let r = &reg.rollouts[&id("r1")];
    assert_eq!((r.state, r.stage_index), (RolloutState::Progressing, 1));
    assert_eq!(r.stage_started_at, T0 + 50);
    assert_eq!(
        r.events.last().unwrap().actor,
        Actor::Operator("ana".into())
    );
}

#[test]
fn resume_restarts_the_stage_clock() {
    let mut reg = started(&[10, 50]);
    reg.apply(operator("pause", T0 + 5), generation(2)).unwrap();
    assert_eq!(
        reg.rollouts[&id("r1")].canary_weight(),
        10,
        "a pause holds weight"
    );
    reg.apply(operator("resume", T0 + 99), generation(3))
        .unwrap();
    assert_eq!(reg.rollouts[&id("r1")].stage_started_at, T0 + 99);
}

#[test]
fn rollback_and_abort_send_everything_to_stable_and_free_the_service() {
    for cmd in [rollback(T0 + 7), operator("abort", T0 + 7)] {
        let mut reg = started(&[10, 50]);
        let applied = reg.apply(cmd, generation(2)).unwrap();
        assert!(applied.traffic_changed);
        let plan = reg.traffic("api").unwrap();
        assert_eq!(plan.canary_weight, 0);
        assert_eq!(plan.stable_version, "v1");
        assert_eq!(plan.generation, generation(2));
        assert_eq!(reg.services["api"].active, None);
        assert_eq!(reg.services["api"].revisions.len(), 1);
        // The service can be rolled out again.
        reg.apply(start_cmd("r2", "api", strategy(&[20])), generation(3))
            .unwrap();
        assert_eq!(reg.traffic("api").unwrap().canary_weight, 20);
    }
}

#[test]
fn operator_aborts_keep_the_measurements_as_evidence() {
    let mut reg = started(&[10, 50]);
    reg.apply(operator("abort", T0 + 7), generation(2)).unwrap();
    let r = &reg.rollouts[&id("r1")];
    let e = r.evidence.last().expect("evidence");
    assert_eq!(
        (e.outcome.as_str(), e.canary_weight, e.stage_index),
        ("aborted", 10, 0)
    );
    // A promote proposed without measurements records none.
    let mut reg = started(&[10, 50]);
    reg.apply(operator("promote", T0 + 7), generation(2))
        .unwrap();
    assert!(reg.rollouts[&id("r1")].evidence.is_empty());
}

#[test]
fn rollback_records_evidence_and_reason() {
    let mut reg = started(&[10, 50]);
    reg.apply(rollback(T0 + 7), generation(2)).unwrap();
    let r = &reg.rollouts[&id("r1")];
    assert_eq!(r.last_reason(), "errors: fail");
    assert_eq!(r.events.last().unwrap().actor, Actor::Controller);
    assert_eq!(r.evidence.last().unwrap().outcome, "rolled_back");
    assert_eq!(r.evidence.last().unwrap().canary_weight, 10);
}

#[test]
fn start_is_validated() {
    let mut reg = started(&[10]);
    let before = reg.clone();
    assert_eq!(
        reg.apply(start_cmd("r2", "api", strategy(&[10])), generation(2)),
        Err(Rejection::ServiceBusy {
            service: "api".into(),
            active: id("r1")
        })
    );
    assert_eq!(
        reg.apply(start_cmd("r1", "web", strategy(&[10])), generation(2)),
        Err(Rejection::DuplicateRollout(id("r1")))
    );
    let mut no_stable = start_cmd("r3", "web", strategy(&[10]));
    if let Command::Start { stable_version, .. } = &mut no_stable {
        *stable_version = None;
    }
    assert_eq!(
        reg.apply(no_stable, generation(2)),
        Err(Rejection::UnknownStableVersion("web".into()))
    );
    assert_eq!(reg, before);
}

#[test]
fn the_stable_version_must_agree_with_history() {
    let mut reg = started(&[10]);
    reg.apply(operator("promote", T0 + 1), generation(2))
        .unwrap();
    // api now runs v2. A start claiming v1 is stable is refused...
    let mut claims_v1 = start_cmd("r2", "api", strategy(&[10]));
    if let Command::Start { version, .. } = &mut claims_v1 {
        *version = "v3".into();
    }
    let err = reg.apply(claims_v1.clone(), generation(3)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "service 'api' runs v2 (its last promoted revision), not v1; leave out --stable-version or pass v2"
    );
    // ...as is rolling out the stable version itself; leaving the stable version out works.
    let mut same = start_cmd("r2", "api", strategy(&[10]));
    if let Command::Start { stable_version, .. } = &mut same {
        *stable_version = None;
    }
    assert!(matches!(
        reg.apply(same, generation(3)),
        Err(Rejection::AlreadyStable { .. })
    ));
    if let Command::Start { stable_version, .. } = &mut claims_v1 {
        *stable_version = None;
    }
    let applied = reg.apply(claims_v1, generation(3)).unwrap();
    assert_eq!(
        reg.rollouts[applied.id.as_ref().unwrap()].stable_version,
        "v2"
    );
}

#[test]
fn unknown_rollouts_are_rejected() {
    let mut reg = Registry::default();
    let err = reg.apply(operator("pause", T0), generation(1)).unwrap_err();
    assert_eq!(err.to_string(), "rollout 'r1' not found");
    assert!(reg.rollout(&id("nope")).is_err());
}

#[test]
fn traffic_generation_only_moves_when_traffic_changes() {
    let mut reg = started(&[10, 50]);
    reg.apply(operator("pause", T0 + 1), generation(2)).unwrap();
    // Pause changes the state but not the weight: agents get a new generation anyway so their
    // view of the rollout state stays current; the weight is the same.
    assert_eq!(reg.traffic("api").unwrap().canary_weight, 10);
    let rejected = reg.apply(operator("pause", T0 + 2), generation(3));
    assert!(rejected.is_err());
    assert_eq!(reg.services["api"].generation, generation(2));
}

#[test]
fn sticky_key_applies_only_while_split() {
    let mut s = strategy(&[10, 100]);
    s.traffic.sticky_key = Some("$cookie_uid".into());
    let mut reg = Registry::default();
    reg.apply(start_cmd("r1", "api", s), generation(1)).unwrap();
    assert_eq!(
        reg.traffic("api").unwrap().sticky_key.as_deref(),
        Some("$cookie_uid")
    );
    reg.apply(rollback(T0 + 1), generation(2)).unwrap();
    assert_eq!(reg.traffic("api").unwrap().sticky_key, None);
    assert_eq!(reg.traffic("unknown"), None);
}

#[test]
fn overrides_route_in_every_active_state_and_never_after_the_rollout_ends() {
    for state in ALL_STATES {
        let mut reg = in_state(state);
        let traffic = &mut reg.rollouts.get_mut(&id("r1")).unwrap().strategy.traffic;
        traffic.override_header = Some("X-Serin-Variant".into());
        traffic.override_cookie = Some("serin_variant".into());
        let plan = reg.traffic("api").unwrap();
        let expected = if state.is_terminal() {
            (None, None)
        } else {
            (Some("X-Serin-Variant"), Some("serin_variant"))
        };
        assert_eq!(
            (
                plan.override_header.as_deref(),
                plan.override_cookie.as_deref()
            ),
            expected,
            "{state}: {plan:?}"
        );
        if state == RolloutState::RolledBack || state == RolloutState::Aborted {
            assert_eq!(plan.canary_weight, 0, "{state}");
        }
    }
    // Every stage, whatever its weight, while progressing.
    let mut s = strategy(&[1, 5, 99, 100]);
    s.traffic.override_header = Some("X-Serin-Variant".into());
    let mut reg = Registry::default();
    reg.apply(start_cmd("r1", "api", s), generation(1)).unwrap();
    for stage in 0..4 {
        let plan = reg.traffic("api").unwrap();
        assert_eq!(
            plan.override_header.as_deref(),
            Some("X-Serin-Variant"),
            "{plan:?}"
        );
        assert_eq!(plan.override_cookie, None);
        reg.apply(
            passed(stage, T0 + 1 + stage as Millis),
            generation(2 + stage as u64),
        )
        .unwrap();
    }
    assert_eq!(reg.rollouts[&id("r1")].state, RolloutState::Promoted);
    assert_eq!(reg.traffic("api").unwrap().override_header, None);
    // A service without a rollout has none.
    assert_eq!(Registry::default().traffic("api"), None);
}

#[test]
fn registry_round_trips_through_serde() {
    let mut reg = started(&[1, 5]);
    reg.apply(passed(0, T0 + 1), generation(2)).unwrap();
    let bytes = serde_json::to_vec(&reg).unwrap();
    let back: Registry = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(reg, back);
}

// --- decide -----------------------------------------------------------------------------------

fn observation(canary_requests: u64, canary_errors: u64) -> Observation {
    let s = strategy(&[1]);
    let data = Pair {
        stable: Window::from_counts(1000, 0, &[], 0.0),
        canary: Window::from_counts(canary_requests, canary_errors, &[], 0.0),
    };
    Observation {
        stage: analyse_stage(&s.checks, data, 1),
        ..Observation::default()
    }
}

fn trigger_reading(severity: Severity, fail: bool, grace_secs: u64) -> TriggerReading {
    let verdict = if fail {
        Verdict::Fail {
            value: 0.5,
            threshold: 0.2,
        }
    } else {
        Verdict::Pass {
            value: 0.0,
            threshold: 0.2,
        }
    };
    TriggerReading {
        result: CheckResult {
            name: "hard-down".into(),
            metric: Metric::ErrorRate,
            verdict,
            detail: None,
        },
        severity,
        grace: Duration::from_secs(grace_secs),
        window: Duration::from_secs(5),
    }
}

fn rollout() -> Rollout {
    started(&[10, 50]).rollouts[&id("r1")].clone()
}

#[test]
fn a_stage_waits_for_its_minimum_time() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    assert_eq!(decide(&r, &observation(100, 0), &mut m, T0 + 9_999), None);
    let cmd = decide(&r, &observation(100, 0), &mut m, T0 + 10_000).unwrap();
    assert!(
        matches!(cmd, Command::StagePassed { stage: 0, .. }),
        "{cmd:?}"
    );
}

#[test]
fn a_leader_that_took_over_passes_no_stage_until_its_trigger_windows_are_fresh() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    let mut obs = observation(100, 0);
    obs.takeover = Some("took over".into());
    assert_eq!(decide(&r, &obs, &mut m, T0 + 10_000), None);
    // A critical trigger still rolls back at once.
    obs.triggers = vec![trigger_reading(Severity::Critical, true, 0)];
    assert!(matches!(
        decide(&r, &obs, &mut m, T0 + 10_000),
        Some(Command::RollBack { .. })
    ));
}

#[test]
fn takeover_waits_only_for_rollouts_running_before_the_leader_and_for_one_window() {
    let window = Duration::from_secs(30);
    // Leading since before the rollout started: its windows are all its own.
    assert_eq!(takeover_wait(T0 - 1, T0, window, T0 + 1), None);
    assert_eq!(takeover_wait(T0, T0, window, T0 + 1), None);
    // Took over: waits one window.
    let took_over = T0 + 60_000;
    let reason = takeover_wait(took_over, T0, window, took_over + 5_000).unwrap();
    assert!(
        reason.contains("took over 5.0s ago") && reason.contains("30s"),
        "{reason}"
    );
    assert!(takeover_wait(took_over, T0, window, took_over + 29_999).is_some());
    assert_eq!(
        takeover_wait(took_over, T0, window, took_over + 30_000),
        None
    );
}

#[test]
fn a_stage_never_passes_without_data() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    for requests in [0, 1, 9] {
        assert_eq!(
            decide(&r, &observation(requests, 0), &mut m, T0 + 3_600_000),
            None
        );
    }
}

#[test]
fn an_inconclusive_stage_pauses_at_its_maximum_time() {
    let mut r = rollout();
    r.strategy.stages[0].max_duration = Some(Duration::from_secs(60));
    let mut m = TriggerMemory::default();
    assert_eq!(decide(&r, &observation(3, 0), &mut m, T0 + 59_000), None);
    let cmd = decide(&r, &observation(3, 0), &mut m, T0 + 60_000).unwrap();
    match cmd {
        Command::Pause { reason, actor, .. } => {
            assert_eq!(actor, Actor::Controller);
            assert!(
                reason.starts_with("inconclusive at stage 1 (10%) after 1m"),
                "{reason}"
            );
            assert!(reason.contains("canary has 3 of 10"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_inconclusive_stage_rolls_back_when_the_strategy_says_so() {
    let mut r = rollout();
    r.strategy.stages[0].max_duration = Some(Duration::from_secs(60));
    r.strategy.on_inconclusive = crate::strategy::OnInconclusive::RollBack;
    let mut m = TriggerMemory::default();
    assert_eq!(decide(&r, &observation(3, 0), &mut m, T0 + 59_000), None);
    match decide(&r, &observation(3, 0), &mut m, T0 + 60_000).unwrap() {
        Command::RollBack { reason, .. } => {
            assert!(
                reason.starts_with("inconclusive at stage 1 (10%) after 1m")
                    && reason.ends_with("(on_inconclusive = roll_back)"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_check_at_stage_end_rolls_back_with_its_numbers() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    assert_eq!(decide(&r, &observation(100, 50), &mut m, T0 + 1), None);
    match decide(&r, &observation(100, 50), &mut m, T0 + 10_000).unwrap() {
        Command::RollBack { reason, .. } => {
            assert_eq!(
                reason,
                "check errors: fail (error_rate 0.5 > 0.05) at stage 1 (10%)"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn critical_triggers_roll_back_at_once_even_when_paused() {
    let mut r = rollout();
    let mut m = TriggerMemory::default();
    let mut obs = observation(0, 0);
    obs.triggers = vec![trigger_reading(Severity::Critical, true, 0)];
    for state in [
        RolloutState::Progressing,
        RolloutState::Paused,
        RolloutState::AwaitingPromotion,
    ] {
        r.state = state;
        match decide(&r, &obs, &mut m, T0 + 1).unwrap() {
            Command::RollBack { reason, .. } => assert!(
                reason.starts_with(
                    "critical trigger hard-down: fail (error_rate 0.5 > 0.2) over the last 5s"
                ),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }
    r.state = RolloutState::RolledBack;
    assert_eq!(decide(&r, &obs, &mut m, T0 + 1), None);
}

#[test]
fn warning_triggers_wait_for_their_grace_and_reset_when_healthy() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    let mut failing = observation(0, 0);
    failing.triggers = vec![trigger_reading(Severity::Warning, true, 60)];
    let mut healthy = observation(0, 0);
    healthy.triggers = vec![trigger_reading(Severity::Warning, false, 60)];
    assert_eq!(decide(&r, &failing, &mut m, T0), None);
    assert_eq!(decide(&r, &failing, &mut m, T0 + 59_000), None);
    // Healthy once: the grace period starts over.
    assert_eq!(decide(&r, &healthy, &mut m, T0 + 59_500), None);
    assert_eq!(decide(&r, &failing, &mut m, T0 + 60_000), None);
    assert_eq!(decide(&r, &failing, &mut m, T0 + 119_000), None);
    let cmd = decide(&r, &failing, &mut m, T0 + 120_000).unwrap();
    assert!(matches!(cmd, Command::RollBack { .. }), "{cmd:?}");
}

#[test]
fn apply_failures_roll_back_first() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    let mut obs = observation(100, 0);
    obs.apply_failures = vec![("host-a".into(), "nginx -t failed: unknown variable".into())];
    match decide(&r, &obs, &mut m, T0 + 10_000).unwrap() {
        Command::RollBack { reason, .. } => assert_eq!(
            reason,
            "agent 'host-a' could not apply the traffic change at stage 1 (10%): nginx -t failed: unknown variable"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn decisions_are_valid_commands() {
    // Whatever decide proposes, the registry accepts.
    let mut reg = started(&[10, 50]);
    let mut m = TriggerMemory::default();
    for (i, obs) in [observation(100, 0), observation(100, 0)]
        .iter()
        .enumerate()
    {
        let r = reg.rollouts[&id("r1")].clone();
        let now = r.stage_started_at + 10_000;
        let cmd = decide(&r, obs, &mut m, now).expect("a decision");
        reg.apply(cmd, generation(2 + i as u64)).unwrap();
    }
    assert_eq!(reg.rollouts[&id("r1")].state, RolloutState::Promoted);
}

#[test]
fn triggers_and_checks_use_strategy_shapes() {
    // Triggers in strategies carry a Check; make sure severity and window survive.
    let t = Trigger {
        check: Check {
            name: "t".into(),
            metric: Metric::ErrorRate,
            rule: Rule::Max { limit: 0.1 },
            min_requests: 5,
        },
        window: Duration::from_secs(3),
        severity: Severity::Critical,
        grace: Duration::ZERO,
    };
    let json = serde_json::to_string(&t).unwrap();
    assert_eq!(serde_json::from_str::<Trigger>(&json).unwrap(), t);
}

#[test]
fn checkpoints_attach_to_the_current_stage_only() {
    let mut reg = started(&[10, 50]);
    let data = Pair {
        canary: Window::from_counts(40, 1, &[], 0.0),
        ..Pair::default()
    };
    let checkpoint = |stage, stage_started_at| Command::Checkpoint {
        id: id("r1"),
        checkpoint: Checkpoint {
            stage,
            stage_started_at,
            data: data.clone(),
            at: T0 + 5,
        },
    };
    let applied = reg.apply(checkpoint(0, T0), generation(2)).unwrap();
    assert!(!applied.traffic_changed, "a checkpoint changes no traffic");
    assert_eq!(reg.services["api"].generation, generation(1));
    let r = &reg.rollouts[&id("r1")];
    assert!(r.checkpoint.as_ref().unwrap().matches(r));
    assert_eq!(r.events.len(), 1, "checkpoints are not events");
    // A checkpoint of another stage, or of the stage before a resume, is stale.
    let before = reg.clone();
    assert!(matches!(
        reg.apply(checkpoint(1, T0), generation(3)),
        Err(Rejection::StaleStage { .. })
    ));
    assert!(reg.apply(checkpoint(0, T0 + 1), generation(3)).is_err());
    assert_eq!(reg, before);
    // After the stage passes, the old checkpoint no longer matches.
    reg.apply(passed(0, T0 + 10), generation(4)).unwrap();
    let r = &reg.rollouts[&id("r1")];
    assert!(!r.checkpoint.as_ref().unwrap().matches(r));
}

#[test]
fn a_long_history_keeps_its_first_and_last_events_and_counts_the_rest() {
    let mut reg = started(&[10, 100]);
    for n in 0..100_000 {
        let kind = if n % 2 == 0 { "pause" } else { "resume" };
        reg.apply(operator(kind, T0 + n), generation(n as u64 + 2))
            .unwrap();
    }
    let r = &reg.rollouts[&id("r1")];
    assert_eq!(r.events.len(), KEEP_FIRST_EVENTS + KEEP_LAST_EVENTS);
    assert_eq!(r.events_dropped, 100_001 - r.events.len() as u64);
    assert_eq!(r.events[0].kind, EventKind::Started);
    assert_eq!(r.events.last().unwrap().at, T0 + 99_999);
    assert_eq!(r.events.last().unwrap().kind, EventKind::Resumed);
    // The recent events are contiguous: nothing dropped among them.
    let recent = &r.events[KEEP_FIRST_EVENTS..];
    assert!(recent.windows(2).all(|w| w[1].at == w[0].at + 1));
}

#[test]
fn an_overlong_event_reason_is_cut_and_marked() {
    let mut reg = started(&[10, 100]);
    let reason = "nginx: [emerg] bad\n".repeat(1000);
    reg.apply(
        Command::Pause {
            id: id("r1"),
            actor: Actor::Controller,
            reason,
            at: T0 + 1,
        },
        generation(2),
    )
    .unwrap();
    let kept = &reg.rollouts[&id("r1")].events[1].reason;
    assert!(kept.len() <= MAX_EVENT_REASON, "{}", kept.len());
    assert!(kept.ends_with('…'));
}

// --- deployments: settling a weighted promotion, gating stages on the deployment -------------

/// A `[deploy]` section of the given model (docker, as the example files).
fn deploy_section(model: &str) -> crate::strategy::Deploy {
    Strategy::from_toml(&format!(
        "[[stages]]\nweight = 5\n[deploy]\nmodel = \"{model}\"\n\
         [deploy.docker]\nimage = \"api:{{version}}\"\nport = 8080\n"
    ))
    .unwrap()
    .deploy
    .unwrap()
}

/// Rollout r1 of `api` (v1 → v2, stages 10 and 50) with `[deploy]` of `model` (none when
/// `None`), promoted by an operator at generation 2.
fn promoted_with(model: Option<&str>) -> Registry {
    let mut s = strategy(&[10, 50]);
    s.deploy = model.map(deploy_section);
    let mut reg = Registry::default();
    reg.apply(start_cmd("r1", "api", s), generation(1)).unwrap();
    reg.apply(operator("promote", T0 + 1), generation(2))
        .unwrap();
    reg
}

fn settle(at: Millis) -> Command {
    Command::DeploySettled {
        id: id("r1"),
        reason: "all 2 stable instances run v2 healthy".into(),
        at,
    }
}

#[test]
fn a_weighted_promotion_keeps_the_traffic_on_the_canary_until_it_settles() {
    let mut reg = promoted_with(Some("weighted"));
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (
            plan.canary_weight,
            plan.canary_version.as_str(),
            plan.stable_version.as_str()
        ),
        (100, "v2", "v2"),
        "promoted, not settled: the canary instances carry everything"
    );
    let applied = reg.apply(settle(T0 + 50), generation(3)).unwrap();
    assert!(applied.traffic_changed);
    assert_eq!(applied.state, Some(RolloutState::Promoted));
    let r = &reg.rollouts[&id("r1")];
    assert!(r.deploy_settled);
    let event = r.events.last().unwrap();
    assert_eq!(
        (
            event.kind,
            &event.actor,
            event.reason.as_str(),
            event.canary_weight,
            event.at
        ),
        (
            EventKind::Deployed,
            &Actor::Controller,
            "all 2 stable instances run v2 healthy",
            0,
            T0 + 50
        )
    );
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (
            plan.canary_weight,
            plan.canary_version.as_str(),
            plan.stable_version.as_str()
        ),
        (0, "", "v2"),
        "settled: all traffic to the stable instances, which run v2"
    );
    assert_eq!(
        plan.generation,
        generation(3),
        "the service's generation moved"
    );
    assert_eq!(reg.services["api"].active, None);
    assert_eq!(reg.services["api"].revisions.len(), 2);
}

#[test]
fn settling_is_refused_unless_promoted_weighted_and_not_yet_settled() {
    let refusal = |reg: &mut Registry| {
        let before = reg.clone();
        let err = reg.apply(settle(T0 + 50), generation(7)).unwrap_err();
        assert_eq!(*reg, before, "a refused settle changes nothing");
        err.to_string()
    };
    // Every state but promoted.
    for state in ALL_STATES
        .into_iter()
        .filter(|s| *s != RolloutState::Promoted)
    {
        let mut reg = in_state(state);
        reg.rollouts.get_mut(&id("r1")).unwrap().strategy.deploy = Some(deploy_section("weighted"));
        assert_eq!(
            refusal(&mut reg),
            format!(
                "cannot settle the deployment of rollout 'r1': it is {state}; only a promoted rollout settles"
            )
        );
    }
    assert_eq!(
        refusal(&mut promoted_with(None)),
        "cannot settle the deployment of rollout 'r1': its strategy has no [deploy]: serin deploys nothing for it"
    );
    assert_eq!(
        refusal(&mut promoted_with(Some("hosts"))),
        "cannot settle the deployment of rollout 'r1': it deploys with model \"hosts\": its instances run the new version in place"
    );
    let mut reg = promoted_with(Some("weighted"));
    reg.apply(settle(T0 + 50), generation(3)).unwrap();
    let err = reg.apply(settle(T0 + 60), generation(4)).unwrap_err();
    assert!(matches!(err, Rejection::NothingToSettle { .. }), "{err}");
    assert!(
        err.to_string()
            .ends_with("it is already settled: the stable instances carry the traffic")
    );
    assert!(matches!(
        Registry::default().apply(settle(T0), generation(1)),
        Err(Rejection::UnknownRollout(_))
    ));
}

#[test]
fn a_rollout_stored_before_deployments_reads_as_not_settled_and_keeps_its_traffic() {
    let reg = promoted_with(None);
    let mut json = serde_json::to_value(&reg).unwrap();
    json["rollouts"]["r1"]
        .as_object_mut()
        .unwrap()
        .remove("deploy_settled");
    json["rollouts"]["r1"]["strategy"]
        .as_object_mut()
        .unwrap()
        .remove("deploy");
    let back: Registry = serde_json::from_value(json).unwrap();
    assert!(!back.rollouts[&id("r1")].deploy_settled);
    assert_eq!(back, reg);
    assert_eq!(back.traffic("api").unwrap().canary_weight, 100);
}

#[test]
fn a_deploy_failure_rolls_back_naming_the_version_stage_and_first_failure() {
    let mut reg = started(&[10, 50]);
    reg.apply(passed(0, T0 + 10_000), generation(2)).unwrap();
    let r = reg.rollouts[&id("r1")].clone();
    let mut m = TriggerMemory::default();
    let mut obs = observation(100, 0);
    obs.deploy_failures = vec![
        "api-2 on host-b: container not healthy after 60s: exit 1".into(),
        "api-3 on host-c: image not found".into(),
    ];
    for state in [
        RolloutState::Progressing,
        RolloutState::Paused,
        RolloutState::AwaitingPromotion,
    ] {
        let mut r = r.clone();
        r.state = state;
        match decide(&r, &obs, &mut m, T0 + 10_001).unwrap() {
            Command::RollBack {
                reason, analysis, ..
            } => {
                assert_eq!(
                    reason,
                    "could not deploy v2 at stage 2 (50%): api-2 on host-b: container not healthy after 60s: exit 1"
                );
                assert!(analysis.is_some(), "the measurements are kept as evidence");
            }
            other => panic!("{state}: {other:?}"),
        }
    }
}

#[test]
fn a_stage_does_not_pass_while_its_deployment_is_waiting() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    let mut obs = observation(100, 0);
    obs.deploy_waiting = vec!["api-2 on host-b: starting v2 (12s)".into()];
    assert_eq!(
        decide(&r, &obs, &mut m, T0 + 3_600_000),
        None,
        "checks pass but an instance is not ready: no max_duration, so it waits"
    );
    obs.deploy_waiting.clear();
    assert!(matches!(
        decide(&r, &obs, &mut m, T0 + 3_600_000),
        Some(Command::StagePassed { .. })
    ));
}

#[test]
fn checks_and_triggers_still_act_while_the_deployment_is_waiting() {
    let r = rollout();
    let mut m = TriggerMemory::default();
    let mut failing_check = observation(100, 50);
    failing_check.deploy_waiting = vec!["api-2 on host-b: starting v2 (12s)".into()];
    assert!(
        matches!(
            decide(&r, &failing_check, &mut m, T0 + 10_000),
            Some(Command::RollBack { reason, .. }) if reason.starts_with("check errors: fail")
        ),
        "a failing check still rolls back"
    );
    let mut fired = observation(100, 0);
    fired.deploy_waiting = vec!["api-2 on host-b: starting v2 (1s)".into()];
    fired.triggers = vec![trigger_reading(Severity::Critical, true, 0)];
    assert!(
        matches!(
            decide(&r, &fired, &mut m, T0 + 1),
            Some(Command::RollBack { reason, .. }) if reason.starts_with("critical trigger hard-down")
        ),
        "a trigger still fires, before the minimum time too"
    );
}

#[test]
fn a_stage_still_waiting_for_its_deployment_at_its_maximum_time_pauses_naming_the_first_instance() {
    let mut r = rollout();
    r.strategy.stages[0].max_duration = Some(Duration::from_secs(60));
    let mut m = TriggerMemory::default();
    let mut obs = observation(100, 0);
    obs.deploy_waiting = vec![
        "api-2 on host-b: starting v2 (59s)".into(),
        "api-3 on host-c: pulling".into(),
        "api-4 on host-d: starting v2 (3s)".into(),
    ];
    assert_eq!(decide(&r, &obs, &mut m, T0 + 59_999), None);
    match decide(&r, &obs, &mut m, T0 + 60_000).unwrap() {
        Command::Pause { reason, actor, .. } => {
            assert_eq!(actor, Actor::Controller);
            assert_eq!(
                reason,
                "inconclusive at stage 1 (10%) after 1m: waiting for the deployment: api-2 on host-b: starting v2 (59s) (and 2 more)"
            );
        }
        other => panic!("{other:?}"),
    }
    // Checks lacking data are named after the deployment.
    let mut thin = observation(3, 0);
    thin.deploy_waiting = vec!["api-2 on host-b: starting v2 (59s)".into()];
    match decide(&r, &thin, &mut m, T0 + 60_000).unwrap() {
        Command::Pause { reason, .. } => {
            assert!(
                reason.starts_with("inconclusive at stage 1 (10%) after 1m: waiting for the deployment: api-2 on host-b: starting v2 (59s); errors"),
                "{reason}"
            );
            assert!(reason.contains("canary has 3 of 10"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hosts_promotion_sends_the_traffic_to_the_instances_as_stable_at_once() {
    let reg = promoted_with(Some("hosts"));
    let plan = reg.traffic("api").unwrap();
    assert_eq!(
        (
            plan.canary_weight,
            plan.canary_version.as_str(),
            plan.stable_version.as_str()
        ),
        (0, "", "v2"),
        "every instance runs v2 in place, as stable: no canary side is left"
    );
    // Without [deploy] a promotion keeps its old traffic: 100% to the canary instances.
    let plan = promoted_with(None).traffic("api").unwrap();
    assert_eq!(
        (plan.canary_weight, plan.canary_version.as_str()),
        (100, "v2")
    );
}

fn action(agent: &str, instance: &str, seq: u64, ok: bool) -> DeployAction {
    DeployAction {
        agent: agent.into(),
        instance: instance.into(),
        seq,
        action: "start".into(),
        detail: "systemctl start api@v2".into(),
        exit_code: Some(if ok { 0 } else { 3 }),
        output: if ok {
            String::new()
        } else {
            "unit failed\n".into()
        },
        duration_ms: 14,
        ok,
        version: "v2".into(),
    }
}

fn action_events(reg: &Registry) -> Vec<String> {
    reg.rollouts[&id("r1")]
        .events
        .iter()
        .filter(|e| e.kind == EventKind::DeployAction)
        .map(|e| format!("{} {}", e.actor, e.reason))
        .collect()
}

#[test]
fn deploy_actions_are_recorded_once_each_in_any_state_and_change_no_traffic() {
    let mut reg = started(&[10, 50]);
    let generation_before = reg.services["api"].generation;
    let applied = reg
        .apply(
            Command::DeployActions {
                id: id("r1"),
                actions: vec![
                    action("h1", "api-1", 5, true),
                    action("h2", "api-2", 3, false),
                ],
                at: T0 + 1,
            },
            generation(2),
        )
        .unwrap();
    assert!(!applied.traffic_changed);
    assert_eq!(reg.services["api"].generation, generation_before);
    assert_eq!(
        action_events(&reg),
        [
            "agent:h1 start on api-1 for v2 ok (exit 0, 14 ms): systemctl start api@v2",
            "agent:h2 start on api-2 for v2 FAILED (exit 3, 14 ms): systemctl start api@v2 | unit failed",
        ]
    );
    // The same report again, and an older action: nothing new. A newer one: recorded.
    reg.apply(
        Command::DeployActions {
            id: id("r1"),
            actions: vec![
                action("h1", "api-1", 5, true),
                action("h1", "api-1", 4, true),
                action("h1", "api-1", 6, true),
            ],
            at: T0 + 2,
        },
        generation(3),
    )
    .unwrap();
    assert_eq!(action_events(&reg).len(), 3);
    // A finished rollout still records (a rollback's removals come after it).
    reg.apply(
        Command::RollBack {
            id: id("r1"),
            reason: "test".into(),
            analysis: None,
            at: T0 + 3,
        },
        generation(4),
    )
    .unwrap();
    reg.apply(
        Command::DeployActions {
            id: id("r1"),
            actions: vec![action("h2", "api-2", 9, true)],
            at: T0 + 4,
        },
        generation(5),
    )
    .unwrap();
    assert_eq!(action_events(&reg).len(), 4);
}

#[test]
fn successful_deploy_actions_are_bounded_and_failures_always_recorded() {
    let mut reg = started(&[10, 50]);
    let many: Vec<DeployAction> = (1..=u64::from(MAX_ACTION_EVENTS) + 20)
        .map(|seq| action("h1", "api-1", seq, true))
        .collect();
    reg.apply(
        Command::DeployActions {
            id: id("r1"),
            actions: many,
            at: T0 + 1,
        },
        generation(2),
    )
    .unwrap();
    reg.apply(
        Command::DeployActions {
            id: id("r1"),
            actions: vec![action("h1", "api-1", 500, false)],
            at: T0 + 2,
        },
        generation(3),
    )
    .unwrap();
    let r = &reg.rollouts[&id("r1")];
    assert_eq!(r.deploy_actions.recorded, MAX_ACTION_EVENTS);
    assert_eq!(r.deploy_actions.unrecorded, 20);
    assert_eq!(
        action_events(&reg).len(),
        MAX_ACTION_EVENTS as usize + 1,
        "the failure past the bound is recorded"
    );
    assert!(action_events(&reg).last().unwrap().contains("FAILED"));
    assert!(matches!(
        reg.apply(
            Command::DeployActions {
                id: id("nope"),
                actions: vec![],
                at: T0,
            },
            generation(4),
        ),
        Err(Rejection::UnknownRollout(_))
    ));
}

fn lease_events(reg: &Registry) -> Vec<String> {
    reg.rollouts[&id("r1")]
        .events
        .iter()
        .filter(|e| e.kind == EventKind::CanaryLeaseExpired)
        .map(|e| format!("{} {}", e.actor, e.reason))
        .collect()
}

fn lease_expired(agent: &str, reason: &str, at: Millis) -> Command {
    Command::CanaryLeaseExpired {
        id: id("r1"),
        agent: agent.into(),
        reason: reason.into(),
        at,
    }
}

#[test]
fn a_canary_lease_expiry_is_recorded_once_per_agent_and_words_in_any_state_and_changes_no_traffic()
{
    let mut reg = started(&[10, 50]);
    let generation_before = reg.services["api"].generation;
    let weight_before = reg.rollouts[&id("r1")].canary_weight();
    let applied = reg
        .apply(
            lease_expired("h1", "lost the leader", T0 + 1),
            generation(2),
        )
        .unwrap();
    assert!(!applied.traffic_changed);
    assert_eq!(applied.state, Some(RolloutState::Progressing));
    assert_eq!(reg.services["api"].generation, generation_before);
    assert_eq!(reg.rollouts[&id("r1")].canary_weight(), weight_before);
    assert_eq!(lease_events(&reg), ["agent:h1 lost the leader"]);
    // Told twice (a leader died before the agent heard back): one event.
    reg.apply(
        lease_expired("h1", "lost the leader", T0 + 2),
        generation(3),
    )
    .unwrap();
    assert_eq!(lease_events(&reg).len(), 1);
    // Another agent, or another expiry: recorded.
    reg.apply(
        lease_expired("h2", "lost the leader", T0 + 3),
        generation(4),
    )
    .unwrap();
    reg.apply(lease_expired("h1", "lost it again", T0 + 4), generation(5))
        .unwrap();
    assert_eq!(lease_events(&reg).len(), 3);
    // A finished rollout still records it (the agent may come back after the rollback).
    reg.apply(
        Command::RollBack {
            id: id("r1"),
            reason: "test".into(),
            analysis: None,
            at: T0 + 5,
        },
        generation(6),
    )
    .unwrap();
    reg.apply(
        lease_expired("h3", "lost the leader", T0 + 6),
        generation(7),
    )
    .unwrap();
    assert_eq!(lease_events(&reg).len(), 4);
    // An unknown rollout is refused.
    let err = reg
        .apply(
            Command::CanaryLeaseExpired {
                id: id("nope"),
                agent: "h1".into(),
                reason: "x".into(),
                at: T0,
            },
            generation(8),
        )
        .unwrap_err();
    assert_eq!(err, Rejection::UnknownRollout(id("nope")));
}
