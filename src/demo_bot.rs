//! `serin demo-bot`: a sharded bot to roll out in demos and tests, the `shards` traffic model's
//! counterpart of `serin demo-app`.
//!
//! A Discord bot's gateway shards are spread over processes; during a rollout serin moves a
//! share of them from the stable bot to the canary. This bot serves exactly the shards it is
//! *given*, starting each through `serin demo-gateway` (which plays Discord's session-start
//! limiter) and simulating the guild events of the shards it holds, so the canary can be judged
//! on its counters like any other service.
//!
//! - The shard set comes from `SHARD_IDS` (comma list, e.g. `0,1,5`) at start, and changes
//!   live with `PUT /__serin/shards {"shards": [...]}`: the bot first releases the removed
//!   shards at the gateway, only then identifies the added ones, and answers `200` with
//!   `{"held", "wanted"}` once it holds exactly the new set (`504` after [`APPLY_TIMEOUT`],
//!   with what it holds). A `429` is retried after the wait the gateway named, never sooner; a
//!   `409` (another bot still holds the shard) every [`CONFLICT_RETRY`].
//!   `GET /__serin/shards` answers `{"held", "wanted"}`.
//! - The bot heartbeats the gateway every [`HEARTBEAT_EVERY`]; a shard the gateway no longer
//!   has it holding (its session expired) is identified again.
//! - For each held shard it handles ~[`EVENTS_PER_SECOND`] simulated guild events, each failing
//!   with probability `--fail-rate` (`POST /admin {"fail_rate": F}` changes it live), and each
//!   carrying a guild id of that shard ([`shard_of_guild`]).
//! - `GET /metrics`: `bot_events_total{shard="S"}`, `bot_events_failed_total{shard="S"}`, the
//!   `bot_event_duration_seconds` histogram (a simulated handling time) and the
//!   `bot_shards_held` gauge. `GET /healthz`: `200` once the gateway answered at least once.
//! - On shutdown it stops the events, releases every shard at the gateway, and exits.
//!
//! One task owns the held set (the reconciler): it alone talks to the gateway, so a release and
//! an identify of the same bot never race. What it does next is decided by [`plan`], a pure
//! function of the held and wanted sets, the retry times and the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::Rng;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::demo_app::{
    LATENCY_BUCKETS, bind_listener, check_share, check_version, jittered, metrics_page, serve_until,
};

/// Simulated guild events per second and held shard.
pub const EVENTS_PER_SECOND: u64 = 20;

/// How often the bot heartbeats the gateway.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How soon an identify refused with `409` (or a failed gateway call) is tried again.
pub const CONFLICT_RETRY: Duration = Duration::from_millis(500);

/// Longest `PUT /__serin/shards` waits for the bot to hold the new set.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Most shards a bot accepts (`--shard-count`).
pub const MAX_SHARD_COUNT: u32 = 4096;

/// Time limit of each gateway call.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Mean simulated handling time of an event, in milliseconds.
const EVENT_LATENCY_MS: u64 = 2;

/// Arguments of `serin demo-bot`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoBotArgs {
    /// Address to listen on (metrics, health, admin and the shard set).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long)]
    pub port: u16,
    /// Version string sent to the gateway with every identify.
    #[arg(long)]
    pub version: String,
    /// Base URL of the demo gateway, e.g. http://127.0.0.1:7400.
    #[arg(long)]
    pub gateway: String,
    /// Share of events that fail, between 0 and 1.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Total shards of the bot: a guild's shard is (guild_id >> 22) % shard-count.
    #[arg(long, default_value_t = 16)]
    pub shard_count: u32,
    /// The shards to serve at start, a comma list such as 0,1,5.
    #[arg(long, env = "SHARD_IDS", default_value = "")]
    pub shard_ids: String,
    /// This instance's name at the gateway (default: `<version>@<listen address>`).
    #[arg(long)]
    pub name: Option<String>,
}

/// The shard of a guild, as Discord computes it: `(guild_id >> 22) % shard_count`. The top
/// 42 bits of a Discord id are its creation time, so guilds spread evenly over the shards.
pub fn shard_of_guild(guild_id: u64, shard_count: NonZeroU32) -> u32 {
    // The remainder is below `shard_count`, a u32.
    ((guild_id >> 22) % u64::from(shard_count.get())) as u32
}

/// A random guild id whose shard is `shard` (below `shard_count`).
pub fn guild_on_shard(shard: u32, shard_count: NonZeroU32, rng: &mut impl Rng) -> u64 {
    let count = u64::from(shard_count.get());
    // Keep the timestamp part within 42 bits, so the shift cannot overflow.
    let rounds = rng.random_range(0..(1u64 << 42) / count);
    let timestamp = rounds * count + u64::from(shard);
    (timestamp << 22) | rng.random_range(0..(1u64 << 22))
}

/// Parses a shard list (`"0, 1,5"`; empty means none); errors name `what` (the variable or
/// field) and the bad entry.
pub fn parse_shard_ids(text: &str, shard_count: u32, what: &str) -> Result<BTreeSet<u32>, String> {
    let mut shards = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let shard: u32 = part.parse().map_err(|_| {
            format!("{what}: {part:?} is not a shard id (expected a comma list such as 0,1,5)")
        })?;
        shards.insert(check_shard(shard, shard_count, what)?);
    }
    Ok(shards)
}

fn check_shard(shard: u32, shard_count: u32, what: &str) -> Result<u32, String> {
    if shard >= shard_count {
        return Err(format!(
            "{what}: shard {shard} is out of range (--shard-count is {shard_count}: shards 0 to {})",
            shard_count - 1
        ));
    }
    Ok(shard)
}

/// What the reconciler does next.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Held but no longer wanted, due now: release these at the gateway.
    pub release: Vec<u32>,
    /// Wanted, not held, due now, and nothing left to release: identify these.
    pub identify: Vec<u32>,
    /// When a shard not due yet becomes due.
    pub wake_at: Option<Instant>,
}

/// The next step towards holding `wanted`: releases come first, and no shard is identified
/// while a removed one is still held (a handover stops the old owner's shard before the new
/// owner starts it, and a bot behaves the same towards itself). A shard in `not_before` is not
/// touched before its time: a `429`'s wait, or a retry delay.
pub fn plan(
    held: &BTreeSet<u32>,
    wanted: &BTreeSet<u32>,
    not_before: &BTreeMap<u32, Instant>,
    now: Instant,
) -> Plan {
    let due = |s: &u32| not_before.get(s).is_none_or(|t| *t <= now);
    let to_release: Vec<u32> = held.difference(wanted).copied().collect();
    let to_identify: Vec<u32> = wanted.difference(held).copied().collect();
    let release: Vec<u32> = to_release.iter().copied().filter(due).collect();
    let identify = if to_release.is_empty() {
        to_identify.iter().copied().filter(due).collect()
    } else {
        Vec::new()
    };
    let waiting = if to_release.is_empty() {
        &to_identify
    } else {
        &to_release
    };
    let wake_at = waiting
        .iter()
        .filter(|s| !due(s))
        .filter_map(|s| not_before.get(s).copied())
        .min();
    Plan {
        release,
        identify,
        wake_at,
    }
}

/// Binds and serves until `shutdown` completes.
pub async fn run(
    args: DemoBotArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (addr, bot) = bind(args).await?;
    tracing::info!(%addr, name = %bot.shared.name, "demo bot listening");
    bot.serve(shutdown).await
}

/// Validates `args` and binds the listening socket, without contacting the gateway yet.
/// Start with [`DemoBot::serve`].
pub async fn bind(args: DemoBotArgs) -> anyhow::Result<(SocketAddr, DemoBot)> {
    check_version(&args.version)?;
    check_share("--fail-rate", args.fail_rate)?;
    let shard_count = NonZeroU32::new(args.shard_count)
        .filter(|n| n.get() <= MAX_SHARD_COUNT)
        .with_context(|| {
            format!(
                "--shard-count must be between 1 and {MAX_SHARD_COUNT}, got {}",
                args.shard_count
            )
        })?;
    let initial = parse_shard_ids(&args.shard_ids, shard_count.get(), "SHARD_IDS")
        .map_err(anyhow::Error::msg)?;
    let gateway = check_gateway_url(&args.gateway)?;
    if let Some(name) = &args.name
        && (name.is_empty() || name.len() > 100 || name.chars().any(char::is_control))
    {
        bail!("--name must be 1 to 100 bytes without control characters, got {name:?}");
    }
    let (addr, listener) = bind_listener(&args.host, args.port, "the demo bot").await?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}@{addr}", args.version));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(GATEWAY_TIMEOUT)
        .build()
        .context("building the gateway's HTTP client")?;
    let shared = Arc::new(Shared::new(
        &args,
        name,
        shard_count,
        gateway,
        client,
        initial,
    ));
    Ok((addr, DemoBot { listener, shared }))
}

fn check_gateway_url(url: &str) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(url).with_context(|| {
        format!("--gateway must be a URL such as http://127.0.0.1:7400, got {url:?}")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        bail!("--gateway must be an http:// or https:// URL with a host, got {url:?}");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A bound demo bot, neither serving nor holding shards yet.
pub struct DemoBot {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl DemoBot {
    /// Takes the initial shards, handles events and serves until `shutdown` completes; then
    /// stops the events and releases every shard at the gateway.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.shared.stop.clone();
        let reconciler = tokio::spawn(reconcile(self.shared.clone()));
        let events = tokio::spawn(generate_events(self.shared.clone()));
        let served = serve_until(
            self.listener,
            router(self.shared),
            stop.clone(),
            shutdown,
            "the demo bot",
        )
        .await;
        // Also when serving failed: neither task may outlive the bot.
        stop.cancel();
        events
            .await
            .context("the demo bot's event generator panicked")?;
        reconciler
            .await
            .context("the demo bot's reconciler panicked")?;
        served
    }
}

/// State shared by the reconciler, the event generator and the handlers.
struct Shared {
    name: String,
    version: String,
    shard_count: NonZeroU32,
    gateway: String,
    client: reqwest::Client,
    /// The set to hold; written by `PUT /__serin/shards`, read by the reconciler.
    wanted: watch::Sender<BTreeSet<u32>>,
    /// The set held at the gateway; written by the reconciler only.
    held: watch::Sender<BTreeSet<u32>>,
    /// One `PUT /__serin/shards` at a time.
    apply_lock: tokio::sync::Mutex<()>,
    /// Set once the gateway answered anything.
    reached_gateway: AtomicBool,
    /// `f64` bits.
    fail_rate: AtomicU64,
    registry: Registry,
    events: Family<[(&'static str, String); 1], Counter>,
    failed: Family<[(&'static str, String); 1], Counter>,
    duration: Histogram,
    shards_held: Gauge,
    /// Cancelled on shutdown.
    stop: CancellationToken,
}

impl Shared {
    fn new(
        args: &DemoBotArgs,
        name: String,
        shard_count: NonZeroU32,
        gateway: String,
        client: reqwest::Client,
        initial: BTreeSet<u32>,
    ) -> Self {
        let events = Family::<[(&'static str, String); 1], Counter>::default();
        let failed = Family::<[(&'static str, String); 1], Counter>::default();
        let duration = Histogram::new(LATENCY_BUCKETS);
        let shards_held = Gauge::default();
        let mut registry = Registry::default();
        // The encoder appends `_total` to counters.
        registry.register(
            "bot_events",
            "Guild events handled, failed ones included, by shard",
            events.clone(),
        );
        registry.register(
            "bot_events_failed",
            "Guild events that failed, by shard",
            failed.clone(),
        );
        registry.register(
            "bot_event_duration_seconds",
            "Time to handle a guild event, in seconds (simulated)",
            duration.clone(),
        );
        registry.register(
            "bot_shards_held",
            "Shards this bot holds at the gateway",
            shards_held.clone(),
        );
        Self {
            name,
            version: args.version.clone(),
            shard_count,
            gateway,
            client,
            wanted: watch::Sender::new(initial),
            held: watch::Sender::new(BTreeSet::new()),
            apply_lock: tokio::sync::Mutex::new(()),
            reached_gateway: AtomicBool::new(false),
            fail_rate: AtomicU64::new(args.fail_rate.to_bits()),
            registry,
            events,
            failed,
            duration,
            shards_held,
            stop: CancellationToken::new(),
        }
    }

    fn fail_rate(&self) -> f64 {
        f64::from_bits(self.fail_rate.load(Ordering::Relaxed))
    }

    fn set_held(&self, held: &BTreeSet<u32>) {
        self.shards_held
            .set(i64::try_from(held.len()).unwrap_or(i64::MAX));
        self.held.send_if_modified(|current| {
            let changed = current != held;
            if changed {
                current.clone_from(held);
            }
            changed
        });
    }

    fn shards_json(&self) -> serde_json::Value {
        serde_json::json!({
            "held": *self.held.borrow(),
            "wanted": *self.wanted.borrow(),
        })
    }

    /// `POST <gateway><path>` with a JSON body: the status and the JSON answer.
    async fn call(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(StatusCode, serde_json::Value), String> {
        let url = format!("{}{path}", self.gateway);
        let resp = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        self.reached_gateway.store(true, Ordering::Relaxed);
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("POST {url}: reading the answer: {e}"))?;
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }
}

/// What the gateway said to an identify.
#[derive(Debug)]
enum IdentifyAnswer {
    Started,
    RateLimited(Duration),
    Refused(String),
}

async fn identify(shared: &Shared, shard: u32) -> IdentifyAnswer {
    let body = serde_json::json!({"shard": shard, "bot": shared.name, "version": shared.version});
    match shared.call("/identify", body).await {
        Ok((StatusCode::OK, _)) => IdentifyAnswer::Started,
        Ok((StatusCode::TOO_MANY_REQUESTS, answer)) => {
            // Without a readable wait, wait a whole default interval rather than guess low.
            let ms = answer["retry_after_ms"].as_u64().unwrap_or(5_000);
            IdentifyAnswer::RateLimited(Duration::from_millis(ms))
        }
        Ok((status, answer)) => IdentifyAnswer::Refused(format!(
            "{status}: {}",
            answer["error"].as_str().unwrap_or("")
        )),
        Err(e) => IdentifyAnswer::Refused(e),
    }
}

/// Releases `shard`: `Ok` once the gateway no longer has this bot holding it.
async fn release(shared: &Shared, shard: u32) -> Result<(), String> {
    let body = serde_json::json!({"shard": shard, "bot": shared.name});
    match shared.call("/release", body).await {
        Ok((StatusCode::OK, _)) => Ok(()),
        // Another bot holds it: it is not ours any more either.
        Ok((StatusCode::CONFLICT, _)) => Ok(()),
        Ok((status, answer)) => Err(format!("{status}: {answer}")),
        Err(e) => Err(e),
    }
}

/// The shards the gateway has this bot holding, or `None` if it could not say.
async fn heartbeat(shared: &Shared, held: &BTreeSet<u32>) -> Option<BTreeSet<u32>> {
    let body = serde_json::json!({"bot": shared.name, "shards": held});
    match shared.call("/heartbeat", body).await {
        Ok((StatusCode::OK, answer)) => answer["held"].as_array().map(|shards| {
            shards
                .iter()
                .filter_map(|s| s.as_u64().and_then(|s| u32::try_from(s).ok()))
                .collect()
        }),
        Ok((status, answer)) => {
            tracing::warn!(%status, %answer, "gateway refused the heartbeat");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat failed");
            None
        }
    }
}

/// The reconciler: brings the held set to the wanted one, heartbeats, and on shutdown releases
/// everything.
async fn reconcile(shared: Arc<Shared>) {
    let mut wanted_rx = shared.wanted.subscribe();
    let mut held = BTreeSet::new();
    let mut not_before: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shared.stop.is_cancelled() {
        let wanted = wanted_rx.borrow_and_update().clone();
        not_before.retain(|s, _| wanted.contains(s) != held.contains(s));
        let next = plan(&held, &wanted, &not_before, Instant::now());
        if !next.release.is_empty() || !next.identify.is_empty() {
            for shard in next.release {
                match release(&shared, shard).await {
                    Ok(()) => {
                        held.remove(&shard);
                        not_before.remove(&shard);
                        tracing::info!(shard, "released");
                    }
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "release failed; retrying");
                        not_before.insert(shard, Instant::now() + CONFLICT_RETRY);
                    }
                }
            }
            for shard in next.identify {
                match identify(&shared, shard).await {
                    IdentifyAnswer::Started => {
                        held.insert(shard);
                        not_before.remove(&shard);
                        tracing::info!(shard, "identified");
                    }
                    IdentifyAnswer::RateLimited(wait) => {
                        tracing::debug!(shard, ?wait, "rate limited");
                        not_before.insert(shard, Instant::now() + wait);
                    }
                    IdentifyAnswer::Refused(why) => {
                        tracing::info!(shard, %why, "identify refused; retrying");
                        not_before.insert(shard, Instant::now() + CONFLICT_RETRY);
                    }
                }
            }
            shared.set_held(&held);
            continue;
        }
        let wake = async {
            match next.wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shared.stop.cancelled() => break,
            _ = wanted_rx.changed() => {}
            () = wake => {}
            _ = beat.tick() => {
                if let Some(at_gateway) = heartbeat(&shared, &held).await {
                    let lost: Vec<u32> = held.difference(&at_gateway).copied().collect();
                    if !lost.is_empty() {
                        tracing::warn!(?lost, "the gateway dropped shards; identifying them again");
                        for shard in lost {
                            held.remove(&shard);
                        }
                        shared.set_held(&held);
                    }
                }
            }
        }
    }
    for shard in held.clone() {
        match release(&shared, shard).await {
            Ok(()) => {
                held.remove(&shard);
            }
            Err(e) => tracing::warn!(shard, error = %e, "could not release on shutdown"),
        }
    }
    shared.set_held(&held);
    tracing::info!(kept = ?held, "released the shards");
}

/// Handles ~[`EVENTS_PER_SECOND`] simulated events per held shard until shutdown.
async fn generate_events(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / EVENTS_PER_SECOND));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.stop.cancelled() => break,
        }
        let held = shared.held.borrow().clone();
        let mut rng = rand::rng();
        for shard in held {
            let guild = guild_on_shard(shard, shared.shard_count, &mut rng);
            // Count the event where Discord would have sent it.
            let label = [(
                "shard",
                shard_of_guild(guild, shared.shard_count).to_string(),
            )];
            let failed = rng.random::<f64>() < shared.fail_rate();
            shared
                .duration
                .observe(jittered(EVENT_LATENCY_MS, &mut rng).as_secs_f64());
            shared.events.get_or_create(&label).inc();
            // Created on the first event, so the failure series starts at 0.
            let failures = shared.failed.get_or_create(&label);
            if failed {
                failures.inc();
            }
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/__serin/shards", get(shards_get).put(shards_put))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/admin", get(admin_get).post(admin_post))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    metrics_page(&shared.registry)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.reached_gateway.load(Ordering::Relaxed) {
        format!("ok {}\n", shared.version).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the gateway {} has not answered yet\n", shared.gateway),
        )
            .into_response()
    }
}

async fn shards_get(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.shards_json()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardsBody {
    shards: Vec<u32>,
}

fn bad_request(msg: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({ "error": msg })),
    )
        .into_response()
}

async fn shards_put(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body: ShardsBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                r#"invalid body (expected {{"shards": [0, 1]}}): {e}"#
            ));
        }
    };
    let mut wanted = BTreeSet::new();
    for shard in body.shards {
        match check_shard(shard, shared.shard_count.get(), "shards") {
            Ok(s) => wanted.insert(s),
            Err(msg) => return bad_request(msg),
        };
    }
    let _one_at_a_time = shared.apply_lock.lock().await;
    shared.wanted.send_replace(wanted.clone());
    tracing::info!(?wanted, "new shard set");
    let mut held = shared.held.subscribe();
    tokio::select! {
        reached = tokio::time::timeout(APPLY_TIMEOUT, held.wait_for(|h| *h == wanted)) => {
            match reached {
                Ok(Ok(_)) => axum::Json(shared.shards_json()).into_response(),
                Ok(Err(_)) | Err(_) => (
                    StatusCode::GATEWAY_TIMEOUT,
                    axum::Json(serde_json::json!({
                        "error": format!("not holding the wanted shards after {APPLY_TIMEOUT:?}; still trying"),
                        "held": *shared.held.borrow(),
                        "wanted": wanted,
                    })),
                )
                    .into_response(),
            }
        }
        () = shared.stop.cancelled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "the bot is shutting down"})),
        )
            .into_response(),
    }
}

fn settings_json(shared: &Shared) -> serde_json::Value {
    serde_json::json!({
        "name": shared.name,
        "version": shared.version,
        "gateway": shared.gateway,
        "shard_count": shared.shard_count.get(),
        "fail_rate": shared.fail_rate(),
    })
}

async fn admin_get(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(settings_json(&shared)).into_response()
}

async fn admin_post(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_fail_rate(&body) {
        Ok(rate) => {
            shared.fail_rate.store(rate.to_bits(), Ordering::Relaxed);
            tracing::info!(fail_rate = rate, "demo bot settings changed");
            axum::Json(settings_json(&shared)).into_response()
        }
        Err(msg) => (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response(),
    }
}

/// Parses `{"fail_rate": F}`; the error names the field.
fn parse_fail_rate(body: &[u8]) -> Result<f64, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let fields = value
        .as_object()
        .ok_or(r#"body must be a JSON object such as {"fail_rate": 0.5}"#)?;
    if let Some(other) = fields.keys().find(|k| *k != "fail_rate") {
        return Err(format!("unknown field '{other}' (expected fail_rate)"));
    }
    let v = fields.get("fail_rate").ok_or("expected fail_rate")?;
    v.as_f64()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("fail_rate must be a number between 0 and 1, got {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_app::test_support::{Running, client, get, post_admin};
    use crate::demo_gateway::{self, DemoGatewayArgs};

    fn count(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn set(shards: &[u32]) -> BTreeSet<u32> {
        shards.iter().copied().collect()
    }

    #[test]
    fn a_guilds_shard_comes_from_the_timestamp_bits_of_its_id() {
        // The snowflake of Discord's documentation: its timestamp part is 9959216934.
        let guild = 41_771_983_423_143_937u64;
        assert_eq!(guild >> 22, 9_959_216_934);
        assert_eq!(shard_of_guild(guild, count(1)), 0);
        assert_eq!(
            shard_of_guild(guild, count(16)),
            6,
            "9959216934 = 16 * 622451058 + 6"
        );
        assert_eq!(shard_of_guild(guild, count(1000)), 934);
        // The low 22 bits (worker, process, increment) do not matter.
        assert_eq!(shard_of_guild((5 << 22) | 0x3f_ffff, count(4)), 1);
        assert_eq!(
            shard_of_guild(u64::MAX, count(7)),
            ((u64::MAX >> 22) % 7) as u32
        );
    }

    #[test]
    fn simulated_guilds_belong_to_the_shard_they_are_made_for() {
        let mut rng = rand::rng();
        for shard_count in [1, 2, 16, 1000, MAX_SHARD_COUNT] {
            for _ in 0..200 {
                let shard = rng.random_range(0..shard_count);
                let guild = guild_on_shard(shard, count(shard_count), &mut rng);
                assert_eq!(shard_of_guild(guild, count(shard_count)), shard, "{guild}");
            }
        }
    }

    #[test]
    fn shard_lists_parse_and_bad_entries_name_the_variable() {
        assert_eq!(parse_shard_ids("", 16, "SHARD_IDS"), Ok(set(&[])));
        assert_eq!(
            parse_shard_ids(" 3, 1,1,,0 ", 16, "SHARD_IDS"),
            Ok(set(&[0, 1, 3]))
        );
        assert_eq!(
            parse_shard_ids("1,x", 16, "SHARD_IDS").unwrap_err(),
            "SHARD_IDS: \"x\" is not a shard id (expected a comma list such as 0,1,5)"
        );
        assert_eq!(
            parse_shard_ids("16", 16, "SHARD_IDS").unwrap_err(),
            "SHARD_IDS: shard 16 is out of range (--shard-count is 16: shards 0 to 15)"
        );
        assert!(parse_shard_ids("-1", 16, "SHARD_IDS").is_err());
    }

    #[test]
    fn removed_shards_are_released_before_any_added_one_is_identified() {
        let now = Instant::now();
        let p = plan(&set(&[0, 1, 2]), &set(&[1, 2, 3]), &BTreeMap::new(), now);
        assert_eq!(
            p,
            Plan {
                release: vec![0],
                identify: vec![],
                wake_at: None
            }
        );
        let p = plan(&set(&[1, 2]), &set(&[1, 2, 3, 4]), &BTreeMap::new(), now);
        assert_eq!((p.release, p.identify), (vec![], vec![3, 4]));
        let p = plan(&set(&[1, 2]), &set(&[1, 2]), &BTreeMap::new(), now);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_rate_limited_shard_waits_its_time_while_the_others_go_ahead() {
        let now = Instant::now();
        let later = now + Duration::from_millis(4_200);
        let not_before = BTreeMap::from([(2, later), (5, now)]);
        let p = plan(&set(&[]), &set(&[2, 3, 5]), &not_before, now);
        assert_eq!(p.identify, vec![3, 5], "2 is not due yet");
        assert_eq!(p.wake_at, Some(later));
        let p = plan(
            &set(&[]),
            &set(&[2]),
            &not_before,
            later - Duration::from_millis(1),
        );
        assert_eq!((p.identify.len(), p.wake_at), (0, Some(later)));
        let p = plan(&set(&[]), &set(&[2]), &not_before, later);
        assert_eq!((p.identify, p.wake_at), (vec![2], None));
        // A release waiting for a retry holds the identifies back too.
        let p = plan(&set(&[2]), &set(&[3]), &not_before, now);
        assert_eq!(
            (p.release, p.identify, p.wake_at),
            (vec![], vec![], Some(later))
        );
    }

    fn bot_args(gateway: &str, shard_ids: &str) -> DemoBotArgs {
        DemoBotArgs {
            host: "127.0.0.1".into(),
            port: 0,
            version: "v2".into(),
            gateway: gateway.into(),
            fail_rate: 0.0,
            shard_count: 8,
            shard_ids: shard_ids.into(),
            name: None,
        }
    }

    #[tokio::test]
    async fn invalid_args_name_the_flag() {
        let ok = "http://127.0.0.1:1";
        for (a, needle) in [
            (bot_args("127.0.0.1:7400", ""), "--gateway"),
            (bot_args("ftp://host/", ""), "--gateway"),
            (bot_args(ok, "0,9"), "SHARD_IDS"),
            (
                DemoBotArgs {
                    shard_count: 0,
                    ..bot_args(ok, "")
                },
                "--shard-count",
            ),
            (
                DemoBotArgs {
                    fail_rate: 2.0,
                    ..bot_args(ok, "")
                },
                "--fail-rate",
            ),
            (
                DemoBotArgs {
                    version: String::new(),
                    ..bot_args(ok, "")
                },
                "--version",
            ),
            (
                DemoBotArgs {
                    name: Some(String::new()),
                    ..bot_args(ok, "")
                },
                "--name",
            ),
        ] {
            let err = match bind(a).await {
                Ok(_) => panic!("expected an error mentioning {needle}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(needle), "{err}");
        }
    }

    async fn put_shards(c: &reqwest::Client, base: &str, body: &str) -> (u16, serde_json::Value) {
        let resp = c
            .put(format!("{base}/__serin/shards"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (
            status,
            serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
        )
    }

    #[tokio::test]
    async fn the_bot_takes_its_shards_handles_their_events_and_releases_them_on_shutdown() {
        let (gw_addr, gateway) = demo_gateway::bind(DemoGatewayArgs {
            host: "127.0.0.1".into(),
            port: 0,
            shards: 8,
            max_concurrency: 8,
            bucket_interval: Duration::from_millis(200),
        })
        .await
        .unwrap();
        let gw = Running::spawn(gw_addr, |shutdown| gateway.serve(shutdown));
        let (addr, bot) = bind(DemoBotArgs {
            fail_rate: 1.0,
            ..bot_args(&gw.base, "1,2")
        })
        .await
        .unwrap();
        let bot = Running::spawn(addr, |shutdown| bot.serve(shutdown));
        let c = client();

        // Shard 9 does not exist; nothing changes.
        let (status, err) = put_shards(&c, &bot.base, r#"{"shards": [1, 9]}"#).await;
        assert_eq!(status, 400, "{err}");
        assert!(
            err["error"]
                .as_str()
                .unwrap()
                .contains("shard 9 is out of range"),
            "{err}"
        );
        let (status, err) = put_shards(&c, &bot.base, r#"{"shard": [1]}"#).await;
        assert_eq!(status, 400, "{err}");
        assert!(err["error"].as_str().unwrap().contains("shard"), "{err}");

        // The initial set from SHARD_IDS.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, text) = get(&c, &format!("{}/__serin/shards", bot.base)).await;
            let shards: serde_json::Value = serde_json::from_str(&text).unwrap();
            if shards == serde_json::json!({"held": [1, 2], "wanted": [1, 2]}) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{shards}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, now) = put_shards(&c, &bot.base, r#"{"shards": [2, 3]}"#).await;
        assert_eq!(status, 200, "{now}");
        assert_eq!(now, serde_json::json!({"held": [2, 3], "wanted": [2, 3]}));
        assert_eq!(get(&c, &format!("{}/healthz", bot.base)).await.0, 200);

        // Events flow for the held shards only, and fail_rate 1 fails them all.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, page) = get(&c, &format!("{}/metrics", bot.base)).await;
        assert!(page.contains("bot_shards_held 2\n"), "{page}");
        let series = |name: &str, shard: u32| -> f64 {
            let prefix = format!("{name}{{shard=\"{shard}\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map_or(0.0, |v| v.parse().unwrap())
        };
        assert!(series("bot_events_total", 3) >= 3.0, "{page}");
        assert_eq!(
            series("bot_events_failed_total", 3),
            series("bot_events_total", 3)
        );
        assert_eq!(series("bot_events_total", 4), 0.0);

        let (status, body) = post_admin(&c, &bot.base, r#"{"fail_rate": 0}"#).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = post_admin(&c, &bot.base, r#"{"fail_rate": 3}"#).await;
        assert_eq!(
            (status, body.contains("fail_rate must be")),
            (400, true),
            "{body}"
        );

        bot.stop().await.unwrap();
        let (_, text) = get(&c, &format!("{}/books", gw.base)).await;
        let books: serde_json::Value = serde_json::from_str(&text).unwrap();
        let owners: Vec<&serde_json::Value> = books["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["owner"])
            .collect();
        assert!(
            owners.iter().all(|o| o.is_null()),
            "released on shutdown: {books}"
        );
        let log: Vec<(String, u64)> = books["log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_owned(),
                    e["shard"].as_u64().unwrap(),
                )
            })
            .collect();
        let position = |kind: &str, shard: u64| {
            log.iter()
                .position(|e| *e == (kind.to_owned(), shard))
                .unwrap_or_else(|| panic!("no {kind} of shard {shard} in {log:?}"))
        };
        let releases_of_1 = position("release", 1);
        let identify_of_3 = position("identify", 3);
        assert!(
            releases_of_1 < identify_of_3,
            "shard 1 released before 3 started: {log:?}"
        );
        gw.stop().await.unwrap();
    }
}
