//! End-to-end rollouts through real processes: `serin coordinator run`, `serin agent run`, two
//! `serin demo-app`s, a real nginx, and the `serin rollout …` CLI, with load flowing through
//! nginx the whole time. See `common/mod.rs` for the harness.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{CANARY, STABLE, Stack, StageSpec, stage, strategy};
use serde_json::Value;

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v:#}"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v:#}"))
}

/// `(kind, stage_index, canary_weight)` of every event of a status.
fn events(status: &Value) -> Vec<(String, u64, u64)> {
    status["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events array in {status:#}"))
        .iter()
        .map(|e| {
            (
                str_of(e, "kind").to_owned(),
                u64_of(e, "stage_index"),
                u64_of(e, "canary_weight"),
            )
        })
        .collect()
}

/// A healthy canary walks 1 → 5 → 25 → 50 → 100 % and is promoted; afterwards nginx sends
/// everything to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_canary_walks_every_stage_and_is_promoted() {
    let stack = Stack::start().await;
    let weights = [1, 5, 25, 50, 100];
    let stages: Vec<StageSpec> = weights.iter().map(|&w| stage(w)).collect();
    // The agent's own host samples (sysinfo) reach the checks: without them this check has no
    // data and no stage could pass.
    let host_check = "\n[[checks]]\nname = \"host-memory\"\nmetric = \"host_memory\"\nmax = 0.999\nmin_requests = 1\n";
    let id = stack.start_rollout(&strategy(&stages, host_check)).await;

    let first = stack.status_json(&id).await;
    assert_eq!(str_of(&first, "service"), common::SERVICE);
    assert_eq!(str_of(&first, "version"), CANARY);
    assert_eq!(u64_of(&first, "stage_count"), 5);

    // Every polled status: its stage index must never go back, and we keep the
    // (stage index, weight) pairs seen.
    let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut backwards = Vec::new();
    let mut last_index = 0;
    let done = stack
        .wait_terminal(&id, Duration::from_secs(120), |s| {
            let index = s["stage_index"].as_u64().unwrap_or(0);
            if index < last_index {
                backwards.push((last_index, index));
            }
            last_index = index;
            if s["state"] == "progressing" {
                seen.insert((index, s["canary_weight"].as_u64().unwrap_or(0)));
            }
        })
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "the healthy canary was not promoted:\n{}",
        stack.diagnostics()
    );
    assert!(
        backwards.is_empty(),
        "stage index went backwards: {backwards:?}"
    );

    // The history records each stage with its weight, in order.
    let history = events(&done);
    let mut expected: Vec<(String, u64, u64)> = vec![("started".into(), 0, 1)];
    for (i, &w) in weights.iter().enumerate().skip(1) {
        expected.push(("stage_advanced".into(), i as u64, u64::from(w)));
    }
    let advancing: Vec<(String, u64, u64)> = history
        .iter()
        .filter(|(k, _, _)| k == "started" || k == "stage_advanced")
        .cloned()
        .collect();
    assert_eq!(advancing, expected, "events: {history:?}");
    assert_eq!(
        history.last().map(|e| e.0.as_str()),
        Some("promoted"),
        "events: {history:?}"
    );
    // Statuses polled every 100 ms see every 2 s stage with its weight as well.
    for (i, &w) in weights.iter().enumerate() {
        assert!(
            seen.contains(&(i as u64, u64::from(w))),
            "never saw stage {i} at {w}% in status: {seen:?}"
        );
    }
    assert_eq!(u64_of(&done, "canary_weight"), 100);

    // After promotion nginx sends every request to the canary version.
    stack.wait_nginx_weight(100).await;
    stack.load.reset();
    let after = stack.wait_load(200).await;
    assert_eq!(
        after.of(CANARY),
        after.answered(),
        "after promotion some requests did not reach {CANARY}: {after:?}"
    );
    assert_eq!(after.transport_errors + after.server_errors, 0, "{after:?}");
    let burst = stack.burst(200).await;
    assert_eq!(burst.of(CANARY), 200, "{burst:?}");

    // The coordinator knows the agent: connected, no error, and it acknowledged a generation
    // at least as new as the promotion's.
    let agents: Value =
        serde_json::from_str(&stack.cli_ok(&["agent", "list", "--json"]).await).expect("JSON");
    let agent = &agents[0];
    assert_eq!(agent["connected"], true, "{agents:#}");
    assert!(agent["last_error"].is_null(), "{agents:#}");
    assert!(
        agent["applied"]["index"].as_u64().is_some_and(|i| i > 0),
        "{agents:#}"
    );
    let variants: BTreeSet<&str> = agent["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["variant"].as_str())
        .collect();
    assert_eq!(variants, BTreeSet::from(["canary", "stable"]), "{agents:#}");
}

/// A canary that starts failing half its requests at 25% is rolled back by the critical
/// trigger, within the stage, and nginx stops sending it anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_canary_is_rolled_back_by_its_trigger() {
    let stack = Stack::start().await;
    // The 25% stage and later ones last 30 s, so a rollback there can only come from the
    // trigger (which acts within its 3 s window), not from the checks at the stage's end.
    let long = |weight| StageSpec {
        weight,
        min_duration: "30s",
        manual_gate: false,
    };
    let stages = [stage(1), stage(5), long(25), long(50), long(100)];
    let id = stack.start_rollout(&strategy(&stages, "")).await;

    stack
        .wait_status(&id, Duration::from_secs(60), "stage index 2 (25%)", |s| {
            s["stage_index"].as_u64() >= Some(2) || s["terminal"] == true
        })
        .await;
    let admin = format!("http://{}/admin", stack.canary_addr);
    assert_eq!(
        common::post_json(&admin, r#"{"error_rate": 0.5}"#).await,
        200,
        "the canary refused the error-rate change"
    );

    let done = stack
        .wait_terminal(&id, Duration::from_secs(60), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "rolled_back",
        "the failing canary was not rolled back:\n{}",
        stack.diagnostics()
    );
    let reason = str_of(&done, "last_reason");
    eprintln!("rolled back: {reason}");
    assert!(
        reason.contains("canary-error-spike"),
        "last_reason should name the trigger: {reason:?}"
    );
    let history = events(&done);
    let rolled_back = history
        .iter()
        .find(|e| e.0 == "rolled_back")
        .unwrap_or_else(|| panic!("no rolled_back event: {history:?}"));
    assert_eq!(
        rolled_back.1, 2,
        "the rollback should happen during the 25% stage: {history:?}"
    );
    assert_eq!(u64_of(&done, "canary_weight"), 0);

    stack.wait_nginx_weight(0).await;
    let after = stack.burst(200).await;
    assert_eq!(
        after.of(CANARY),
        0,
        "nginx still sends traffic to the rolled-back canary: {after:?}"
    );
    assert_eq!(after.of(STABLE), 200, "{after:?}");

    // The evidence of every stage end and of the rollback, as Markdown and as JSON.
    let markdown = stack.cli_ok(&["rollout", "evidence", &id]).await;
    assert!(
        markdown.contains("Final state: **rolled_back**")
            && markdown.contains("### Stage 1 (1%) — passed")
            && markdown.contains("### Stage 3 (25%) — rolled back"),
        "{markdown}"
    );
    let json: Value =
        serde_json::from_str(&stack.cli_ok(&["rollout", "evidence", &id, "--json"]).await)
            .expect("evidence --json is JSON");
    let evidence = json["evidence"].as_array().expect("evidence array");
    let outcomes: Vec<&str> = evidence
        .iter()
        .map(|e| e["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, ["passed", "passed", "rolled_back"], "{json:#}");
    assert!(
        evidence[2]["analysis"]["data"]["canary"]["errors"]
            .as_u64()
            .is_some_and(|e| e > 0),
        "the rollback evidence should hold the canary's errors: {json:#}"
    );
}

/// A sequential check decides from its scores, second by second: a canary failing 5% of its
/// requests (under the 20% trigger, and judged by the threshold checks only at the end of the
/// 60 s stage) is rolled back by the check's fail score well before the stage's minimum time,
/// and the reason carries the score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_check_rolls_back_a_worse_canary_long_before_the_stage_ends() {
    let stack = Stack::start().await;
    let admin = format!("http://{}/admin", stack.canary_addr);
    assert_eq!(
        common::post_json(&admin, r#"{"error_rate": 0.05}"#).await,
        200,
        "the canary refused the error-rate change"
    );
    let long = |weight| StageSpec {
        weight,
        min_duration: "60s",
        manual_gate: false,
    };
    let sequential = "\n[[checks]]\nname = \"errors-sequential\"\nmetric = \"error_rate\"\ntest = \"sequential\"\n";
    let started = std::time::Instant::now();
    let id = stack
        .start_rollout(&strategy(&[long(25), long(50)], sequential))
        .await;
    let done = stack
        .wait_terminal(&id, Duration::from_secs(55), |_| {})
        .await;
    let took = started.elapsed();
    assert_eq!(
        str_of(&done, "state"),
        "rolled_back",
        "the worse canary was not rolled back:\n{}",
        stack.diagnostics()
    );
    let reason = str_of(&done, "last_reason");
    eprintln!("rolled back after {took:?}: {reason}");
    assert!(
        reason.contains("errors-sequential: fail (fail: fail score") && reason.contains("≥ 100"),
        "the reason should name the sequential check and its score: {reason:?}"
    );
    assert!(
        took < Duration::from_secs(55),
        "the rollback must come before the 60 s stage could end: {took:?}"
    );
}

/// At a 25% stage held by a manual gate, nginx really sends a quarter of new connections to
/// the canary; `rollout abort` then returns everything to stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25_percent_stage_splits_traffic_and_abort_restores_stable() {
    let stack = Stack::start().await;
    let gated = StageSpec {
        weight: 25,
        min_duration: "2s",
        manual_gate: true,
    };
    let id = stack
        .start_rollout(&strategy(&[gated, stage(100)], ""))
        .await;
    let held = stack
        .wait_status(
            &id,
            Duration::from_secs(60),
            "the gated 25% stage to pass its checks",
            |s| s["state"] == "awaiting_promotion" || s["terminal"] == true,
        )
        .await;
    assert_eq!(str_of(&held, "state"), "awaiting_promotion");
    assert_eq!(u64_of(&held, "stage_index"), 0);
    assert_eq!(u64_of(&held, "canary_weight"), 25);
    stack.wait_nginx_weight(25).await;

    // n fresh connections. If each request independently went to the canary with p = 0.25,
    // the count would be Binomial(n, p): sigma = sqrt(n p (1 - p)) = 19.4 for n = 2000, and
    // 4.5 sigma (87 requests, 4.4 points of share) is exceeded with probability < 1e-5.
    // nginx's smooth weighted round robin is deterministic within one worker (exactly 1 in 4),
    // so this bound is loose there; it stays valid with several workers, each running its own
    // round robin, and with the agent's probes interleaved.
    stack.load.pause(true);
    let n = 2000;
    let split = stack.burst(n).await;
    stack.load.pause(false);
    assert_eq!(
        split.transport_errors + split.server_errors,
        0,
        "requests failed: {split:?}"
    );
    assert_eq!(
        split.of(STABLE) + split.of(CANARY),
        n as u64,
        "answers from unknown versions: {split:?}"
    );
    let p = 0.25;
    let share = split.of(CANARY) as f64 / n as f64;
    eprintln!(
        "25% stage: {} of {n} fresh connections reached the canary",
        split.of(CANARY)
    );
    let sigma = (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (share - p).abs() <= 4.5 * sigma,
        "canary share {share:.4} is outside 25% ± {:.4} (4.5 sigma): {split:?}",
        4.5 * sigma
    );
    // The gate still holds.
    let still = stack.status_json(&id).await;
    assert_eq!(str_of(&still, "state"), "awaiting_promotion");

    let out = stack
        .cli_ok(&["rollout", "abort", &id, "--reason", "e2e: abort at 25%"])
        .await;
    assert!(out.contains("aborted"), "abort printed {out:?}");
    let done = stack.status_json(&id).await;
    assert_eq!(str_of(&done, "state"), "aborted");
    assert_eq!(str_of(&done, "last_reason"), "e2e: abort at 25%");
    assert_eq!(u64_of(&done, "canary_weight"), 0);
    let abort_event = events(&done).into_iter().last();
    assert_eq!(
        abort_event.as_ref().map(|e| e.0.as_str()),
        Some("aborted"),
        "{done:#}"
    );
    let actor = done["events"]
        .as_array()
        .and_then(|e| e.last())
        .map(|e| e["actor"].as_str().unwrap_or("").to_owned());
    assert_eq!(actor.as_deref(), Some("operator:e2e"));

    stack.wait_nginx_weight(0).await;
    let after = stack.burst(400).await;
    assert_eq!(after.of(CANARY), 0, "traffic after abort: {after:?}");
    assert_eq!(after.of(STABLE), 400, "traffic after abort: {after:?}");
}

/// The operator's steering commands against a live rollout: a manual gate waits for
/// `resume`, `pause` holds a stage that would otherwise pass, `resume` releases it, and
/// `promote` skips the remaining stages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_resumes_a_gate_pauses_resumes_and_promotes() {
    let stack = Stack::start().await;
    let gated = StageSpec {
        weight: 10,
        min_duration: "2s",
        manual_gate: true,
    };
    let id = stack
        .start_rollout(&strategy(&[gated, stage(50), stage(100)], ""))
        .await;
    stack
        .wait_status(&id, Duration::from_secs(60), "the manual gate", |s| {
            s["state"] == "awaiting_promotion" || s["terminal"] == true
        })
        .await;
    // The gate holds: well past the stage's 2 s, still at stage 0.
    stack
        .assert_holds(
            &id,
            Duration::from_secs(2),
            "the gate to hold at stage 0",
            |s| s["state"] == "awaiting_promotion" && s["stage_index"] == 0,
        )
        .await;

    stack.cli_ok(&["rollout", "resume", &id]).await;
    let resumed = stack.status_json(&id).await;
    assert_eq!(str_of(&resumed, "state"), "progressing", "{resumed:#}");
    assert_eq!(u64_of(&resumed, "stage_index"), 1);
    assert_eq!(u64_of(&resumed, "canary_weight"), 50);

    stack
        .cli_ok(&["rollout", "pause", &id, "--reason", "e2e: hold"])
        .await;
    // Paused for twice the stage's minimum duration with load flowing: it must not advance.
    let paused = stack
        .assert_holds(
            &id,
            Duration::from_secs(4),
            "the paused rollout to stay at stage 1",
            |s| s["state"] == "paused" && s["stage_index"] == 1,
        )
        .await;
    assert_eq!(str_of(&paused, "last_reason"), "e2e: hold");
    stack.wait_nginx_weight(50).await;

    stack.cli_ok(&["rollout", "resume", &id]).await;
    let again = stack.status_json(&id).await;
    assert!(
        matches!(str_of(&again, "state"), "progressing" | "promoted"),
        "{again:#}"
    );
    stack
        .cli_ok(&["rollout", "promote", &id, "--reason", "e2e: ship it"])
        .await;
    let done = stack.status_json(&id).await;
    assert_eq!(str_of(&done, "state"), "promoted", "{done:#}");
    assert_eq!(u64_of(&done, "canary_weight"), 100);
    // Who did what: passing the gate is the operator's stage advance; resuming from a pause
    // restarts the stage's clock, so the controller cannot advance before the promote.
    let history: Vec<(String, String)> = done["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (str_of(e, "kind").to_owned(), str_of(e, "actor").to_owned()))
        .collect();
    let expected = [
        ("started", "operator:e2e"),
        ("awaiting_promotion", "controller"),
        ("stage_advanced", "operator:e2e"),
        ("paused", "operator:e2e"),
        ("resumed", "operator:e2e"),
        ("promoted", "operator:e2e"),
    ]
    .map(|(k, a)| (k.to_owned(), a.to_owned()));
    assert_eq!(history, expected, "{done:#}");

    stack.wait_nginx_weight(100).await;
    let after = stack.burst(200).await;
    assert_eq!(after.of(CANARY), 200, "traffic after promote: {after:?}");
}
