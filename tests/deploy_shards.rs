//! The `shards` model as a fleet (docs/deploy.md): four hosts, each in its own network
//! namespace with its own agent and one managed bot (`serin demo-bot`, started by serin through
//! command templates): two stable bots, two canary bots. One `serin demo-gateway` plays
//! Discord's gateway for all of them (16 shards, 4 session start buckets, one start per bucket
//! per 500 ms) and keeps the books this test reads.
//!
//! One good version goes 1 → 25 → 50 → 100% and is promoted, then a bad one (half its events
//! fail) is rolled back by its trigger. Throughout: no shard is ever held by two bots (the
//! gateway's log, replayed), no bucket starts two sessions within its interval and, past the
//! first starts of the stable bots, serin's pacing never made a bot hit the limit (no 429);
//! while a rollout is live the canary bots' shards only grow; at the end every shard is held
//! once, by a stable bot on the promoted version, and no canary bot runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::books::{assert_buckets_paced, assert_waits_honoured, replay_holders};
use common::netns::{Fleet, spawn_coordinator};
use common::{Proc, cli_at, describe, fresh_client, tail, wait_for};
use serde_json::Value;

/// The bot's port on every host.
const BOT_PORT: u16 = 9300;
/// Hosts: 1 and 2 run the stable bots, 3 and 4 the canary bots.
const HOSTS: usize = 4;
const SHARDS: u32 = 16;
const BUCKETS: u64 = 4;
const START_INTERVAL_MS: u64 = 500;

struct Bots {
    fleet: Fleet,
    _coordinator: Proc,
    _gateway: Proc,
    coordinator: SocketAddr,
    gateway: String,
}

fn is_canary_host(k: usize) -> bool {
    k > 2
}

impl Bots {
    async fn start() -> Bots {
        let mut fleet = Fleet::new(HOSTS).unwrap_or_else(|e| panic!("{e:#}"));
        let (coordinator_proc, coordinator) = spawn_coordinator(&fleet, 3);
        let gateway_addr = SocketAddr::from((fleet.gateway(), common::free_port()));
        let gateway_proc = Proc::spawn(
            "gateway",
            fleet.dir(),
            &[
                "demo-gateway".to_owned(),
                "--host".into(),
                gateway_addr.ip().to_string(),
                "--port".into(),
                gateway_addr.port().to_string(),
                "--shards".into(),
                SHARDS.to_string(),
                "--max-concurrency".into(),
                BUCKETS.to_string(),
                "--bucket-interval".into(),
                format!("{START_INTERVAL_MS}ms"),
            ],
        );
        for k in 1..=HOSTS {
            let host = fleet.host_mut(k);
            let addr = host.addr();
            let config = format!(
                r#"name = "{name}"
coordinators = ["http://{coordinator}"]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "bot-{name}"
service = "bot"
variant = "{variant}"
address = "{addr}:{BOT_PORT}"
metrics_url = "http://{addr}:{BOT_PORT}/metrics"
managed = true
metrics = {{ requests = "bot_events_total", errors = "bot_events_failed_total", latency = "bot_event_duration_seconds" }}
"#,
                name = host.name(),
                variant = if is_canary_host(k) {
                    "canary"
                } else {
                    "stable"
                },
                data = host.dir().join("agent-data").display(),
            );
            let file = host.dir().join("agent.toml");
            std::fs::write(&file, config).expect("writing agent.toml");
            host.serin(
                "agent",
                &[
                    "agent".into(),
                    "run".into(),
                    "--config".into(),
                    file.display().to_string(),
                ],
            );
        }
        let bots = Bots {
            fleet,
            _coordinator: coordinator_proc,
            _gateway: gateway_proc,
            coordinator,
            gateway: format!("http://{gateway_addr}"),
        };
        bots.wait(
            Duration::from_secs(30),
            "every agent to connect",
            async || {
                let out = cli_at(bots.coordinator, &["agent", "list", "--json"]).await;
                serde_json::from_slice::<Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .is_some_and(|a| a.iter().filter(|a| a["connected"] == true).count() == HOSTS)
            },
        )
        .await;
        bots
    }

    /// Whether `bot` (its gateway name, `{instance}-{version}`) is one of the canary bots.
    fn is_canary_bot(&self, bot: &str) -> bool {
        (1..=HOSTS)
            .filter(|&k| is_canary_host(k))
            .any(|k| bot.starts_with(&format!("bot-{}-", self.fleet.host(k).name())))
    }

    fn diagnostics(&self) -> String {
        let dir = self.fleet.dir();
        let bot_logs: String = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("bot-"))
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| {
                format!(
                    "--- {}\n{}",
                    e.file_name().to_string_lossy(),
                    tail(&e.path(), 10)
                )
            })
            .collect();
        format!(
            "{}--- coordinator\n{}--- gateway\n{}{bot_logs}",
            self.fleet.diagnostics(),
            tail(&dir.join("coordinator.log"), 40),
            tail(&dir.join("gateway.log"), 20),
        )
    }

    async fn wait(&self, timeout: Duration, what: &str, cond: impl AsyncFnMut() -> bool) {
        wait_for(timeout, what, cond, || self.diagnostics()).await;
    }

    /// The strategy: 1 → 25 → 50 → 100% of 16 shards, each bot started in the background by
    /// `start` and stopped by `stop`, its failure rate read from `fail-{version}`.
    fn strategy(&self) -> String {
        let dir = self.fleet.dir().display();
        let serin = common::SERIN;
        let gateway = &self.gateway;
        format!(
            r#"
[[stages]]
weight = 1
min_duration = "3s"

[[stages]]
weight = 25
min_duration = "3s"

[[stages]]
weight = 50
min_duration = "3s"

[[stages]]
weight = 100
min_duration = "2s"

[[triggers]]
name = "event-failures"
metric = "error_rate"
max = 0.1
min_requests = 20
window = "3s"

[deploy]
model = "shards"
health_path = "/healthz"
health_timeout = "15s"

[deploy.shards]
count = {SHARDS}
max_concurrency = {BUCKETS}
start_interval = "{START_INTERVAL_MS}ms"

[deploy.command]
start = "setsid {serin} demo-bot --host {{host}} --port {{port}} --version {{version}} --gateway {gateway} --shard-count {SHARDS} --name {{instance}}-{{version}} --fail-rate $(cat {dir}/fail-{{version}} 2>/dev/null || echo 0) > {dir}/{{instance}}-{{version}}.log 2>&1 < /dev/null & echo $! > {dir}/{{instance}}.pid"
stop = "pid=$(cat {dir}/{{instance}}.pid) && kill $pid && while kill -0 $pid 2>/dev/null; do sleep 0.05; done; rm -f {dir}/{{instance}}.pid"
timeout = "10s"
"#
        )
    }

    async fn start_rollout(&self, version: &str, stable: &str) -> String {
        let file = self.fleet.dir().join(format!("strategy-{version}.toml"));
        std::fs::write(&file, self.strategy()).expect("writing the strategy");
        let out = cli_at(
            self.coordinator,
            &[
                "rollout",
                "start",
                "bot",
                "--version",
                version,
                "--stable-version",
                stable,
                "--strategy",
                &file.display().to_string(),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(&out),
            self.diagnostics()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    async fn status(&self, id: &str) -> Option<Value> {
        let out = cli_at(self.coordinator, &["rollout", "status", id, "--json"]).await;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    async fn books(&self) -> Value {
        let client = fresh_client(Duration::from_secs(2));
        let resp = client
            .get(format!("{}/books", self.gateway))
            .send()
            .await
            .expect("GET /books");
        serde_json::from_str(&resp.text().await.expect("books body")).expect("books json")
    }

    /// Follows rollout `id` to its end, sampling the gateway's owners: while the rollout is
    /// live, the shards held by canary bots must only grow. Returns the last status and the
    /// largest canary set seen.
    async fn follow(&self, id: &str) -> (Value, BTreeSet<u32>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut canary_seen = BTreeSet::new();
        loop {
            // Books first: a rollout live after them was live when they were read.
            let books = self.books().await;
            let status = self.status(id).await;
            let live = status.as_ref().is_some_and(|s| s["terminal"] == false);
            let canary = held_by(&books, |bot| self.is_canary_bot(bot));
            if live {
                assert!(
                    canary.is_superset(&canary_seen),
                    "a canary shard left the canary while live: {canary_seen:?} then {canary:?}\n{}",
                    self.diagnostics()
                );
                canary_seen = canary;
            }
            if let Some(s) = status.filter(|s| s["terminal"] == true) {
                return (s, canary_seen);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rollout {id} did not finish in 120 s\n{}",
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until every shard is held by a stable bot running `version` and no canary bot
    /// answers.
    async fn wait_all_stable(&self, version: &str) {
        let client = fresh_client(Duration::from_millis(500));
        self.wait(
            Duration::from_secs(60),
            &format!("all {SHARDS} shards on the stable bots at {version}, no canary bot"),
            async || {
                let books = self.books().await;
                let stable = held_by(&books, |bot| {
                    !self.is_canary_bot(bot) && bot.ends_with(&format!("-{version}"))
                });
                let mut canary_up = false;
                for k in (1..=HOSTS).filter(|&k| is_canary_host(k)) {
                    let url = format!("http://{}:{BOT_PORT}/healthz", self.fleet.host(k).addr());
                    canary_up |= client.get(&url).send().await.is_ok();
                }
                stable.len() == SHARDS as usize && !canary_up
            },
        )
        .await;
    }
}

/// The shards whose current owner at the gateway is a bot `which` accepts.
fn held_by(books: &Value, which: impl Fn(&str) -> bool) -> BTreeSet<u32> {
    books["shards"]
        .as_array()
        .map(|shards| {
            shards
                .iter()
                .enumerate()
                .filter(|(_, s)| s["owner"]["bot"].as_str().is_some_and(&which))
                .map(|(i, _)| i as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_shards_move_to_the_canary_stage_by_stage_without_overlap_then_a_bad_bot_is_rolled_back()
 {
    let bots = Bots::start().await;

    // A good version: promoted, the stable bots replaced, every shard back on them.
    let id = bots.start_rollout("v2", "v1").await;
    let (status, canary_seen) = bots.follow(&id).await;
    assert_eq!(
        status["state"],
        "promoted",
        "{status:#}\n{}",
        bots.diagnostics()
    );
    assert!(
        canary_seen.len() >= SHARDS as usize / 2,
        "past 50% the canary bots held at least half the shards: {canary_seen:?}"
    );
    bots.wait_all_stable("v2").await;
    let promoted = bots.books().await;
    let on_canary: BTreeSet<u64> = promoted["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "identify" && bots.is_canary_bot(e["bot"].as_str().unwrap()))
        .map(|e| e["shard"].as_u64().unwrap())
        .collect();
    assert_eq!(
        on_canary.len(),
        SHARDS as usize,
        "at 100% every shard ran on a canary bot: {on_canary:?}"
    );
    // The first starts of the stable bots are the bots' own business (serin grants them all
    // at once); every start serin paced came after.
    let warm = bots.books().await;
    let warm_until = warm["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "identify")
        .take(SHARDS as usize - 1)
        .map(|e| e["at_ms"].as_u64().unwrap())
        .max()
        .unwrap();

    // A bad version: half its events fail; its trigger rolls it back.
    std::fs::write(bots.fleet.dir().join("fail-v3"), "0.5").unwrap();
    let id = bots.start_rollout("v3", "v2").await;
    let (status, _) = bots.follow(&id).await;
    assert_eq!(
        status["state"],
        "rolled_back",
        "{status:#}\n{}",
        bots.diagnostics()
    );
    let reason = status["last_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("event-failures"), "{reason}");
    bots.wait_all_stable("v2").await;

    // The books of both rollouts.
    let books = bots.books().await;
    let log = books["log"].as_array().unwrap();
    let owners = replay_holders(log);
    assert_eq!(owners.len(), SHARDS as usize, "{books}");
    assert!(
        owners
            .values()
            .all(|b| b.ends_with("-v2") && !bots.is_canary_bot(b)),
        "{owners:?}"
    );
    assert_eq!(
        books["conflicts"], 0,
        "a bot asked for a shard still held: {books}"
    );
    assert_buckets_paced(log, BUCKETS, START_INTERVAL_MS);
    assert_waits_honoured(log);
    let late_429: Vec<&Value> = log
        .iter()
        .filter(|e| e["kind"] == "rate_limited" && e["at_ms"].as_u64().unwrap() > warm_until)
        .collect();
    assert!(
        late_429.is_empty(),
        "serin's pacing let a bot hit the start limit: {late_429:?}"
    );

    // Handover gaps: release by the old owner → identify by the new one.
    let mut gaps: Vec<u64> = books["handovers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["gap_ms"].as_u64().unwrap())
        .collect();
    gaps.sort_unstable();
    // v2: 16 to the canary, 16 back after the promotion; v3: at least 1 there and back.
    assert!(gaps.len() >= 34, "{} handovers: {books}", gaps.len());
    let by_kind: BTreeMap<&str, usize> = log.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["kind"].as_str().unwrap()).or_default() += 1;
        m
    });
    eprintln!(
        "shard handovers: {} — gap median {} ms, p90 {} ms, max {} ms; gateway log {by_kind:?}",
        gaps.len(),
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.9),
        gaps.last().unwrap()
    );
}
