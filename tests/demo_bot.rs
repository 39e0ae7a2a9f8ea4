//! `serin demo-bot` and `serin demo-gateway`, as real processes on loopback: two bots share a
//! gateway of 8 shards with 2 session-start buckets, and 2 shards move from bot A to bot B the
//! way a shard rollout moves them (A's new set first, then B's). The gateway's books must show
//! that no shard was ever held by two bots, that no bucket started two sessions within its
//! interval, that every bot waited out each 429 before trying the shard again, and how long
//! each handover left its shard unserved.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::books::{assert_buckets_paced, assert_waits_honoured, replay_holders};
use common::{Proc, SERIN, free_port, tail, wait_for};
use serde_json::{Value, json};

const BUCKET_INTERVAL_MS: u64 = 1_000;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap()
}

async fn get_json(url: &str) -> Option<Value> {
    let resp = client().get(url).send().await.ok()?;
    serde_json::from_str(&resp.text().await.ok()?).ok()
}

async fn put_shards(base: &str, shards: &[u32]) -> (u16, Value) {
    let resp = client()
        .put(format!("{base}/__serin/shards"))
        .header("content-type", "application/json")
        .body(json!({ "shards": shards }).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {base}/__serin/shards: {e}"));
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
    )
}

/// Starts a bot whose initial shards come from `SHARD_IDS`, as a deployment would set them.
fn spawn_bot(dir: &Path, name: &str, version: &str, port: u16, gateway: &str, ids: &str) -> Proc {
    let argv: Vec<String> = [
        "env",
        &format!("SHARD_IDS={ids}"),
        SERIN,
        "demo-bot",
        "--port",
        &port.to_string(),
        "--version",
        version,
        "--gateway",
        gateway,
        "--shard-count",
        "8",
        "--name",
        name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let shown = format!("SHARD_IDS={ids} serin demo-bot --name {name}");
    Proc::spawn_argv(name, dir, &argv, &shown, None)
}

#[tokio::test]
async fn two_shards_move_from_bot_a_to_bot_b_without_overlap_and_paced_by_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let gw_port = free_port();
    let gateway = format!("http://127.0.0.1:{gw_port}");
    let _gw = Proc::spawn(
        "gateway",
        dir.path(),
        &[
            "demo-gateway",
            "--port",
            &gw_port.to_string(),
            "--shards",
            "8",
            "--max-concurrency",
            "2",
            "--bucket-interval",
            &format!("{BUCKET_INTERVAL_MS}ms"),
        ]
        .map(String::from),
    );
    let (a_port, b_port) = (free_port(), free_port());
    let mut a = spawn_bot(dir.path(), "bot-a", "v1", a_port, &gateway, "0,1,2,3");
    let _b = spawn_bot(dir.path(), "bot-b", "v2", b_port, &gateway, "4,5,6,7");
    let (a_base, b_base) = (
        format!("http://127.0.0.1:{a_port}"),
        format!("http://127.0.0.1:{b_port}"),
    );
    let logs = || {
        ["gateway", "bot-a", "bot-b"]
            .map(|n| {
                format!(
                    "--- {n} ---\n{}",
                    tail(&dir.path().join(format!("{n}.log")), 30)
                )
            })
            .join("\n")
    };

    // 8 starts over 2 buckets: about 4 intervals.
    for (base, held) in [
        (&a_base, json!([0, 1, 2, 3])),
        (&b_base, json!([4, 5, 6, 7])),
    ] {
        wait_for(
            Duration::from_secs(30),
            &format!("{base} to hold {held}"),
            async || {
                get_json(&format!("{base}/__serin/shards"))
                    .await
                    .is_some_and(|s| s["held"] == held)
            },
            logs,
        )
        .await;
        let health = client()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
    }

    // The handover: A lets 2 and 3 go, then B takes them.
    let (status, body) = put_shards(&a_base, &[0, 1]).await;
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert_eq!(body, json!({"held": [0, 1], "wanted": [0, 1]}));
    let (status, body) = put_shards(&b_base, &[2, 3, 4, 5, 6, 7]).await;
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert_eq!(body["held"], json!([2, 3, 4, 5, 6, 7]));

    // Events now flow for shard 2 at B.
    wait_for(
        Duration::from_secs(10),
        "bot-b to count events of shard 2",
        async || {
            let Ok(resp) = client().get(format!("{b_base}/metrics")).send().await else {
                return false;
            };
            let page = resp.text().await.unwrap_or_default();
            page.lines().any(|l| {
                l.strip_prefix("bot_events_total{shard=\"2\"} ")
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
            })
        },
        logs,
    )
    .await;

    let books = get_json(&format!("{gateway}/books")).await.unwrap();
    let log = books["log"].as_array().unwrap();
    let owners = replay_holders(log);
    let expected: BTreeMap<u64, String> = (0..8)
        .map(|s| (s, if s < 2 { "bot-a" } else { "bot-b" }.to_owned()))
        .collect();
    assert_eq!(owners, expected, "{books}");
    for (shard, owner) in &expected {
        assert_eq!(
            books["shards"][*shard as usize]["owner"]["bot"],
            owner.as_str()
        );
    }
    let starts = assert_buckets_paced(log, 2, BUCKET_INTERVAL_MS);
    assert_eq!(starts, 10, "8 first starts and 2 handovers: {books}");
    assert_eq!(books["identify_ok"], 10);
    assert_eq!(books["conflicts"], 0, "A released before B asked: {books}");
    let refused = assert_waits_honoured(log);
    assert_eq!(books["rate_limited"], refused as u64);
    assert!(
        refused > 0,
        "the two bots' first starts must have collided: {books}"
    );

    // Each handover: A's release, then B's identify, measured.
    let handovers = books["handovers"].as_array().unwrap();
    // The two shards move concurrently: their handovers may complete in either order.
    let mut moved: Vec<(u64, &str, &str)> = handovers
        .iter()
        .map(|h| {
            (
                h["shard"].as_u64().unwrap(),
                h["from"].as_str().unwrap(),
                h["to"].as_str().unwrap(),
            )
        })
        .collect();
    moved.sort();
    assert_eq!(moved, [(2, "bot-a", "bot-b"), (3, "bot-a", "bot-b")]);
    for h in handovers {
        let gap = h["gap_ms"].as_u64().unwrap();
        assert_eq!(
            gap,
            h["identified_at_ms"].as_u64().unwrap() - h["released_at_ms"].as_u64().unwrap()
        );
        // At most about one interval: the shard's bucket may have started a session just
        // before (the first starts end right before the handover), and B must wait that out.
        assert!(gap < 2 * BUCKET_INTERVAL_MS, "{h}");
        eprintln!("handover of shard {}: {gap} ms unserved", h["shard"]);
    }

    // SIGTERM: A releases its shards at the gateway before exiting.
    // `env` execs serin, so the child's pid is the bot's.
    let pid = rustix::process::Pid::from_raw(a.pid().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    wait_for(
        Duration::from_secs(10),
        "bot-a to exit after SIGTERM",
        async || a.exited().is_some(),
        logs,
    )
    .await;
    assert!(a.exited().unwrap().success(), "{}", logs());
    let books = get_json(&format!("{gateway}/books")).await.unwrap();
    let released: Vec<u64> = books["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["bot"] == "bot-a" && e["kind"] == "release")
        .map(|e| e["shard"].as_u64().unwrap())
        .collect();
    assert_eq!(released, [2, 3, 0, 1], "released, not expired: {books}");
    assert_eq!(books["shards"][0]["owner"], Value::Null);
}
