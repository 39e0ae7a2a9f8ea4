//! The agent's runtime: [`run`] wires the collectors, the actuator, the local store and the
//! coordinator connection together until shutdown.
//!
//! The two I/O edges are traits, and the tasks are generic over them: the collector scrapes
//! through a [`MetricsSource`] ([`Scraper`] in production) and the applier drives a
//! [`TrafficActuator`] (a [`Balancer`] chosen by the config: [`NginxActuator`] when it has
//! `[nginx]`; none otherwise).
//! The unit tests below run both tasks' logic against in-memory fakes.
//!
//! Three tasks, each owning its state and stopped by one cancellation token:
//! - **collector**: every `interval` (missed ticks delay the next) scrapes every instance
//!   concurrently, each bounded by `scrape_timeout`, samples the host, and turns the
//!   results into a `Report`. It keeps scraping while disconnected so that deltas stay
//!   right; the connection drops reports it cannot send.
//! - **connection** ([`crate::connection`]): the gRPC session, reconnected with backoff.
//! - **applier**: owns the traffic actuator and the store; applies desired states serially,
//!   newest first (states that queue up while one applies are coalesced), records each
//!   success in the store *before* acknowledging it, then acks. A failed apply is
//!   acknowledged with one failure per service the actuator names, then tried again after
//!   500 ms, doubling up to every 5 s, until it succeeds or a newer desired state arrives
//!   (a host whose nginx was down must not keep the old traffic until the next decision);
//!   every attempt is acknowledged, so a success clears the failure at the coordinator.
//!
//! An apply in progress is allowed to finish at shutdown (the actuator restores the
//! previous nginx site file on failure, and interrupting it halfway would leave a written
//! but unconfirmed file); everything else stops at once. [`run`] returns after all three
//! tasks have ended.
//!
//! Instance windows: the first successful scrape after a start or a failure is only a
//! baseline, so the instance is left out of that report; a failed scrape is reported with
//! `scrape_ok = false` and its error, and the baseline is dropped.
//!
//! Generations: a desired state older than the last applied one is ignored (a deposed
//! leader cannot undo a newer decision); the same generation is acknowledged again without
//! re-applying; a newer one is applied. A failed apply is not recorded, so the retries (and
//! the coordinator re-sending that generation) apply it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use serin_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::actuator::{ActuatorFailure, ActuatorOutcome, TrafficActuator};
use crate::balancer::Balancer;
use crate::collect::{
    DeltaTracker, HostCollector, HostSample, MetricsSource, Sample, Scraper, Window,
};
use crate::config::{AgentConfig, InstanceConfig};
use crate::connection::{self, Backoff, Connection, Coordinators};
pub use crate::error::AgentError;
use crate::error::error_chain;
use crate::nginx::NginxActuator;
use crate::store::{DesiredState, Generation, LocalStore};
use crate::traffic::{Upstreams, Variant};

/// Reports waiting for the connection; more are dropped (they are soft state).
const REPORT_QUEUE: usize = 2;
/// Acks waiting for the connection (kept across a reconnect).
const ACK_QUEUE: usize = 16;

/// Runs the agent until `shutdown` is cancelled.
///
/// Fails at once, before connecting anywhere, when the store cannot be opened, the
/// `[nginx]` section does not describe a usable nginx, or a coordinator address is not a
/// usable endpoint. Afterwards only a panicking task, or the coordinator refusing the first
/// session because another agent with this name is connected
/// ([`AgentError::DuplicateName`]), makes it return an error; unreachable coordinators,
/// failing scrapes and failing applies are retried or reported.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let span = tracing::info_span!("agent", agent = %config.name);
    async move {
        let tasks = start(config).await?;
        tasks.run(shutdown).await
    }
    .instrument(span)
    .await
}

/// Everything [`run`] starts, built and checked before any task runs.
struct Tasks {
    collector: Collector<Scraper>,
    applier: Applier<Balancer>,
    connection: Connection,
}

async fn start(config: AgentConfig) -> Result<Tasks, AgentError> {
    for address in &config.coordinators {
        connection::endpoint(address).map_err(|reason| AgentError::Coordinator {
            address: address.clone(),
            reason,
        })?;
    }

    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || LocalStore::open(&dir))
        .await
        .map_err(|e| AgentError::TaskFailed {
            task: "store open",
            reason: e.to_string(),
        })??;
    let last_applied = store.last_applied()?;
    let instance_id = store.instance_id()?;
    let applied = last_applied.as_ref().map(|d| d.generation);

    let actuator = balancer(&config).await?;
    let scraper = Scraper::new(config.scrape_timeout)?;
    let host = HostCollector::new()?;

    let config = Arc::new(config);
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
    let (desired_tx, desired_rx) = watch::channel(None);
    let (applied_tx, applied_rx) = watch::channel(applied);

    if config.does_nothing() {
        tracing::warn!(
            "this agent has no [[instances]] and no [nginx]: it will report no traffic and \
             steer none; it only registers and reports host metrics"
        );
    }
    tracing::info!(
        store = %store.path().display(),
        last_applied = ?applied,
        instances = config.instances.len(),
        "agent starting"
    );

    Ok(Tasks {
        collector: Collector {
            trackers: config
                .instances
                .iter()
                .map(|_| DeltaTracker::for_interval(config.interval))
                .collect(),
            config: Arc::clone(&config),
            source: scraper,
            host,
            reports: report_tx,
            seq: 0,
        },
        applier: Applier {
            upstreams: config.local_upstreams(),
            store,
            actuator,
            applied,
            desired: desired_rx,
            applied_tx,
            acks: ack_tx,
            retry_delays: RetryDelays::default(),
            retry: None,
        },
        connection: Connection {
            coordinators: Coordinators::new(config.coordinators.clone()),
            register: register(&config, instance_id),
            applied: applied_rx,
            reports: report_rx,
            acks: ack_rx,
            desired: desired_tx,
            backoff: Backoff::default(),
            failures: 0,
            registered: false,
        },
    })
}

/// The balancer the config asks for, checked up front; `None` when this host carries no
/// traffic.
async fn balancer(config: &AgentConfig) -> Result<Option<Balancer>, AgentError> {
    match &config.nginx {
        Some(settings) => {
            let actuator = NginxActuator::new(settings.clone()).await?;
            tracing::info!(version = actuator.version(), site = %settings.site.display(), "nginx ready");
            Ok(Some(Balancer::Nginx(actuator)))
        }
        None => Ok(None),
    }
}

impl Tasks {
    async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        // Any task ending stops the others: normally that is the shutdown itself.
        let stop = shutdown.child_token();
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        let span = tracing::Span::current();
        let collector = self.collector.run(stop.clone());
        let id = set
            .spawn(
                async {
                    collector.await;
                    Ok(())
                }
                .instrument(span.clone()),
            )
            .id();
        names.insert(id, "collector");
        let applier = self.applier.run(stop.clone());
        let id = set
            .spawn(
                async {
                    applier.await;
                    Ok(())
                }
                .instrument(span.clone()),
            )
            .id();
        names.insert(id, "applier");
        let id = set
            .spawn(self.connection.run(stop.clone()).instrument(span))
            .id();
        names.insert(id, "connection");

        let mut result = Ok(());
        while let Some(joined) = set.join_next_with_id().await {
            let (id, reason) = match joined {
                // A fatal error of the task's own (logged by the task): stop the others.
                Ok((_, Err(e))) => {
                    stop.cancel();
                    if result.is_ok() {
                        result = Err(e);
                    }
                    continue;
                }
                // Ended because of shutdown, or because another task failed first.
                Ok((id, Ok(()))) if stop.is_cancelled() => (id, None),
                Ok((id, Ok(()))) => (id, Some("stopped before shutdown".to_owned())),
                Err(e) => (e.id(), Some(join_error_text(e))),
            };
            stop.cancel();
            if let Some(reason) = reason {
                let task = names.get(&id).copied().unwrap_or("unknown");
                tracing::error!(task, %reason, "agent task failed; stopping");
                if result.is_ok() {
                    result = Err(AgentError::TaskFailed { task, reason });
                }
            }
        }
        tracing::info!("agent stopped");
        result
    }
}

fn join_error_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let panic = e.into_panic();
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_owned()
    }
}

fn proto_variant(v: Variant) -> pb::Variant {
    match v {
        Variant::Stable => pb::Variant::Stable,
        Variant::Canary => pb::Variant::Canary,
    }
}

/// The `Register` message, without `last_applied` (filled in per session).
fn register(config: &AgentConfig, instance_id: String) -> pb::Register {
    pb::Register {
        agent: config.name.clone(),
        instance_id,
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        targets: config
            .instances
            .iter()
            .map(|i| pb::Target {
                name: i.name.clone(),
                service: i.service.clone(),
                variant: proto_variant(i.variant) as i32,
                address: i.address.clone(),
            })
            .collect(),
        last_applied: None,
        balancer_services: config.balancer_services(),
    }
}

// ---------------------------------------------------------------------------------------
// Collector
// ---------------------------------------------------------------------------------------

struct Collector<M> {
    config: Arc<AgentConfig>,
    source: M,
    /// One per instance, in `config.instances` order.
    trackers: Vec<DeltaTracker>,
    host: HostCollector,
    reports: mpsc::Sender<pb::Report>,
    seq: u64,
}

impl<M: MetricsSource> Collector<M> {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut previous: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = Instant::now();
            let elapsed = previous.map_or(self.config.interval, |p| now - p);
            previous = Some(now);
            // Nothing is changed until the scrapes are in, so stopping midway loses nothing.
            let report = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                report = self.collect(elapsed) => report,
            };
            match self.reports.try_send(report) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::trace!(seq = self.seq, "not connected; report dropped");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    /// Scrapes every instance, samples the host and builds the next report, covering
    /// `elapsed` since the previous one.
    async fn collect(&mut self, elapsed: Duration) -> pb::Report {
        let results = scrape_all(
            &self.source,
            &self.config.instances,
            self.config.scrape_timeout,
        )
        .await;
        let host = self.host.sample();
        self.seq += 1;
        let instances = self
            .config
            .instances
            .iter()
            .zip(&mut self.trackers)
            .zip(results)
            .filter_map(|((instance, tracker), result)| instance_window(instance, tracker, result))
            .collect();
        pb::Report {
            seq: self.seq,
            interval_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            host: Some(host_metrics(host)),
            instances,
        }
    }
}

/// Scrapes every instance concurrently; each result is the sample or the error text.
async fn scrape_all<M: MetricsSource>(
    source: &M,
    instances: &[InstanceConfig],
    timeout: Duration,
) -> Vec<Result<Sample, String>> {
    join_all(instances.iter().map(|instance| async move {
        // The scraper's client has the same timeout; this bounds the whole call regardless.
        match tokio::time::timeout(
            timeout,
            source.scrape(&instance.metrics_url, &instance.metrics),
        )
        .await
        {
            Ok(Ok(sample)) => Ok(sample),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "cannot scrape {}: no complete answer within {timeout:?}",
                instance.metrics_url
            )),
        }
    }))
    .await
}

/// The instance's window for this report: `None` for a baseline sample.
fn instance_window(
    instance: &InstanceConfig,
    tracker: &mut DeltaTracker,
    result: Result<Sample, String>,
) -> Option<pb::InstanceWindow> {
    let mut window = pb::InstanceWindow {
        instance: instance.name.clone(),
        service: instance.service.clone(),
        variant: proto_variant(instance.variant) as i32,
        ..Default::default()
    };
    match result {
        Ok(sample) => {
            let Window {
                requests,
                errors,
                buckets,
                latency_sum,
            } = tracker.observe(sample)?;
            window.scrape_ok = true;
            window.requests = requests;
            window.errors = errors;
            window.latency = buckets
                .into_iter()
                .map(|(le, count)| pb::Bucket { le, count })
                .collect();
            window.latency_sum_seconds = latency_sum;
        }
        Err(error) => {
            tracing::debug!(instance = %instance.name, %error, "scrape failed");
            tracker.forget();
            window.scrape_ok = false;
            window.scrape_error = error;
        }
    }
    Some(window)
}

fn host_metrics(h: HostSample) -> pb::HostMetrics {
    pb::HostMetrics {
        cpu_percent: h.cpu_percent,
        memory_used_bytes: h.memory_used_bytes,
        memory_total_bytes: h.memory_total_bytes,
    }
}

// ---------------------------------------------------------------------------------------
// Applier
// ---------------------------------------------------------------------------------------

/// What to do with a desired state, given the last applied generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Older than what is applied: a deposed leader's, ignored.
    Stale,
    /// Already applied: acknowledge again, change nothing.
    Reack,
    Apply,
}

fn decide(applied: Option<Generation>, incoming: Generation) -> Decision {
    match applied {
        Some(a) if incoming < a => Decision::Stale,
        Some(a) if incoming == a => Decision::Reack,
        _ => Decision::Apply,
    }
}

struct Applier<A> {
    /// The servers of each service the actuator routes to: this agent's `[[instances]]`.
    upstreams: Upstreams,
    store: LocalStore,
    /// `None` on a host that carries no traffic: desired states are recorded and acked.
    actuator: Option<A>,
    /// Last generation applied and recorded.
    applied: Option<Generation>,
    desired: watch::Receiver<Option<DesiredState>>,
    applied_tx: watch::Sender<Option<Generation>>,
    acks: mpsc::Sender<pb::Ack>,
    retry_delays: RetryDelays,
    /// The newest desired state, when applying it failed: tried again at `Retry::at`.
    retry: Option<Retry>,
}

/// Delays between the attempts to apply a desired state that failed: `initial`, doubling up
/// to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RetryDelays {
    initial: Duration,
    max: Duration,
}

impl Default for RetryDelays {
    fn default() -> Self {
        RetryDelays {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryDelays {
    /// The delay after the attempt that followed `previous` (`None`: the first failure).
    fn after(&self, previous: Option<Duration>) -> Duration {
        previous.map_or(self.initial, |d| (d * 2).min(self.max))
    }
}

/// A failed desired state waiting to be applied again.
struct Retry {
    desired: DesiredState,
    delay: Duration,
    at: Instant,
}

impl<A: TrafficActuator> Applier<A> {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let retry_at = self.retry.as_ref().map(|r| r.at);
            let retrying = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => true,
            };
            // Only the newest state: those received during the last apply are coalesced.
            let desired = if retrying {
                self.retry.as_ref().map(|r| r.desired.clone())
            } else {
                self.desired.borrow_and_update().clone()
            };
            let Some(desired) = desired else {
                continue;
            };
            let failed = self.handle(&desired).await;
            self.schedule_retry(desired, failed);
        }
    }

    /// After handling `desired`: retries it later if it `failed`, else drops a pending retry
    /// unless `desired` is older than the retried state (an ignored, stale one).
    fn schedule_retry(&mut self, desired: DesiredState, failed: bool) {
        let pending = self.retry.take();
        if failed {
            let previous = pending
                .filter(|r| r.desired.generation == desired.generation)
                .map(|r| r.delay);
            let delay = self.retry_delays.after(previous);
            tracing::info!(generation = %desired.generation, retry_in = ?delay, "will retry the failed apply");
            self.retry = Some(Retry {
                desired,
                delay,
                at: Instant::now() + delay,
            });
        } else {
            self.retry = pending.filter(|r| desired.generation < r.desired.generation);
        }
    }

    /// Ignores, re-acks or applies `desired` according to its generation; `true` when
    /// applying it failed.
    async fn handle(&mut self, desired: &DesiredState) -> bool {
        let generation = desired.generation;
        match decide(self.applied, generation) {
            Decision::Stale => {
                tracing::info!(
                    %generation,
                    applied = ?self.applied,
                    "ignoring a desired state older than the applied one"
                );
                false
            }
            Decision::Reack => {
                tracing::debug!(%generation, "generation already applied; acknowledging again");
                self.ack(generation, Vec::new());
                false
            }
            Decision::Apply => {
                let failures = self.apply(desired).await;
                self.ack(generation, failures);
                // Only a success records the generation as applied.
                self.applied != Some(generation)
            }
        }
    }

    /// Applies `desired` and, on success, records it; returns the failures to acknowledge.
    async fn apply(&mut self, desired: &DesiredState) -> Vec<pb::ServiceFailure> {
        let generation = desired.generation;
        let started = Instant::now();
        let weights = desired
            .services
            .iter()
            .map(|s| format!("{}={}%", s.service, s.canary_weight))
            .collect::<Vec<_>>()
            .join(",");

        let mut reload = None;
        if let Some(actuator) = &mut self.actuator {
            match actuator.apply(desired, &self.upstreams).await {
                Ok(ActuatorOutcome::Changed { elapsed }) => reload = Some(elapsed),
                Ok(ActuatorOutcome::Unchanged) => {}
                Err(ActuatorFailure { services, error }) => {
                    tracing::warn!(%generation, weights, %error, "apply failed");
                    return services
                        .into_iter()
                        .map(|service| pb::ServiceFailure {
                            service,
                            error: error.clone(),
                        })
                        .collect();
                }
            }
        }

        let store = self.store.clone();
        let record = desired.clone();
        let recorded = tokio::task::spawn_blocking(move || store.record_applied(&record))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| error_chain(&e)));
        if let Err(error) = recorded {
            tracing::error!(%generation, %error, "applied, but could not record it in the local store");
            return desired
                .services
                .iter()
                .map(|s| pb::ServiceFailure {
                    service: s.service.clone(),
                    error: format!("applied, but could not record it in the local store: {error}"),
                })
                .collect();
        }

        self.applied = Some(generation);
        self.applied_tx.send_replace(Some(generation));
        tracing::info!(
            %generation,
            weights,
            reload = ?reload,
            elapsed = ?started.elapsed(),
            "applied generation"
        );
        Vec::new()
    }

    fn ack(&self, generation: Generation, failures: Vec<pb::ServiceFailure>) {
        let ack = pb::Ack {
            generation: Some(generation.into()),
            failures,
        };
        if let Err(e) = self.acks.try_send(ack) {
            tracing::warn!(%generation, "ack queue full or closed; ack dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use serin_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::actuator::fake::FakeActuator;
    use crate::nginx::{BalancedService, LocalNginx, find_nginx};
    use crate::store::ServiceTraffic;

    /// Upper bound on every wait; a test that needs longer has failed.
    const WAIT: Duration = Duration::from_secs(20);

    // --- pure parts ---------------------------------------------------------------------

    fn generation(term: u64, index: u64) -> Generation {
        Generation { term, index }
    }

    #[test]
    fn decide_ignores_older_reacks_equal_applies_newer() {
        assert_eq!(decide(None, generation(1, 1)), Decision::Apply);
        assert_eq!(
            decide(Some(generation(2, 5)), generation(1, 9)),
            Decision::Stale
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(2, 4)),
            Decision::Stale
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(2, 5)),
            Decision::Reack
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(2, 6)),
            Decision::Apply
        );
        assert_eq!(
            decide(Some(generation(2, 5)), generation(3, 0)),
            Decision::Apply
        );
    }

    use crate::test_support::{instance, traffic};

    #[test]
    fn baseline_sample_gives_no_window_and_failures_reset_it() {
        let inst = instance("web-s", "web", Variant::Stable, 8001);
        let mut tracker = DeltaTracker::default();
        let sample = |requests: f64| {
            Sample::of(
                requests,
                1.0,
                &[(0.1, requests), (f64::INFINITY, requests)],
                requests / 100.0,
            )
        };
        assert_eq!(instance_window(&inst, &mut tracker, Ok(sample(10.0))), None);
        let w = instance_window(&inst, &mut tracker, Ok(sample(25.0))).unwrap();
        assert!(w.scrape_ok);
        assert_eq!((w.requests, w.errors), (15, 0));
        assert_eq!(w.variant, pb::Variant::Stable as i32);
        assert_eq!(
            w.latency,
            vec![
                pb::Bucket { le: 0.1, count: 15 },
                pb::Bucket {
                    le: f64::INFINITY,
                    count: 15
                }
            ]
        );
        let w = instance_window(&inst, &mut tracker, Err("boom".into())).unwrap();
        assert!(!w.scrape_ok);
        assert_eq!(w.scrape_error, "boom");
        assert_eq!(w.requests, 0);
        // After a failure the next success is a new baseline.
        assert_eq!(instance_window(&inst, &mut tracker, Ok(sample(40.0))), None);
    }

    // --- the collector against a fake metrics source -----------------------------------

    /// One scripted answer of [`FakeSource`].
    enum Step {
        Page(Sample),
        /// A 503 from the app.
        Fail,
        /// No answer at all.
        Hang,
    }

    /// A [`MetricsSource`] answering each URL with its scripted steps in order, then failing.
    struct FakeSource {
        steps: HashMap<String, std::sync::Mutex<std::collections::VecDeque<Step>>>,
    }

    impl MetricsSource for FakeSource {
        fn scrape(
            &self,
            url: &str,
            _names: &crate::collect::MetricNames,
        ) -> impl Future<Output = Result<Sample, crate::collect::ScrapeError>> + Send {
            let step = self
                .steps
                .get(url)
                .and_then(|q| q.lock().expect("fake source lock").pop_front());
            let url = url.to_owned();
            async move {
                match step {
                    Some(Step::Page(sample)) => Ok(sample),
                    Some(Step::Hang) => std::future::pending().await,
                    Some(Step::Fail) | None => Err(crate::collect::ScrapeError::Status {
                        url,
                        status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                    }),
                }
            }
        }
    }

    fn page(requests: f64) -> Step {
        Step::Page(Sample::of(
            requests,
            requests / 10.0,
            &[(0.1, requests), (f64::INFINITY, requests)],
            requests / 100.0,
        ))
    }

    fn collector(
        steps: Vec<(&str, Vec<Step>)>,
    ) -> (Collector<FakeSource>, mpsc::Receiver<pb::Report>) {
        let instances: String = steps
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                format!(
                    "[[instances]]\nname = \"{name}\"\nservice = \"web\"\nvariant = \"stable\"\n\
                     address = \"127.0.0.1:{port}\"\nmetrics_url = \"http://127.0.0.1:{port}/metrics\"\n",
                    port = 8001 + i
                )
            })
            .collect();
        let config = AgentConfig::from_toml(&format!(
            "name = \"a\"\ncoordinators = [\"http://127.0.0.1:9\"]\ninterval = \"1s\"\n\
             scrape_timeout = \"50ms\"\ndata_dir = \"/nonexistent/serin-test\"\n{instances}"
        ))
        .expect("valid config");
        let source = FakeSource {
            steps: steps
                .into_iter()
                .enumerate()
                .map(|(i, (_, steps))| {
                    (
                        format!("http://127.0.0.1:{}/metrics", 8001 + i),
                        std::sync::Mutex::new(steps.into()),
                    )
                })
                .collect(),
        };
        let (reports, rx) = mpsc::channel(1);
        let collector = Collector {
            trackers: config
                .instances
                .iter()
                .map(|_| DeltaTracker::for_interval(config.interval))
                .collect(),
            config: Arc::new(config),
            source,
            host: HostCollector::new().expect("host metrics"),
            reports,
            seq: 0,
        };
        (collector, rx)
    }

    fn window<'a>(report: &'a pb::Report, instance: &str) -> Option<&'a pb::InstanceWindow> {
        report.instances.iter().find(|w| w.instance == instance)
    }

    #[tokio::test]
    async fn collector_reports_windows_after_a_baseline_and_failed_scrapes_with_their_error() {
        let (mut collector, _reports) = collector(vec![
            (
                "a",
                vec![page(10.0), page(30.0), Step::Fail, page(40.0), page(60.0)],
            ),
            ("b", vec![Step::Hang, page(5.0), page(6.0)]),
        ]);

        // a: a baseline only; b: no answer within scrape_timeout.
        let report = collector.collect(Duration::from_millis(1000)).await;
        assert_eq!((report.seq, report.interval_ms), (1, 1000));
        assert!(report.host.expect("host metrics").memory_total_bytes > 0);
        assert_eq!(window(&report, "a"), None);
        let b = window(&report, "b").expect("a failed scrape is reported");
        assert!(!b.scrape_ok, "{b:?}");
        assert!(b.scrape_error.contains("within 50ms"), "{b:?}");
        assert_eq!((b.requests, b.service.as_str()), (0, "web"));

        // a: the first window; b: its first answer is a new baseline.
        let report = collector.collect(Duration::from_millis(1200)).await;
        assert_eq!((report.seq, report.interval_ms), (2, 1200));
        let a = window(&report, "a").expect("a has a window");
        assert!(a.scrape_ok, "{a:?}");
        assert_eq!((a.requests, a.errors), (20, 2));
        assert_eq!(window(&report, "b"), None);

        // a fails (and loses its baseline); b has a window.
        let report = collector.collect(Duration::from_millis(1000)).await;
        let a = window(&report, "a").expect("a failed scrape is reported");
        assert!(!a.scrape_ok, "{a:?}");
        assert!(a.scrape_error.contains("HTTP status 503"), "{a:?}");
        let b = window(&report, "b").expect("b has a window");
        assert!(b.scrape_ok && b.requests == 1, "{b:?}");

        // a: a new baseline after the failure, then a window from it.
        let report = collector.collect(Duration::from_millis(1000)).await;
        assert_eq!(window(&report, "a"), None);
        let report = collector.collect(Duration::from_millis(1000)).await;
        assert_eq!(report.seq, 5);
        let a = window(&report, "a").expect("a has a window");
        assert_eq!((a.scrape_ok, a.requests, a.errors), (true, 20, 2));
    }

    // --- the applier against a fake actuator --------------------------------------------

    struct ApplierHarness {
        applier: Applier<FakeActuator>,
        acks: mpsc::Receiver<pb::Ack>,
        applied: watch::Receiver<Option<Generation>>,
        desired: watch::Sender<Option<DesiredState>>,
        store: LocalStore,
        _dir: tempfile::TempDir,
    }

    impl ApplierHarness {
        fn new(actuator: Option<FakeActuator>) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = LocalStore::open(dir.path()).expect("store opens");
            let (desired, desired_rx) = watch::channel(None);
            let (applied_tx, applied) = watch::channel(None);
            let (ack_tx, acks) = mpsc::channel(ACK_QUEUE);
            ApplierHarness {
                applier: Applier {
                    upstreams: Upstreams::default(),
                    store: store.clone(),
                    actuator,
                    applied: None,
                    desired: desired_rx,
                    applied_tx,
                    acks: ack_tx,
                    retry_delays: RetryDelays {
                        initial: Duration::from_millis(10),
                        max: Duration::from_millis(40),
                    },
                    retry: None,
                },
                acks,
                applied,
                desired,
                store,
                _dir: dir,
            }
        }

        fn fake(&mut self) -> &mut FakeActuator {
            self.applier.actuator.as_mut().expect("a fake actuator")
        }

        /// Generations the fake actuator was asked to apply, in order.
        fn calls(&mut self) -> Vec<Generation> {
            self.fake().calls.iter().map(|d| d.generation).collect()
        }

        fn stored(&self) -> Option<Generation> {
            self.store
                .last_applied()
                .expect("store readable")
                .map(|d| d.generation)
        }

        /// The ack `handle` sent, as (generation, [(service, error)]).
        fn ack(&mut self) -> (Generation, Vec<(String, String)>) {
            let ack = self.acks.try_recv().expect("an ack was sent");
            (
                ack.generation.expect("acks carry a generation").into(),
                ack.failures
                    .into_iter()
                    .map(|f| (f.service, f.error))
                    .collect(),
            )
        }

        fn no_ack(&mut self) {
            assert_eq!(
                self.acks.try_recv().map(|a| a.generation),
                Err(mpsc::error::TryRecvError::Empty)
            );
        }

        /// Both the task's memory and the connection's view of the applied generation.
        fn applied(&self) -> Option<Generation> {
            assert_eq!(self.applier.applied, *self.applied.borrow());
            self.applier.applied
        }
    }

    fn desired_state(term: u64, index: u64, services: &[(&str, u32)]) -> DesiredState {
        DesiredState {
            generation: generation(term, index),
            services: services
                .iter()
                .map(|(service, weight)| traffic(service, *weight, None))
                .collect(),
        }
    }

    #[tokio::test]
    async fn newer_generation_is_applied_and_recorded_before_the_ack() {
        let h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        let shutdown = CancellationToken::new();
        let store = h.store.clone();
        let mut acks = h.acks;
        let desired = h.desired.clone();
        let task = tokio::spawn(h.applier.run(shutdown.clone()));
        for (index, weight) in [(1, 10), (2, 20)] {
            desired.send_replace(Some(desired_state(1, index, &[("web", weight)])));
            let ack = tokio::time::timeout(WAIT, acks.recv())
                .await
                .expect("an ack in time")
                .expect("applier running");
            assert_eq!(ack.generation, Some(pb::Generation { term: 1, index }));
            assert!(ack.failures.is_empty(), "{:?}", ack.failures);
            // Recorded before the ack went out.
            let stored = store.last_applied().expect("store readable");
            assert_eq!(stored.map(|d| d.generation), Some(generation(1, index)));
        }
        assert_eq!(*h.applied.borrow(), Some(generation(1, 2)));
        shutdown.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the applier stops on shutdown")
            .expect("applier task");
    }

    #[tokio::test]
    async fn failed_apply_is_acked_per_failing_service_not_recorded_and_retried() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web", "api"])));
        h.fake().fail_with = Some("nginx said no".into());

        // Attributed to the desired services the actuator carries.
        h.applier
            .handle(&desired_state(1, 1, &[("web", 10), ("bot", 5)]))
            .await;
        assert_eq!(
            h.ack(),
            (
                generation(1, 1),
                vec![("web".into(), "nginx said no".into())]
            )
        );
        assert_eq!((h.stored(), h.applied()), (None, None));

        // Re-sending the same generation retries it.
        h.applier
            .handle(&desired_state(1, 1, &[("web", 10), ("bot", 5)]))
            .await;
        assert_eq!(h.calls(), [generation(1, 1), generation(1, 1)]);
        assert_eq!(h.ack().1.len(), 1);

        h.fake().fail_with = None;
        h.applier
            .handle(&desired_state(1, 1, &[("web", 10), ("bot", 5)]))
            .await;
        assert_eq!(h.calls().len(), 3);
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.stored(), Some(generation(1, 1)));
        assert_eq!(h.applied(), Some(generation(1, 1)));

        // A state naming none of the carried services fails for all of them; the last
        // success stays recorded.
        h.fake().fail_with = Some("boom".into());
        h.applier.handle(&desired_state(1, 2, &[("bot", 5)])).await;
        assert_eq!(
            h.ack(),
            (
                generation(1, 2),
                vec![("web".into(), "boom".into()), ("api".into(), "boom".into())]
            )
        );
        assert_eq!(h.stored(), Some(generation(1, 1)));
        assert_eq!(h.applied(), Some(generation(1, 1)));

        // A refusal of the actuator's own (weight out of range) travels the same way.
        h.fake().fail_with = None;
        h.applier
            .handle(&desired_state(1, 3, &[("api", 150)]))
            .await;
        let (acked, failures) = h.ack();
        assert_eq!(acked, generation(1, 3));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].0, "api");
        assert!(failures[0].1.contains("150"), "{failures:?}");
        assert_eq!(h.stored(), Some(generation(1, 1)));
    }

    #[tokio::test]
    async fn older_generation_is_ignored_without_an_ack() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(2, 5, &[("web", 50)])).await;
        assert_eq!(h.ack(), (generation(2, 5), vec![]));
        for (term, index) in [(2, 4), (1, 9)] {
            h.applier
                .handle(&desired_state(term, index, &[("web", 0)]))
                .await;
            h.no_ack();
        }
        assert_eq!(h.calls(), [generation(2, 5)]);
        assert_eq!(h.stored(), Some(generation(2, 5)));
        assert_eq!(h.applied(), Some(generation(2, 5)));
    }

    #[tokio::test]
    async fn equal_generation_is_reacked_without_calling_the_actuator() {
        let mut h = ApplierHarness::new(Some(FakeActuator::new(&["web"])));
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        // Even when the actuator would now fail.
        h.fake().fail_with = Some("boom".into());
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.calls(), [generation(1, 1)]);
        assert_eq!(h.stored(), Some(generation(1, 1)));
    }

    #[tokio::test]
    async fn without_an_actuator_states_are_recorded_and_acked() {
        let mut h = ApplierHarness::new(None);
        h.applier.handle(&desired_state(1, 1, &[("web", 10)])).await;
        assert_eq!(h.ack(), (generation(1, 1), vec![]));
        assert_eq!(h.stored(), Some(generation(1, 1)));
        assert_eq!(h.applied(), Some(generation(1, 1)));
    }

    /// Runs `h`'s applier until the returned token is cancelled.
    fn spawn_applier(
        h: ApplierHarness,
    ) -> (
        CancellationToken,
        JoinHandle<()>,
        mpsc::Receiver<pb::Ack>,
        watch::Sender<Option<DesiredState>>,
        LocalStore,
    ) {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(h.applier.run(shutdown.clone()));
        (shutdown, task, h.acks, h.desired, h.store)
    }

    async fn next_ack(acks: &mut mpsc::Receiver<pb::Ack>) -> (Generation, usize) {
        let ack = tokio::time::timeout(WAIT, acks.recv())
            .await
            .expect("an ack in time")
            .expect("applier running");
        (
            ack.generation.expect("a generation").into(),
            ack.failures.len(),
        )
    }

    #[tokio::test]
    async fn a_failed_apply_is_retried_with_backoff_until_it_succeeds_each_attempt_acked() {
        let mut fake = FakeActuator::new(&["web"]);
        fake.fail_with = Some("nginx master is gone".into());
        fake.fail_times = Some(3);
        let (shutdown, task, mut acks, desired, store) =
            spawn_applier(ApplierHarness::new(Some(fake)));

        let started = Instant::now();
        desired.send_replace(Some(desired_state(1, 1, &[("web", 0)])));
        for _ in 0..3 {
            assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 1));
        }
        assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 0));
        // 10 ms, 20 ms, then the 40 ms cap between the attempts.
        assert!(
            started.elapsed() >= Duration::from_millis(70),
            "{:?}",
            started.elapsed()
        );
        let stored = store.last_applied().expect("store readable");
        assert_eq!(stored.map(|d| d.generation), Some(generation(1, 1)));
        // Applied: no more attempts.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), acks.recv())
                .await
                .is_err(),
            "no ack after the success"
        );
        shutdown.cancel();
        task.await.expect("applier task");
    }

    #[tokio::test]
    async fn a_newer_generation_supersedes_the_retry_of_a_failed_one() {
        let mut fake = FakeActuator::new(&["web"]);
        fake.fail_with = Some("nginx master is gone".into());
        fake.fail_times = Some(1);
        let mut h = ApplierHarness::new(Some(fake));
        h.applier.retry_delays = RetryDelays {
            initial: Duration::from_millis(300),
            max: Duration::from_millis(300),
        };
        let (shutdown, task, mut acks, desired, _store) = spawn_applier(h);

        desired.send_replace(Some(desired_state(1, 1, &[("web", 10)])));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 1), 1));
        desired.send_replace(Some(desired_state(1, 2, &[("web", 0)])));
        assert_eq!(next_ack(&mut acks).await, (generation(1, 2), 0));
        // The retry of 1.1 would have succeeded and been acked: it was dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(800), acks.recv())
                .await
                .is_err(),
            "the superseded generation was retried"
        );
        shutdown.cancel();
        task.await.expect("applier task");
    }

    #[test]
    fn apply_retry_delays_double_from_the_initial_to_the_cap() {
        let d = RetryDelays::default();
        assert_eq!(
            (d.initial, d.max),
            (Duration::from_millis(500), Duration::from_secs(5))
        );
        let mut delay = None;
        let delays: Vec<u64> = (0..6)
            .map(|_| {
                let next = d.after(delay);
                delay = Some(next);
                u64::try_from(next.as_millis()).expect("small")
            })
            .collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000]);
    }

    // --- in-test coordinator ------------------------------------------------------------

    type Downstream = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

    /// What the test coordinator saw, in order.
    enum Event {
        /// A session opened; sending on this reaches the agent, dropping it ends the stream.
        Session(Downstream),
        Message(pb::AgentMessage),
        /// A session was refused as a duplicate name; holds its Register.
        Refused(pb::Register),
    }

    struct TestCoordinator {
        events: mpsc::UnboundedSender<Event>,
        /// When set, every session is refused with `ALREADY_EXISTS` and this message.
        refuse: Option<String>,
    }

    #[tonic::async_trait]
    impl AgentService for TestCoordinator {
        type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

        async fn session(
            &self,
            request: Request<Streaming<pb::AgentMessage>>,
        ) -> Result<Response<Self::SessionStream>, Status> {
            let mut inbound = request.into_inner();
            if let Some(message) = &self.refuse {
                // As the real coordinator does: read Register, then refuse.
                let first = inbound.message().await?;
                if let Some(pb::AgentMessage {
                    body: Some(pb::agent_message::Body::Register(r)),
                }) = first
                {
                    let _ = self.events.send(Event::Refused(r));
                }
                return Err(Status::already_exists(message.clone()));
            }
            let (tx, rx) = mpsc::channel(16);
            let _ = self.events.send(Event::Session(tx));
            let events = self.events.clone();
            tokio::spawn(async move {
                while let Ok(Some(message)) = inbound.message().await {
                    if events.send(Event::Message(message)).is_err() {
                        break;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }
    }

    struct TestServer {
        events: mpsc::UnboundedReceiver<Event>,
        stop: CancellationToken,
        task: JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl TestServer {
        async fn start(listener: TcpListener) -> TestServer {
            Self::start_with(listener, None).await
        }

        /// A coordinator that refuses every session as a duplicate name, with `message`.
        async fn start_refusing(listener: TcpListener, message: &str) -> TestServer {
            Self::start_with(listener, Some(message.to_owned())).await
        }

        async fn start_with(listener: TcpListener, refuse: Option<String>) -> TestServer {
            let (tx, events) = mpsc::unbounded_channel();
            let stop = CancellationToken::new();
            let signal = stop.clone();
            let task = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentServiceServer::new(TestCoordinator {
                        events: tx,
                        refuse,
                    }))
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(listener),
                        signal.cancelled_owned(),
                    ),
            );
            TestServer { events, stop, task }
        }

        /// Stops serving; sessions must have been ended (their `Downstream` dropped).
        async fn stop(self) {
            self.stop.cancel();
            let mut task = self.task;
            match tokio::time::timeout(WAIT, &mut task).await {
                Ok(joined) => joined.expect("server task").expect("server"),
                Err(_) => {
                    task.abort();
                    panic!("test coordinator did not shut down within {WAIT:?}");
                }
            }
        }

        /// Waits for the next session, skipping what earlier sessions still had in flight.
        async fn session(&mut self) -> Downstream {
            loop {
                if let Event::Session(down) = self.next_event("a session").await {
                    return down;
                }
            }
        }

        /// Waits for the next message from the agent.
        /// Waits for the next refused session's Register.
        async fn refused(&mut self) -> pb::Register {
            loop {
                if let Event::Refused(register) = self.next_event("a refused session").await {
                    return register;
                }
            }
        }

        async fn message(&mut self, what: &str) -> pb::agent_message::Body {
            match self.next_event(what).await {
                Event::Session(_) => panic!("unexpected new session while waiting for {what}"),
                Event::Refused(_) => panic!("unexpected refused session while waiting for {what}"),
                Event::Message(pb::AgentMessage { body: Some(body) }) => body,
                Event::Message(m) => panic!("message without body: {m:?}"),
            }
        }

        /// Skips reports until an ack arrives.
        async fn ack(&mut self) -> pb::Ack {
            loop {
                match self.message("an ack").await {
                    pb::agent_message::Body::Ack(ack) => return ack,
                    pb::agent_message::Body::Report(_) => {}
                    pb::agent_message::Body::Register(r) => panic!("unexpected Register: {r:?}"),
                }
            }
        }

        async fn next_event(&mut self, what: &str) -> Event {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => panic!("test coordinator gone while waiting for {what}"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    async fn send_desired(down: &Downstream, term: u64, index: u64, services: Vec<ServiceTraffic>) {
        let message = pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Desired(pb::DesiredState {
                generation: Some(pb::Generation { term, index }),
                services: services
                    .into_iter()
                    .map(|s| pb::ServiceTraffic {
                        service: s.service,
                        canary_weight: s.canary_weight,
                        stable_version: s.stable_version,
                        canary_version: s.canary_version,
                        rollout_id: s.rollout_id,
                        sticky_key: s.sticky_key.unwrap_or_default(),
                    })
                    .collect(),
            })),
        };
        down.send(Ok(message)).await.expect("agent session open");
    }

    fn expect_register(body: pb::agent_message::Body) -> pb::Register {
        match body {
            pb::agent_message::Body::Register(r) => r,
            other => panic!("expected Register first, got {other:?}"),
        }
    }

    // --- in-test HTTP endpoints ---------------------------------------------------------

    /// Answers every request with `page(n)`, `n` counting requests from 1. Aborted on drop.
    struct HttpServer {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl Drop for HttpServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn http_server(page: impl Fn(u64) -> String + Send + Sync + 'static) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let page = Arc::new(page);
        let count = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let page = Arc::clone(&page);
                let count = Arc::clone(&count);
                connections.spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 2048];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = page(count.fetch_add(1, Ordering::SeqCst) + 1);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        HttpServer { addr, task }
    }

    /// A metrics page whose request counter grows by 10 per scrape, one in ten a 500.
    fn metrics_page(n: u64, comment: &str) -> String {
        format!(
            "# {comment}\n# TYPE http_requests_total counter\n\
             http_requests_total{{code=\"200\"}} {}\nhttp_requests_total{{code=\"500\"}} {n}\n",
            n * 9
        )
    }

    async fn run_agent(
        config: AgentConfig,
    ) -> (CancellationToken, JoinHandle<Result<(), AgentError>>) {
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn(run(config, shutdown.clone()));
        (shutdown, agent)
    }

    async fn stop_agent(shutdown: CancellationToken, agent: JoinHandle<Result<(), AgentError>>) {
        shutdown.cancel();
        match tokio::time::timeout(WAIT, agent).await {
            Ok(joined) => joined.expect("agent task").expect("agent run"),
            Err(_) => panic!("agent did not stop within {WAIT:?} of shutdown"),
        }
    }

    // --- the runtime end to end ---------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registers_reports_acks_and_reregisters_after_coordinator_restart() {
        let good = http_server(|n| metrics_page(n, "good")).await;
        let garbage = http_server(|_| "<html><body>garbage</body></html>\n".to_owned()).await;
        // Accepts connections and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let silent_task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let coordinator = listener.local_addr().expect("addr");
        let data = tempfile::tempdir().expect("tempdir");

        let config = AgentConfig::from_toml(&format!(
            r#"
            name = "host-1"
            coordinators = ["http://{coordinator}"]
            interval = "100ms"
            data_dir = "{data}"
            labels = {{ zone = "z1" }}

            [[instances]]
            name = "web-stable"
            service = "web"
            variant = "stable"
            address = "{good}"
            metrics_url = "http://{good}/metrics"

            [[instances]]
            name = "web-canary"
            service = "web"
            variant = "canary"
            address = "{garbage}"
            metrics_url = "http://{garbage}/metrics"

            [[instances]]
            name = "web-silent"
            service = "web"
            variant = "canary"
            address = "{silent}"
            metrics_url = "http://{silent}/metrics"
            "#,
            data = data.path().display(),
            good = good.addr,
            garbage = garbage.addr,
            silent = silent_addr,
        ))
        .expect("valid config");

        let mut server = TestServer::start(listener).await;
        let (shutdown, agent) = run_agent(config).await;

        let down = server.session().await;
        let register = expect_register(server.message("Register").await);
        assert_eq!(register.agent, "host-1");
        assert_eq!(register.labels.get("zone").map(String::as_str), Some("z1"));
        assert_eq!(register.last_applied, None);
        assert!(register.balancer_services.is_empty());
        let targets: Vec<(&str, &str, i32)> = register
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.address.as_str(), t.variant))
            .collect();
        assert_eq!(
            targets,
            [
                (
                    "web-stable",
                    good.addr.to_string().as_str(),
                    pb::Variant::Stable as i32
                ),
                (
                    "web-canary",
                    garbage.addr.to_string().as_str(),
                    pb::Variant::Canary as i32
                ),
                (
                    "web-silent",
                    silent_addr.to_string().as_str(),
                    pb::Variant::Canary as i32
                ),
            ]
        );

        // Reports: the garbage instance fails every time; the good one shows traffic once
        // it has a baseline.
        let mut last_seq = 0;
        loop {
            let report = match server.message("a report with traffic").await {
                pb::agent_message::Body::Report(r) => r,
                other => panic!("expected reports, got {other:?}"),
            };
            assert!(
                report.seq > last_seq,
                "seq must grow: {} after {last_seq}",
                report.seq
            );
            last_seq = report.seq;
            assert!(report.interval_ms > 0);
            let host = report.host.expect("host metrics");
            assert!(host.memory_total_bytes > 0);
            let bad = report
                .instances
                .iter()
                .find(|w| w.instance == "web-canary")
                .expect("the failing instance is in every report");
            assert!(!bad.scrape_ok, "{bad:?}");
            assert!(
                bad.scrape_error
                    .contains("not in the Prometheus text format"),
                "{bad:?}"
            );
            assert_eq!(bad.variant, pb::Variant::Canary as i32);
            let silent = report
                .instances
                .iter()
                .find(|w| w.instance == "web-silent")
                .expect("the silent instance is in every report");
            assert!(!silent.scrape_ok, "{silent:?}");
            assert!(silent.scrape_error.contains("within"), "{silent:?}");
            if let Some(ok) = report.instances.iter().find(|w| w.instance == "web-stable") {
                assert!(ok.scrape_ok, "{ok:?}");
                assert!(ok.requests > 0, "{ok:?}");
                assert!(ok.errors > 0 && ok.errors < ok.requests, "{ok:?}");
                assert_eq!(ok.service, "web");
                break;
            }
        }

        // A desired state: no nginx here, so nothing to actuate, acked without failures.
        send_desired(&down, 1, 5, vec![traffic("web", 10, None)]).await;
        let ack = server.ack().await;
        assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 5 }));
        assert!(ack.failures.is_empty(), "{:?}", ack.failures);

        // An older generation is ignored; the applied one is acknowledged again.
        send_desired(&down, 1, 4, vec![traffic("web", 90, None)]).await;
        send_desired(&down, 1, 5, vec![traffic("web", 10, None)]).await;
        let ack = server.ack().await;
        assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 5 }));

        // The coordinator goes away and comes back on the same port.
        drop(down);
        server.stop().await;
        let listener = TcpListener::bind(coordinator).await.expect("rebind");
        let mut server = TestServer::start(listener).await;
        let _down = server.session().await;
        let register = expect_register(server.message("Register after reconnect").await);
        assert_eq!(register.agent, "host-1");
        assert_eq!(
            register.last_applied,
            Some(pb::Generation { term: 1, index: 5 })
        );

        stop_agent(shutdown, agent).await;
        drop(_down);
        server.stop().await;
        silent_task.abort();
    }

    #[tokio::test]
    async fn a_restarted_agent_registers_its_stored_generation() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let coordinator = listener.local_addr().expect("addr");
        let data = tempfile::tempdir().expect("tempdir");
        let config = AgentConfig::from_toml(&format!(
            "name = \"a\"\ncoordinators = [\"http://{coordinator}\"]\ndata_dir = \"{}\"",
            data.path().display()
        ))
        .expect("valid config");
        let mut server = TestServer::start(listener).await;

        let (shutdown, agent) = run_agent(config.clone()).await;
        let down = server.session().await;
        let register = expect_register(server.message("Register").await);
        assert_eq!(register.last_applied, None);
        let first_id = register.instance_id;
        assert_eq!(first_id.len(), 32, "{first_id:?}");
        send_desired(&down, 3, 1, vec![]).await;
        assert!(server.ack().await.failures.is_empty());
        stop_agent(shutdown, agent).await;
        drop(down);

        let (shutdown, agent) = run_agent(config).await;
        let _down = server.session().await;
        let register = expect_register(server.message("Register after restart").await);
        assert_eq!(
            register.last_applied,
            Some(pb::Generation { term: 3, index: 1 })
        );
        assert_eq!(
            register.instance_id, first_id,
            "the same data directory, the same agent"
        );
        stop_agent(shutdown, agent).await;
    }

    fn minimal_config(coordinator: SocketAddr, data: &tempfile::TempDir) -> AgentConfig {
        AgentConfig::from_toml(&format!(
            "name = \"host-1\"\ncoordinators = [\"http://{coordinator}\"]\ndata_dir = \"{}\"",
            data.path().display()
        ))
        .expect("valid config")
    }

    #[tokio::test]
    async fn an_agent_refused_as_a_duplicate_name_at_start_stops_with_the_coordinators_message() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let coordinator = listener.local_addr().expect("addr");
        let data = tempfile::tempdir().expect("tempdir");
        let message = "agent 'host-1' is already connected from 10.0.0.5:41234";
        let mut server = TestServer::start_refusing(listener, message).await;

        let result = tokio::time::timeout(
            WAIT,
            run(minimal_config(coordinator, &data), CancellationToken::new()),
        )
        .await
        .expect("run returns by itself");
        let err = result.expect_err("a refused first session is fatal");
        assert!(
            matches!(&err, AgentError::DuplicateName(m) if m == message),
            "{err:?}"
        );
        assert!(err.to_string().contains(message), "{err}");
        let register = server.refused().await;
        assert_eq!(register.agent, "host-1");
        assert_eq!(register.instance_id.len(), 32, "{register:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn an_agent_refused_as_a_duplicate_name_after_it_was_connected_keeps_retrying() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let coordinator = listener.local_addr().expect("addr");
        let data = tempfile::tempdir().expect("tempdir");
        let mut server = TestServer::start(listener).await;
        let (shutdown, agent) = run_agent(minimal_config(coordinator, &data)).await;
        let down = server.session().await;
        let first = expect_register(server.message("Register").await);
        drop(down);
        server.stop().await;

        // Meanwhile another agent took the name: the coordinator refuses this one.
        let listener = TcpListener::bind(coordinator).await.expect("rebind");
        let mut server =
            TestServer::start_refusing(listener, "agent 'host-1' is already connected").await;
        for _ in 0..3 {
            let register = server.refused().await;
            assert_eq!(register.instance_id, first.instance_id, "the same agent");
        }
        assert!(
            !agent.is_finished(),
            "a refusal after a registration is not fatal"
        );
        stop_agent(shutdown, agent).await;
        server.stop().await;
    }

    #[tokio::test]
    async fn unusable_nginx_fails_at_once_naming_the_problem() {
        let data = tempfile::tempdir().expect("tempdir");
        // Nothing listens at the coordinator address: run must fail before connecting.
        let config = AgentConfig::from_toml(&format!(
            r#"
            name = "a"
            coordinators = ["http://127.0.0.1:9"]
            data_dir = "{data}"
            [[instances]]
            name = "web-1"
            service = "web"
            variant = "stable"
            address = "127.0.0.1:8081"
            metrics_url = "http://127.0.0.1:8081/metrics"
            [nginx]
            binary = "/nonexistent/serin-test/nginx"
            config = "/etc/nginx/nginx.conf"
            site = "{data}/serin.conf"
            services = [{{ service = "web", listen = "127.0.0.1:8080" }}]
            "#,
            data = data.path().display(),
        ))
        .expect("valid config");
        let result = tokio::time::timeout(WAIT, run(config, CancellationToken::new()))
            .await
            .expect("run returns at once");
        let err = result.expect_err("a missing nginx binary is fatal");
        assert!(matches!(err, AgentError::Nginx(_)), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/serin-test/nginx"),
            "{err}"
        );
    }

    /// A port that was free a moment ago.
    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        l.local_addr().expect("local addr").port()
    }

    async fn get_body(url: &str) -> String {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let response = client
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.text().await.expect("body")
    }

    /// Real nginx (Debian's package): desired weights become live routes; a state nginx
    /// cannot take is acknowledged with the error and leaves the previous routes live.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applies_desired_weights_through_real_nginx() {
        let binary = find_nginx()
            .expect("nginx not found on PATH or at /usr/sbin/nginx: apt-get install -y nginx");
        let stable = http_server(|n| metrics_page(n, "backend stable")).await;
        let canary = http_server(|n| metrics_page(n, "backend canary")).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let coordinator = listener.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let nginx = LocalNginx::start(&dir.path().join("nginx"), &binary)
            .await
            .expect("local nginx starts");
        let listen = format!("127.0.0.1:{}", free_port());

        let mut config = AgentConfig::from_toml(&format!(
            r#"
            name = "lb-1"
            coordinators = ["http://{coordinator}"]
            interval = "100ms"
            data_dir = "{data}"
            [[instances]]
            name = "web-stable"
            service = "web"
            variant = "stable"
            address = "{stable}"
            metrics_url = "http://{stable}/metrics"
            [[instances]]
            name = "web-canary"
            service = "web"
            variant = "canary"
            address = "{canary}"
            metrics_url = "http://{canary}/metrics"
            "#,
            data = dir.path().join("agent").display(),
            stable = stable.addr,
            canary = canary.addr,
        ))
        .expect("valid config");
        config.nginx = Some(nginx.settings(vec![BalancedService {
            service: "web".into(),
            listen: listen.clone(),
        }]));

        let mut server = TestServer::start(listener).await;
        let (shutdown, agent) = run_agent(config).await;
        let down = server.session().await;
        let register = expect_register(server.message("Register").await);
        assert_eq!(register.balancer_services, ["web"]);

        send_desired(&down, 1, 1, vec![traffic("web", 100, None)]).await;
        let ack = server.ack().await;
        assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 1 }));
        assert!(ack.failures.is_empty(), "{:?}", ack.failures);
        for _ in 0..5 {
            let body = get_body(&format!("http://{listen}/")).await;
            assert!(body.contains("backend canary"), "{body}");
        }

        // A sticky key nginx cannot use: the apply fails, the error is acknowledged, and
        // the previous routes stay live.
        send_desired(&down, 1, 2, vec![traffic("web", 50, Some("cookie_uid"))]).await;
        let ack = server.ack().await;
        assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 2 }));
        assert_eq!(ack.failures.len(), 1, "{:?}", ack.failures);
        assert_eq!(ack.failures[0].service, "web");
        assert!(
            ack.failures[0].error.contains("cookie_uid"),
            "{:?}",
            ack.failures
        );
        let body = get_body(&format!("http://{listen}/")).await;
        assert!(body.contains("backend canary"), "{body}");

        // Back to stable.
        send_desired(&down, 1, 3, vec![traffic("web", 0, None)]).await;
        let ack = server.ack().await;
        assert!(ack.failures.is_empty(), "{:?}", ack.failures);
        let body = get_body(&format!("http://{listen}/")).await;
        assert!(body.contains("backend stable"), "{body}");

        stop_agent(shutdown, agent).await;
        drop(down);
        server.stop().await;
        nginx.stop().await;
    }
}
