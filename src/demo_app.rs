//! `serin demo-app`: a tiny HTTP service to roll out in demos and tests.
//!
//! Every path except the special ones below is "the app": it waits `latency_ms` (±20% uniform
//! jitter), then answers `500` with probability `error_rate`, else `200`, with body
//! `"<version>\n"` and header `x-serin-version: <version>`.
//!
//! Special paths (not counted in the metrics):
//! - `GET /metrics`: Prometheus/OpenMetrics text with `http_requests_total{code="200"|"500"}`
//!   and the `http_request_duration_seconds` histogram, the names serin's agent reads by default,
//!   plus the `http_requests_in_flight` gauge;
//! - `GET /healthz`: `200 ok`, or `503 unhealthy` when started with `--unhealthy` (a canary that
//!   never becomes healthy, for tests of health gates);
//! - `GET /admin`: `{"version", "error_rate", "latency_ms", "metrics_scrapes",
//!   "last_scrape_unix_ms"}`: the last two count the `GET /metrics` requests served and give
//!   the wall-clock time (Unix milliseconds, 0 before the first) of the latest one, so a
//!   benchmark can tell when a scraper first saw a change;
//! - `POST /admin` with `{"error_rate": 0.5}` and/or `{"latency_ms": 200}`: changes them at run
//!   time, so a demo can break the canary on purpose. Invalid input is a `400` naming the field,
//!   and changes nothing;
//! - `POST /smoke`: a smoke test for rollout hooks (`[[hooks]]` with `url` pointing here). It
//!   waits `smoke_latency_ms`, then answers `200 smoke ok: <version>`, or `500 smoke failed:
//!   <reason>` after `POST /admin` with `{"smoke_fail": "<reason>"}` (`{"smoke_fail": null}`
//!   makes it pass again). `GET /admin` counts the calls (`smoke_calls`) and shows the body of
//!   the latest (`last_smoke_body`, the hook's JSON payload), so tests can see what a hook sent.
//!
//! [`bind`] then [`DemoApp::serve`] (or [`run`], which does both). On shutdown, requests still
//! waiting out their latency are answered at once, the server drains, and after
//! [`SHUTDOWN_GRACE`] it stops waiting for connections that have not finished.
//!
//! `serin demo-worker` (`demo_worker.rs`) shares the plumbing: argument checks, binding,
//! serving with the grace period, latency jitter and the metrics page are `pub(crate)` here.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest accepted `latency_ms`, on the command line and through `POST /admin`.
pub const MAX_LATENCY_MS: u64 = 60_000;

/// Longest `smoke_fail` reason accepted through `POST /admin`, in bytes.
pub const MAX_SMOKE_REASON: usize = 200;

/// Most of a smoke request's body kept for `GET /admin`, in bytes.
const SMOKE_BODY_KEPT: usize = 4096;

/// How long [`DemoApp::serve`] waits for open connections after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bucket bounds of `http_request_duration_seconds`.
pub(crate) const LATENCY_BUCKETS: [f64; 10] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

const VERSION_HEADER: HeaderName = HeaderName::from_static("x-serin-version");

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Arguments of `serin demo-app`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoAppArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long)]
    pub port: u16,
    /// Version string returned in every answer.
    #[arg(long)]
    pub version: String,
    /// Share of requests answered with 500, between 0 and 1.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Mean time to answer, in milliseconds (±20% jitter; at most 60000).
    #[arg(long, default_value_t = 5)]
    pub latency_ms: u64,
    /// Answer `/healthz` with 503 (everything else unchanged): a canary that never becomes
    /// healthy.
    #[arg(long)]
    pub unhealthy: bool,
}

/// Binds and serves until `shutdown` completes.
pub async fn run(
    args: DemoAppArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (addr, app) = bind(args).await?;
    tracing::info!(%addr, "demo app listening");
    app.serve(shutdown).await
}

/// Validates `args` and binds the listening socket, without serving yet, so the caller learns
/// the address (useful with `--port 0`) before any request can arrive. Serve with
/// [`DemoApp::serve`].
pub async fn bind(args: DemoAppArgs) -> anyhow::Result<(SocketAddr, DemoApp)> {
    let shared = Arc::new(Shared::new(&args)?);
    let (addr, listener) = bind_listener(&args.host, args.port, "the demo app").await?;
    Ok((addr, DemoApp { listener, shared }))
}

/// Binds `host:port`; errors name `what` (e.g. "the demo app") and the address.
pub(crate) async fn bind_listener(
    host: &str,
    port: u16,
    what: &str,
) -> anyhow::Result<(SocketAddr, TcpListener)> {
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding {what} to {host}:{port}"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("reading {what}'s bound address"))?;
    Ok((addr, listener))
}

/// Serves `router` on `listener` until `shutdown` completes, then cancels `stop` (which cuts
/// latency sleeps short) and drains; connections still open after [`SHUTDOWN_GRACE`] are
/// abandoned. `what` names the server in errors and logs.
pub(crate) async fn serve_until(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
    what: &str,
) -> anyhow::Result<()> {
    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .into_future();
    tokio::select! {
        res = server => res.with_context(|| format!("serving {what}"))?,
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!(grace = ?SHUTDOWN_GRACE, "{what}: connections still open after the grace period; stopping anyway"),
    }
    Ok(())
}

/// Checks a `--version` flag: non-empty, usable as a header value (printable ASCII).
pub(crate) fn check_version(version: &str) -> anyhow::Result<HeaderValue> {
    if version.is_empty() {
        bail!("--version must not be empty");
    }
    HeaderValue::from_str(version).map_err(|_| {
        anyhow::anyhow!(
            "--version must be printable ASCII without control characters, got {version:?}"
        )
    })
}

/// Checks a `--latency-ms` flag against [`MAX_LATENCY_MS`].
pub(crate) fn check_latency_ms(latency_ms: u64) -> anyhow::Result<()> {
    if latency_ms > MAX_LATENCY_MS {
        bail!("--latency-ms must be at most {MAX_LATENCY_MS}, got {latency_ms}");
    }
    Ok(())
}

/// Checks a rate flag (`flag` names it) is a share between 0 and 1.
pub(crate) fn check_share(flag: &str, value: f64) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&value) {
        bail!("{flag} must be between 0 and 1, got {value}");
    }
    Ok(())
}

/// `latency_ms` with ±20% uniform jitter.
pub(crate) fn jittered(latency_ms: u64, rng: &mut impl Rng) -> Duration {
    let jitter: f64 = rng.random_range(0.8..=1.2);
    Duration::from_secs_f64(latency_ms as f64 * jitter / 1000.0)
}

/// Sleeps `delay`, or less if `stop` is cancelled first.
pub(crate) async fn sleep_unless_stopped(delay: Duration, stop: &CancellationToken) {
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => {}
        }
    }
}

/// `registry` as an OpenMetrics text page (a 500 if it cannot be encoded).
pub(crate) fn metrics_page(registry: &Registry) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

/// A bound demo app, not serving yet.
pub struct DemoApp {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl DemoApp {
    /// Serves until `shutdown` completes, then drains: requests waiting out their latency are
    /// answered at once, and connections still open after [`SHUTDOWN_GRACE`] are abandoned.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.shared.stop.clone();
        serve_until(
            self.listener,
            router(self.shared),
            stop,
            shutdown,
            "the demo app",
        )
        .await
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/admin", get(admin_get).post(admin_post))
        .route("/smoke", post(smoke))
        .fallback(app_request)
        .with_state(shared)
}

/// State shared by the handlers.
struct Shared {
    version: String,
    version_header: HeaderValue,
    /// `--unhealthy`: `/healthz` answers 503.
    unhealthy: bool,
    /// `f64` bits.
    error_rate: AtomicU64,
    latency_ms: AtomicU64,
    registry: Registry,
    ok: Counter,
    failed: Counter,
    duration: Histogram,
    in_flight: Gauge,
    /// `GET /metrics` requests served.
    metrics_scrapes: AtomicU64,
    /// Unix time in milliseconds of the latest `GET /metrics` (0: none yet).
    last_scrape_unix_ms: AtomicU64,
    /// Cancelled on shutdown: cuts latency sleeps short.
    stop: CancellationToken,
    /// Smoke test state (`POST /smoke`).
    smoke: Mutex<Smoke>,
    /// `POST /smoke` requests received.
    smoke_calls: AtomicU64,
}

/// How `POST /smoke` answers, and what it last received.
#[derive(Debug, Default)]
struct Smoke {
    /// `Some(reason)`: answer 500 with it.
    fail: Option<String>,
    latency_ms: u64,
    last_body: Option<String>,
}

impl Shared {
    fn new(args: &DemoAppArgs) -> anyhow::Result<Self> {
        check_share("--error-rate", args.error_rate)?;
        check_latency_ms(args.latency_ms)?;
        let version_header = check_version(&args.version)?;

        let requests = Family::<[(&'static str, &'static str); 1], Counter>::default();
        // Both series exist from the start, so a scraper finds the metric before any traffic.
        let ok = requests.get_or_create_owned(&[("code", "200")]);
        let failed = requests.get_or_create_owned(&[("code", "500")]);
        let duration = Histogram::new(LATENCY_BUCKETS);
        let in_flight = Gauge::default();
        let mut registry = Registry::default();
        // The encoder appends `_total` to counters.
        registry.register(
            "http_requests",
            "HTTP requests handled, by status code",
            requests,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests, in seconds",
            duration.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being handled now",
            in_flight.clone(),
        );

        Ok(Self {
            version: args.version.clone(),
            version_header,
            unhealthy: args.unhealthy,
            error_rate: AtomicU64::new(args.error_rate.to_bits()),
            latency_ms: AtomicU64::new(args.latency_ms),
            registry,
            ok,
            failed,
            duration,
            in_flight,
            metrics_scrapes: AtomicU64::new(0),
            last_scrape_unix_ms: AtomicU64::new(0),
            stop: CancellationToken::new(),
            smoke: Mutex::new(Smoke::default()),
            smoke_calls: AtomicU64::new(0),
        })
    }

    fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate.load(Ordering::Relaxed))
    }

    fn latency_ms(&self) -> u64 {
        self.latency_ms.load(Ordering::Relaxed)
    }

    fn smoke(&self) -> std::sync::MutexGuard<'_, Smoke> {
        self.smoke.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settings_json(&self) -> serde_json::Value {
        let smoke = self.smoke();
        serde_json::json!({
            "smoke_fail": smoke.fail,
            "smoke_latency_ms": smoke.latency_ms,
            "smoke_calls": self.smoke_calls.load(Ordering::Relaxed),
            "last_smoke_body": smoke.last_body,
            "version": self.version,
            "error_rate": self.error_rate(),
            "latency_ms": self.latency_ms(),
            "metrics_scrapes": self.metrics_scrapes.load(Ordering::Relaxed),
            "last_scrape_unix_ms": self.last_scrape_unix_ms.load(Ordering::Relaxed),
        })
    }
}

/// Any path but the special ones.
async fn app_request(State(shared): State<Arc<Shared>>) -> Response {
    let start = Instant::now();
    let _in_flight = InFlight::enter(&shared.in_flight);
    let (delay, fail) = {
        let mut rng = rand::rng();
        let delay = jittered(shared.latency_ms(), &mut rng);
        // `random` is in [0, 1): rate 0 never fails, rate 1 always does.
        (delay, rng.random::<f64>() < shared.error_rate())
    };
    sleep_unless_stopped(delay, &shared.stop).await;
    let status = if fail {
        shared.failed.inc();
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        shared.ok.inc();
        StatusCode::OK
    };
    shared.duration.observe(start.elapsed().as_secs_f64());
    (
        status,
        [(VERSION_HEADER, shared.version_header.clone())],
        format!("{}\n", shared.version),
    )
        .into_response()
}

/// Counts a request in `http_requests_in_flight` until dropped, even if the client goes away.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    shared.last_scrape_unix_ms.store(now_ms, Ordering::Relaxed);
    shared.metrics_scrapes.fetch_add(1, Ordering::Relaxed);
    metrics_page(&shared.registry)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.unhealthy {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

/// `POST /smoke`: waits `smoke_latency_ms`, then passes or fails as told through `/admin`.
async fn smoke(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.smoke_calls.fetch_add(1, Ordering::Relaxed);
    let latency = {
        let mut smoke = shared.smoke();
        let kept = &body[..body.len().min(SMOKE_BODY_KEPT)];
        smoke.last_body = Some(String::from_utf8_lossy(kept).into_owned());
        Duration::from_millis(smoke.latency_ms)
    };
    sleep_unless_stopped(latency, &shared.stop).await;
    let fail = shared.smoke().fail.clone();
    match fail {
        Some(reason) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("smoke failed: {reason}\n"),
        )
            .into_response(),
        None => (StatusCode::OK, format!("smoke ok: {}\n", shared.version)).into_response(),
    }
}

async fn admin_get(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.settings_json()).into_response()
}

async fn admin_post(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_admin_update(&body) {
        Ok(update) => {
            if let Some(rate) = update.error_rate {
                shared.error_rate.store(rate.to_bits(), Ordering::Relaxed);
            }
            if let Some(ms) = update.latency_ms {
                shared.latency_ms.store(ms, Ordering::Relaxed);
            }
            {
                let mut smoke = shared.smoke();
                if let Some(fail) = update.smoke_fail.clone() {
                    smoke.fail = fail;
                }
                if let Some(ms) = update.smoke_latency_ms {
                    smoke.latency_ms = ms;
                }
            }
            tracing::info!(
                error_rate = shared.error_rate(),
                latency_ms = shared.latency_ms(),
                "demo app settings changed"
            );
            axum::Json(shared.settings_json()).into_response()
        }
        Err(msg) => (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response(),
    }
}

/// A validated `POST /admin` body.
#[derive(Debug, Default, PartialEq)]
struct AdminUpdate {
    error_rate: Option<f64>,
    latency_ms: Option<u64>,
    /// `Some(Some(reason))`: the smoke endpoint fails; `Some(None)`: it passes again.
    smoke_fail: Option<Option<String>>,
    smoke_latency_ms: Option<u64>,
}

const ADMIN_FIELDS: &str = "error_rate, latency_ms, smoke_fail, smoke_latency_ms";

/// Parses and validates a `POST /admin` body; the error message names the offending field.
fn parse_admin_update(body: &[u8]) -> Result<AdminUpdate, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let fields = value
        .as_object()
        .ok_or(r#"body must be a JSON object such as {"error_rate": 0.5}"#)?;
    let mut update = AdminUpdate::default();
    for (key, v) in fields {
        match key.as_str() {
            "error_rate" => {
                let rate = v
                    .as_f64()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("error_rate must be a number between 0 and 1, got {v}")
                    })?;
                update.error_rate = Some(rate);
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
            "smoke_fail" => {
                let reason = match v {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(r)
                        if !r.trim().is_empty() && r.len() <= MAX_SMOKE_REASON =>
                    {
                        Some(r.clone())
                    }
                    _ => {
                        return Err(format!(
                            "smoke_fail must be a reason of 1 to {MAX_SMOKE_REASON} bytes (the smoke test fails with it) or null (it passes), got {v}"
                        ));
                    }
                };
                update.smoke_fail = Some(reason);
            }
            "smoke_latency_ms" => {
                let ms = v
                    .as_u64()
                    .filter(|ms| *ms <= MAX_LATENCY_MS)
                    .ok_or_else(|| {
                        format!(
                            "smoke_latency_ms must be an integer between 0 and {MAX_LATENCY_MS}, got {v}"
                        )
                    })?;
                update.smoke_latency_ms = Some(ms);
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

/// Test helpers shared with `demo_worker.rs`'s tests: a server running on a task, and an
/// HTTP client without proxies.
#[cfg(test)]
pub(crate) mod test_support {
    use std::future::Future;
    use std::net::SocketAddr;

    /// A running server, stopped when dropped... or explicitly, to check shutdown.
    pub(crate) struct Running {
        pub(crate) base: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Running {
        /// Runs `serve(shutdown)` on a task; `addr` is where it listens.
        pub(crate) fn spawn<F, S>(addr: SocketAddr, serve: S) -> Self
        where
            S: FnOnce(futures::future::BoxFuture<'static, ()>) -> F,
            F: Future<Output = anyhow::Result<()>> + Send + 'static,
        {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(Box::pin(async move {
                let _ = rx.await;
            })));
            Self {
                base: format!("http://{addr}"),
                stop: Some(tx),
                task,
            }
        }

        /// Signals shutdown and waits for the server to finish.
        pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            (&mut self.task).await.unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    pub(crate) fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    pub(crate) async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
        let resp = c.get(url).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// `POST <base>/admin` with `body` sent as `content_type`.
    pub(crate) async fn post_admin_as(
        c: &reqwest::Client,
        base: &str,
        content_type: &str,
        body: &str,
    ) -> (u16, String) {
        let resp = c
            .post(format!("{base}/admin"))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// `POST <base>/admin` with a JSON `body`.
    pub(crate) async fn post_admin(c: &reqwest::Client, base: &str, body: &str) -> (u16, String) {
        post_admin_as(c, base, "application/json", body).await
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{Running, client, get, post_admin};
    use super::*;

    use serin_agent::collect::{MetricNames, parse_sample};

    fn args(error_rate: f64, latency_ms: u64) -> DemoAppArgs {
        DemoAppArgs {
            host: "127.0.0.1".into(),
            port: 0,
            version: "v1.2.3".into(),
            error_rate,
            latency_ms,
            unhealthy: false,
        }
    }

    impl Running {
        async fn start(args: DemoAppArgs) -> Self {
            let (addr, app) = bind(args).await.unwrap();
            Running::spawn(addr, |shutdown| app.serve(shutdown))
        }
    }

    #[tokio::test]
    async fn unhealthy_answers_503_on_healthz_and_serves_the_app_as_usual() {
        let app = Running::start(DemoAppArgs {
            unhealthy: true,
            ..args(0.0, 0)
        })
        .await;
        let c = client();
        assert_eq!(
            get(&c, &format!("{}/healthz", app.base)).await,
            (503, "unhealthy\n".to_owned())
        );
        assert_eq!(
            get(&c, &format!("{}/", app.base)).await,
            (200, "v1.2.3\n".to_owned())
        );
        let (status, page) = get(&c, &format!("{}/metrics", app.base)).await;
        assert_eq!(status, 200);
        let sample = parse_sample(&page, &MetricNames::default()).unwrap();
        assert_eq!(sample.total_requests(), 1.0);
        app.stop().await.unwrap();

        let healthy = Running::start(args(0.0, 0)).await;
        assert_eq!(
            get(&c, &format!("{}/healthz", healthy.base)).await,
            (200, "ok\n".to_owned())
        );
        healthy.stop().await.unwrap();
    }

    #[tokio::test]
    async fn metrics_count_exactly_the_app_requests() {
        let app = Running::start(args(0.5, 0)).await;
        let c = client();
        let (mut ok, mut failed) = (0u64, 0u64);
        for i in 0..40 {
            let path = ["/", "/orders", "/a/b?c=d"][i % 3];
            let resp = c.get(format!("{}{path}", app.base)).send().await.unwrap();
            assert_eq!(resp.headers()["x-serin-version"], "v1.2.3");
            match resp.status().as_u16() {
                200 => ok += 1,
                500 => failed += 1,
                s => panic!("unexpected status {s}"),
            }
            assert_eq!(resp.text().await.unwrap(), "v1.2.3\n");
        }
        // Neither of these count.
        assert_eq!(get(&c, &format!("{}/healthz", app.base)).await.0, 200);
        assert_eq!(get(&c, &format!("{}/admin", app.base)).await.0, 200);
        assert_eq!(get(&c, &format!("{}/metrics", app.base)).await.0, 200);

        let (status, page) = get(&c, &format!("{}/metrics", app.base)).await;
        assert_eq!(status, 200);
        assert!(
            page.contains(&format!("http_requests_total{{code=\"200\"}} {ok}")),
            "{page}"
        );
        assert!(
            page.contains(&format!("http_requests_total{{code=\"500\"}} {failed}")),
            "{page}"
        );
        // And the agent's parser reads it the same way.
        let sample = parse_sample(&page, &MetricNames::default()).unwrap();
        assert_eq!(sample.total_requests(), 40.0);
        assert_eq!(sample.total_errors(), failed as f64);
        let bounds: Vec<f64> = sample.total_buckets().iter().map(|b| b.0).collect();
        let mut expected = LATENCY_BUCKETS.to_vec();
        expected.push(f64::INFINITY);
        assert_eq!(bounds, expected);
        assert_eq!(sample.total_buckets().last().unwrap().1, 40.0);

        // GET /admin counts the two /metrics scrapes above and dates the latest one.
        let before_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(get(&c, &format!("{}/metrics", app.base)).await.0, 200);
        let (_, body) = get(&c, &format!("{}/admin", app.base)).await;
        let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(settings["metrics_scrapes"], 3, "{settings}");
        let last = settings["last_scrape_unix_ms"].as_u64().unwrap();
        assert!(
            last >= before_ms && last < before_ms + 10_000,
            "{last} vs {before_ms}"
        );
        app.stop().await.unwrap();
    }

    #[tokio::test]
    async fn metrics_exist_before_any_traffic() {
        let app = Running::start(args(0.0, 0)).await;
        let (_, page) = get(&client(), &format!("{}/metrics", app.base)).await;
        let sample = parse_sample(&page, &MetricNames::default()).unwrap();
        assert_eq!((sample.total_requests(), sample.total_errors()), (0.0, 0.0));
        app.stop().await.unwrap();
    }

    #[tokio::test]
    async fn admin_changes_error_rate_and_latency_at_run_time() {
        let app = Running::start(args(0.0, 0)).await;
        let c = client();
        for _ in 0..5 {
            assert_eq!(get(&c, &format!("{}/", app.base)).await.0, 200);
        }

        let (status, body) = post_admin(&c, &app.base, r#"{"error_rate": 1.0}"#).await;
        assert_eq!(status, 200, "{body}");
        for _ in 0..20 {
            assert_eq!(get(&c, &format!("{}/x", app.base)).await.0, 500);
        }
        let (_, body) = get(&c, &format!("{}/admin", app.base)).await;
        let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            settings,
            serde_json::json!({
                "version": "v1.2.3",
                "error_rate": 1.0,
                "latency_ms": 0,
                "metrics_scrapes": 0,
                "last_scrape_unix_ms": 0,
                "smoke_fail": null,
                "smoke_latency_ms": 0,
                "smoke_calls": 0,
                "last_smoke_body": null,
            })
        );

        let (status, body) =
            post_admin(&c, &app.base, r#"{"error_rate": 0, "latency_ms": 200}"#).await;
        assert_eq!(status, 200, "{body}");
        let start = Instant::now();
        assert_eq!(get(&c, &format!("{}/", app.base)).await.0, 200);
        assert!(
            start.elapsed() >= Duration::from_millis(160),
            "{:?}",
            start.elapsed()
        );
        app.stop().await.unwrap();
    }

    #[tokio::test]
    async fn bad_admin_input_is_400_naming_the_field_and_changes_nothing() {
        let app = Running::start(args(0.25, 0)).await;
        let c = client();
        let cases = [
            (r#"{"error_rate": 1.5}"#, "error_rate"),
            (r#"{"error_rate": -0.1}"#, "error_rate"),
            (r#"{"error_rate": "high"}"#, "error_rate"),
            (r#"{"latency_ms": 60001}"#, "latency_ms"),
            (r#"{"latency_ms": -5}"#, "latency_ms"),
            (r#"{"latency_ms": 1.5}"#, "latency_ms"),
            // Valid error_rate, invalid latency: neither is applied.
            (r#"{"error_rate": 0.9, "latency_ms": 999999}"#, "latency_ms"),
            (r#"{"eror_rate": 0.9}"#, "eror_rate"),
            (r#"{}"#, "at least one"),
            (r#"[0.5]"#, "JSON object"),
            ("error_rate=0.5", "not valid JSON"),
        ];
        for (body, needle) in cases {
            let (status, msg) = post_admin(&c, &app.base, body).await;
            assert_eq!(status, 400, "{body} -> {msg}");
            assert!(msg.contains(needle), "{body} -> {msg}");
        }
        let (_, body) = get(&c, &format!("{}/admin", app.base)).await;
        let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(settings["error_rate"], 0.25);
        assert_eq!(settings["latency_ms"], 0);
        app.stop().await.unwrap();
    }

    #[tokio::test]
    async fn invalid_args_name_the_flag() {
        for (a, flag) in [
            (args(1.5, 5), "--error-rate"),
            (args(-0.1, 5), "--error-rate"),
            (args(f64::NAN, 5), "--error-rate"),
            (args(0.0, MAX_LATENCY_MS + 1), "--latency-ms"),
            (
                DemoAppArgs {
                    version: "v1\nv2".into(),
                    ..args(0.0, 5)
                },
                "--version",
            ),
            (
                DemoAppArgs {
                    version: String::new(),
                    ..args(0.0, 5)
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
    async fn shutdown_answers_slow_requests_and_stops_promptly() {
        let app = Running::start(args(0.0, MAX_LATENCY_MS)).await;
        let c = client();
        let url = format!("{}/", app.base);
        let in_flight = tokio::spawn({
            let c = c.clone();
            async move { get(&c, &url).await }
        });
        // Stop only once the request is being handled.
        let metrics_url = format!("{}/metrics", app.base);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !get(&c, &metrics_url)
            .await
            .1
            .contains("http_requests_in_flight 1")
        {
            assert!(Instant::now() < deadline, "the slow request never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let start = Instant::now();
        app.stop().await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let (status, body) = in_flight.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "v1.2.3\n"));
    }

    async fn admin(c: &reqwest::Client, base: &str) -> serde_json::Value {
        let (_, body) = get(c, &format!("{base}/admin")).await;
        serde_json::from_str(&body).unwrap()
    }

    #[tokio::test]
    async fn the_smoke_endpoint_passes_fails_when_told_and_counts_its_calls() {
        let app = Running::start(args(0.0, 0)).await;
        let c = client();
        let smoke = |body: &'static str| {
            let c = c.clone();
            let url = format!("{}/smoke", app.base);
            async move {
                let resp = c.post(url).body(body).send().await.unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            }
        };
        assert_eq!(smoke("{}").await, (200, "smoke ok: v1.2.3\n".to_owned()));
        let (status, body) =
            post_admin(&c, &app.base, r#"{"smoke_fail": "orders table missing"}"#).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            smoke(r#"{"rollout": "web-1"}"#).await,
            (500, "smoke failed: orders table missing\n".to_owned())
        );
        let settings = admin(&c, &app.base).await;
        assert_eq!(settings["smoke_calls"], 2);
        assert_eq!(settings["smoke_fail"], "orders table missing");
        assert_eq!(settings["last_smoke_body"], r#"{"rollout": "web-1"}"#);
        assert_eq!(
            post_admin(&c, &app.base, r#"{"smoke_fail": null}"#).await.0,
            200
        );
        assert_eq!(smoke("{}").await.0, 200);
        // Smoke calls are not app requests.
        let (_, page) = get(&c, &format!("{}/metrics", app.base)).await;
        let sample = parse_sample(&page, &MetricNames::default()).unwrap();
        assert_eq!(sample.total_requests(), 0.0);
        for (body, needle) in [
            (r#"{"smoke_fail": ""}"#, "smoke_fail"),
            (r#"{"smoke_fail": true}"#, "smoke_fail"),
            (r#"{"smoke_latency_ms": 60001}"#, "smoke_latency_ms"),
        ] {
            let (status, msg) = post_admin(&c, &app.base, body).await;
            assert_eq!(status, 400, "{body} -> {msg}");
            assert!(msg.contains(needle), "{body} -> {msg}");
        }
        let long = format!(
            r#"{{"smoke_fail": "{}"}}"#,
            "x".repeat(MAX_SMOKE_REASON + 1)
        );
        assert_eq!(post_admin(&c, &app.base, &long).await.0, 400);
        assert_eq!(
            admin(&c, &app.base).await["smoke_fail"],
            serde_json::Value::Null
        );
        app.stop().await.unwrap();
    }

    mod hook_runner {
        use super::*;
        use serin_coordinator::hooks::{HookPayload, HookRunner, HttpHookRunner};
        use serin_coordinator::strategy::{Hook, HookOn};

        fn hook(url: String, timeout_ms: u64, retries: u32) -> Hook {
            Hook {
                name: "smoke".into(),
                on: HookOn::PreAdvance,
                url,
                timeout: Duration::from_millis(timeout_ms),
                retries,
                headers: [("X-Token".to_owned(), "t0ken".to_owned())].into(),
            }
        }

        fn payload() -> HookPayload {
            HookPayload {
                rollout: "web-3f9a1c".into(),
                service: "web".into(),
                version: "v2".into(),
                stable_version: "v1".into(),
                on: HookOn::PreAdvance,
                hook: "smoke".into(),
                stage_index: 1,
                stage_count: 4,
                canary_weight: 5,
                next_weight: Some(25),
                state: "progressing".into(),
                reason: "stage 2 passed".into(),
            }
        }

        #[tokio::test]
        async fn a_2xx_answer_passes_at_the_first_attempt_with_the_payload_sent_as_json() {
            let app = Running::start(args(0.0, 0)).await;
            let runner = HttpHookRunner::without_proxy().unwrap();
            let run = runner
                .call(&hook(format!("{}/smoke", app.base), 2_000, 2), &payload())
                .await;
            assert!(run.passed(), "{run:?}");
            assert_eq!((run.attempts, run.status), (1, Some(200)));
            assert_eq!(run.body, "smoke ok: v1.2.3");
            assert_eq!((run.name.as_str(), run.on), ("smoke", HookOn::PreAdvance));
            let settings = admin(&client(), &app.base).await;
            let sent: HookPayload =
                serde_json::from_str(settings["last_smoke_body"].as_str().unwrap()).unwrap();
            assert_eq!(sent, payload());
            app.stop().await.unwrap();
        }

        #[tokio::test]
        async fn a_failing_smoke_is_retried_and_the_last_answer_reported() {
            let app = Running::start(args(0.0, 0)).await;
            let c = client();
            post_admin(&c, &app.base, r#"{"smoke_fail": "checkout returns 502"}"#).await;
            let runner = HttpHookRunner::without_proxy().unwrap();
            let run = runner
                .call(&hook(format!("{}/smoke", app.base), 2_000, 2), &payload())
                .await;
            assert!(!run.passed());
            assert_eq!(
                (run.attempts, run.status, run.error.as_deref()),
                (3, Some(500), None)
            );
            assert_eq!(run.body, "smoke failed: checkout returns 502");
            assert_eq!(
                admin(&c, &app.base).await["smoke_calls"],
                3,
                "1 call + 2 retries"
            );
            // No retries configured: one call.
            let run = runner
                .call(&hook(format!("{}/smoke", app.base), 2_000, 0), &payload())
                .await;
            assert_eq!(run.attempts, 1);
            assert_eq!(admin(&c, &app.base).await["smoke_calls"], 4);
            // Any non-2xx answer fails: `/healthz` answers POST with 405.
            let run = runner
                .call(&hook(format!("{}/healthz", app.base), 2_000, 0), &payload())
                .await;
            assert_eq!((run.passed(), run.status), (false, Some(405)), "{run:?}");
            app.stop().await.unwrap();
        }

        #[tokio::test]
        async fn each_attempt_is_bounded_by_the_timeout() {
            let app = Running::start(args(0.0, 0)).await;
            let c = client();
            post_admin(&c, &app.base, r#"{"smoke_latency_ms": 5000}"#).await;
            let runner = HttpHookRunner::without_proxy().unwrap();
            let run = runner
                .call(&hook(format!("{}/smoke", app.base), 100, 1), &payload())
                .await;
            assert!(!run.passed());
            assert_eq!((run.attempts, run.status), (2, None));
            assert_eq!(
                run.error.as_deref(),
                Some("no answer within the timeout of 100ms")
            );
            assert_eq!(admin(&c, &app.base).await["smoke_calls"], 2);
            // A slow answer within the timeout passes.
            post_admin(&c, &app.base, r#"{"smoke_latency_ms": 50}"#).await;
            let run = runner
                .call(&hook(format!("{}/smoke", app.base), 5_000, 0), &payload())
                .await;
            assert!(run.passed(), "{run:?}");
            app.stop().await.unwrap();
        }

        #[tokio::test]
        async fn no_listener_is_an_error_naming_the_refused_connection() {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let runner = HttpHookRunner::without_proxy().unwrap();
            let run = runner
                .call(
                    &hook(format!("http://127.0.0.1:{port}/smoke"), 1_000, 1),
                    &payload(),
                )
                .await;
            assert!(!run.passed());
            assert_eq!((run.attempts, run.status), (2, None));
            let error = run.error.unwrap();
            assert!(error.to_lowercase().contains("refused"), "{error}");
        }
    }

    #[test]
    fn admin_update_parsing() {
        assert_eq!(
            parse_admin_update(br#"{"error_rate": 0.5}"#),
            Ok(AdminUpdate {
                error_rate: Some(0.5),
                ..AdminUpdate::default()
            })
        );
        assert_eq!(
            parse_admin_update(br#"{"latency_ms": 200, "error_rate": 0}"#),
            Ok(AdminUpdate {
                error_rate: Some(0.0),
                latency_ms: Some(200),
                ..AdminUpdate::default()
            })
        );
        assert!(parse_admin_update(br#"{"latency_ms": 60000}"#).is_ok());
        assert!(parse_admin_update(br#"{"latency_ms": 60001}"#).is_err());
    }
}
