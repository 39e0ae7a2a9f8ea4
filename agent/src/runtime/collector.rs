//! The collector task: every `interval` (missed ticks delay the next) it scrapes every
//! instance concurrently, each bounded by `scrape_timeout`, samples the host, and turns the
//! results into a `Report` (see `report` for how a scrape becomes a window).
//!
//! It keeps scraping while disconnected so that deltas stay right; the connection drops
//! reports it cannot send. Nothing is changed until a round's scrapes are in, so stopping
//! midway loses nothing.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use serin_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::report::{host_metrics, instance_window};
use super::workloads::WorkloadBoard;
use crate::collect::{DeltaTracker, HostCollector, MetricsSource, Sample};
use crate::config::{AgentConfig, InstanceConfig};
use crate::traffic::Variant;

/// The collector task: scrapes this agent's instances and the host every `interval`.
pub(super) struct Collector<M> {
    config: Arc<AgentConfig>,
    source: M,
    /// One per instance, in `config.instances` order.
    trackers: Vec<DeltaTracker>,
    host: HostCollector,
    reports: mpsc::Sender<pb::Report>,
    seq: u64,
    /// What runs behind the managed instances (`workloads`): reported, and the variant their
    /// windows are counted for.
    board: WorkloadBoard,
    /// The variant each instance's last window was counted for, in `config.instances` order.
    counted_as: Vec<Variant>,
}

impl<M: MetricsSource> Collector<M> {
    /// A collector of `config.instances` through `source`, sending its reports on `reports`.
    pub(super) fn new(
        config: Arc<AgentConfig>,
        source: M,
        host: HostCollector,
        reports: mpsc::Sender<pb::Report>,
        board: WorkloadBoard,
    ) -> Self {
        Collector {
            counted_as: config.instances.iter().map(|i| i.variant).collect(),
            board,
            trackers: config
                .instances
                .iter()
                .map(|_| DeltaTracker::for_interval(config.interval))
                .collect(),
            config,
            source,
            host,
            reports,
            seq: 0,
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut previous: Option<Instant> = None;
        let mut carried: Option<pb::Report> = None;
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
            // What could not be sent (no session) goes with the next report.
            let report = match carried.take() {
                Some(older) => super::report::merge_reports(older, report),
                None => report,
            };
            match self.reports.try_send(report) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(report)) => {
                    tracing::trace!(seq = self.seq, "not connected; report carried to the next");
                    carried = Some(report);
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
        let board = &self.board;
        let instances = self
            .config
            .instances
            .iter()
            .zip(&mut self.trackers)
            .zip(&mut self.counted_as)
            .zip(results)
            .filter_map(|(((instance, tracker), counted_as), result)| {
                // A managed instance counts for the variant it runs now; when that changed (a
                // hosts-model host turned canary, or back), the counts since the last sample
                // belong to neither side: start again from a baseline.
                let variant = board.variant_of(&instance.name).unwrap_or(instance.variant);
                if variant != *counted_as {
                    tracker.forget();
                    *counted_as = variant;
                }
                instance_window(instance, variant, tracker, result)
            })
            .collect();
        pb::Report {
            seq: self.seq,
            interval_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            host: Some(host_metrics(host)),
            instances,
            workloads: self.board.report(Instant::now()),
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

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
        let host = HostCollector::new().expect("host metrics");
        let collector = Collector::new(Arc::new(config), source, host, reports, Default::default());
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
}
