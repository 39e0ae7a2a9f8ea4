//! Collectors: what the agent measures on its host.
//!
//! Layout:
//! - this file: [`MetricsSource`], the I/O edge the runtime's collector scrapes through.
//! - [`prometheus`]: scrape an application's Prometheus metrics page ([`Scraper`]), read the
//!   request, error and latency series out of it ([`parse_sample`]), and turn successive
//!   cumulative samples into per-interval [`Window`]s ([`DeltaTracker`]). [`Scraper`] is the
//!   real [`MetricsSource`].
//! - [`host`]: CPU and memory of the whole host ([`HostCollector`]), cheap enough to run every
//!   second.
//!
//! Nothing here decides anything: collectors report numbers, the coordinator's analysis judges
//! them.

pub mod host;
pub mod prometheus;

pub use host::{HostCollector, HostError, HostSample};
pub use prometheus::{
    DeltaTracker, MetricNames, ParseError, Sample, ScrapeError, Scraper, Window, parse_sample,
};

/// Where an instance's cumulative request, error and latency counters come from: the
/// collector's I/O edge. [`Scraper`] (the app's Prometheus page over HTTP) is the real
/// implementation; the runtime's tests use an in-memory one.
///
/// Contract: one call reads the counters once; a failure is an error the next call may not
/// repeat (the collector reports it and starts a new baseline). Implementations should bound
/// their own wait; the collector also bounds every call by its `scrape_timeout`.
pub trait MetricsSource: Send + Sync + 'static {
    /// The counters of the metrics page at `url`, read with `names`.
    fn scrape(
        &self,
        url: &str,
        names: &MetricNames,
    ) -> impl Future<Output = Result<Sample, ScrapeError>> + Send;
}
