//! The replicated coordinator under fire, end to end: a 3-node raft group of real
//! `serin coordinator run` processes behind a real agent, nginx and load. Leaders are SIGKILLed
//! mid-stage (20 times in a row), right after a rollback decision, all members at once; a member
//! is replaced during a rollout; a leader is cut off from the majority. Every test asserts on
//! the committed event history (`serin rollout status --json`), never on log lines.

mod common;

use std::time::{Duration, Instant};

use common::{CANARY, Coordinators, STABLE, Stack, StackOptions, StageSpec, stage, strategy};
use serde_json::Value;

/// A stack on a 3-node group, on loopback or one member per network namespace.
async fn group_stack(in_netns: bool) -> Stack {
    let coordinators = if in_netns {
        Coordinators::GroupInNetns(3)
    } else {
        Coordinators::Group(3)
    };
    Stack::start_on(coordinators, StackOptions::default()).await
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v:#}"))
}

/// `(kind, stage_index)` of every event of a status.
fn history(status: &Value) -> Vec<(String, u64)> {
    status["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events array in {status:#}"))
        .iter()
        .map(|e| {
            (
                str_of(e, "kind").to_owned(),
                e["stage_index"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// Asserts a promoted rollout's history is `started`, one `stage_advanced` per stage boundary
/// with consecutive stage indexes, then `promoted`: nothing lost, nothing applied twice.
fn assert_each_transition_once_in_order(done: &Value) {
    let events = history(done);
    let stages = done["stage_count"].as_u64().expect("stage_count") as usize;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let mut expected = vec!["started"];
    expected.extend(std::iter::repeat_n("stage_advanced", stages - 1));
    expected.push("promoted");
    assert_eq!(kinds, expected, "history: {events:?}");
    let advanced: Vec<u64> = events
        .iter()
        .filter(|(k, _)| k == "stage_advanced")
        .map(|(_, s)| *s)
        .collect();
    assert!(
        advanced.windows(2).all(|w| w[1] == w[0] + 1),
        "stage_advanced events are not one per stage in order: {events:?}"
    );
}

/// When the leader's control loop last acted on this rollout: the newest of its committed
/// checkpoint and its last event (ms since the epoch, the coordinators' clock = ours).
fn last_act_ms(status: &Value) -> i64 {
    let checkpoint = status["detail"]["checkpoint"]["at"].as_i64().unwrap_or(0);
    let event = status["events"]
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["at_ms"].as_i64())
        .unwrap_or(0);
    checkpoint.max(event)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock before 1970")
        .as_millis() as i64
}

/// Waits until `serin agent list --json` (answered by the leader) lists the agent connected.
async fn wait_agent_connected(stack: &Stack, timeout: Duration) {
    stack
        .wait_until(
            timeout,
            "the agent to be connected to the leader",
            async || {
                let out = stack.cli(&["agent", "list", "--json"]).await;
                out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| {
                        v.as_array()
                            .is_some_and(|a| a.iter().any(|a| a["connected"] == true))
                    })
            },
        )
        .await;
}

/// The leader is SIGKILLed in the middle of a stage 20 times in a row, each killed member
/// restarted on its data so the group keeps three: each time another member takes over and
/// its control loop acts again; the rollout carries on to promotion with every stage
/// transition in its history exactly once and in order, and the agent (the same process) is
/// connected to the last leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leader_kills_mid_stage_lose_no_transition_and_apply_none_twice() {
    const KILLS: usize = 20;
    let mut stack = group_stack(false).await;
    let agent_pid = stack.agent.pid();
    // 19 stages of 5 s (95 s): longer than 20 kill cycles (about 4 s each here), so every
    // kill lands mid-stage, some stages see several.
    let five = |weight| StageSpec {
        weight,
        min_duration: "5s",
        manual_gate: false,
    };
    let stages: Vec<StageSpec> = (2..=20).map(|k| five(k * 5)).collect();
    let id = stack.start_rollout(&strategy(&stages, "")).await;
    stack
        .wait_status(&id, Duration::from_secs(30), "stage index 1", |s| {
            s["stage_index"].as_u64() >= Some(1)
        })
        .await;

    let mut leaders = Vec::new();
    for kill in 1..=KILLS {
        let before = stack.status_json(&id).await;
        assert_eq!(
            str_of(&before, "state"),
            "progressing",
            "the rollout is no longer progressing before kill {kill} (the strategy is too \
             short for {KILLS} kills?): {before:#}"
        );
        let killed = stack.kill_leader().await;
        let killed_at = now_ms();
        let (leader, took) = stack
            .group()
            .wait_leader(Some(killed), Duration::from_secs(15))
            .await;
        stack.group_mut().start(killed);
        leaders.push((killed, leader, took));
        // The new leader's control loop acts (a checkpoint or an event committed after the
        // kill) before the next kill, so every kill lands mid-stage on a working leader.
        stack
            .wait_status(
                &id,
                Duration::from_secs(20),
                &format!("leader {leader}'s control loop to act after kill {kill}"),
                |s| last_act_ms(s) > killed_at || s["terminal"] == true,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("(killed, new leader, time to a new leader): {leaders:?}");

    let done = stack
        .wait_terminal(&id, Duration::from_secs(120), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "not promoted after {KILLS} leader kills:\n{}",
        stack.diagnostics()
    );
    assert_each_transition_once_in_order(&done);
    assert!(stack.agent_alive(), "the agent died");
    assert_eq!(stack.agent.pid(), agent_pid, "the agent was restarted");
    wait_agent_connected(&stack, Duration::from_secs(20)).await;
    stack.wait_nginx_weight(100).await;
    let burst = stack.burst(50).await;
    assert_eq!(burst.of(CANARY), 50, "{burst:?}");
}

/// A bad canary's rollback is committed and the leader is SIGKILLed at once: the next leader
/// keeps the decision (the rollout stays rolled back, with one `rolled_back` event), gets the
/// agent to apply it, and nginx serves only the stable version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_committed_just_before_the_leader_dies_is_completed_by_the_next_leader() {
    let mut stack = group_stack(false).await;
    let long = |weight| StageSpec {
        weight,
        min_duration: "60s",
        manual_gate: false,
    };
    let id = stack
        .start_rollout(&strategy(&[stage(20), long(50), long(100)], ""))
        .await;
    stack
        .wait_status(&id, Duration::from_secs(30), "stage index 1 (50%)", |s| {
            s["stage_index"].as_u64() >= Some(1) || s["terminal"] == true
        })
        .await;
    let admin = format!("http://{}/admin", stack.canary_addr);
    assert_eq!(
        common::post_json(&admin, r#"{"error_rate": 0.6}"#).await,
        200,
        "the canary refused the error-rate change"
    );
    let decided = stack
        .wait_status(&id, Duration::from_secs(30), "the rollback decision", |s| {
            s["terminal"] == true
        })
        .await;
    let killed = stack.kill_leader().await;
    assert_eq!(str_of(&decided, "state"), "rolled_back", "{decided:#}");

    let (leader, took) = stack
        .group()
        .wait_leader(Some(killed), Duration::from_secs(15))
        .await;
    eprintln!("leader {killed} killed after the rollback; {leader} leads after {took:?}");
    stack.group_mut().start(killed);
    // The new leader's view: every agent has applied the rolled-back state.
    let after = stack
        .wait_status(
            &id,
            Duration::from_secs(30),
            "the agent to apply the rollback under the new leader",
            |s| {
                s["apply"]["agents"].as_u64() >= Some(1)
                    && s["apply"]["applied"] == s["apply"]["agents"]
            },
        )
        .await;
    assert_eq!(str_of(&after, "state"), "rolled_back", "{after:#}");
    let rolled_back = history(&after)
        .iter()
        .filter(|(k, _)| k == "rolled_back")
        .count();
    assert_eq!(rolled_back, 1, "{:?}", history(&after));
    assert_eq!(
        history(&after)[..],
        history(&decided)[..],
        "the next leader changed the history"
    );
    stack.wait_nginx_weight(0).await;
    let burst = stack.burst(100).await;
    assert_eq!(burst.of(STABLE), 100, "{burst:?}");
}

/// Status JSON minus what only the live leader computes (analysis, apply progress) and the
/// time of the stage checkpoint: a new leader re-commits the checkpoint it resumed from (same
/// data, its own time), since it starts with no record of what was last committed.
fn committed_part(mut status: Value) -> Value {
    if let Some(o) = status.as_object_mut() {
        o.remove("live");
        o.remove("apply");
    }
    if let Some(c) = status["detail"]["checkpoint"].as_object_mut() {
        c.remove("at");
    }
    status
}

/// All three members SIGKILLed at once and started again: every rollout (an aborted one and a
/// paused one) comes back with the same committed status and events, and the paused one
/// completes once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_members_killed_and_restarted_keep_every_rollout_and_event() {
    let mut stack = group_stack(false).await;
    // A finished rollout (aborted by an operator, so v1 stays stable) and a live one.
    let first = stack
        .start_rollout(&strategy(&[stage(30), stage(100)], ""))
        .await;
    stack.cli_ok(&["rollout", "abort", &first]).await;
    let done = stack
        .wait_terminal(&first, Duration::from_secs(30), |_| {})
        .await;
    assert_eq!(str_of(&done, "state"), "aborted", "{done:#}");
    let second = stack
        .start_rollout(&strategy(&[stage(20), stage(60), stage(100)], ""))
        .await;
    stack
        .wait_status(&second, Duration::from_secs(30), "stage index 1", |s| {
            s["stage_index"].as_u64() >= Some(1)
        })
        .await;
    stack.cli_ok(&["rollout", "pause", &second]).await;
    // Paused: the control loop commits nothing more for it, so the snapshot stays exact.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: Vec<Value> = vec![
        committed_part(stack.status_json(&first).await),
        committed_part(stack.status_json(&second).await),
    ];
    let list_before = stack.cli_ok(&["rollout", "list", "--json"]).await;

    stack.group_mut().kill_all().await;
    stack.group_mut().start_stopped();
    stack.leader().await;

    let after: Vec<Value> = vec![
        committed_part(
            stack
                .wait_status(
                    &first,
                    Duration::from_secs(30),
                    "the group to answer",
                    |_| true,
                )
                .await,
        ),
        committed_part(stack.status_json(&second).await),
    ];
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a, "a rollout changed across the restart of every member");
    }
    let list_after = stack.cli_ok(&["rollout", "list", "--json"]).await;
    assert_eq!(list_before, list_after, "rollout list changed");

    stack.cli_ok(&["rollout", "resume", &second]).await;
    let done = stack
        .wait_terminal(&second, Duration::from_secs(60), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "{}",
        stack.diagnostics()
    );
}

/// During a rollout a follower is removed (`serin cluster remove`) and a new member joins
/// (`coordinator run --join` + `serin cluster add`, which returns once it is a voter): the
/// rollout completes, the new member's applied index catches up with the leader's commit
/// index, and `cluster status` lists it as a voter among three members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_replaced_during_a_rollout_catches_up_as_a_voter() {
    let mut stack = group_stack(false).await;
    let three = |weight| StageSpec {
        weight,
        min_duration: "3s",
        manual_gate: false,
    };
    let id = stack
        .start_rollout(&strategy(
            &[three(20), three(40), three(70), three(100)],
            "",
        ))
        .await;
    stack
        .wait_status(&id, Duration::from_secs(30), "stage index 1", |s| {
            s["stage_index"].as_u64() >= Some(1)
        })
        .await;
    let leader = stack.leader().await;
    let follower = stack
        .group()
        .ids()
        .into_iter()
        .find(|&m| m != leader)
        .expect("a follower");
    let out = stack.group_mut().remove(follower).await;
    assert!(out.status.success(), "{}", common::describe(&out));
    let out = stack.group_mut().add_local(4).await;
    assert!(
        out.status.success(),
        "cluster add failed: {}\n{}",
        common::describe(&out),
        stack.diagnostics()
    );
    assert!(
        common::stdout(&out).contains("node 4 caught up and is a voter"),
        "{}",
        common::describe(&out)
    );

    let done = stack
        .wait_terminal(&id, Duration::from_secs(60), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "{}",
        stack.diagnostics()
    );
    assert_each_transition_once_in_order(&done);

    let status = stack.group().status().await.expect("cluster status");
    let commit = status["commit_index"].as_u64().expect("commit_index");
    let members = status["members"].as_array().expect("members");
    let mut ids: Vec<u64> = members.iter().filter_map(|m| m["id"].as_u64()).collect();
    ids.sort_unstable();
    let mut expected: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|&m| m != follower)
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "members after the change: {status:#}");
    let four = members
        .iter()
        .find(|m| m["id"] == 4)
        .expect("member 4 listed");
    assert_eq!(four["suffrage"], "voter", "{status:#}");
    stack
        .wait_until(
            Duration::from_secs(20),
            "member 4's applied index to reach the leader's commit index",
            async || {
                stack
                    .group()
                    .member_view(4)
                    .await
                    .is_ok_and(|v| v.applied_index >= commit)
            },
        )
        .await;
}

/// `serin cluster status --json` run inside member `id`'s namespace against that member
/// itself (the CLI asks the leader it names, which a cut member cannot reach, and then shows
/// the member's own view).
async fn own_view_in_namespace(stack: &Stack, id: u64) -> Option<Value> {
    let url = stack.group().member(id).url();
    let out = stack
        .group()
        .exec_in(
            id,
            &["cluster", "status", "--json", "--coordinator", &url],
            Duration::from_secs(15),
        )
        .await;
    serde_json::from_slice(&out.stdout).ok()
}

/// The leader is cut off from the majority (each member in its own network namespace): its
/// proposals fail, it steps down within a few seconds, the majority elects a leader and the
/// rollout carries on to promotion. Once healed there is one history: every member names the
/// same leader and term, the old leader's applied index catches up, and the history has each
/// transition once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_majority_steps_down_and_the_majority_carries_on() {
    let mut stack = group_stack(true).await;
    let three = |weight| StageSpec {
        weight,
        min_duration: "3s",
        manual_gate: false,
    };
    let id = stack
        .start_rollout(&strategy(
            &[three(20), three(40), three(70), three(100)],
            "",
        ))
        .await;
    stack
        .wait_status(&id, Duration::from_secs(30), "stage index 1", |s| {
            s["stage_index"].as_u64() >= Some(1)
        })
        .await;
    let old = stack.leader().await;
    stack.group_mut().cut(old);
    let cut_at = Instant::now();

    // Its proposals fail: an operator's pause sent to it from its own host is refused (once
    // it steps down it answers the proposal it could not commit).
    let url = stack.group().member(old).url();
    let pause = stack
        .group()
        .exec_in(
            old,
            &["rollout", "pause", &id, "--coordinator", &url],
            Duration::from_secs(40),
        )
        .await;
    let pause_failed_after = cut_at.elapsed();
    assert!(
        !pause.status.success(),
        "the cut-off leader accepted a pause: {}",
        common::describe(&pause)
    );
    eprintln!(
        "pause on the cut-off leader failed {pause_failed_after:?} after the cut: {}",
        common::stderr(&pause).trim()
    );
    assert!(
        pause_failed_after < Duration::from_secs(10),
        "the cut-off leader kept the pause waiting for {pause_failed_after:?} (the CLI's \
         timeout?) instead of answering when it stepped down: {}",
        common::describe(&pause)
    );
    // It steps down.
    let mut stepped_down = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stepped_down.is_none() && Instant::now() < deadline {
        if let Some(v) = own_view_in_namespace(&stack, old).await
            && v["answered_by"] == old
            && v["role"] != "leader"
        {
            stepped_down = Some(cut_at.elapsed());
        } else {
            tokio::time::sleep(common::POLL).await;
        }
    }
    let stepped_down = stepped_down.unwrap_or_else(|| {
        panic!(
            "the cut-off leader {old} still leads 10 s after the cut\n{}",
            stack.diagnostics()
        )
    });
    eprintln!("cut-off leader {old} stepped down {stepped_down:?} after the cut");

    let (new, _) = stack
        .group()
        .wait_leader(Some(old), Duration::from_secs(15))
        .await;
    eprintln!(
        "the majority's leader {new} seen {:?} after the cut",
        cut_at.elapsed()
    );
    let done = stack
        .wait_terminal(&id, Duration::from_secs(90), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "{}",
        stack.diagnostics()
    );
    assert_eq!(
        history(&done).iter().filter(|(k, _)| k == "paused").count(),
        0,
        "the cut-off leader's pause got into the history: {:?}",
        history(&done)
    );
    assert_each_transition_once_in_order(&done);

    stack.group_mut().heal(old);
    let commit = stack
        .group()
        .member_view(new)
        .await
        .expect("the new leader answers")
        .commit_index;
    stack
        .wait_until(
            Duration::from_secs(30),
            "every member to name one leader and term and apply the majority's log",
            async || {
                let mut views = Vec::new();
                for m in stack.group().ids() {
                    match stack.group().member_view(m).await {
                        Ok(v) => views.push(v),
                        Err(_) => return false,
                    }
                }
                views.iter().all(|v| {
                    v.leader_id == views[0].leader_id
                        && v.term == views[0].term
                        && v.leader_id != 0
                        && v.applied_index >= commit
                })
            },
        )
        .await;
    let again = stack.status_json(&id).await;
    assert_eq!(
        history(&again),
        history(&done),
        "the history changed after healing"
    );
}
