//! Collectors: what the agent measures on its host.
//!
//! Layout:
//! - [`prometheus`]: scrape an application's Prometheus metrics page ([`Scraper`]), read the
//!   request, error and latency series out of it ([`parse_sample`]), and turn successive
//!   cumulative samples into per-interval [`Window`]s ([`DeltaTracker`]).
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
