//! `serin demo-gateway`: a stand-in for Discord's gateway, the session-start limiter a sharded
//! bot must respect, so serin's `shards` traffic model can be tested without Discord.
//!
//! Discord lets a bot start (identify) one session per *bucket* every 5 s, the bucket of shard
//! `S` being `S % max_concurrency`, and a shard can be served by one session at a time. A
//! rollout that moves shards between the stable and the canary bot must therefore stop the old
//! owner's shard before the new owner starts it, and pace the starts. This gateway enforces
//! both rules and keeps books of every start and stop, so a test can prove afterwards that no
//! shard was ever held twice, that no rate limit was ignored, and how long each handover took.
//!
//! HTTP (JSON bodies; bad input is a `400` naming the field):
//! - `POST /identify {"shard": S, "bot": "<instance>", "version": "v2"}`: `200` when the shard
//!   is free and its bucket had no start within `--bucket-interval`; `429` with `bucket` and
//!   `retry_after_ms` (and a `Retry-After` header, in whole seconds) when the bucket is busy;
//!   `409` with the `holder` when another live session holds the shard. A bot identifying a
//!   shard it already holds gets `200` with `"resumed": true`, which uses no start.
//! - `POST /release {"shard": S, "bot": ...}`: frees the shard (`409` if another bot holds it;
//!   `200` with `"released": false` if nobody does, so a retry is harmless).
//! - `POST /heartbeat {"bot": ..., "shards": [...]}`: keeps the bot's session alive and answers
//!   the shards the gateway has it holding (`held`) and those of `shards` it does not
//!   (`lost`). A session not heartbeated (nor identifying) for
//!   [`SESSION_TIMEOUT`] is dropped with all its shards (logged as `expired`).
//! - `GET /books`: per shard its owner or `null`, the counters `identify_ok`, `rate_limited`,
//!   `conflicts` (refused identifies), the handovers computed from the log, and the log itself:
//!   every identify, release, expiry and rate-limited identify (with the wait it was told),
//!   each with its Unix time in milliseconds (the last [`LOG_CAPACITY`] entries).
//! - `GET /metrics`: OpenMetrics counters `gateway_identify_ok_total`,
//!   `gateway_rate_limited_total`, `gateway_conflicts_total` and the `gateway_shards_held`
//!   gauge; `GET /healthz`: `200 ok`.
//!
//! The rules live in [`Books`], a pure core that takes the time as a parameter; the HTTP layer
//! only parses, locks, and reads the clock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::demo_app::{bind_listener, metrics_page, serve_until};

/// A session not heartbeated for this long is dropped, with its shards.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

/// How many log entries `GET /books` keeps (the oldest are dropped first).
pub const LOG_CAPACITY: usize = 10_000;

/// Most shards a gateway accepts (`--shards`).
pub const MAX_SHARDS: u32 = 4096;

/// Longest accepted `--bucket-interval`.
pub const MAX_BUCKET_INTERVAL: Duration = Duration::from_secs(3600);

/// Longest accepted `bot` name, in bytes.
pub const MAX_BOT_NAME: usize = 100;

/// Longest accepted `version`, in bytes.
pub const MAX_VERSION: usize = 100;

/// Arguments of `serin demo-gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoGatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long)]
    pub port: u16,
    /// Number of shards, 1 to 4096; shard ids are 0..shards.
    #[arg(long)]
    pub shards: u32,
    /// Session start buckets: shard S belongs to bucket S % max_concurrency (1 to --shards).
    #[arg(long)]
    pub max_concurrency: u32,
    /// Least time between two starts in one bucket (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub bucket_interval: Duration,
}

/// The gateway's fixed rules, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Shard ids are `0..shards`.
    pub shards: u32,
    /// Bucket of shard `s`: `s % max_concurrency`.
    pub max_concurrency: u32,
    /// Least time between two starts in one bucket.
    pub bucket_interval: Duration,
    /// A session not heard from for this long is dropped.
    pub session_timeout: Duration,
}

impl Rules {
    /// Checks the flags; errors name the flag.
    pub fn new(
        shards: u32,
        max_concurrency: u32,
        bucket_interval: Duration,
    ) -> anyhow::Result<Self> {
        if !(1..=MAX_SHARDS).contains(&shards) {
            bail!("--shards must be between 1 and {MAX_SHARDS}, got {shards}");
        }
        if !(1..=shards).contains(&max_concurrency) {
            bail!(
                "--max-concurrency must be between 1 and --shards ({shards}), got {max_concurrency}"
            );
        }
        if bucket_interval.is_zero() || bucket_interval > MAX_BUCKET_INTERVAL {
            bail!(
                "--bucket-interval must be above 0 and at most {}, got {}",
                humantime::format_duration(MAX_BUCKET_INTERVAL),
                humantime::format_duration(bucket_interval)
            );
        }
        Ok(Self {
            shards,
            max_concurrency,
            bucket_interval,
            session_timeout: SESSION_TIMEOUT,
        })
    }

    /// The session start bucket of `shard`.
    pub fn bucket_of(&self, shard: u32) -> u32 {
        shard % self.max_concurrency
    }
}

/// Who serves a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub bot: String,
    pub version: String,
}

/// What a log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// A session started serving the shard.
    Identify,
    /// The owner let the shard go.
    Release,
    /// The owner's session timed out; the shard is free.
    Expired,
    /// An identify refused with 429 (`retry_after_ms` says the wait it was told), logged so a
    /// test can check the bot waited that long before trying the shard again.
    RateLimited,
}

/// One identify, release or expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub kind: LogKind,
    pub shard: u32,
    pub bot: String,
    pub version: String,
    /// For `rate_limited` entries: the wait the bot was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A shard passing from one bot to another: the old owner's release (or expiry) to the new
/// owner's identify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub shard: u32,
    pub from: String,
    pub to: String,
    pub released_at_ms: u64,
    pub identified_at_ms: u64,
    /// `identified_at_ms - released_at_ms`: how long nobody served the shard.
    pub gap_ms: u64,
}

/// Why an identify was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Answered 400: the shard does not exist.
    NoSuchShard { shard: u32, shards: u32 },
    /// Answered 409: another live session holds the shard.
    HeldByOther { shard: u32, holder: Owner },
    /// Answered 429: the bucket started a session less than the interval ago.
    RateLimited { bucket: u32, retry_after_ms: u64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoSuchShard { shard, shards } => write!(
                f,
                "shard {shard} does not exist: this gateway has shards 0 to {}",
                shards - 1
            ),
            Refusal::HeldByOther { shard, holder } => write!(
                f,
                "shard {shard} is held by {} ({})",
                holder.bot, holder.version
            ),
            Refusal::RateLimited {
                bucket,
                retry_after_ms,
            } => write!(
                f,
                "bucket {bucket} started a session too recently; retry after {retry_after_ms} ms"
            ),
        }
    }
}

/// A granted identify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identified {
    pub bucket: u32,
    /// The bot already held the shard: no start was used.
    pub resumed: bool,
}

/// The counters of `GET /books` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub identify_ok: u64,
    pub rate_limited: u64,
    pub conflicts: u64,
}

/// The gateway's state and rules: who holds which shard, when each bucket last started a
/// session, which sessions are alive, and the log. Every method takes the time (`now_ms`, Unix
/// milliseconds) and first drops the sessions that timed out by then.
#[derive(Debug)]
pub struct Books {
    rules: Rules,
    owners: Vec<Option<Owner>>,
    /// Per bucket, the time of its latest start.
    last_start_ms: Vec<Option<u64>>,
    /// Per bot, when it was last heard from.
    sessions: HashMap<String, u64>,
    counters: Counters,
    log: VecDeque<LogEntry>,
}

impl Books {
    /// Empty books: no shard held, every bucket free.
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            owners: vec![None; rules.shards as usize],
            last_start_ms: vec![None; rules.max_concurrency as usize],
            sessions: HashMap::new(),
            counters: Counters::default(),
            log: VecDeque::new(),
        }
    }

    /// Starts `bot`'s session on `shard`, or says why not (counting the refusal).
    pub fn identify(
        &mut self,
        shard: u32,
        owner: Owner,
        now_ms: u64,
    ) -> Result<Identified, Refusal> {
        self.expire(now_ms);
        let slot = self.slot(shard)?;
        let bucket = self.rules.bucket_of(shard);
        match &self.owners[slot] {
            Some(holder) if holder.bot == owner.bot => {
                self.sessions.insert(owner.bot, now_ms);
                return Ok(Identified {
                    bucket,
                    resumed: true,
                });
            }
            Some(holder) => {
                self.counters.conflicts += 1;
                return Err(Refusal::HeldByOther {
                    shard,
                    holder: holder.clone(),
                });
            }
            None => {}
        }
        let interval_ms = duration_ms(self.rules.bucket_interval);
        if let Some(last) = self.last_start_ms[bucket as usize] {
            let since = now_ms.saturating_sub(last);
            if since < interval_ms {
                self.counters.rate_limited += 1;
                let retry_after_ms = interval_ms - since;
                self.record(now_ms, LogKind::RateLimited, shard, &owner);
                if let Some(entry) = self.log.back_mut() {
                    entry.retry_after_ms = Some(retry_after_ms);
                }
                return Err(Refusal::RateLimited {
                    bucket,
                    retry_after_ms,
                });
            }
        }
        self.last_start_ms[bucket as usize] = Some(now_ms);
        self.sessions.insert(owner.bot.clone(), now_ms);
        self.counters.identify_ok += 1;
        self.record(now_ms, LogKind::Identify, shard, &owner);
        self.owners[slot] = Some(owner);
        Ok(Identified {
            bucket,
            resumed: false,
        })
    }

    /// Frees `shard` if `bot` holds it: `Ok(true)`; `Ok(false)` if nobody holds it; the
    /// holder if another bot does.
    pub fn release(&mut self, shard: u32, bot: &str, now_ms: u64) -> Result<bool, Refusal> {
        self.expire(now_ms);
        let slot = self.slot(shard)?;
        match &self.owners[slot] {
            None => Ok(false),
            Some(holder) if holder.bot != bot => Err(Refusal::HeldByOther {
                shard,
                holder: holder.clone(),
            }),
            Some(_) => {
                if let Some(owner) = self.owners[slot].take() {
                    self.record(now_ms, LogKind::Release, shard, &owner);
                }
                self.sessions.insert(bot.to_owned(), now_ms);
                Ok(true)
            }
        }
    }

    /// Keeps `bot`'s session alive; answers the shards it holds.
    pub fn heartbeat(&mut self, bot: &str, now_ms: u64) -> Vec<u32> {
        self.expire(now_ms);
        self.sessions.insert(bot.to_owned(), now_ms);
        self.held_by(bot)
    }

    /// Drops the sessions not heard from within the session timeout, freeing their shards.
    pub fn expire(&mut self, now_ms: u64) {
        let timeout_ms = duration_ms(self.rules.session_timeout);
        let dead: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, seen)| now_ms.saturating_sub(**seen) >= timeout_ms)
            .map(|(bot, _)| bot.clone())
            .collect();
        for bot in dead {
            self.sessions.remove(&bot);
            for shard in 0..self.rules.shards {
                let slot = shard as usize;
                if self.owners[slot].as_ref().is_some_and(|o| o.bot == bot)
                    && let Some(owner) = self.owners[slot].take()
                {
                    self.record(now_ms, LogKind::Expired, shard, &owner);
                }
            }
        }
    }

    /// The shards `bot` holds, in order.
    pub fn held_by(&self, bot: &str) -> Vec<u32> {
        (0..self.rules.shards)
            .filter(|s| {
                self.owners[*s as usize]
                    .as_ref()
                    .is_some_and(|o| o.bot == bot)
            })
            .collect()
    }

    /// Each shard's owner, by shard id.
    pub fn owners(&self) -> &[Option<Owner>] {
        &self.owners
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The log, oldest first.
    pub fn log(&self) -> impl Iterator<Item = &LogEntry> {
        self.log.iter()
    }

    /// The rules these books keep.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    fn slot(&self, shard: u32) -> Result<usize, Refusal> {
        if shard < self.rules.shards {
            Ok(shard as usize)
        } else {
            Err(Refusal::NoSuchShard {
                shard,
                shards: self.rules.shards,
            })
        }
    }

    fn record(&mut self, at_ms: u64, kind: LogKind, shard: u32, owner: &Owner) {
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(LogEntry {
            at_ms,
            kind,
            shard,
            bot: owner.bot.clone(),
            version: owner.version.clone(),
            retry_after_ms: None,
        });
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The handovers in `log` (oldest first): each time a shard released (or expired) by one bot
/// is next identified by another. A shard's first identify and a bot taking back its own shard
/// are not handovers.
pub fn handovers<'a>(log: impl IntoIterator<Item = &'a LogEntry>) -> Vec<Handover> {
    // Per shard: the latest release/expiry not yet followed by an identify.
    let mut freed: BTreeMap<u32, &LogEntry> = BTreeMap::new();
    let mut out = Vec::new();
    for entry in log {
        match entry.kind {
            LogKind::Release | LogKind::Expired => {
                freed.insert(entry.shard, entry);
            }
            LogKind::RateLimited => {}
            LogKind::Identify => {
                if let Some(released) = freed.remove(&entry.shard)
                    && released.bot != entry.bot
                {
                    out.push(Handover {
                        shard: entry.shard,
                        from: released.bot.clone(),
                        to: entry.bot.clone(),
                        released_at_ms: released.at_ms,
                        identified_at_ms: entry.at_ms,
                        gap_ms: entry.at_ms.saturating_sub(released.at_ms),
                    });
                }
            }
        }
    }
    out
}

/// Unix time in milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, duration_ms)
}

/// Binds and serves until `shutdown` completes.
pub async fn run(
    args: DemoGatewayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (addr, gateway) = bind(args).await?;
    tracing::info!(%addr, "demo gateway listening");
    gateway.serve(shutdown).await
}

/// Validates `args` and binds the listening socket, without serving yet (the caller learns
/// the address, useful with `--port 0`). Serve with [`DemoGateway::serve`].
pub async fn bind(args: DemoGatewayArgs) -> anyhow::Result<(SocketAddr, DemoGateway)> {
    let rules = Rules::new(args.shards, args.max_concurrency, args.bucket_interval)?;
    let (addr, listener) = bind_listener(&args.host, args.port, "the demo gateway").await?;
    Ok((
        addr,
        DemoGateway {
            listener,
            shared: Arc::new(Shared::new(rules)),
        },
    ))
}

/// A bound demo gateway, not serving yet.
pub struct DemoGateway {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl DemoGateway {
    /// Serves until `shutdown` completes, then drains as demo-app does.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        serve_until(
            self.listener,
            router(self.shared),
            CancellationToken::new(),
            shutdown,
            "the demo gateway",
        )
        .await
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/identify", post(identify))
        .route("/release", post(release))
        .route("/heartbeat", post(heartbeat))
        .route("/books", get(books))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

struct Shared {
    books: Mutex<Books>,
    registry: Registry,
    identify_ok: Counter,
    rate_limited: Counter,
    conflicts: Counter,
    shards_held: Gauge,
}

impl Shared {
    fn new(rules: Rules) -> Self {
        let identify_ok = Counter::default();
        let rate_limited = Counter::default();
        let conflicts = Counter::default();
        let shards_held = Gauge::default();
        let mut registry = Registry::default();
        // The encoder appends `_total` to counters.
        registry.register(
            "gateway_identify_ok",
            "Session starts granted",
            identify_ok.clone(),
        );
        registry.register(
            "gateway_rate_limited",
            "Session starts refused by the bucket limit (429)",
            rate_limited.clone(),
        );
        registry.register(
            "gateway_conflicts",
            "Session starts refused because another session held the shard (409)",
            conflicts.clone(),
        );
        registry.register(
            "gateway_shards_held",
            "Shards held by a live session",
            shards_held.clone(),
        );
        Self {
            books: Mutex::new(Books::new(rules)),
            registry,
            identify_ok,
            rate_limited,
            conflicts,
            shards_held,
        }
    }

    /// Runs `f` on the books at the current time, then refreshes the metrics from them.
    fn with_books<T>(&self, f: impl FnOnce(&mut Books, u64) -> T) -> T {
        let mut books = self.books.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut books, unix_ms());
        let c = books.counters();
        // The counters only grow; catch the metrics up with the books.
        for (counter, total) in [
            (&self.identify_ok, c.identify_ok),
            (&self.rate_limited, c.rate_limited),
            (&self.conflicts, c.conflicts),
        ] {
            let behind = total.saturating_sub(counter.get());
            if behind > 0 {
                counter.inc_by(behind);
            }
        }
        let held = books.owners().iter().filter(|o| o.is_some()).count();
        self.shards_held
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        out
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifyBody {
    shard: u32,
    bot: String,
    version: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    shard: u32,
    bot: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    bot: String,
    #[serde(default)]
    shards: Vec<u32>,
}

/// Parses a JSON body into `T`; the error names the field serde complained about.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}"))
}

/// Checks a `bot` or `version` field: 1 to `max` bytes, no control characters.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(format!(
            "{field} must be 1 to {max} bytes without control characters, got {value:?}"
        ));
    }
    Ok(())
}

fn bad_request(msg: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({ "error": msg })),
    )
        .into_response()
}

fn refusal_response(refusal: Refusal) -> Response {
    let error = refusal.to_string();
    match refusal {
        Refusal::NoSuchShard { .. } => bad_request(error),
        Refusal::HeldByOther { shard, holder } => (
            StatusCode::CONFLICT,
            axum::Json(serde_json::json!({"error": error, "shard": shard, "holder": holder})),
        )
            .into_response(),
        Refusal::RateLimited {
            bucket,
            retry_after_ms,
        } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(
                header::RETRY_AFTER,
                retry_after_ms.div_ceil(1000).to_string(),
            )],
            axum::Json(serde_json::json!({
                "error": error, "bucket": bucket, "retry_after_ms": retry_after_ms,
            })),
        )
            .into_response(),
    }
}

async fn identify(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = parse_body::<IdentifyBody>(&body).and_then(|b| {
        check_name("bot", &b.bot, MAX_BOT_NAME)?;
        check_name("version", &b.version, MAX_VERSION)?;
        Ok(b)
    });
    let body = match parsed {
        Ok(b) => b,
        Err(msg) => return bad_request(msg),
    };
    let owner = Owner {
        bot: body.bot,
        version: body.version,
    };
    let shard = body.shard;
    match shared.with_books(|books, now| books.identify(shard, owner.clone(), now)) {
        Ok(ok) => axum::Json(serde_json::json!({
            "shard": shard, "bot": owner.bot, "version": owner.version,
            "bucket": ok.bucket, "resumed": ok.resumed,
        }))
        .into_response(),
        Err(refusal) => refusal_response(refusal),
    }
}

async fn release(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = parse_body::<ReleaseBody>(&body).and_then(|b| {
        check_name("bot", &b.bot, MAX_BOT_NAME)?;
        Ok(b)
    });
    let body = match parsed {
        Ok(b) => b,
        Err(msg) => return bad_request(msg),
    };
    match shared.with_books(|books, now| books.release(body.shard, &body.bot, now)) {
        Ok(released) => axum::Json(serde_json::json!({"shard": body.shard, "released": released}))
            .into_response(),
        Err(refusal) => refusal_response(refusal),
    }
}

async fn heartbeat(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = parse_body::<HeartbeatBody>(&body).and_then(|b| {
        check_name("bot", &b.bot, MAX_BOT_NAME)?;
        Ok(b)
    });
    let body = match parsed {
        Ok(b) => b,
        Err(msg) => return bad_request(msg),
    };
    let held = shared.with_books(|books, now| books.heartbeat(&body.bot, now));
    // What the bot believes it holds but does not (its session expired meanwhile).
    let lost: Vec<u32> = body
        .shards
        .iter()
        .copied()
        .filter(|s| !held.contains(s))
        .collect();
    axum::Json(serde_json::json!({"bot": body.bot, "held": held, "lost": lost})).into_response()
}

async fn books(State(shared): State<Arc<Shared>>) -> Response {
    let page = shared.with_books(|books, now| {
        let rules = books.rules();
        let shards: Vec<serde_json::Value> = books
            .owners()
            .iter()
            .enumerate()
            .map(|(shard, owner)| serde_json::json!({"shard": shard, "owner": owner}))
            .collect();
        let c = books.counters();
        let log: Vec<&LogEntry> = books.log().collect();
        serde_json::json!({
            "now_ms": now,
            "shard_count": rules.shards,
            "max_concurrency": rules.max_concurrency,
            "bucket_interval_ms": duration_ms(rules.bucket_interval),
            "session_timeout_ms": duration_ms(rules.session_timeout),
            "shards": shards,
            "identify_ok": c.identify_ok,
            "rate_limited": c.rate_limited,
            "conflicts": c.conflicts,
            "handovers": handovers(log.iter().copied()),
            "log": log,
        })
    });
    axum::Json(page).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    // Expire first, so the gauge does not count dead sessions' shards.
    shared.with_books(|books, now| books.expire(now));
    metrics_page(&shared.registry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_app::test_support::{Running, client, get};

    fn rules(shards: u32, c: u32, interval_ms: u64) -> Rules {
        Rules::new(shards, c, Duration::from_millis(interval_ms)).unwrap()
    }

    fn owner(bot: &str) -> Owner {
        Owner {
            bot: bot.into(),
            version: format!("{bot}-version"),
        }
    }

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn one_start_per_bucket_per_interval_and_other_buckets_are_free() {
        let mut b = Books::new(rules(8, 2, 5_000));
        assert_eq!(
            b.identify(0, owner("a"), T0),
            Ok(Identified {
                bucket: 0,
                resumed: false
            })
        );
        // Shard 1 is in bucket 1: free.
        assert!(b.identify(1, owner("a"), T0).is_ok());
        // Shard 2 shares bucket 0 with shard 0.
        assert_eq!(
            b.identify(2, owner("a"), T0 + 1_200),
            Err(Refusal::RateLimited {
                bucket: 0,
                retry_after_ms: 3_800
            })
        );
        assert_eq!(
            b.identify(4, owner("b"), T0 + 4_999).unwrap_err(),
            Refusal::RateLimited {
                bucket: 0,
                retry_after_ms: 1
            }
        );
        assert_eq!(b.counters().rate_limited, 2);
        let refused: Vec<(LogKind, u32, Option<u64>)> = b
            .log()
            .filter(|e| e.kind == LogKind::RateLimited)
            .map(|e| (e.kind, e.shard, e.retry_after_ms))
            .collect();
        assert_eq!(
            refused,
            [
                (LogKind::RateLimited, 2, Some(3_800)),
                (LogKind::RateLimited, 4, Some(1))
            ]
        );
        // A refusal does not reset the bucket's clock.
        assert_eq!(
            b.identify(2, owner("a"), T0 + 5_000).map(|i| i.bucket),
            Ok(0)
        );
        assert_eq!(b.counters().identify_ok, 3);
    }

    #[test]
    fn a_shard_held_by_another_live_session_is_a_conflict_naming_the_holder() {
        let mut b = Books::new(rules(4, 1, 1_000));
        b.identify(3, owner("a"), T0).unwrap();
        let refusal = b.identify(3, owner("b"), T0 + 2_000).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::HeldByOther {
                shard: 3,
                holder: owner("a")
            }
        );
        assert_eq!(refusal.to_string(), "shard 3 is held by a (a-version)");
        assert_eq!(b.counters().conflicts, 1);
        // B may not release A's shard either.
        assert!(b.release(3, "b", T0 + 2_000).is_err());
        // The holder identifying again resumes without using a start.
        assert_eq!(
            b.identify(3, owner("a"), T0 + 2_100),
            Ok(Identified {
                bucket: 0,
                resumed: true
            })
        );
        assert_eq!(b.counters().identify_ok, 1);
        // Released, it is B's for the taking.
        assert_eq!(b.release(3, "a", T0 + 2_200), Ok(true));
        assert_eq!(
            b.release(3, "a", T0 + 2_250),
            Ok(false),
            "a retry is harmless"
        );
        assert!(b.identify(3, owner("b"), T0 + 2_300).is_ok());
        assert_eq!(b.owners()[3], Some(owner("b")));
    }

    #[test]
    fn a_session_not_heartbeated_for_the_timeout_loses_its_shards() {
        let mut b = Books::new(rules(4, 4, 100));
        b.identify(0, owner("a"), T0).unwrap();
        b.identify(1, owner("a"), T0).unwrap();
        b.identify(2, owner("b"), T0).unwrap();
        // A keeps heartbeating, B does not.
        assert_eq!(b.heartbeat("a", T0 + 2_000), vec![0, 1]);
        assert_eq!(b.heartbeat("a", T0 + 4_000), vec![0, 1]);
        assert_eq!(b.owners()[2], None, "b was silent for 4 s");
        assert_eq!(b.held_by("b"), Vec::<u32>::new());
        // Just under the timeout is still alive.
        assert_eq!(b.heartbeat("a", T0 + 4_000 + 2_999), vec![0, 1]);
        b.expire(T0 + 4_000 + 2_999 + 3_000);
        assert_eq!(b.owners(), &[None, None, None, None]);
        let kinds: Vec<(LogKind, u32)> = b.log().map(|e| (e.kind, e.shard)).collect();
        assert_eq!(
            kinds,
            [
                (LogKind::Identify, 0),
                (LogKind::Identify, 1),
                (LogKind::Identify, 2),
                (LogKind::Expired, 2),
                (LogKind::Expired, 0),
                (LogKind::Expired, 1),
            ]
        );
        // A shard freed by expiry can be started by another bot.
        assert!(b.identify(0, owner("c"), T0 + 20_000).is_ok());
    }

    #[test]
    fn an_unknown_shard_is_refused_naming_the_range() {
        let mut b = Books::new(rules(8, 2, 100));
        let refusal = b.identify(8, owner("a"), T0).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "shard 8 does not exist: this gateway has shards 0 to 7"
        );
        assert!(b.release(9, "a", T0).is_err());
        assert_eq!(b.counters(), Counters::default());
    }

    #[test]
    fn handovers_are_measured_from_release_to_the_new_owners_identify() {
        let mut b = Books::new(rules(4, 4, 100));
        b.identify(0, owner("a"), T0).unwrap();
        b.identify(1, owner("a"), T0).unwrap();
        b.release(0, "a", T0 + 1_000).unwrap();
        b.identify(0, owner("b"), T0 + 1_250).unwrap();
        // A takes its own shard back: not a handover.
        b.release(1, "a", T0 + 1_300).unwrap();
        b.identify(1, owner("a"), T0 + 1_400).unwrap();
        // B goes silent; C picks shard 0 up after the expiry.
        b.heartbeat("a", T0 + 3_000);
        b.heartbeat("a", T0 + 5_000);
        b.identify(0, owner("c"), T0 + 5_100).unwrap();
        let gaps = handovers(b.log());
        assert_eq!(
            gaps,
            [
                Handover {
                    shard: 0,
                    from: "a".into(),
                    to: "b".into(),
                    released_at_ms: T0 + 1_000,
                    identified_at_ms: T0 + 1_250,
                    gap_ms: 250,
                },
                Handover {
                    shard: 0,
                    from: "b".into(),
                    to: "c".into(),
                    released_at_ms: T0 + 5_000,
                    identified_at_ms: T0 + 5_100,
                    gap_ms: 100,
                },
            ]
        );
    }

    #[test]
    fn the_log_keeps_the_latest_entries_only() {
        let mut b = Books::new(rules(1, 1, 1));
        for i in 0..(LOG_CAPACITY as u64 / 2 + 10) {
            b.identify(0, owner("a"), T0 + 2 * i).unwrap();
            b.release(0, "a", T0 + 2 * i + 1).unwrap();
        }
        assert_eq!(b.log().count(), LOG_CAPACITY);
        assert_eq!(b.log().next().map(|e| e.at_ms), Some(T0 + 20));
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        for (shards, c, interval, flag) in [
            (0, 1, 5_000, "--shards"),
            (MAX_SHARDS + 1, 1, 5_000, "--shards"),
            (8, 0, 5_000, "--max-concurrency"),
            (8, 9, 5_000, "--max-concurrency"),
            (8, 2, 0, "--bucket-interval"),
            (8, 2, 3_600_001, "--bucket-interval"),
        ] {
            let err = Rules::new(shards, c, Duration::from_millis(interval)).unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
        assert_eq!(rules(8, 2, 5_000).bucket_of(7), 1);
    }

    async fn post(c: &reqwest::Client, url: String, body: &str) -> (u16, serde_json::Value) {
        let resp = c
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }

    #[tokio::test]
    async fn the_http_api_answers_200_429_409_and_400_and_keeps_the_books() {
        let (addr, gateway) = bind(DemoGatewayArgs {
            host: "127.0.0.1".into(),
            port: 0,
            shards: 4,
            max_concurrency: 2,
            bucket_interval: Duration::from_secs(60),
        })
        .await
        .unwrap();
        let gw = Running::spawn(addr, |shutdown| gateway.serve(shutdown));
        let c = client();
        let url = |path: &str| format!("{}{path}", gw.base);

        let (status, ok) = post(
            &c,
            url("/identify"),
            r#"{"shard": 0, "bot": "a", "version": "v1"}"#,
        )
        .await;
        assert_eq!((status, ok["bucket"].clone()), (200, 0.into()), "{ok}");
        let (status, limited) = post(
            &c,
            url("/identify"),
            r#"{"shard": 2, "bot": "b", "version": "v2"}"#,
        )
        .await;
        assert_eq!(status, 429, "{limited}");
        assert_eq!(limited["bucket"], 0);
        assert!(
            limited["retry_after_ms"].as_u64().unwrap() > 50_000,
            "{limited}"
        );
        let (status, conflict) = post(
            &c,
            url("/identify"),
            r#"{"shard": 0, "bot": "b", "version": "v2"}"#,
        )
        .await;
        assert_eq!(
            (status, conflict["holder"]["bot"].clone()),
            (409, "a".into()),
            "{conflict}"
        );
        for (path, body, needle) in [
            ("/identify", r#"{"shard": 0, "bot": "a"}"#, "version"),
            (
                "/identify",
                r#"{"shard": -1, "bot": "a", "version": "v1"}"#,
                "-1",
            ),
            (
                "/identify",
                r#"{"shard": 4, "bot": "a", "version": "v1"}"#,
                "shards 0 to 3",
            ),
            (
                "/identify",
                r#"{"shard": 1, "bot": "", "version": "v1"}"#,
                "bot must be",
            ),
            (
                "/release",
                r#"{"shard": 1, "bot": "a", "extra": 1}"#,
                "extra",
            ),
            ("/heartbeat", r#"{"shards": []}"#, "bot"),
            ("/heartbeat", "not json", "invalid body"),
        ] {
            let (status, err) = post(&c, url(path), body).await;
            assert_eq!(status, 400, "{path} {body} -> {err}");
            let msg = err["error"].as_str().unwrap();
            assert!(msg.contains(needle), "{path} {body} -> {msg}");
        }
        let (status, hb) = post(&c, url("/heartbeat"), r#"{"bot": "a", "shards": [0, 1]}"#).await;
        assert_eq!(
            (status, hb["held"].clone(), hb["lost"].clone()),
            (200, serde_json::json!([0]), serde_json::json!([1]))
        );
        let (status, released) = post(&c, url("/release"), r#"{"shard": 0, "bot": "a"}"#).await;
        assert_eq!((status, released["released"].clone()), (200, true.into()));

        let (_, text) = get(&c, &url("/books")).await;
        let books: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (
                books["identify_ok"].clone(),
                books["rate_limited"].clone(),
                books["conflicts"].clone()
            ),
            (1.into(), 1.into(), 1.into()),
            "{books}"
        );
        assert_eq!(books["shards"][0]["owner"], serde_json::Value::Null);
        let kinds: Vec<&str> = books["log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["identify", "rate_limited", "release"]);
        assert_eq!(books["log"][1]["shard"], 2);
        assert_eq!(books["log"][1]["retry_after_ms"], limited["retry_after_ms"]);
        let (_, page) = get(&c, &url("/metrics")).await;
        for line in [
            "gateway_identify_ok_total 1\n",
            "gateway_rate_limited_total 1\n",
            "gateway_conflicts_total 1\n",
            "gateway_shards_held 0\n",
        ] {
            assert!(page.contains(line), "{line} not in {page}");
        }
        gw.stop().await.unwrap();
    }
}
