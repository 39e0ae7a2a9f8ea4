//! `serin demo-worker`: a queue worker to roll out in demos and tests, the non-HTTP cousin of
//! `serin demo-app`.
//!
//! serin's `hosts` traffic model rolls a share of a service's hosts to the canary in place, and
//! must judge services that serve no HTTP traffic by their own counters. This worker is such a
//! service: it "processes" jobs from an internal generator at `--rate` jobs per second, each
//! taking `--latency-ms` (±20% uniform jitter) and failing with probability `--fail-rate`. Jobs
//! run concurrently, so a slower version keeps the rate (at most [`MAX_IN_FLIGHT`] at once;
//! beyond that the jobs due wait, as in a queue).
//!
//! Its HTTP port carries no work, only:
//! - `GET /metrics`: OpenMetrics text with `worker_jobs_processed_total` (every finished job,
//!   failed ones included), `worker_jobs_failed_total`, the `worker_job_duration_seconds`
//!   histogram, `worker_info{version="…"} 1` and `process_start_time_seconds`. The agent reads
//!   it with `metrics = { requests = "worker_jobs_processed_total", errors =
//!   "worker_jobs_failed_total", latency = "worker_job_duration_seconds" }`;
//! - `GET /healthz`: `200 ok <version>`;
//! - `GET /admin`: `{"version", "rate", "fail_rate", "latency_ms"}`;
//! - `POST /admin` with `fail_rate=0.5` (a form, as `curl -d` sends) or `{"fail_rate": 0.5}`
//!   (JSON, as demo-app's `/admin` takes), and/or `latency_ms`: changes them at run time, so a
//!   demo can break the canary on purpose. Invalid input is a `400` naming the field, and
//!   changes nothing.
//!
//! [`bind`] then [`DemoWorker::serve`] (or [`run`], which does both). On shutdown the generator
//! stops, jobs still waiting out their latency finish at once (and are counted), and the HTTP
//! server drains as demo-app's does.
//!
//! The pacing is pure ([`jobs_due`] takes the elapsed time), so it is tested without a clock.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::demo_app::{
    LATENCY_BUCKETS, MAX_LATENCY_MS, bind_listener, check_latency_ms, check_share, check_version,
    jittered, metrics_page, serve_until, sleep_unless_stopped,
};

/// Highest accepted `--rate`, in jobs per second.
pub const MAX_RATE: f64 = 10_000.0;

/// Most jobs in progress at once; the jobs due beyond it wait for a free slot.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// How often the generator starts the jobs that have come due.
const TICK: Duration = Duration::from_millis(10);

/// Arguments of `serin demo-worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoWorkerArgs {
    /// Address to listen on (metrics, health and admin only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long)]
    pub port: u16,
    /// Version string shown in /healthz and the `worker_info` gauge.
    #[arg(long)]
    pub version: String,
    /// Jobs started per second (above 0, at most 10000).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Share of jobs that fail, between 0 and 1.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Mean time a job takes, in milliseconds (±20% jitter; at most 60000).
    #[arg(long, default_value_t = 5)]
    pub latency_ms: u64,
}

/// Binds and serves until `shutdown` completes.
pub async fn run(
    args: DemoWorkerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (addr, worker) = bind(args).await?;
    tracing::info!(%addr, "demo worker listening");
    worker.serve(shutdown).await
}

/// Validates `args` and binds the listening socket, without processing or serving yet, so the
/// caller learns the address (useful with `--port 0`). Start with [`DemoWorker::serve`].
pub async fn bind(args: DemoWorkerArgs) -> anyhow::Result<(SocketAddr, DemoWorker)> {
    let shared = Arc::new(Shared::new(&args, unix_now())?);
    let (addr, listener) = bind_listener(&args.host, args.port, "the demo worker").await?;
    Ok((addr, DemoWorker { listener, shared }))
}

/// A bound demo worker, neither processing nor serving yet.
pub struct DemoWorker {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl DemoWorker {
    /// Processes jobs and serves until `shutdown` completes, then stops the generator, lets the
    /// jobs in progress finish at once, and drains the HTTP server.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.shared.stop.clone();
        let generator = tokio::spawn(generate(self.shared.clone()));
        let served = serve_until(
            self.listener,
            router(self.shared),
            stop.clone(),
            shutdown,
            "the demo worker",
        )
        .await;
        // Also when serving failed: the generator must not outlive the worker.
        stop.cancel();
        generator
            .await
            .context("the demo worker's job generator panicked")?;
        served
    }
}

/// How many jobs to start now: those a steady `rate` per second would have started in
/// `elapsed`, less the `started` ones.
pub fn jobs_due(elapsed: Duration, rate: f64, started: u64) -> u64 {
    // Float-to-int `as` saturates; `rate` is validated positive and finite.
    let by_now = (elapsed.as_secs_f64() * rate).floor() as u64;
    by_now.saturating_sub(started)
}

/// Starts jobs at the configured rate until `stop`, then waits for those in progress.
async fn generate(shared: Arc<Shared>) {
    let begun = tokio::time::Instant::now();
    let mut started: u64 = 0;
    let mut jobs = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.stop.cancelled() => break,
        }
        while jobs.try_join_next().is_some() {}
        let due = jobs_due(begun.elapsed(), shared.rate, started);
        let room = MAX_IN_FLIGHT.saturating_sub(jobs.len()) as u64;
        for _ in 0..due.min(room) {
            jobs.spawn(process_job(shared.clone()));
            started += 1;
        }
    }
    while jobs.join_next().await.is_some() {}
}

/// One job: wait out its latency (cut short on shutdown), then count it.
async fn process_job(shared: Arc<Shared>) {
    let begun = Instant::now();
    let (delay, fail) = {
        let mut rng = rand::rng();
        let delay = jittered(shared.latency_ms(), &mut rng);
        // `random` is in [0, 1): rate 0 never fails, rate 1 always does.
        (delay, rng.random::<f64>() < shared.fail_rate())
    };
    sleep_unless_stopped(delay, &shared.stop).await;
    shared.record(fail, begun.elapsed());
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/admin", get(admin_get).post(admin_post))
        .with_state(shared)
}

/// State shared by the generator, the jobs and the handlers.
struct Shared {
    version: String,
    /// Jobs per second.
    rate: f64,
    /// `f64` bits.
    fail_rate: AtomicU64,
    latency_ms: AtomicU64,
    registry: Registry,
    processed: Counter,
    failed: Counter,
    duration: Histogram,
    /// Cancelled on shutdown: stops the generator and cuts job latencies short.
    stop: CancellationToken,
}

impl Shared {
    /// Checks `args` and builds the metrics; `started_unix` is `process_start_time_seconds`.
    fn new(args: &DemoWorkerArgs, started_unix: f64) -> anyhow::Result<Self> {
        if !(args.rate > 0.0 && args.rate <= MAX_RATE) {
            bail!(
                "--rate must be above 0 and at most {MAX_RATE} jobs per second, got {}",
                args.rate
            );
        }
        check_share("--fail-rate", args.fail_rate)?;
        check_latency_ms(args.latency_ms)?;
        check_version(&args.version)?;

        // Unlabelled: both counters are on the page from the start, at 0.
        let processed = Counter::default();
        let failed = Counter::default();
        let duration = Histogram::new(LATENCY_BUCKETS);
        let info = Family::<[(&'static str, String); 1], Gauge>::default();
        info.get_or_create(&[("version", args.version.clone())])
            .set(1);
        let process_start = Gauge::<f64, AtomicU64>::default();
        process_start.set(started_unix);
        let mut registry = Registry::default();
        // The encoder appends `_total` to counters.
        registry.register(
            "worker_jobs_processed",
            "Jobs processed, failed ones included",
            processed.clone(),
        );
        registry.register("worker_jobs_failed", "Jobs that failed", failed.clone());
        registry.register(
            "worker_job_duration_seconds",
            "Time to process a job, in seconds",
            duration.clone(),
        );
        registry.register("worker_info", "The version this worker runs", info);
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            process_start,
        );

        Ok(Self {
            version: args.version.clone(),
            rate: args.rate,
            fail_rate: AtomicU64::new(args.fail_rate.to_bits()),
            latency_ms: AtomicU64::new(args.latency_ms),
            registry,
            processed,
            failed,
            duration,
            stop: CancellationToken::new(),
        })
    }

    fn fail_rate(&self) -> f64 {
        f64::from_bits(self.fail_rate.load(Ordering::Relaxed))
    }

    fn latency_ms(&self) -> u64 {
        self.latency_ms.load(Ordering::Relaxed)
    }

    /// Counts a finished job. Processed goes up before failed, so no page shows more
    /// failures than jobs.
    fn record(&self, failed: bool, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        self.processed.inc();
        if failed {
            self.failed.inc();
        }
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "rate": self.rate,
            "fail_rate": self.fail_rate(),
            "latency_ms": self.latency_ms(),
        })
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    metrics_page(&shared.registry)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> String {
    format!("ok {}\n", shared.version)
}

async fn admin_get(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.settings_json()).into_response()
}

async fn admin_post(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    match parse_admin_update(&body, form) {
        Ok(update) => {
            if let Some(rate) = update.fail_rate {
                shared.fail_rate.store(rate.to_bits(), Ordering::Relaxed);
            }
            if let Some(ms) = update.latency_ms {
                shared.latency_ms.store(ms, Ordering::Relaxed);
            }
            tracing::info!(
                fail_rate = shared.fail_rate(),
                latency_ms = shared.latency_ms(),
                "demo worker settings changed"
            );
            axum::Json(shared.settings_json()).into_response()
        }
        Err(msg) => (axum::http::StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response(),
    }
}

/// A validated `POST /admin` body.
#[derive(Debug, Default, PartialEq)]
struct AdminUpdate {
    fail_rate: Option<f64>,
    latency_ms: Option<u64>,
}

const ADMIN_FIELDS: &str = "fail_rate, latency_ms";

/// Parses and validates a `POST /admin` body, a form (`fail_rate=0.5&latency_ms=20`) when
/// `form`, else a JSON object; the error message names the offending field.
fn parse_admin_update(body: &[u8], form: bool) -> Result<AdminUpdate, String> {
    let fields: Vec<(String, serde_json::Value)> = if form {
        form_fields(body)?
    } else {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
        let serde_json::Value::Object(object) = value else {
            return Err(r#"body must be a JSON object such as {"fail_rate": 0.5}"#.to_owned());
        };
        object.into_iter().collect()
    };
    let mut update = AdminUpdate::default();
    for (key, v) in fields {
        match key.as_str() {
            "fail_rate" => {
                let rate = v
                    .as_f64()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("fail_rate must be a number between 0 and 1, got {v}")
                    })?;
                update.fail_rate = Some(rate);
            }
            "latency_ms" => {
                let ms = v
                    .as_u64()
                    .filter(|ms| *ms <= MAX_LATENCY_MS)
                    .ok_or_else(|| {
                        format!(
                            "latency_ms must be an integer between 0 and {MAX_LATENCY_MS}, got {v}"
                        )
                    })?;
                update.latency_ms = Some(ms);
            }
            other => {
                return Err(format!("unknown field '{other}' (expected {ADMIN_FIELDS})"));
            }
        }
    }
    if update == AdminUpdate::default() {
        return Err(format!("expected at least one of {ADMIN_FIELDS}"));
    }
    Ok(update)
}

/// `key=value&…` pairs, each value read as a JSON scalar when it is one (`0.5`, `20`) and as
/// a string otherwise, so the JSON and form bodies share one validation. The fields are
/// numbers, so no percent-decoding is needed: an encoded name is an unknown field.
fn form_fields(body: &[u8]) -> Result<Vec<(String, serde_json::Value)>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "form body is not UTF-8 text".to_owned())?;
    text.trim()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("form field '{pair}' has no value (expected name=value)"))?;
            let value = serde_json::from_str::<serde_json::Value>(value)
                .ok()
                .filter(|v| v.is_number())
                .unwrap_or_else(|| serde_json::Value::String(value.to_owned()));
            Ok((key.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_app::test_support::{Running, client, get, post_admin, post_admin_as};

    use serin_agent::collect::{DeltaTracker, MetricNames, Sample, Window, parse_sample};

    const FORM: &str = "application/x-www-form-urlencoded";

    fn args(rate: f64, fail_rate: f64, latency_ms: u64) -> DemoWorkerArgs {
        DemoWorkerArgs {
            host: "127.0.0.1".into(),
            port: 0,
            version: "v2.0.1".into(),
            rate,
            fail_rate,
            latency_ms,
        }
    }

    /// What the agent's config says for this worker.
    fn names() -> MetricNames {
        MetricNames {
            requests: "worker_jobs_processed_total".into(),
            errors: Some("worker_jobs_failed_total".into()),
            latency: "worker_job_duration_seconds".into(),
            ..MetricNames::default()
        }
    }

    impl Running {
        async fn start_worker(args: DemoWorkerArgs) -> Self {
            let (addr, worker) = bind(args).await.unwrap();
            Running::spawn(addr, |shutdown| worker.serve(shutdown))
        }
    }

    async fn scrape(c: &reqwest::Client, base: &str) -> Sample {
        let (status, page) = get(c, &format!("{base}/metrics")).await;
        assert_eq!(status, 200, "{page}");
        parse_sample(&page, &names()).unwrap()
    }

    /// Scrapes until at least `jobs` more jobs than in `from` are processed (10 s at most).
    async fn scrape_after(c: &reqwest::Client, base: &str, from: &Sample, jobs: f64) -> Sample {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = scrape(c, base).await;
            if s.total_requests() >= from.total_requests() + jobs {
                return s;
            }
            assert!(Instant::now() < deadline, "fewer than {jobs} jobs in 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The agent's window between two scrapes.
    fn window(before: &Sample, after: &Sample) -> Window {
        let mut t = DeltaTracker::default();
        assert_eq!(t.observe(before.clone()), None);
        t.observe(after.clone()).unwrap()
    }

    #[test]
    fn jobs_come_due_at_the_rate_from_the_elapsed_time() {
        assert_eq!(jobs_due(Duration::ZERO, 50.0, 0), 0);
        assert_eq!(jobs_due(Duration::from_millis(19), 50.0, 0), 0);
        assert_eq!(jobs_due(Duration::from_millis(20), 50.0, 0), 1);
        assert_eq!(jobs_due(Duration::from_secs(1), 50.0, 0), 50);
        assert_eq!(jobs_due(Duration::from_secs(1), 50.0, 45), 5);
        // Started more than due (never happens, but must not wrap).
        assert_eq!(jobs_due(Duration::from_millis(500), 50.0, 30), 0);
        // A fractional rate: one job every 2 s.
        assert_eq!(jobs_due(Duration::from_millis(3_999), 0.5, 1), 0);
        assert_eq!(jobs_due(Duration::from_secs(4), 0.5, 1), 1);
    }

    #[test]
    fn recorded_jobs_show_on_the_page_as_the_agent_reads_it() {
        let shared = Shared::new(&args(50.0, 0.0, 5), 1_700_000_000.5).unwrap();
        let page = |shared: &Shared| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &shared.registry).unwrap();
            text
        };
        // Before any job: both counters exist at 0, so the agent has a baseline.
        let empty = parse_sample(&page(&shared), &names()).unwrap();
        assert_eq!((empty.total_requests(), empty.total_errors()), (0.0, 0.0));

        shared.record(false, Duration::from_millis(3));
        shared.record(true, Duration::from_millis(30));
        shared.record(false, Duration::from_millis(7));
        let text = page(&shared);
        assert!(text.contains("worker_jobs_processed_total 3\n"), "{text}");
        assert!(text.contains("worker_jobs_failed_total 1\n"), "{text}");
        assert!(
            text.contains("worker_info{version=\"v2.0.1\"} 1\n"),
            "{text}"
        );
        let s = parse_sample(&text, &names()).unwrap();
        assert_eq!((s.total_requests(), s.total_errors()), (3.0, 1.0));
        assert_eq!(s.process_start, Some(1_700_000_000.5));
        let buckets = s.total_buckets();
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(buckets[0], (0.005, 1.0));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 3.0)));
        assert!((s.total_latency_sum() - 0.040).abs() < 1e-9, "{s:?}");
    }

    #[tokio::test]
    async fn the_worker_processes_jobs_at_its_rate_and_counts_every_failure() {
        let worker = Running::start_worker(args(500.0, 1.0, 0)).await;
        let c = client();
        let first = scrape(&c, &worker.base).await;
        let later = scrape_after(&c, &worker.base, &first, 50.0).await;
        let w = window(&first, &later);
        assert!(w.requests >= 50, "{w:?}");
        assert_eq!(w.errors, w.requests, "fail_rate 1 fails every job");
        assert_eq!(w.buckets.last().map(|b| b.1), Some(w.requests));
        // Health and settings show the version; neither counts as work.
        assert_eq!(
            get(&c, &format!("{}/healthz", worker.base)).await,
            (200, "ok v2.0.1\n".to_owned())
        );
        let (_, body) = get(&c, &format!("{}/admin", worker.base)).await;
        let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            settings,
            serde_json::json!({"version": "v2.0.1", "rate": 500.0, "fail_rate": 1.0, "latency_ms": 0})
        );
        worker.stop().await.unwrap();
    }

    #[tokio::test]
    async fn admin_changes_the_fail_rate_live_by_form_or_json() {
        let worker = Running::start_worker(args(500.0, 0.0, 0)).await;
        let c = client();
        let start = scrape(&c, &worker.base).await;
        let healthy = scrape_after(&c, &worker.base, &start, 20.0).await;
        let w = window(&start, &healthy);
        assert_eq!(w.errors, 0, "{w:?}");

        // `curl -d fail_rate=1` sends a form. Jobs decide and count in one step, so every job
        // counted after the answer failed.
        let (status, body) = post_admin_as(&c, &worker.base, FORM, "fail_rate=1").await;
        assert_eq!(status, 200, "{body}");
        let broken_from = scrape(&c, &worker.base).await;
        let broken = scrape_after(&c, &worker.base, &broken_from, 20.0).await;
        let w = window(&broken_from, &broken);
        assert_eq!(w.errors, w.requests, "{w:?}");

        let (status, body) = post_admin(&c, &worker.base, r#"{"fail_rate": 0}"#).await;
        assert_eq!(status, 200, "{body}");
        let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(settings["fail_rate"], 0.0);
        let fixed_from = scrape(&c, &worker.base).await;
        let fixed = scrape_after(&c, &worker.base, &fixed_from, 20.0).await;
        let w = window(&fixed_from, &fixed);
        assert_eq!((w.errors, w.requests >= 20), (0, true), "{w:?}");
        worker.stop().await.unwrap();
    }

    #[tokio::test]
    async fn bad_admin_input_is_400_naming_the_field_and_changes_nothing() {
        let worker = Running::start_worker(args(1.0, 0.25, 0)).await;
        let c = client();
        let json = "application/json";
        let cases = [
            (
                json,
                r#"{"fail_rate": 1.5}"#,
                "fail_rate must be a number between 0 and 1",
            ),
            (json, r#"{"fail_rate": "high"}"#, "fail_rate"),
            (
                json,
                r#"{"fail_rate": 0.9, "latency_ms": 60001}"#,
                "latency_ms",
            ),
            (json, r#"{"error_rate": 0.9}"#, "unknown field 'error_rate'"),
            (json, "{}", "at least one"),
            (json, "[0.5]", "JSON object"),
            (json, "fail_rate=0.5", "not valid JSON"),
            (
                FORM,
                "fail_rate=-0.1",
                "fail_rate must be a number between 0 and 1, got -0.1",
            ),
            (
                FORM,
                "fail_rate=lots",
                "fail_rate must be a number between 0 and 1, got \"lots\"",
            ),
            (FORM, "fail_rate=0.5&latency_ms=1.5", "latency_ms"),
            (FORM, "fail_rate", "form field 'fail_rate' has no value"),
            (FORM, "", "at least one"),
        ];
        for (content_type, body, needle) in cases {
            let (status, msg) = post_admin_as(&c, &worker.base, content_type, body).await;
            assert_eq!(status, 400, "{body} -> {msg}");
            assert!(msg.contains(needle), "{body} -> {msg}");
        }
        let (_, body) = get(&c, &format!("{}/admin", worker.base)).await;
        let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (
                settings["fail_rate"].clone(),
                settings["latency_ms"].clone()
            ),
            (0.25.into(), 0.into())
        );
        worker.stop().await.unwrap();
    }

    #[test]
    fn admin_update_parsing_reads_forms_and_json_alike() {
        let both = AdminUpdate {
            fail_rate: Some(0.5),
            latency_ms: Some(20),
        };
        assert_eq!(
            parse_admin_update(b"fail_rate=0.5&latency_ms=20", true),
            Ok(both)
        );
        assert_eq!(
            parse_admin_update(br#"{"latency_ms": 20, "fail_rate": 0.5}"#, false),
            Ok(AdminUpdate {
                fail_rate: Some(0.5),
                latency_ms: Some(20),
            })
        );
        assert_eq!(
            parse_admin_update(b"fail_rate=1\n", true),
            Ok(AdminUpdate {
                fail_rate: Some(1.0),
                ..AdminUpdate::default()
            })
        );
        assert!(parse_admin_update(b"latency_ms=60000", true).is_ok());
        assert!(parse_admin_update(b"latency_ms=60001", true).is_err());
    }

    #[tokio::test]
    async fn invalid_args_name_the_flag() {
        for (a, flag) in [
            (args(0.0, 0.0, 5), "--rate"),
            (args(-1.0, 0.0, 5), "--rate"),
            (args(f64::NAN, 0.0, 5), "--rate"),
            (args(MAX_RATE + 1.0, 0.0, 5), "--rate"),
            (args(50.0, 1.5, 5), "--fail-rate"),
            (args(50.0, f64::NAN, 5), "--fail-rate"),
            (args(50.0, 0.0, MAX_LATENCY_MS + 1), "--latency-ms"),
            (
                DemoWorkerArgs {
                    version: String::new(),
                    ..args(50.0, 0.0, 5)
                },
                "--version",
            ),
            (
                DemoWorkerArgs {
                    version: "v1\nv2".into(),
                    ..args(50.0, 0.0, 5)
                },
                "--version",
            ),
        ] {
            let err = match bind(a).await {
                Ok(_) => panic!("expected an error mentioning {flag}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(flag), "{err}");
        }
    }

    #[tokio::test]
    async fn shutdown_stops_promptly_with_slow_jobs_in_progress() {
        let worker = Running::start_worker(args(200.0, 0.0, MAX_LATENCY_MS)).await;
        let c = client();
        // Let some jobs start; none can finish for a minute.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(scrape(&c, &worker.base).await.total_requests(), 0.0);
        let start = Instant::now();
        worker.stop().await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
