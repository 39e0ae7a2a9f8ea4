//! The agent's canary lease, end to end (docs/agent.md, "Canary lease"): a rollout at a 50%
//! canary stage, the coordinator SIGKILLed, an agent with a 3 s lease. With `revert` nginx
//! goes stable-only; with `hold` it keeps the canary share. Either way the agent logs it, and
//! once the coordinator is restarted on the same data directory the rollout's committed
//! events hold the agent's lease event; a reverted agent takes the canary share back (the
//! same generation is applied again).

mod common;

use std::time::{Duration, Instant};

use common::{CANARY, STABLE, Stack, StackOptions, StageSpec, strategy};
use serde_json::Value;

/// Long enough that the rollout stays at its canary stage for the whole test.
const CANARY_STAGE: StageSpec = StageSpec {
    weight: 50,
    min_duration: "10m",
    manual_gate: false,
};

async fn stack_with_lease(on_expiry: &str) -> Stack {
    Stack::start_with(StackOptions {
        agent_extra: Some(format!(
            "[canary_lease]\nafter = \"3s\"\non_expiry = \"{on_expiry}\"\n"
        )),
        ..StackOptions::default()
    })
    .await
}

/// Starts the rollout and waits until nginx serves its 50% canary.
async fn at_the_canary_stage(stack: &Stack) -> String {
    let id = stack.start_rollout(&strategy(&[CANARY_STAGE], "")).await;
    stack.wait_nginx_weight(50).await;
    let status = stack.status_json(&id).await;
    assert_eq!(status["state"], "progressing", "{status:#}");
    id
}

fn agent_log(stack: &Stack) -> String {
    std::fs::read_to_string(&stack.agent.log).unwrap_or_default()
}

/// Waits (bounded) until the agent logged its lease expiry; returns that line.
async fn lease_expired_line(stack: &Stack) -> String {
    let mut line = String::new();
    stack
        .wait_until(
            Duration::from_secs(30),
            "the agent to log its canary lease expiry",
            async || match agent_log(stack)
                .lines()
                .find(|l| l.contains("canary lease expired"))
            {
                Some(l) => {
                    line = l.to_owned();
                    true
                }
                None => false,
            },
        )
        .await;
    line
}

/// Restarts the coordinator and waits (bounded) until the rollout's committed events hold
/// the agent's lease event; returns its reason.
async fn lease_event_after_restart(stack: &mut Stack, id: &str) -> String {
    stack.restart_coordinator();
    let status = stack
        .wait_status(
            id,
            Duration::from_secs(60),
            "the restarted coordinator to record the agent's lease event",
            |s| lease_events(s).next().is_some(),
        )
        .await;
    let reasons: Vec<String> = lease_events(&status)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(reasons.len(), 1, "one lease event: {status:#}");
    let event = lease_events(&status).next().expect("an event");
    assert_eq!(event["actor"], "agent:e2e-host", "{event:#}");
    reasons[0].clone()
}

fn lease_events(status: &Value) -> impl Iterator<Item = &Value> {
    status["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "canary_lease_expired")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_for_the_lease_an_agent_reverts_nginx_to_stable_and_says_so_once_back() {
    let mut stack = stack_with_lease("revert").await;
    let id = at_the_canary_stage(&stack).await;
    let before = stack.burst(200).await;
    assert!(before.of(CANARY) > 0 && before.of(STABLE) > 0, "{before:?}");

    let killed_at = Instant::now();
    stack.kill_coordinator().await;
    // nginx goes stable-only once the lease (3 s) expired.
    stack.wait_nginx_weight(0).await;
    assert!(
        killed_at.elapsed() >= Duration::from_secs(3),
        "reverted before the lease expired: {:?}",
        killed_at.elapsed()
    );
    let line = lease_expired_line(&stack).await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("reverted this host to stable"), "{line}");
    assert!(line.contains("web 50%"), "{line}");
    let reverted = stack.burst(100).await;
    assert_eq!(reverted.of(STABLE), 100, "{reverted:?}");
    assert_eq!(
        agent_log(&stack).matches("canary lease expired").count(),
        1,
        "logged once"
    );

    let reason = lease_event_after_restart(&mut stack, &id).await;
    assert!(
        reason.starts_with("agent e2e-host lost the leader for 3s at generation "),
        "{reason}"
    );
    assert!(
        reason.contains("and reverted to stable (web at 50%)"),
        "{reason}"
    );
    // Reconnected, the agent applies the coordinator's state again: the canary has its share
    // back, although its generation is the one applied before the revert.
    stack.wait_nginx_weight(50).await;
    let after = stack.burst(200).await;
    assert!(after.of(CANARY) > 0 && after.of(STABLE) > 0, "{after:?}");
    let status = stack.status_json(&id).await;
    assert_eq!(status["state"], "progressing", "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hold_an_agent_without_a_leader_keeps_the_canary_share_and_says_so_once_back() {
    let mut stack = stack_with_lease("hold").await;
    let id = at_the_canary_stage(&stack).await;

    stack.kill_coordinator().await;
    let line = lease_expired_line(&stack).await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("holding the last desired state"), "{line}");
    // The canary keeps its share while the coordinator is away.
    assert!(
        stack.site_text().contains("canary 50% ("),
        "{}",
        stack.site_text()
    );
    let held = stack.burst(200).await;
    assert!(held.of(CANARY) > 0 && held.of(STABLE) > 0, "{held:?}");

    let reason = lease_event_after_restart(&mut stack, &id).await;
    assert!(
        reason.contains("lost the leader for 3s")
            && reason.contains("and held the canary (web at 50%)"),
        "{reason}"
    );
    stack.wait_nginx_weight(50).await;
}
