//! The agent's shard task (`serin_agent::runtime::shards::sync_shards`) driving a real
//! `serin demo-bot` through `serin demo-gateway`, both processes on loopback: nothing is pushed
//! before the instance is healthy, a granted shard starts after its delay, and a shard no longer
//! granted is released at once while the others stay held.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, SERIN, free_port, tail, wait_for};
use serde_json::{Value, json};
use serin_agent::runtime::shards::{Phase, ShardTarget, sync_shards};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SHARD_COUNT: u32 = 4;
const DELAY: Duration = Duration::from_millis(1500);

async fn get_json(url: &str) -> Option<Value> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let resp = client.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    serde_json::from_str(&resp.text().await.ok()?).ok()
}

/// A held set and when it was published.
type Sighting = (Instant, Vec<u32>);

/// The held sets the task published, in order, each change once.
#[derive(Clone, Default)]
struct Published(Arc<Mutex<Vec<Sighting>>>);

impl Published {
    fn record(&self, held: &[u32]) {
        let mut seen = self.0.lock().unwrap();
        if seen.last().is_none_or(|(_, last)| last != held) {
            seen.push((Instant::now(), held.to_vec()));
        }
    }

    fn last(&self) -> Option<Vec<u32>> {
        self.0.lock().unwrap().last().map(|(_, h)| h.clone())
    }

    /// When `held` was first published.
    fn first(&self, held: &[u32]) -> Option<Instant> {
        let seen = self.0.lock().unwrap();
        seen.iter().find(|(_, h)| h == held).map(|(at, _)| *at)
    }

    fn sets(&self) -> Vec<Vec<u32>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.clone())
            .collect()
    }
}

fn target(grants: &[(u32, Duration)], phase: Phase) -> ShardTarget {
    ShardTarget {
        shard_count: SHARD_COUNT,
        version: "v1".into(),
        grants: grants.iter().copied().collect::<BTreeMap<_, _>>(),
        phase,
    }
}

#[tokio::test]
async fn granted_shards_start_after_their_delay_and_a_removed_one_is_released_at_once() {
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
            &SHARD_COUNT.to_string(),
            "--max-concurrency",
            &SHARD_COUNT.to_string(),
            "--bucket-interval",
            "200ms",
        ]
        .map(String::from),
    );
    // As the agent starts a sharded instance: SHARD_IDS empty, the shards come live.
    let bot_port = free_port();
    let argv: Vec<String> = [
        "env",
        "SHARD_IDS=",
        SERIN,
        "demo-bot",
        "--port",
        &bot_port.to_string(),
        "--version",
        "v1",
        "--gateway",
        &gateway,
        "--shard-count",
        &SHARD_COUNT.to_string(),
        "--name",
        "bot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _bot = Proc::spawn_argv("bot", dir.path(), &argv, "SHARD_IDS= serin demo-bot", None);
    let address = format!("127.0.0.1:{bot_port}");
    let base = format!("http://{address}");
    let logs = || {
        ["gateway", "bot"]
            .map(|n| {
                format!(
                    "--- {n} ---\n{}",
                    tail(&dir.path().join(format!("{n}.log")), 30)
                )
            })
            .join("\n")
    };
    wait_for(
        Duration::from_secs(10),
        "the bot to be healthy",
        async || get_json(&format!("{base}/__serin/shards")).await.is_some(),
        logs,
    )
    .await;

    let published = Published::default();
    let (tx, rx) = watch::channel(ShardTarget::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (published, shutdown, address) = (published.clone(), shutdown.clone(), address.clone());
        async move {
            sync_shards(&address, rx, |held| published.record(held), shutdown).await;
        }
    });

    // Granted while the instance is still starting: read, never pushed.
    tx.send_replace(target(&[(0, Duration::ZERO)], Phase::Starting));
    wait_for(
        Duration::from_secs(5),
        "the empty held set of the starting instance to be published",
        async || published.last() == Some(vec![]),
        logs,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let shards = get_json(&format!("{base}/__serin/shards")).await.unwrap();
    assert_eq!(shards, json!({"held": [], "wanted": []}), "{}", logs());

    // Healthy, and shard 1 granted with a delay: 0 at once, 1 after the delay.
    let granted = Instant::now();
    tx.send_replace(target(&[(0, Duration::ZERO), (1, DELAY)], Phase::Healthy));
    wait_for(
        Duration::from_secs(5),
        "shard 0 and then 0 and 1 to be held",
        async || published.last() == Some(vec![0, 1]),
        || format!("published {:?}\n{}", published.sets(), logs()),
    )
    .await;
    let only_zero = published
        .first(&[0])
        .unwrap_or_else(|| panic!("{{0}} never held alone: {:?}", published.sets()));
    let both = published.first(&[0, 1]).unwrap();
    assert!(
        only_zero < granted + DELAY,
        "shard 0 took {:?}",
        only_zero - granted
    );
    assert!(
        both >= granted + DELAY,
        "shard 1 held {:?} after its grant, before its delay of {DELAY:?}",
        both - granted
    );

    // Shard 0 no longer granted: released at once, 1 stays held.
    let removed = Instant::now();
    tx.send_replace(target(&[(1, DELAY)], Phase::Healthy));
    wait_for(
        Duration::from_secs(5),
        "shard 0 to be released",
        async || published.last() == Some(vec![1]),
        || format!("published {:?}\n{}", published.sets(), logs()),
    )
    .await;
    let released = published.first(&[1]).unwrap() - removed;
    assert!(
        released < Duration::from_secs(1),
        "release took {released:?}"
    );
    assert_eq!(
        published.sets(),
        [vec![], vec![0], vec![0, 1], vec![1]],
        "every held set in order"
    );

    // The gateway's books: each shard started once, shard 0 released by the bot.
    let books = get_json(&format!("{gateway}/books")).await.unwrap();
    let events: Vec<(u64, &str)> = books["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["shard"].as_u64().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [(0, "identify"), (1, "identify"), (0, "release")],
        "{books}"
    );

    // Nothing runs any more: the held set is empty at once.
    tx.send_replace(target(&[], Phase::Stopped));
    wait_for(
        Duration::from_secs(2),
        "an empty held set once nothing runs",
        async || published.last() == Some(vec![]),
        logs,
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
}
