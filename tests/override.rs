//! End-to-end header and cookie overrides through real processes (`serin coordinator run`,
//! `serin agent run`, two `serin demo-app`s, a real nginx; see `common/mod.rs`): a strategy's
//! `override_header` / `override_cookie` send testers' requests to the canary at a 1% stage,
//! those requests are counted in the canary's live metrics, and once the rollout ends the
//! header no longer reaches the canary.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{CANARY, STABLE, Stack, StageSpec, fresh_client, strategy};
use serde_json::Value;

/// The overrides every strategy here names.
const OVERRIDES: &str = "
[traffic]
override_header = \"X-Serin-Variant\"
override_cookie = \"serin_variant\"
";

/// A 1% stage that lasts far longer than any test, then 100%: the rollout stays at 1% until
/// the test ends it.
fn held_at_one_percent() -> String {
    let stages = [
        StageSpec {
            weight: 1,
            min_duration: "10m",
            manual_gate: false,
        },
        common::stage(100),
    ];
    strategy(&stages, OVERRIDES)
}

/// What `n` requests through nginx with `header` (name, value) got: (HTTP status,
/// `x-serin-version`) → count. One after another, each on a new connection.
async fn send_marked(url: &str, n: usize, header: (&str, &str)) -> BTreeMap<(u16, String), u64> {
    let client = fresh_client(Duration::from_secs(5));
    let mut answers = BTreeMap::new();
    for _ in 0..n {
        let answer = match client.get(url).header(header.0, header.1).send().await {
            Ok(response) => {
                let version = response
                    .headers()
                    .get("x-serin-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                (status, version)
            }
            Err(e) => (0, format!("transport error: {e}")),
        };
        *answers.entry(answer).or_default() += 1;
    }
    answers
}

/// The canary's (or stable's) request count in the rollout's live analysis (0 while the
/// leader has none yet).
fn live_requests(status: &Value, variant: &str) -> u64 {
    status["live"][variant]["requests"].as_u64().unwrap_or(0)
}

/// Waits until the rollout's live `variant` request count is at least `at_least`.
async fn wait_live_requests(stack: &Stack, id: &str, variant: &str, at_least: u64) -> u64 {
    let status = stack
        .wait_status(
            id,
            Duration::from_secs(30),
            &format!("the live {variant} request count to reach {at_least}"),
            |s| live_requests(s, variant) >= at_least,
        )
        .await;
    live_requests(&status, variant)
}

/// At 1%, requests carrying `X-Serin-Variant: canary` or the cookie `serin_variant=canary`
/// all reach the canary and each is counted in the canary's live metrics; `stable` reaches
/// the stable version. After an abort the header reaches only stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_cookie_overrides_reach_the_canary_at_1_percent_and_count_in_its_metrics() {
    let stack = Stack::start().await;
    // Only the test's own requests from now on, so the counts below are theirs.
    stack.load.pause(true);
    let id = stack.start_rollout(&held_at_one_percent()).await;
    stack.wait_nginx_weight(1).await;
    assert!(
        stack
            .site_text()
            .contains("# overrides: header X-Serin-Variant, cookie serin_variant\n"),
        "the site has no overrides:\n{}",
        stack.site_text()
    );
    let human = stack.cli_ok(&["rollout", "status", &id]).await;
    assert!(
        human.contains(
            "override  header X-Serin-Variant: canary|stable, cookie serin_variant=canary|stable\n"
        ),
        "{human}"
    );

    const N: u64 = 60;
    let before = live_requests(&stack.status_json(&id).await, "canary");
    let answers = send_marked(&stack.url, N as usize, ("X-Serin-Variant", "canary")).await;
    assert_eq!(
        answers,
        BTreeMap::from([((200, CANARY.to_owned()), N)]),
        "header override at 1%:\n{}",
        stack.diagnostics()
    );
    let after_header = wait_live_requests(&stack, &id, "canary", before + N).await;
    eprintln!("canary live requests: {before} before, {after_header} after {N} with the header");
    // Nothing else reaches the canary (the load is paused; before it paused the canary had
    // 0%), so each override request is counted exactly once: never twice, as a balancer's
    // agent scraping the same instance would.
    assert_eq!(after_header, before + N, "{}", stack.diagnostics());

    let answers = send_marked(
        &stack.url,
        N as usize,
        ("Cookie", "uid=tester; serin_variant=canary"),
    )
    .await;
    assert_eq!(
        answers,
        BTreeMap::from([((200, CANARY.to_owned()), N)]),
        "cookie override at 1%"
    );
    let after_cookie = wait_live_requests(&stack, &id, "canary", after_header + N).await;
    eprintln!("canary live requests: {after_cookie} after {N} more with the cookie");
    assert_eq!(after_cookie, after_header + N, "{}", stack.diagnostics());

    let stable_before = live_requests(&stack.status_json(&id).await, "stable");
    let answers = send_marked(&stack.url, N as usize, ("X-Serin-Variant", "Stable")).await;
    assert_eq!(answers, BTreeMap::from([((200, STABLE.to_owned()), N)]));
    wait_live_requests(&stack, &id, "stable", stable_before + N).await;

    stack
        .cli_ok(&[
            "rollout",
            "abort",
            &id,
            "--reason",
            "e2e: overrides checked",
        ])
        .await;
    stack.wait_nginx_weight(0).await;
    assert!(
        !stack.site_text().contains("# overrides"),
        "overrides still rendered after the abort:\n{}",
        stack.site_text()
    );
    let answers = send_marked(&stack.url, 40, ("X-Serin-Variant", "canary")).await;
    assert_eq!(
        answers,
        BTreeMap::from([((200, STABLE.to_owned()), 40)]),
        "the header reached the canary after the abort"
    );
    let human = stack.cli_ok(&["rollout", "status", &id]).await;
    assert!(human.contains("(off: the rollout finished)"), "{human}");
}

/// A canary that fails only the testers' requests is rolled back by its trigger: override
/// traffic counts in the canary's metrics like any other. After the rollback neither the
/// header nor the normal split sends it anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_the_testers_requests_is_rolled_back_and_the_header_stops_reaching_it() {
    let stack = Stack::start().await;
    let id = stack.start_rollout(&held_at_one_percent()).await;
    stack.wait_nginx_weight(1).await;
    let admin = format!("http://{}/admin", stack.canary_addr);
    assert_eq!(
        common::post_json(&admin, r#"{"error_rate": 1.0}"#).await,
        200,
        "the canary refused the error-rate change"
    );

    // At 1% of 100 req/s the background load alone sends the canary ~3 requests per 3 s
    // window, under the trigger's 10; the testers' requests make the difference.
    let mut sent = 0;
    stack
        .wait_until(
            Duration::from_secs(60),
            "the trigger to roll the failing canary back",
            async || {
                let answers = send_marked(&stack.url, 20, ("X-Serin-Variant", "canary")).await;
                if sent == 0 {
                    assert_eq!(
                        answers,
                        BTreeMap::from([((500, CANARY.to_owned()), 20)]),
                        "the first override requests to the failing canary"
                    );
                }
                sent += 20;
                stack
                    .try_status(&id)
                    .await
                    .is_ok_and(|s| s["terminal"] == true)
            },
        )
        .await;
    let done = stack.status_json(&id).await;
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    let reason = done["last_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("canary-error-spike"), "{reason}");
    eprintln!("rolled back after {sent} override requests: {reason}");

    stack.wait_nginx_weight(0).await;
    let answers = send_marked(&stack.url, 100, ("X-Serin-Variant", "canary")).await;
    assert_eq!(
        answers,
        BTreeMap::from([((200, STABLE.to_owned()), 100)]),
        "the header reached the rolled-back canary"
    );
    stack.load.reset();
    let after = stack.wait_load(200).await;
    assert_eq!(after.of(CANARY), 0, "traffic after the rollback: {after:?}");
}
