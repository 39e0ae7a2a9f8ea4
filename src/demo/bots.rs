//! The demo's bot rollout: `bot` v5.0.0 → v5.1.0 with the shards model. serin starts the bots
//! itself (two stable, one canary, command templates), grants the canary bot a quarter, half,
//! then all of the gateway's shards, and after the promotion replaces the stable bots and hands
//! every shard back to them. What the demo shows and checks is read from the demo gateway's
//! books (`GET /books`): who holds each shard, whether a bot ever asked for a shard another bot
//! still held, and how long each handover left its shard unserved.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use serin_proto::v1::Rollout;
use serin_proto::v1::control_service_client::ControlServiceClient;
use tonic::transport::Channel;

use super::fleet::{BOT_SERVICE, Fleet};
use super::scenario::{start, watch};
use super::{BOT_SHARDS, DemoArgs, bot_strategy, say};

/// The stable version the bots start on, and the canary.
pub const BOT_STABLE: &str = "v5.0.0";
/// See [`BOT_STABLE`].
pub const BOT_CANARY: &str = "v5.1.0";

/// A stage index and the shards the canary bot held at it.
type StageShards = (u32, BTreeSet<u32>);

/// The bot rollout's outcome.
pub struct BotRollout {
    /// The rollout as it ended.
    pub rollout: Rollout,
    /// The shards the canary bot held, sampled at each stage (the stage's last sample).
    pub stages: Vec<StageShards>,
    /// Shards held, at the end, by a stable bot on the new version.
    pub stable_on_new: usize,
    /// Identifies the gateway refused because another bot held the shard.
    pub conflicts: u64,
    /// Every handover's gap (release by the old owner → start by the new one), sorted, ms.
    pub gaps: Vec<u64>,
}

/// The shards whose owner at the gateway is a bot `which` accepts (by name and version).
fn held_by(books: &Value, which: impl Fn(&str, &str) -> bool) -> BTreeSet<u32> {
    books["shards"]
        .as_array()
        .map(|shards| {
            shards
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    let owner = &s["owner"];
                    owner["bot"]
                        .as_str()
                        .zip(owner["version"].as_str())
                        .is_some_and(|(bot, version)| which(bot, version))
                })
                .map(|(i, _)| i as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn is_canary_bot(bot: &str) -> bool {
    bot.starts_with("bot-3-")
}

async fn books(http: &reqwest::Client, gateway: &str) -> anyhow::Result<Value> {
    let text = http
        .get(format!("{gateway}/books"))
        .send()
        .await?
        .text()
        .await?;
    Ok(serde_json::from_str(&text)?)
}

fn shard_list(shards: &BTreeSet<u32>) -> String {
    shards
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rolls `bot` from [`BOT_STABLE`] to [`BOT_CANARY`]; samples the canary bot's shards at
/// every poll and waits (up to 30 s) until every shard is back on a stable bot.
pub async fn bot_rollout(
    args: &DemoArgs,
    client: &mut ControlServiceClient<Channel>,
    fleet: &Fleet,
) -> anyhow::Result<BotRollout> {
    let gateway = fleet.gateway_url()?;
    let strategy = bot_strategy(
        fleet.serin(),
        fleet.bots_dir(),
        &gateway,
        args.stage_seconds.min(4),
    );
    let started = start(client, BOT_SERVICE, BOT_CANARY, BOT_STABLE, &strategy).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let stages: Arc<Mutex<Vec<StageShards>>> = Arc::default();
    let rollout = watch(client, &started.id, |r: Rollout| {
        let (stages, http, gateway) = (stages.clone(), http.clone(), gateway.clone());
        async move {
            if r.state != "progressing" {
                return;
            }
            let Ok(books) = books(&http, &gateway).await else {
                return;
            };
            let canary = held_by(&books, |bot, _| is_canary_bot(bot));
            let Ok(mut s) = stages.lock() else {
                return;
            };
            let changed = match s.iter_mut().find(|(k, _)| *k == r.stage_index) {
                Some((_, held)) if *held == canary => false,
                Some((_, held)) => {
                    *held = canary.clone();
                    true
                }
                None => {
                    s.push((r.stage_index, canary.clone()));
                    true
                }
            };
            if changed {
                say(&format!(
                    "  ▸ stage {} ({}%): the canary bot serves {} of {BOT_SHARDS} shards{}",
                    r.stage_index + 1,
                    r.canary_weight,
                    canary.len(),
                    if canary.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", shard_list(&canary))
                    }
                ));
            }
        }
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let b = books(&http, &gateway).await?;
        let on_new = held_by(&b, |bot, version| {
            !is_canary_bot(bot) && version == BOT_CANARY
        });
        if on_new.len() == BOT_SHARDS as usize || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stable_on_new = held_by(&last, |bot, version| {
        !is_canary_bot(bot) && version == BOT_CANARY
    })
    .len();
    let mut gaps: Vec<u64> = last["handovers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["gap_ms"].as_u64())
        .collect();
    gaps.sort_unstable();
    let stages = stages.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(BotRollout {
        rollout,
        stages,
        stable_on_new,
        conflicts: last["conflicts"].as_u64().unwrap_or(u64::MAX),
        gaps,
    })
}
