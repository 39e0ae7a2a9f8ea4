//! Rollout hooks end to end, through real processes: `serin coordinator run`, `serin agent run`,
//! two `serin demo-app`s whose `POST /smoke` endpoints are the hooks, a real nginx, and the
//! `serin rollout …` CLI, with load flowing through nginx the whole time (`common/mod.rs`).

mod common;

use std::time::Duration;

use common::{CANARY, Stack, stage, strategy};
use serde_json::Value;

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v:#}"))
}

/// The events of kind `hook` of a status, as `(name, passed, status)`.
fn hook_runs(status: &Value) -> Vec<(String, bool, Option<u64>)> {
    status["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events in {status:#}"))
        .iter()
        .filter(|e| e["kind"] == "hook")
        .map(|e| {
            let h = &e["hook"];
            (
                str_of(h, "name").to_owned(),
                h["passed"] == true,
                h["status"].as_u64(),
            )
        })
        .collect()
}

/// `GET /admin` of a demo app.
async fn admin(addr: std::net::SocketAddr) -> Value {
    let body = common::fresh_client(Duration::from_secs(5))
        .get(format!("http://{addr}/admin"))
        .send()
        .await
        .expect("GET /admin")
        .text()
        .await
        .expect("GET /admin body");
    serde_json::from_str(&body).expect("GET /admin is JSON")
}

/// Requests the canary app served (its own `/metrics`, not counting smoke calls).
async fn canary_requests(stack: &Stack) -> f64 {
    let page = common::fresh_client(Duration::from_secs(5))
        .get(format!("http://{}/metrics", stack.canary_addr))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    page.lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A pre_rollout hook (the stable app's smoke test, passing) lets the canary in; the canary's
/// own smoke test, failing, holds the first stage at 5% with its answer as the reason; told
/// to pass and resumed, the rollout advances and is promoted, and the post_promote hook runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_advance_smoke_hook_holds_the_stage_until_it_passes_and_is_resumed() {
    let stack = Stack::start().await;
    let canary_admin = format!("http://{}/admin", stack.canary_addr);
    assert_eq!(
        common::post_json(&canary_admin, r#"{"smoke_fail": "orders table missing"}"#).await,
        200
    );
    let hooks = format!(
        r#"
[[hooks]]
name = "ticket"
on = "pre_rollout"
url = "http://{stable}/smoke"

[[hooks]]
name = "smoke"
on = "pre_advance"
url = "http://{canary}/smoke"
timeout = "2s"
retries = 1

[[hooks]]
name = "announce"
on = "post_promote"
url = "http://{stable}/smoke"
"#,
        stable = stack.stable_addr,
        canary = stack.canary_addr,
    );
    let id = stack
        .start_rollout(&strategy(&[stage(5), stage(50)], &hooks))
        .await;

    let held = stack
        .wait_status(&id, Duration::from_secs(60), "the stage to be held", |s| {
            s["state"] == "paused" || s["terminal"] == true
        })
        .await;
    assert_eq!(
        str_of(&held, "state"),
        "paused",
        "the failing smoke hook did not hold the stage:\n{}",
        stack.diagnostics()
    );
    assert_eq!(held["stage_index"], 0, "{held:#}");
    assert_eq!(held["canary_weight"], 5, "{held:#}");
    let reason = str_of(&held, "last_reason");
    assert!(
        reason.contains("pre_advance hook 'smoke' failed: HTTP 500")
            && reason.contains("smoke failed: orders table missing")
            && reason.contains("serin rollout resume"),
        "{reason}"
    );
    let last = held["events"].as_array().unwrap().last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["actor"].as_str()),
        (Some("paused"), Some("hook:smoke")),
        "{held:#}"
    );
    assert_eq!(
        hook_runs(&held),
        [
            ("ticket".to_owned(), true, Some(200)),
            ("smoke".to_owned(), false, Some(500)),
        ]
    );
    let smoke_event = held["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["hook"]["name"] == "smoke")
        .unwrap();
    assert_eq!(smoke_event["hook"]["attempts"], 2, "1 call + 1 retry");
    assert_eq!(admin(stack.canary_addr).await["smoke_calls"], 2);

    // Held means held: the weight stays and nginx keeps serving 5%.
    stack.wait_nginx_weight(5).await;
    stack
        .assert_holds(&id, Duration::from_secs(3), "the stage held at 5%", |s| {
            s["state"] == "paused" && s["canary_weight"] == 5 && s["stage_index"] == 0
        })
        .await;
    let text = stack.cli_ok(&["rollout", "status", &id]).await;
    assert!(
        text.contains("\nhooks\n") && text.contains("FAILED") && text.contains("orders table"),
        "{text}"
    );

    // Fixed and resumed: the stage is observed again, its hook passes, the rollout advances.
    assert_eq!(
        common::post_json(&canary_admin, r#"{"smoke_fail": null}"#).await,
        200
    );
    stack.cli_ok(&["rollout", "resume", &id]).await;
    let done = stack
        .wait_status(
            &id,
            Duration::from_secs(90),
            "the promotion and its post hook",
            |s| s["terminal"] == true && hook_runs(s).iter().any(|(n, _, _)| n == "announce"),
        )
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "the resumed rollout was not promoted:\n{}",
        stack.diagnostics()
    );
    let runs = hook_runs(&done);
    assert_eq!(
        runs.iter()
            .map(|(n, p, _)| (n.as_str(), *p))
            .collect::<Vec<_>>(),
        [
            ("ticket", true),
            ("smoke", false),
            ("smoke", true),
            ("smoke", true),
            ("announce", true),
        ],
        "{done:#}"
    );
    // The canary's smoke test was told which stage passed.
    let sent: Value = serde_json::from_str(
        admin(stack.canary_addr).await["last_smoke_body"]
            .as_str()
            .expect("the canary's smoke endpoint was called"),
    )
    .expect("the hook payload is JSON");
    assert_eq!(
        (
            sent["rollout"].as_str(),
            sent["on"].as_str(),
            sent["stage_index"].as_u64(),
            sent["next_weight"].as_u64(),
            sent["version"].as_str(),
        ),
        (
            Some(id.as_str()),
            Some("pre_advance"),
            Some(1),
            Some(100),
            Some(CANARY)
        ),
        "{sent:#}"
    );
}

/// A failing pre_rollout hook aborts the rollout before the canary got a single request, while
/// load flows through nginx the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_rollout_hook_aborts_before_the_canary_gets_traffic() {
    let stack = Stack::start().await;
    let canary_admin = format!("http://{}/admin", stack.canary_addr);
    assert_eq!(
        common::post_json(&canary_admin, r#"{"smoke_fail": "migrations not applied"}"#).await,
        200
    );
    let hooks = format!(
        r#"
[[hooks]]
name = "smoke"
on = "pre_rollout"
url = "http://{canary}/smoke"
retries = 0

[[hooks]]
name = "page"
on = "post_rollback"
url = "http://{stable}/smoke"
"#,
        stable = stack.stable_addr,
        canary = stack.canary_addr,
    );
    let id = stack
        .start_rollout(&strategy(&[stage(5), stage(100)], &hooks))
        .await;
    let done = stack
        .wait_status(
            &id,
            Duration::from_secs(60),
            "the abort and its post hook",
            |s| s["terminal"] == true && hook_runs(s).iter().any(|(n, _, _)| n == "page"),
        )
        .await;
    assert_eq!(str_of(&done, "state"), "aborted", "{}", stack.diagnostics());
    let reason = str_of(&done, "last_reason");
    assert!(
        reason.contains("pre_rollout hook 'smoke' failed: HTTP 500")
            && reason.contains("migrations not applied")
            && reason.contains("never got traffic"),
        "{reason}"
    );
    let events = done["events"].as_array().unwrap();
    assert!(
        events.iter().all(|e| e["canary_weight"] == 0),
        "the canary was given weight: {done:#}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "aborted" && e["actor"] == "hook:smoke"),
        "{done:#}"
    );
    assert_eq!(
        hook_runs(&done),
        [
            ("smoke".to_owned(), false, Some(500)),
            ("page".to_owned(), true, Some(200)),
        ]
    );
    // The load ran all along; the canary served none of it.
    assert!(stack.load.snapshot().answered() > 0, "no load ran");
    assert_eq!(
        canary_requests(&stack).await,
        0.0,
        "the canary got traffic before its pre_rollout hook passed"
    );
    let after = stack.burst(100).await;
    assert_eq!(after.of(CANARY), 0, "{after:?}");
}

/// A coordinator killed while its pre_advance hook is in flight lost that call's result; the
/// restarted one (the next leader) finds the stage still passing and calls the hook again (at
/// least once), and the rollout advances. The lost call is in no history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_in_flight_when_the_leader_dies_is_called_again_by_the_next() {
    let mut stack = Stack::start().await;
    let canary_admin = format!("http://{}/admin", stack.canary_addr);
    // Slow enough to kill the coordinator while the call is open.
    assert_eq!(
        common::post_json(&canary_admin, r#"{"smoke_latency_ms": 60000}"#).await,
        200
    );
    let hooks = format!(
        r#"
[[hooks]]
name = "smoke"
on = "pre_advance"
url = "http://{canary}/smoke"
timeout = "1m"
retries = 0
"#,
        canary = stack.canary_addr,
    );
    let id = stack
        .start_rollout(&strategy(&[stage(5), stage(50)], &hooks))
        .await;
    stack
        .wait_until(
            Duration::from_secs(60),
            "the smoke hook to be called",
            async || admin(stack.canary_addr).await["smoke_calls"].as_u64() >= Some(1),
        )
        .await;
    let before = stack.status_json(&id).await;
    assert_eq!(
        (before["state"].as_str(), before["stage_index"].as_u64()),
        (Some("progressing"), Some(0)),
        "{before:#}"
    );
    assert!(hook_runs(&before).is_empty(), "{before:#}");

    stack.kill_coordinator().await;
    assert_eq!(
        common::post_json(&canary_admin, r#"{"smoke_latency_ms": 0}"#).await,
        200
    );
    stack.restart_coordinator();
    let advanced = stack
        .wait_status(
            &id,
            Duration::from_secs(60),
            "the restarted coordinator to call the hook again and advance",
            |s| s["stage_index"].as_u64() >= Some(1) || s["terminal"] == true,
        )
        .await;
    assert_eq!(advanced["stage_index"], 1, "{}", stack.diagnostics());
    assert!(
        admin(stack.canary_addr).await["smoke_calls"].as_u64() >= Some(2),
        "the hook was not called again"
    );
    assert_eq!(
        hook_runs(&advanced),
        [("smoke".to_owned(), true, Some(200))],
        "only the committed run is in the history: {advanced:#}"
    );
}
