//! The hooks' replicated effects and the controller's decisions, exhaustively and without a
//! network; then the control loop with a scripted [`HookRunner`] over a real single-node raft.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::analysis::StageAnalysis;
use crate::rollout::TrafficPlan;

const T0: Millis = 1_000_000;

const HOOKS: &str = r#"
[[stages]]
weight = 10
min_duration = "10s"
[[stages]]
weight = 50
min_duration = "10s"

[[hooks]]
name = "ticket"
on = "pre_rollout"
url = "http://hooks.test/ticket"
[[hooks]]
name = "warmup"
on = "pre_rollout"
url = "http://hooks.test/warmup"
[[hooks]]
name = "smoke"
on = "pre_advance"
url = "http://hooks.test/smoke"
[[hooks]]
name = "smoke-2"
on = "pre_advance"
url = "http://hooks.test/smoke2"
[[hooks]]
name = "chat"
on = "post_promote"
url = "http://hooks.test/chat"
[[hooks]]
name = "page"
on = "post_rollback"
url = "http://hooks.test/page"
"#;

fn id() -> RolloutId {
    RolloutId("r1".into())
}

fn generation(index: u64) -> Generation {
    Generation { term: 1, index }
}

fn strategy(text: &str) -> Strategy {
    Strategy::from_toml(text).unwrap()
}

fn start(reg: &mut Registry, strategy: Strategy) {
    reg.apply(
        Command::Start {
            id: id(),
            service: "api".into(),
            version: "v2".into(),
            stable_version: Some("v1".into()),
            strategy,
            actor: Actor::Operator("ana".into()),
            at: T0,
        },
        generation(1),
    )
    .unwrap();
}

fn started(text: &str) -> Registry {
    let mut reg = Registry::default();
    start(&mut reg, strategy(text));
    reg
}

fn run(name: &str, on: HookOn, status: u16) -> HookRun {
    HookRun {
        name: name.into(),
        on,
        attempts: 1,
        status: Some(status),
        error: None,
        body: if status == 200 {
            "ok".into()
        } else {
            "smoke failed: checkout returns 502".into()
        },
        duration_ms: 12,
    }
}

fn ran(stage: usize, run: HookRun, at: Millis) -> Command {
    Command::HookRan {
        id: id(),
        stage,
        run,
        at,
    }
}

fn r(reg: &Registry) -> &Rollout {
    &reg.rollouts[&id()]
}

fn plan(reg: &Registry) -> TrafficPlan {
    reg.traffic("api").unwrap()
}

fn kinds(reg: &Registry) -> Vec<(EventKind, String)> {
    r(reg)
        .events
        .iter()
        .map(|e| (e.kind, e.actor.to_string()))
        .collect()
}

/// Both pre_rollout hooks passed: the canary at stage 1's weight.
fn past_pre_rollout() -> Registry {
    let mut reg = started(HOOKS);
    reg.apply(
        ran(0, run("ticket", HookOn::PreRollout, 200), T0 + 1),
        generation(2),
    )
    .unwrap();
    reg.apply(
        ran(0, run("warmup", HookOn::PreRollout, 200), T0 + 2),
        generation(3),
    )
    .unwrap();
    reg
}

#[test]
fn the_canary_gets_no_traffic_until_every_pre_rollout_hook_passed() {
    let mut reg = started(HOOKS);
    assert_eq!(r(&reg).state, RolloutState::Progressing);
    assert_eq!(r(&reg).canary_weight(), 0);
    assert_eq!(plan(&reg).canary_weight, 0);
    assert_eq!(
        r(&reg).hooks.pre_rollout_pending,
        ["ticket".to_owned(), "warmup".to_owned()]
    );
    assert!(
        r(&reg)
            .last_reason()
            .contains("no traffic until its pre_rollout hooks pass: ticket, warmup"),
        "{}",
        r(&reg).last_reason()
    );
    assert_eq!(r(&reg).events[0].canary_weight, 0);

    let applied = reg
        .apply(
            ran(0, run("ticket", HookOn::PreRollout, 200), T0 + 1),
            generation(2),
        )
        .unwrap();
    assert!(!applied.traffic_changed, "one of two passed: still 0%");
    assert_eq!(plan(&reg).canary_weight, 0);
    assert_eq!(plan(&reg).generation, generation(1));

    let applied = reg
        .apply(
            ran(0, run("warmup", HookOn::PreRollout, 200), T0 + 7),
            generation(3),
        )
        .unwrap();
    assert!(applied.traffic_changed);
    assert_eq!(plan(&reg).canary_weight, 10);
    assert_eq!(plan(&reg).generation, generation(3));
    let rollout = r(&reg);
    assert_eq!(
        rollout.stage_started_at,
        T0 + 7,
        "the stage is observed from when its traffic starts"
    );
    assert!(rollout.hooks.pre_rollout_pending.is_empty());
    let last = rollout.events.last().unwrap();
    assert_eq!(
        (last.kind, last.canary_weight, last.actor.to_string()),
        (EventKind::Hook, 10, "hook:warmup".to_owned())
    );
    assert!(
        last.reason.contains("the canary gets 10%"),
        "{}",
        last.reason
    );
    assert_eq!(last.hook.as_ref().map(|h| h.status), Some(Some(200)));
}

#[test]
fn a_failing_pre_rollout_hook_aborts_before_the_canary_gets_traffic() {
    let mut reg = started(HOOKS);
    let applied = reg
        .apply(
            ran(0, run("ticket", HookOn::PreRollout, 500), T0 + 1),
            generation(2),
        )
        .unwrap();
    assert_eq!(applied.state, Some(RolloutState::Aborted));
    assert!(applied.traffic_changed, "the state changed");
    let rollout = r(&reg);
    assert_eq!(rollout.state, RolloutState::Aborted);
    assert!(
        rollout.events.iter().all(|e| e.canary_weight == 0),
        "{:?}",
        rollout.events
    );
    assert_eq!(
        kinds(&reg),
        [
            (EventKind::Started, "operator:ana".to_owned()),
            (EventKind::Hook, "hook:ticket".to_owned()),
            (EventKind::Aborted, "hook:ticket".to_owned()),
        ]
    );
    let reason = r(&reg).last_reason();
    assert!(
        reason.contains("pre_rollout hook 'ticket' failed: HTTP 500")
            && reason.contains("checkout returns 502")
            && reason.contains("never got traffic"),
        "{reason}"
    );
    assert_eq!(
        reg.services["api"].active, None,
        "the service is free again"
    );
    assert_eq!(
        r(&reg).hooks.post_pending,
        ["page".to_owned()],
        "post_rollback hooks are due"
    );
    assert!(r(&reg).hooks.pre_rollout_pending.is_empty());
}

#[test]
fn a_failing_pre_advance_hook_holds_the_stage_paused_by_the_hook() {
    let mut reg = past_pre_rollout();
    reg.apply(
        ran(0, run("smoke", HookOn::PreAdvance, 200), T0 + 20_000),
        generation(4),
    )
    .unwrap();
    assert_eq!(
        r(&reg).state,
        RolloutState::Progressing,
        "a pass changes nothing"
    );
    let applied = reg
        .apply(
            ran(0, run("smoke-2", HookOn::PreAdvance, 503), T0 + 20_100),
            generation(5),
        )
        .unwrap();
    assert_eq!(applied.state, Some(RolloutState::Paused));
    assert_eq!(plan(&reg).canary_weight, 10);
    let rollout = r(&reg);
    assert_eq!(rollout.stage_index, 0);
    let last = rollout.events.last().unwrap();
    assert_eq!(
        (last.kind, last.actor.to_string(), last.canary_weight),
        (EventKind::Paused, "hook:smoke-2".to_owned(), 10)
    );
    assert!(
        last.reason
            .starts_with("holding stage 1 (10%): pre_advance hook 'smoke-2' failed: HTTP 503")
            && last.reason.contains("serin rollout resume"),
        "{}",
        last.reason
    );
    // A pass of the stage proposed meanwhile is refused: the rollout is paused.
    let pass = Command::StagePassed {
        id: id(),
        stage: 0,
        analysis: StageAnalysis::default(),
        at: T0 + 20_200,
    };
    assert!(matches!(
        reg.clone().apply(pass, generation(6)),
        Err(Rejection::InvalidTransition { .. })
    ));
    // Resume observes the stage again from the resume.
    reg.apply(
        Command::Resume {
            id: id(),
            actor: Actor::Operator("ana".into()),
            reason: "smoke fixed".into(),
            at: T0 + 30_000,
        },
        generation(6),
    )
    .unwrap();
    assert_eq!(r(&reg).state, RolloutState::Progressing);
    assert_eq!(r(&reg).stage_started_at, T0 + 30_000);
}

#[test]
fn a_hook_result_not_awaited_is_refused_and_changes_nothing() {
    let fresh = started(HOOKS);
    let past = past_pre_rollout();
    let mut at_stage_2 = past.clone();
    at_stage_2
        .apply(
            Command::StagePassed {
                id: id(),
                stage: 0,
                analysis: StageAnalysis::default(),
                at: T0 + 20_000,
            },
            generation(4),
        )
        .unwrap();
    let mut paused = past.clone();
    paused
        .apply(
            Command::Pause {
                id: id(),
                actor: Actor::Operator("ana".into()),
                reason: "hold".into(),
                at: T0 + 10,
            },
            generation(4),
        )
        .unwrap();
    let mut paused_at_zero = fresh.clone();
    paused_at_zero
        .apply(
            Command::Pause {
                id: id(),
                actor: Actor::Operator("ana".into()),
                reason: "hold at 0%".into(),
                at: T0 + 10,
            },
            generation(4),
        )
        .unwrap();
    type Case<'a> = (&'a str, &'a Registry, Command, fn(&Rejection) -> bool);
    let cases: Vec<Case> = vec![
        (
            "a pre_rollout hook that already passed",
            &past,
            ran(0, run("ticket", HookOn::PreRollout, 200), T0 + 9),
            |e| matches!(e, Rejection::HookNotDue { .. }),
        ),
        (
            "a hook the strategy lacks",
            &fresh,
            ran(0, run("nope", HookOn::PreRollout, 200), T0 + 9),
            |e| matches!(e, Rejection::UnknownHook { .. }),
        ),
        (
            "a hook reported under another kind",
            &fresh,
            ran(0, run("ticket", HookOn::PreAdvance, 200), T0 + 9),
            |e| matches!(e, Rejection::UnknownHook { .. }),
        ),
        (
            "pre_advance before the pre_rollout hooks passed",
            &fresh,
            ran(0, run("smoke", HookOn::PreAdvance, 500), T0 + 9),
            |e| matches!(e, Rejection::InvalidTransition { .. }),
        ),
        (
            "pre_advance for a stage already left",
            &at_stage_2,
            ran(0, run("smoke", HookOn::PreAdvance, 500), T0 + 9),
            |e| matches!(e, Rejection::StaleStage { .. }),
        ),
        (
            "pre_advance while paused",
            &paused,
            ran(0, run("smoke", HookOn::PreAdvance, 500), T0 + 9),
            |e| matches!(e, Rejection::InvalidTransition { .. }),
        ),
        (
            "a pre_rollout hook while paused at 0%",
            &paused_at_zero,
            ran(0, run("warmup", HookOn::PreRollout, 200), T0 + 9),
            |e| matches!(e, Rejection::InvalidTransition { .. }),
        ),
        (
            "a post hook of a live rollout",
            &past,
            ran(0, run("chat", HookOn::PostPromote, 200), T0 + 9),
            |e| matches!(e, Rejection::HookNotDue { .. }),
        ),
    ];
    for (what, reg, command, expected) in cases {
        let mut after = reg.clone();
        let err = after
            .apply(command, generation(9))
            .expect_err(&format!("{what}: must be refused"));
        assert!(expected(&err), "{what}: {err}");
        assert_eq!(&after, reg, "{what}: a refused result changes nothing");
    }
    let mut unknown = Registry::default();
    assert!(matches!(
        unknown.apply(
            ran(0, run("ticket", HookOn::PreRollout, 200), T0),
            generation(1)
        ),
        Err(Rejection::UnknownRollout(_))
    ));
}

#[test]
fn post_hooks_become_due_at_the_terminal_transition_and_only_record() {
    let terminal = |command: Command| {
        let mut reg = past_pre_rollout();
        reg.apply(command, generation(4)).unwrap();
        reg
    };
    let promote = Command::Promote {
        id: id(),
        actor: Actor::Operator("ana".into()),
        reason: "ship it".into(),
        analysis: None,
        at: T0 + 5,
    };
    let rollback = Command::RollBack {
        id: id(),
        reason: "errors".into(),
        analysis: None,
        at: T0 + 5,
    };
    let abort = Command::Abort {
        id: id(),
        actor: Actor::Operator("ana".into()),
        reason: "no".into(),
        analysis: None,
        at: T0 + 5,
    };
    for (command, state, due, on) in [
        (promote, RolloutState::Promoted, "chat", HookOn::PostPromote),
        (
            rollback,
            RolloutState::RolledBack,
            "page",
            HookOn::PostRollback,
        ),
        (abort, RolloutState::Aborted, "page", HookOn::PostRollback),
    ] {
        let mut reg = terminal(command);
        assert_eq!(r(&reg).hooks.post_pending, [due.to_owned()], "{state}");
        let batch = post_due(r(&reg)).expect("post hooks are due");
        assert_eq!(batch.key.on, on);
        assert!(batch.key.is_current(&reg));
        assert_eq!(batch.hooks.len(), 1);
        assert_eq!(batch.hooks[0].1.state, state.name());
        let before_weight = plan(&reg).canary_weight;
        let applied = reg
            .apply(
                ran(r(&reg).stage_index, run(due, on, 500), T0 + 6),
                generation(5),
            )
            .unwrap();
        assert!(!applied.traffic_changed, "{state}");
        assert_eq!(r(&reg).state, state, "a failed post hook changes nothing");
        assert_eq!(plan(&reg).canary_weight, before_weight);
        assert_eq!(r(&reg).events.last().unwrap().kind, EventKind::Hook);
        assert!(r(&reg).hooks.post_pending.is_empty());
        assert!(post_due(r(&reg)).is_none());
        assert!(!batch.key.is_current(&reg), "the batch is done");
        assert!(matches!(
            reg.clone()
                .apply(ran(0, run(due, on, 200), T0 + 7), generation(6)),
            Err(Rejection::HookNotDue { .. })
        ));
    }
}

#[test]
fn a_strategy_without_hooks_behaves_as_before() {
    let mut reg = started("[[stages]]\nweight = 10\n[[stages]]\nweight = 50\n");
    assert_eq!(plan(&reg).canary_weight, 10);
    assert_eq!(r(&reg).hooks, HookState::default());
    let pass = Command::StagePassed {
        id: id(),
        stage: 0,
        analysis: StageAnalysis::default(),
        at: T0 + 1,
    };
    assert_eq!(
        gate(r(&reg), Some(pass.clone())),
        Some(Step::Propose(pass.clone()))
    );
    assert_eq!(gate(r(&reg), None), None);
    reg.apply(pass, generation(2)).unwrap();
    reg.apply(
        Command::StagePassed {
            id: id(),
            stage: 1,
            analysis: StageAnalysis::default(),
            at: T0 + 2,
        },
        generation(3),
    )
    .unwrap();
    assert_eq!(r(&reg).state, RolloutState::Promoted);
    assert!(r(&reg).hooks.post_pending.is_empty());
    assert!(post_due(r(&reg)).is_none());
}

#[test]
fn the_gate_runs_pending_pre_rollout_hooks_and_lets_only_rollbacks_through() {
    let mut reg = started(HOOKS);
    let rollout = r(&reg).clone();
    let pass = Command::StagePassed {
        id: id(),
        stage: 0,
        analysis: StageAnalysis::default(),
        at: T0 + 1,
    };
    let rollback = Command::RollBack {
        id: id(),
        reason: "agent could not apply".into(),
        analysis: None,
        at: T0 + 1,
    };
    let pause = Command::Pause {
        id: id(),
        actor: Actor::Controller,
        reason: "inconclusive".into(),
        at: T0 + 1,
    };
    for decision in [None, Some(pass.clone()), Some(pause)] {
        let Some(Step::Run(batch)) = gate(&rollout, decision.clone()) else {
            panic!("{decision:?}: the pre_rollout hooks must run first");
        };
        assert_eq!(batch.key.on, HookOn::PreRollout);
        assert_eq!(batch.then, None);
        let names: Vec<_> = batch.hooks.iter().map(|(h, _)| h.name.as_str()).collect();
        assert_eq!(names, ["ticket", "warmup"]);
        assert_eq!(batch.hooks[0].1.canary_weight, 0);
        assert_eq!(batch.hooks[0].1.next_weight, Some(10));
    }
    assert_eq!(
        gate(&rollout, Some(rollback.clone())),
        Some(Step::Propose(rollback))
    );
    // Only what is still pending runs (a new leader after one of two passed).
    reg.apply(
        ran(0, run("ticket", HookOn::PreRollout, 200), T0 + 1),
        generation(2),
    )
    .unwrap();
    let Some(Step::Run(batch)) = gate(r(&reg), None) else {
        panic!("warmup is still due");
    };
    assert_eq!(batch.hooks.len(), 1);
    assert_eq!(batch.hooks[0].0.name, "warmup");
    // A paused rollout waits for its resume before its hooks run.
    let mut paused = reg.clone();
    paused
        .apply(
            Command::Pause {
                id: id(),
                actor: Actor::Operator("ana".into()),
                reason: "wait".into(),
                at: T0 + 2,
            },
            generation(3),
        )
        .unwrap();
    assert_eq!(gate(r(&paused), None), None);
}

#[test]
fn the_gate_turns_a_stage_pass_into_its_pre_advance_hooks() {
    let reg = past_pre_rollout();
    let rollout = r(&reg);
    let pass = Command::StagePassed {
        id: id(),
        stage: 0,
        analysis: StageAnalysis::default(),
        at: T0 + 20_000,
    };
    let Some(Step::Run(batch)) = gate(rollout, Some(pass.clone())) else {
        panic!("the pass waits for the pre_advance hooks");
    };
    assert_eq!(
        batch.key,
        BatchKey {
            id: id(),
            on: HookOn::PreAdvance,
            stage: 0,
            stage_started_at: T0 + 2,
        }
    );
    assert!(batch.key.is_current(&reg));
    assert_eq!(batch.then, Some(pass));
    let names: Vec<_> = batch.hooks.iter().map(|(h, _)| h.name.as_str()).collect();
    assert_eq!(names, ["smoke", "smoke-2"]);
    let payload = &batch.hooks[0].1;
    assert_eq!(
        payload,
        &HookPayload {
            rollout: "r1".into(),
            service: "api".into(),
            version: "v2".into(),
            stable_version: "v1".into(),
            on: HookOn::PreAdvance,
            hook: "smoke".into(),
            stage_index: 0,
            stage_count: 2,
            canary_weight: 10,
            next_weight: Some(50),
            state: "progressing".into(),
            reason: rollout.last_reason().into(),
        }
    );
    // Every other decision goes through as decided.
    let rollback = Command::RollBack {
        id: id(),
        reason: "trigger".into(),
        analysis: None,
        at: T0 + 1,
    };
    assert_eq!(
        gate(rollout, Some(rollback.clone())),
        Some(Step::Propose(rollback))
    );
    assert_eq!(gate(rollout, None), None);
    // At the last stage the next weight is the promotion's.
    let mut last = reg.clone();
    last.apply(
        Command::StagePassed {
            id: id(),
            stage: 0,
            analysis: StageAnalysis::default(),
            at: T0 + 20_000,
        },
        generation(9),
    )
    .unwrap();
    assert!(!batch.key.is_current(&last), "the stage was left");
    let at_last = r(&last);
    let pass = Command::StagePassed {
        id: id(),
        stage: 1,
        analysis: StageAnalysis::default(),
        at: T0 + 40_000,
    };
    let Some(Step::Run(batch)) = gate(at_last, Some(pass)) else {
        panic!("the last stage's pass waits for the hooks too");
    };
    assert_eq!(batch.hooks[0].1.next_weight, Some(100));
}

#[test]
fn hook_runs_describe_their_answer() {
    let ok = run("smoke", HookOn::PreAdvance, 200);
    assert!(ok.passed());
    assert_eq!(ok.describe(), "passed: HTTP 200 in 12ms (1 attempt): ok");
    let redirect = HookRun {
        status: Some(302),
        body: String::new(),
        ..ok.clone()
    };
    assert!(!redirect.passed(), "only 2xx passes");
    assert_eq!(redirect.describe(), "failed: HTTP 302 in 12ms (1 attempt)");
    let timeout = HookRun {
        attempts: 3,
        status: None,
        error: Some("no answer within the timeout of 1s".into()),
        body: String::new(),
        duration_ms: 4_000,
        ..ok
    };
    assert!(!timeout.passed());
    assert_eq!(
        timeout.describe(),
        "failed: no answer within the timeout of 1s in 4s (3 attempts)"
    );
}

#[test]
fn body_excerpts_are_one_line_and_cut_to_200_characters() {
    assert_eq!(excerpt(b"  ok\n"), "ok");
    assert_eq!(excerpt(b"line 1\nline 2"), "line 1 line 2");
    let long = "é".repeat(300);
    let cut_text = excerpt(long.as_bytes());
    assert_eq!(cut_text.chars().count(), HOOK_BODY_EXCERPT_CHARS + 1);
    assert!(cut_text.ends_with('…'));
    assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
}

#[test]
fn rollouts_with_hooks_round_trip_and_old_records_read() {
    let mut reg = past_pre_rollout();
    reg.apply(
        ran(0, run("smoke", HookOn::PreAdvance, 500), T0 + 9),
        generation(4),
    )
    .unwrap();
    let json = serde_json::to_string(&reg).unwrap();
    assert_eq!(serde_json::from_str::<Registry>(&json).unwrap(), reg);
    // A rollout written before hooks existed: no `hooks` in the rollout nor in its events.
    let mut old: serde_json::Value =
        serde_json::to_value(started("[[stages]]\nweight = 5\n")).unwrap();
    let rollout = old["rollouts"]["r1"].as_object_mut().unwrap();
    rollout.remove("hooks");
    assert!(rollout["events"][0].get("hook").is_none());
    let back: Registry = serde_json::from_value(old).unwrap();
    assert_eq!(back.rollouts[&id()].hooks, HookState::default());
    assert_eq!(back.traffic("api").unwrap().canary_weight, 5);
}

// ---------------------------------------------------------------------------------------------
// The control loop with a scripted runner.
// ---------------------------------------------------------------------------------------------

/// Answers each hook with its scripted status (200 unless told otherwise), records every call,
/// and holds calls of hooks named in `held` until released.
#[derive(Default)]
struct Scripted {
    status: Mutex<HashMap<String, u16>>,
    calls: Mutex<Vec<HookPayload>>,
    held: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Scripted {
    fn answer(&self, hook: &str, status: u16) {
        self.status.lock().unwrap().insert(hook.into(), status);
    }

    fn hold(&self, hook: &str) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        self.held.lock().unwrap().insert(hook.into(), gate.clone());
        gate
    }

    fn calls_of(&self, hook: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.hook == hook)
            .count()
    }
}

impl HookRunner for Scripted {
    async fn call(&self, hook: &Hook, payload: &HookPayload) -> HookRun {
        self.calls.lock().unwrap().push(payload.clone());
        let held = self.held.lock().unwrap().get(&hook.name).cloned();
        if let Some(gate) = held {
            let _ = gate.acquire().await;
        }
        let status = self
            .status
            .lock()
            .unwrap()
            .get(&hook.name)
            .copied()
            .unwrap_or(200);
        run(&hook.name, hook.on, status)
    }
}

mod control_loop {
    use std::time::Duration;

    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::agents::AgentRegistry;
    use crate::analysis::Window;
    use crate::control::{Shared, run_with_hooks};
    use crate::metrics::{MetricsStore, Side};
    use crate::raft::node::{self, NoPeers, NodeConfig};
    use crate::raft::storage::open_db;
    use crate::raft::{NodeView, Role};

    struct Harness {
        shared: Shared,
        runner: Arc<Scripted>,
        view: tokio::sync::watch::Receiver<Arc<NodeView>>,
        tasks: CancellationToken,
        node_shutdown: CancellationToken,
        node_task: JoinHandle<Result<(), crate::raft::node::NodeError>>,
        loop_task: JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        async fn start() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let db = open_db(dir.path(), Duration::from_secs(10)).unwrap();
            let node_shutdown = CancellationToken::new();
            let (raft, node_task) =
                node::start(&db, &NodeConfig::single(1), NoPeers, node_shutdown.clone()).unwrap();
            let mut view = raft.subscribe();
            view.wait_for(|v| v.role == Role::Leader).await.unwrap();
            let shared = Shared {
                raft,
                metrics: Arc::new(std::sync::Mutex::new(MetricsStore::new(
                    Duration::from_secs(60),
                ))),
                agents: Arc::new(AgentRegistry::default()),
                live: Arc::new(std::sync::Mutex::new(HashMap::new())),
                wake: Arc::new(Notify::new()),
            };
            let runner = Arc::new(Scripted::default());
            let tasks = CancellationToken::new();
            let loop_task = tokio::spawn(run_with_hooks(
                shared.clone(),
                runner.clone(),
                tasks.clone(),
            ));
            Harness {
                shared,
                runner,
                view,
                tasks,
                node_shutdown,
                node_task,
                loop_task,
                _dir: dir,
            }
        }

        async fn start_rollout(&self, rid: &str, service: &str, text: &str) {
            self.shared
                .raft
                .propose(Command::Start {
                    id: RolloutId(rid.into()),
                    service: service.into(),
                    version: "v2".into(),
                    stable_version: Some("v1".into()),
                    strategy: strategy(text),
                    actor: Actor::Operator("ana".into()),
                    at: now_millis(),
                })
                .await
                .unwrap();
        }

        async fn wait(&mut self, what: &str, cond: impl Fn(&Registry) -> bool) -> Arc<NodeView> {
            let waited = tokio::time::timeout(
                Duration::from_secs(20),
                self.view.wait_for(|v| cond(&v.registry)),
            )
            .await
            .map(|r| r.map(|v| v.clone()));
            match waited {
                Ok(view) => view.unwrap(),
                Err(_) => panic!(
                    "timed out waiting for {what}: {:#?}",
                    self.view.borrow().registry.rollouts
                ),
            }
        }

        async fn stop(self) {
            self.tasks.cancel();
            self.loop_task.await.unwrap();
            self.node_shutdown.cancel();
            self.node_task.await.unwrap().unwrap();
        }
    }

    fn rollout<'a>(reg: &'a Registry, rid: &str) -> Option<&'a Rollout> {
        reg.rollouts.get(&RolloutId(rid.into()))
    }

    const HELD: &str = r#"
[[stages]]
weight = 10
min_duration = "0s"
[[stages]]
weight = 50
min_duration = "1h"

[[triggers]]
name = "errors"
metric = "error_rate"
max = 0.2
window = "10s"
min_requests = 10

[[hooks]]
name = "smoke"
on = "pre_advance"
url = "http://hooks.test/smoke"
[[hooks]]
name = "page"
on = "post_rollback"
url = "http://hooks.test/page"
"#;

    /// The stage passes at once (no checks, no minimum time); its failing smoke hook holds it
    /// at 10%, and the trigger still rolls the held canary back, after which the
    /// post_rollback hook is called once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_pre_advance_hook_holds_the_stage_and_a_trigger_still_rolls_back() {
        let mut h = Harness::start().await;
        h.runner.answer("smoke", 500);
        h.start_rollout("r", "api", HELD).await;
        let view = h
            .wait("the hold", |reg| {
                rollout(reg, "r").is_some_and(|r| r.state == RolloutState::Paused)
            })
            .await;
        let r = rollout(&view.registry, "r").unwrap();
        assert_eq!((r.stage_index, r.canary_weight()), (0, 10));
        let last = r.events.last().unwrap();
        assert_eq!(last.actor, Actor::Hook("smoke".into()));
        assert!(last.reason.contains("HTTP 500"), "{}", last.reason);
        assert_eq!(h.runner.calls_of("smoke"), 1, "one run per stage pass");
        // The held canary fails: the trigger rolls it back although it is paused.
        h.shared.metrics().record(
            "api",
            Side::Canary,
            Window::from_counts(100, 100, &[], 0.0),
            now_millis(),
        );
        h.shared.wake.notify_one();
        let view = h
            .wait("the rollback and its post hook", |reg| {
                rollout(reg, "r").is_some_and(|r| {
                    r.state == RolloutState::RolledBack && r.hooks.post_pending.is_empty()
                })
            })
            .await;
        let r = rollout(&view.registry, "r").unwrap();
        let hook_events: Vec<_> = r
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Hook)
            .map(|e| e.actor.to_string())
            .collect();
        assert_eq!(hook_events, ["hook:smoke", "hook:page"]);
        assert_eq!(h.runner.calls_of("page"), 1);
        assert_eq!(h.runner.calls_of("smoke"), 1);
        h.stop().await;
    }

    /// A hook that does not answer holds only its own rollout: another service's rollout
    /// meanwhile passes its pre_rollout hook and gets its traffic, and a bad canary elsewhere
    /// is rolled back. Released, the held hook's pass advances its rollout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_hook_does_not_hold_up_the_control_loop() {
        let mut h = Harness::start().await;
        let release = h.runner.hold("smoke");
        h.start_rollout("slow", "api", HELD).await;
        tokio::time::timeout(Duration::from_secs(20), async {
            while h.runner.calls_of("smoke") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the smoke hook is called");

        h.start_rollout(
            "gated",
            "web",
            "[[stages]]\nweight = 20\nmin_duration = \"1h\"\n\
             [[hooks]]\nname = \"ticket\"\non = \"pre_rollout\"\nurl = \"http://hooks.test/t\"\n",
        )
        .await;
        h.wait("the other rollout's pre_rollout hook to pass", |reg| {
            rollout(reg, "gated").is_some_and(|r| r.canary_weight() == 20)
        })
        .await;
        h.start_rollout("bad", "db", HELD).await;
        h.shared.metrics().record(
            "db",
            Side::Canary,
            Window::from_counts(100, 100, &[], 0.0),
            now_millis(),
        );
        h.shared.wake.notify_one();
        h.wait("the bad canary's rollback", |reg| {
            rollout(reg, "bad").is_some_and(|r| r.state == RolloutState::RolledBack)
        })
        .await;
        let view = h.view.borrow().clone();
        let slow = rollout(&view.registry, "slow").unwrap();
        assert_eq!(
            (slow.state, slow.stage_index),
            (RolloutState::Progressing, 0),
            "still waiting for its hook"
        );

        release.add_permits(1);
        h.wait("the released hook's pass to advance its rollout", |reg| {
            rollout(reg, "slow").is_some_and(|r| r.stage_index == 1)
        })
        .await;
        assert_eq!(h.runner.calls_of("smoke"), 1);
        h.stop().await;
    }

    /// Shutdown cancels a hook that never answers and returns.
    #[tokio::test]
    async fn shutdown_cancels_a_hook_that_never_answers() {
        let h = Harness::start().await;
        let _never = h.runner.hold("smoke");
        h.start_rollout("r", "api", HELD).await;
        tokio::time::timeout(Duration::from_secs(20), async {
            while h.runner.calls_of("smoke") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the smoke hook is called");
        tokio::time::timeout(Duration::from_secs(10), h.stop())
            .await
            .expect("shutdown does not wait for the hook");
    }
}
