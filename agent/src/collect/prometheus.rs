//! Scraping an application's Prometheus metrics page.
//!
//! Three steps, each usable alone:
//! 1. [`Scraper::scrape`] fetches the page over plain HTTP (timeout, 4 MiB cap, no proxy) and
//! 2. [`parse_sample`] reads the configured series ([`MetricNames`]) into a cumulative
//!    [`Sample`], series by series (metric name + full label set);
//! 3. [`DeltaTracker`] turns successive samples into per-interval [`Window`]s, handling app
//!    restarts (counter resets) and histogram layout changes.
//!
//! Steps 1 and 2 together are [`Scraper`]'s [`MetricsSource`] implementation, which the
//! runtime's collector uses.
//!
//! # Deltas are per series
//!
//! An app often exposes one series per worker process, status code or path, and one of them
//! can start over while the others go on (a worker process restarted). Judging resets on the
//! page's totals would take that for a restart of the whole app and count the full totals as
//! one interval's traffic: thousands of requests that never happened. So, as Prometheus'
//! `rate()` does, each series (requests counter, every histogram label set, its `_sum`) is
//! compared with its own previous value, and a window is the sum of the series' deltas:
//! - a series that went up contributes its increase; one that went down was reset and
//!   contributes its current value; one that is gone from the page contributes nothing;
//! - if `process_start_time_seconds` changed between the two scrapes, the app restarted
//!   inside the interval and every series contributes its current value;
//! - otherwise a series first seen after the baseline contributes its full value: client
//!   libraries create a labelled series on its first increment, so a canary's first
//!   `code="500"` errors appear as a new series, and counting it as nothing would hide the
//!   first failure of a zero-tolerance check. A series absent from the page is remembered for
//!   [`SERIES_RETENTION`] (then forgotten, to bound memory): when it comes back it contributes
//!   its increase over the remembered value (its current value if lower);
//! - the first sample, and the first after a failed scrape ([`DeltaTracker::forget`]), are
//!   only a baseline: no window.
//!
//! # Errors: a status label or a counter of their own
//!
//! An HTTP service's errors are its requests whose status label starts with `5`. A service
//! with no HTTP traffic (a queue worker) has no status to read; it counts its failures in a
//! counter of their own (`worker_jobs_failed_total` beside `worker_jobs_processed_total`).
//! When [`MetricNames::errors`] names that counter, errors are its increase (summed over its
//! labels) instead, and the status label is not read. Its series follow the same rules as
//! the requests series above (resets, restarts, new and returning series), so a failed-jobs
//! series created by the canary's first failure counts that failure. A page without the
//! errors counter has no errors yet, not "no data": client libraries often create a labelled
//! counter's series only on its first increment.
//!
//! A histogram label set whose bucket layout (its `le` values) changed without a reset cannot
//! be subtracted; the window then has no buckets at all for that interval (requests, errors and
//! the latency sum still count), so its buckets never disagree with its requests.
//!
//! Parsing uses the `prometheus-parse` crate. That crate never reports an error: it silently
//! skips lines it cannot read. [`parse_sample`] therefore first checks every line with the
//! crate's own line classifier and rejects pages that are not in the text format (an HTML error
//! page, random bytes) instead of reporting them as "no traffic".

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use prometheus_parse::{LineInfo, Scrape, Value};
use reqwest::header::ACCEPT;
use serde::Deserialize;

use super::MetricsSource;

/// Largest metrics page the scraper reads, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The `Accept` header sent when scraping: the classic text format, which every client library
/// can produce (some would otherwise answer in protobuf).
const ACCEPT_TEXT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// Which series of an app's metrics page mean requests, errors and latency.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricNames {
    /// Counter of handled requests (the windows of all series of this name are summed).
    #[serde(default = "default_requests")]
    pub requests: String,
    /// Label of `requests` holding the HTTP status; values starting with `5` are errors.
    #[serde(default = "default_status_label")]
    pub status_label: String,
    /// Base name of the request-duration histogram (`<latency>_bucket`, `<latency>_sum`).
    #[serde(default = "default_latency")]
    pub latency: String,
    /// Counter of failed requests (or jobs), for services without an HTTP status: when set,
    /// errors are this counter's increase, summed over its series, and `status_label` is not
    /// read. `requests` must count the failed ones too.
    #[serde(default)]
    pub errors: Option<String>,
}

fn default_requests() -> String {
    "http_requests_total".to_owned()
}

fn default_status_label() -> String {
    "code".to_owned()
}

fn default_latency() -> String {
    "http_request_duration_seconds".to_owned()
}

impl Default for MetricNames {
    fn default() -> Self {
        Self {
            requests: default_requests(),
            status_label: default_status_label(),
            latency: default_latency(),
            errors: None,
        }
    }
}

/// Cumulative counters read from one scrape, per series.
///
/// Series are keyed by their label set, sorted and written `k="v",...` (histogram series
/// without `le`); the metric name is implied by the field. Series that appear twice on one
/// page are added up.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Every series of the `requests` counter, by label set.
    pub requests: BTreeMap<String, RequestSeries>,
    /// Every series of the latency histogram, by label set without `le`.
    pub histograms: BTreeMap<String, HistogramSeries>,
    /// Every series of the errors counter, by label set: empty unless
    /// [`MetricNames::errors`] is set (then no `requests` series is an error).
    pub errors: BTreeMap<String, f64>,
    /// `process_start_time_seconds`, when the page has it: a change means the app restarted.
    pub process_start: Option<f64>,
}

/// One series of the requests counter.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestSeries {
    /// Its cumulative value.
    pub value: f64,
    /// Whether its status label starts with `5` (always false when errors come from
    /// [`MetricNames::errors`]).
    pub error: bool,
}

/// One series (label set) of the latency histogram.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistogramSeries {
    /// `(le, cumulative count)`, sorted by `le`; `+Inf` is `f64::INFINITY`.
    pub buckets: Vec<(f64, f64)>,
    /// Its `<latency>_sum`, in the histogram's unit (seconds by convention).
    pub sum: f64,
}

impl Sample {
    /// Sum of every `requests` series.
    pub fn total_requests(&self) -> f64 {
        self.requests.values().map(|s| s.value).sum()
    }

    /// Sum of the `requests` series whose status label starts with `5`, plus every series of
    /// the errors counter (only one of the two is ever non-empty).
    pub fn total_errors(&self) -> f64 {
        let by_status: f64 = self
            .requests
            .values()
            .filter(|s| s.error)
            .map(|s| s.value)
            .sum();
        by_status + self.errors.values().sum::<f64>()
    }

    /// `(le, cumulative count)` summed over the histogram's series, sorted by `le`.
    pub fn total_buckets(&self) -> Vec<(f64, f64)> {
        let mut buckets = Vec::new();
        for h in self.histograms.values() {
            for &(le, count) in &h.buckets {
                add_bucket(&mut buckets, le, count);
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    /// Sum of every `<latency>_sum` series.
    pub fn total_latency_sum(&self) -> f64 {
        self.histograms.values().map(|h| h.sum).sum()
    }
}

#[cfg(test)]
impl Sample {
    /// A page with one `code="200"` series (`requests - errors`), one `code="500"` series
    /// (`errors`) and, unless `buckets` is empty, one unlabelled histogram series.
    pub(crate) fn of(requests: f64, errors: f64, buckets: &[(f64, f64)], sum: f64) -> Sample {
        let series = |value, error| RequestSeries { value, error };
        Sample {
            requests: BTreeMap::from([
                ("code=\"200\"".to_owned(), series(requests - errors, false)),
                ("code=\"500\"".to_owned(), series(errors, true)),
            ]),
            histograms: if buckets.is_empty() {
                BTreeMap::new()
            } else {
                BTreeMap::from([(
                    String::new(),
                    HistogramSeries {
                        buckets: buckets.to_vec(),
                        sum,
                    },
                )])
            },
            errors: BTreeMap::new(),
            process_start: None,
        }
    }
}

/// Why a metrics page could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// The page has no series of the configured requests metric.
    #[error("metric '{0}' not found")]
    MissingMetric(String),
    /// A line is neither a comment nor a sample.
    #[error("line {line} is not in the Prometheus text format: {snippet:?}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The start of the offending line.
        snippet: String,
    },
    /// A series we use has a value no counter can have (NaN, infinite or negative).
    #[error("metric '{metric}' has invalid value {value} (counters must be finite and >= 0)")]
    InvalidValue {
        /// Series name.
        metric: String,
        /// The value found.
        value: f64,
    },
    /// The body is not UTF-8 text.
    #[error("body is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
}

/// Why a scrape failed. Every variant but [`ClientInit`](Self::ClientInit) and
/// [`InvalidUrl`](Self::InvalidUrl) is transient: the next tick may succeed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The HTTP client could not be built (configuration problem; fatal).
    #[error("cannot build the HTTP client for scraping: {}", root_cause(.0))]
    ClientInit(#[source] reqwest::Error),
    /// The scrape URL is not usable (configuration problem; fatal).
    #[error("cannot scrape {url}: invalid URL: {}", root_cause(.source))]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// No TCP connection to the app (refused, unreachable, DNS).
    #[error("cannot scrape {url}: connection failed: {}", root_cause(.source))]
    Connect {
        /// The URL scraped.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The app did not answer in time.
    #[error("cannot scrape {url}: no complete answer within {timeout:?}")]
    Timeout {
        /// The URL scraped.
        url: String,
        /// The scraper's timeout.
        timeout: Duration,
    },
    /// The app answered with a non-2xx status.
    #[error("cannot scrape {url}: HTTP status {status}")]
    Status {
        /// The URL scraped.
        url: String,
        /// The status received.
        status: reqwest::StatusCode,
    },
    /// The page is larger than [`MAX_BODY_BYTES`].
    #[error("cannot scrape {url}: metrics page larger than {limit} bytes")]
    BodyTooLarge {
        /// The URL scraped.
        url: String,
        /// The cap, in bytes.
        limit: usize,
    },
    /// Any other HTTP failure (connection reset mid-body, protocol error).
    #[error("cannot scrape {url}: {}", root_cause(.source))]
    Http {
        /// The URL scraped.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The page was fetched but is not a usable metrics page. `url` is `None` when the text
    /// came from [`parse_sample`] directly.
    #[error("{}{source}", url_prefix(.url))]
    Parse {
        /// The URL scraped, if any.
        url: Option<String>,
        /// What is wrong with the page.
        #[source]
        source: ParseError,
    },
}

fn url_prefix(url: &Option<String>) -> String {
    url.as_ref()
        .map(|u| format!("cannot scrape {u}: "))
        .unwrap_or_default()
}

/// The innermost error's message: reqwest's own message ("error sending request") says less
/// than the OS error underneath ("Connection refused").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Reads the requests, errors and latency series named in `names` from a metrics page in the
/// Prometheus text format (OpenMetrics text is accepted too).
///
/// Each series is kept by its label set (a series whose status label starts with `5` counts
/// errors, or, when `names.errors` is set, every series of that counter does; a series written
/// twice is added up), as is `process_start_time_seconds` when present. A page without the
/// errors counter has no errors.
/// A page without the latency histogram yields no histogram series; a page without the requests
/// metric, a line that is not in the text format, or a NaN, infinite or negative value in a
/// series we use is an error. Lines whose metric name contains `:` (recording-rule names,
/// which `prometheus-parse` cannot read) are skipped, so such names cannot be configured.
pub fn parse_sample(text: &str, names: &MetricNames) -> Result<Sample, ScrapeError> {
    parse_page(text, names).map_err(|source| ScrapeError::Parse { url: None, source })
}

fn parse_page(text: &str, names: &MetricNames) -> Result<Sample, ParseError> {
    check_lines(text)?;
    // The iterator never yields an error, so neither does the parser.
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).map_err(|e| {
        ParseError::Malformed {
            line: 0,
            snippet: e.to_string(),
        }
    })?;

    let bucket_name = format!("{}_bucket", names.latency);
    let sum_name = format!("{}_sum", names.latency);
    let mut sample = Sample::default();
    let mut found_requests = false;

    for s in &scrape.samples {
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                if s.metric == names.requests {
                    let value = counter(&s.metric, *v)?;
                    found_requests = true;
                    let error = names.errors.is_none()
                        && s.labels
                            .get(&names.status_label)
                            .is_some_and(|code| code.starts_with('5'));
                    let series = sample
                        .requests
                        .entry(series_key(&s.labels, None))
                        .or_default();
                    series.value += value;
                    series.error = error;
                } else if names.errors.as_ref() == Some(&s.metric) {
                    let value = counter(&s.metric, *v)?;
                    *sample
                        .errors
                        .entry(series_key(&s.labels, None))
                        .or_default() += value;
                } else if s.metric == sum_name {
                    let value = counter(&s.metric, *v)?;
                    sample
                        .histograms
                        .entry(series_key(&s.labels, None))
                        .or_default()
                        .sum += value;
                } else if s.metric == bucket_name {
                    // A histogram without a `# TYPE` line: its buckets come through as plain
                    // samples carrying an `le` label.
                    if let Some(le) = s.labels.get("le").and_then(parse_le) {
                        let value = counter(&s.metric, *v)?;
                        let key = series_key(&s.labels, Some("le"));
                        let series = sample.histograms.entry(key).or_default();
                        add_bucket(&mut series.buckets, le, value);
                    }
                } else if s.metric == PROCESS_START {
                    // Several (one per process) would be odd; the latest start is what moves.
                    sample.process_start = Some(sample.process_start.map_or(*v, |p| p.max(*v)));
                }
            }
            // The parser has already taken `le` out of a typed histogram's labels.
            Value::Histogram(counts) if s.metric == names.latency => {
                let series = sample
                    .histograms
                    .entry(series_key(&s.labels, None))
                    .or_default();
                for c in counts {
                    add_bucket(
                        &mut series.buckets,
                        c.less_than,
                        counter(&bucket_name, c.count)?,
                    );
                }
            }
            Value::Histogram(_) | Value::Summary(_) => {}
        }
    }

    if !found_requests {
        return Err(ParseError::MissingMetric(names.requests.clone()));
    }
    for h in sample.histograms.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(sample)
}

/// The gauge client libraries export with the process's start time, in Unix seconds.
const PROCESS_START: &str = "process_start_time_seconds";

/// A label set as a series key: sorted `k="v"` pairs, without `skip`.
fn series_key(labels: &prometheus_parse::Labels, skip: Option<&str>) -> String {
    let mut pairs: Vec<(&String, &String)> = labels
        .iter()
        .filter(|(k, _)| Some(k.as_str()) != skip)
        .collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rejects text that is not a metrics page; `prometheus-parse` would silently skip it.
fn check_lines(text: &str) -> Result<(), ParseError> {
    for (i, line) in text.lines().enumerate() {
        let bad = match LineInfo::parse(line) {
            LineInfo::Empty | LineInfo::Doc { .. } | LineInfo::Type { .. } => false,
            LineInfo::Sample { value, .. } => parse_float(value).is_none(),
            LineInfo::Ignored => {
                let t = line.trim_start();
                !(t.starts_with('#') || has_colon_name(t))
            }
        };
        if bad {
            return Err(ParseError::Malformed {
                line: i + 1,
                snippet: line.chars().take(80).collect(),
            });
        }
    }
    Ok(())
}

/// `foo:bar{...} 1` or `foo:bar 1`: a legal metric name the parser's regex cannot match.
fn has_colon_name(line: &str) -> bool {
    let name_len = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(name_len);
    name.contains(':')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && (rest.starts_with('{') || rest.starts_with([' ', '\t']))
}

/// Go-style float: `NaN`, `+Inf`, `-Inf` or a decimal.
fn parse_float(s: &str) -> Option<f64> {
    s.parse::<f64>().ok()
}

fn parse_le(s: &str) -> Option<f64> {
    parse_float(s).filter(|le| !le.is_nan())
}

fn counter(metric: &str, value: f64) -> Result<f64, ParseError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ParseError::InvalidValue {
            metric: metric.to_owned(),
            value,
        })
    }
}

fn add_bucket(buckets: &mut Vec<(f64, f64)>, le: f64, count: f64) {
    match buckets.iter_mut().find(|(b, _)| *b == le) {
        Some((_, c)) => *c += count,
        None => buckets.push((le, count)),
    }
}

/// Fetches metrics pages over HTTP.
///
/// Keeps one connection pool for the agent's lifetime; proxies from the environment are
/// ignored, since the app is local.
pub struct Scraper {
    client: reqwest::Client,
    timeout: Duration,
}

impl Scraper {
    /// A scraper whose every request (connect, headers and body) must finish within `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, ScrapeError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .pool_max_idle_per_host(1)
            .user_agent(concat!("serin-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ScrapeError::ClientInit)?;
        Ok(Self { client, timeout })
    }

    /// Fetches `url` and parses it with [`parse_sample`].
    pub async fn scrape(&self, url: &str, names: &MetricNames) -> Result<Sample, ScrapeError> {
        let body = self.fetch(url).await?;
        let text = std::str::from_utf8(&body).map_err(|e| ScrapeError::Parse {
            url: Some(url.to_owned()),
            source: ParseError::NotUtf8(e.valid_up_to()),
        })?;
        parse_page(text, names).map_err(|source| ScrapeError::Parse {
            url: Some(url.to_owned()),
            source,
        })
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, ScrapeError> {
        let too_large = || ScrapeError::BodyTooLarge {
            url: url.to_owned(),
            limit: MAX_BODY_BYTES,
        };
        let mut resp = self
            .client
            .get(url)
            .header(ACCEPT, ACCEPT_TEXT)
            .send()
            .await
            .map_err(|e| self.classify(url, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ScrapeError::Status {
                url: url.to_owned(),
                status,
            });
        }
        let declared = resp.content_length().unwrap_or(0);
        if declared > MAX_BODY_BYTES as u64 {
            return Err(too_large());
        }
        // `declared` is at most MAX_BODY_BYTES here.
        let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.classify(url, e))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn classify(&self, url: &str, err: reqwest::Error) -> ScrapeError {
        let url = url.to_owned();
        if err.is_timeout() {
            ScrapeError::Timeout {
                url,
                timeout: self.timeout,
            }
        } else if err.is_builder() {
            ScrapeError::InvalidUrl { url, source: err }
        } else if err.is_connect() {
            ScrapeError::Connect { url, source: err }
        } else {
            ScrapeError::Http { url, source: err }
        }
    }
}

impl MetricsSource for Scraper {
    fn scrape(
        &self,
        url: &str,
        names: &MetricNames,
    ) -> impl Future<Output = Result<Sample, ScrapeError>> + Send {
        Scraper::scrape(self, url, names)
    }
}

/// Request, error and latency counts of one interval between two scrapes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Window {
    /// Requests handled in the interval.
    pub requests: u64,
    /// Of those, the failed ones: requests answered with a 5xx status, or the increase of the
    /// [`MetricNames::errors`] counter when one is configured (then at most `requests`: a
    /// page read between the two counters' increments cannot make more failures than work).
    pub errors: u64,
    /// `(le, requests of the interval that took at most le)`, sorted by `le`. Empty when the
    /// page has no histogram, or when the bucket layout changed during this interval without a
    /// restart (the two layouts cannot be subtracted).
    pub buckets: Vec<(f64, u64)>,
    /// Total latency of the interval's requests, in the histogram's unit.
    pub latency_sum: f64,
}

/// How long a series absent from the page is remembered: if it comes back within this time it
/// counts its increase, after it it counts as new. Bounds the tracker's memory.
pub const SERIES_RETENTION: Duration = Duration::from_secs(600);

/// Turns successive cumulative [`Sample`]s into per-interval [`Window`]s, per series, as
/// Prometheus' `rate()` does; the module docs give the rules and why.
#[derive(Debug)]
pub struct DeltaTracker {
    /// Whether the next sample has a baseline to be compared with.
    baseline: bool,
    /// The last `process_start_time_seconds` seen.
    process_start: Option<f64>,
    requests: HashMap<String, Seen<RequestSeries>>,
    histograms: HashMap<String, Seen<HistogramSeries>>,
    /// Series of the errors counter ([`MetricNames::errors`]).
    errors: HashMap<String, Seen<f64>>,
    /// Samples observed so far: the tracker's clock.
    observed: u64,
    /// A series absent for more than this many samples is forgotten.
    retention: u64,
}

/// A series' last value and the sample it was last on.
#[derive(Debug)]
struct Seen<T> {
    last: T,
    at: u64,
}

impl Default for DeltaTracker {
    /// A tracker for the default 1 s interval.
    fn default() -> Self {
        Self::for_interval(Duration::from_secs(1))
    }
}

impl DeltaTracker {
    /// A tracker fed one sample per `interval`: it remembers absent series for
    /// [`SERIES_RETENTION`].
    pub fn for_interval(interval: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        let retention = SERIES_RETENTION.as_nanos().div_ceil(interval.as_nanos());
        Self::with_retention(u64::try_from(retention).unwrap_or(u64::MAX))
    }

    /// A tracker that forgets a series absent for more than `samples` samples.
    pub fn with_retention(samples: u64) -> Self {
        DeltaTracker {
            baseline: false,
            process_start: None,
            requests: HashMap::new(),
            histograms: HashMap::new(),
            errors: HashMap::new(),
            observed: 0,
            retention: samples,
        }
    }

    /// Records `sample` as the new baseline and returns the interval since the previous one;
    /// `None` for the first sample (no baseline yet).
    pub fn observe(&mut self, sample: Sample) -> Option<Window> {
        self.observed += 1;
        let now = self.observed;
        if !self.baseline {
            self.baseline = true;
            self.process_start = sample.process_start;
            self.requests = seen_at(sample.requests, now);
            self.histograms = seen_at(sample.histograms, now);
            self.errors = seen_at(sample.errors, now);
            return None;
        }

        if let (Some(before), Some(after)) = (self.process_start, sample.process_start)
            && before != after
        {
            tracing::debug!(
                before,
                after,
                "process_start_time_seconds changed: the app restarted; every series is new"
            );
            self.requests.clear();
            self.histograms.clear();
            self.errors.clear();
        }
        if sample.process_start.is_some() {
            self.process_start = sample.process_start;
        }

        let mut requests = 0.0;
        let mut errors = 0.0;
        for (key, cur) in sample.requests {
            let delta = self
                .requests
                .get(&key)
                .map_or(cur.value, |prev| increase(prev.last.value, cur.value));
            requests += delta;
            if cur.error {
                errors += delta;
            }
            self.requests.insert(key, Seen { last: cur, at: now });
        }
        // The errors counter's series, by the same rules as the requests series.
        let mut counted_errors = 0.0;
        for (key, cur) in sample.errors {
            counted_errors += self
                .errors
                .get(&key)
                .map_or(cur, |prev| increase(prev.last, cur));
            self.errors.insert(key, Seen { last: cur, at: now });
        }
        if counted_errors > requests {
            tracing::debug!(
                errors = counted_errors,
                requests,
                "the errors counter rose more than the requests counter; errors capped at requests"
            );
            counted_errors = requests;
        }
        errors += counted_errors;

        let mut buckets: Vec<(f64, f64)> = Vec::new();
        let mut layout_changed = false;
        let mut latency_sum = 0.0;
        for (key, cur) in sample.histograms {
            match self.histograms.get(&key) {
                None => {
                    cur.buckets
                        .iter()
                        .for_each(|&(le, c)| add_bucket(&mut buckets, le, c));
                    latency_sum += cur.sum;
                }
                Some(prev) => match histogram_delta(&prev.last, &cur) {
                    HistogramDelta::Buckets(delta) => {
                        delta
                            .into_iter()
                            .for_each(|(le, c)| add_bucket(&mut buckets, le, c));
                        latency_sum += (cur.sum - prev.last.sum).max(0.0);
                    }
                    HistogramDelta::Reset => {
                        tracing::debug!(series = %key, "histogram series reset");
                        cur.buckets
                            .iter()
                            .for_each(|&(le, c)| add_bucket(&mut buckets, le, c));
                        latency_sum += cur.sum;
                    }
                    HistogramDelta::LayoutChanged => {
                        tracing::debug!(
                            series = %key,
                            "histogram bucket layout changed: no latency buckets for this interval"
                        );
                        layout_changed = true;
                        latency_sum += (cur.sum - prev.last.sum).max(0.0);
                    }
                },
            }
            self.histograms.insert(key, Seen { last: cur, at: now });
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));

        let retention = self.retention;
        self.requests.retain(|_, s| now - s.at <= retention);
        self.histograms.retain(|_, s| now - s.at <= retention);
        self.errors.retain(|_, s| now - s.at <= retention);

        Some(Window {
            requests: count(requests),
            errors: count(errors),
            buckets: if layout_changed {
                Vec::new()
            } else {
                buckets.into_iter().map(|(le, c)| (le, count(c))).collect()
            },
            latency_sum,
        })
    }

    /// Drops the baseline and every remembered series, after a failed scrape, so the next
    /// success starts a new baseline instead of attributing two intervals' traffic to one.
    pub fn forget(&mut self) {
        *self = Self::with_retention(self.retention);
    }

    /// How many series (requests, histogram and errors) the tracker remembers.
    pub fn remembered(&self) -> usize {
        self.requests.len() + self.histograms.len() + self.errors.len()
    }
}

fn seen_at<T>(series: BTreeMap<String, T>, at: u64) -> HashMap<String, Seen<T>> {
    series
        .into_iter()
        .map(|(key, last)| (key, Seen { last, at }))
        .collect()
}

/// A counter's increase: its current value when it went down (it was reset).
fn increase(prev: f64, cur: f64) -> f64 {
    if cur < prev { cur } else { cur - prev }
}

/// What one histogram series contributes to a window, compared with its remembered value.
enum HistogramDelta {
    /// Same layout, nothing went down: the per-`le` increases.
    Buckets(Vec<(f64, f64)>),
    /// A bucket went down (with the same layout, or `+Inf` with another): the series was
    /// reset and contributes its current values.
    Reset,
    /// Other `le` values and no reset: the two cannot be subtracted.
    LayoutChanged,
}

fn histogram_delta(prev: &HistogramSeries, cur: &HistogramSeries) -> HistogramDelta {
    let same_layout = prev.buckets.len() == cur.buckets.len()
        && prev
            .buckets
            .iter()
            .zip(&cur.buckets)
            .all(|(p, c)| p.0 == c.0);
    if same_layout {
        if prev
            .buckets
            .iter()
            .zip(&cur.buckets)
            .any(|(p, c)| c.1 < p.1)
        {
            return HistogramDelta::Reset;
        }
        return HistogramDelta::Buckets(
            prev.buckets
                .iter()
                .zip(&cur.buckets)
                .map(|(p, c)| (c.0, c.1 - p.1))
                .collect(),
        );
    }
    let total = |h: &HistogramSeries| {
        h.buckets
            .last()
            .filter(|b| b.0 == f64::INFINITY)
            .map(|b| b.1)
    };
    match (total(prev), total(cur)) {
        (Some(p), Some(c)) if c < p => HistogramDelta::Reset,
        _ => HistogramDelta::LayoutChanged,
    }
}

/// A non-negative float count to an integer (NaN becomes 0).
fn count(v: f64) -> u64 {
    // Float-to-int `as` saturates; counts are integers below 2^53 in practice.
    v.round().max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    const PAGE: &str = r#"# HELP http_requests_total Total HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="GET",path="/",code="200"} 1027
http_requests_total{method="POST",path="/api",code="200"} 3
http_requests_total{method="GET",path="/",code="404"} 7
http_requests_total{method="GET",path="/",code="500"} 12
http_requests_total{method="POST",path="/api",code="503"} 2
# A line of free-form comment.
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.4576e+07
# HELP http_request_duration_seconds Request latency.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{path="/",le="0.05"} 900
http_request_duration_seconds_bucket{path="/",le="0.1"} 1000
http_request_duration_seconds_bucket{path="/",le="+Inf"} 1046
http_request_duration_seconds_sum{path="/"} 40.5
http_request_duration_seconds_count{path="/"} 1046
http_request_duration_seconds_bucket{path="/api",le="0.05"} 1
http_request_duration_seconds_bucket{path="/api",le="0.1"} 2
http_request_duration_seconds_bucket{path="/api",le="+Inf"} 5
http_request_duration_seconds_sum{path="/api"} 1.25
http_request_duration_seconds_count{path="/api"} 5
# HELP rpc_duration_seconds A summary.
# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.5"} 0.01
rpc_duration_seconds_sum 17.5
rpc_duration_seconds_count 2693
"#;

    fn parse(text: &str) -> Result<Sample, ScrapeError> {
        parse_sample(text, &MetricNames::default())
    }

    fn parse_err(text: &str) -> ParseError {
        match parse(text) {
            Err(ScrapeError::Parse { url: None, source }) => source,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_realistic_page() {
        let s = parse(PAGE).unwrap();
        assert_eq!(s.total_requests(), 1027.0 + 3.0 + 7.0 + 12.0 + 2.0);
        assert_eq!(s.total_errors(), 14.0);
        assert_eq!(
            s.total_buckets(),
            vec![(0.05, 901.0), (0.1, 1002.0), (f64::INFINITY, 1051.0)]
        );
        assert_eq!(s.total_latency_sum(), 41.75);
    }

    #[test]
    fn parses_openmetrics_from_prometheus_client_with_crlf() {
        // prometheus-client writes `# TYPE http_requests counter` and a `_total` sample, and
        // ends with `# EOF`; some servers use CRLF.
        let page = "# HELP http_requests Requests.\r\n# TYPE http_requests counter\r\n\
                    http_requests_total{code=\"200\"} 5\r\nhttp_requests_total{code=\"500\"} 1\r\n\
                    # EOF\r\n";
        let s = parse(page).unwrap();
        assert_eq!((s.total_requests(), s.total_errors()), (6.0, 1.0));
        assert!(s.total_buckets().is_empty());
        assert_eq!(s.total_latency_sum(), 0.0);
    }

    #[test]
    fn untyped_histogram_and_custom_names() {
        let page = "reqs{status=\"502\",x=\"a\"} 4\nreqs{status=\"200\",x=\"b\"} 6\n\
                    lat_bucket{le=\"1\"} 7\nlat_bucket{le=\"+Inf\"} 10\nlat_sum 3.5\n\
                    job:reqs:rate5m{a=\"b\"} 1\n";
        let names = MetricNames {
            requests: "reqs".into(),
            status_label: "status".into(),
            latency: "lat".into(),
            errors: None,
        };
        let s = parse_sample(page, &names).unwrap();
        assert_eq!((s.total_requests(), s.total_errors()), (10.0, 4.0));
        assert_eq!(s.total_buckets(), vec![(1.0, 7.0), (f64::INFINITY, 10.0)]);
        assert_eq!(s.total_latency_sum(), 3.5);
    }

    #[test]
    fn missing_requests_metric_is_an_error_naming_it() {
        let err = parse_err("# TYPE other counter\nother_total 5\n");
        assert_eq!(err, ParseError::MissingMetric("http_requests_total".into()));
        assert_eq!(err.to_string(), "metric 'http_requests_total' not found");
        // An empty page has no requests metric either: it is not "zero traffic".
        assert!(matches!(parse_err(""), ParseError::MissingMetric(_)));
    }

    #[test]
    fn garbage_is_malformed_not_empty() {
        let html = "<html><head><title>502 Bad Gateway</title></head>\n<body>oops</body></html>\n";
        assert!(matches!(
            parse_err(html),
            ParseError::Malformed { line: 1, .. }
        ));

        let words = "http_requests_total{code=\"200\"} 5\nthis is not a metric\n";
        assert!(matches!(
            parse_err(words),
            ParseError::Malformed { line: 2, .. }
        ));

        let bare_name = "http_requests_total\n";
        assert!(matches!(parse_err(bare_name), ParseError::Malformed { .. }));

        // Deterministic pseudo-random bytes, lossily decoded as the scraper cannot.
        let mut x: u32 = 0x2545_f491;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        assert!(matches!(parse_err(&text), ParseError::Malformed { .. }));
    }

    #[test]
    fn nan_and_negative_counters_are_errors() {
        for bad in ["NaN", "-1", "+Inf"] {
            let page = format!("http_requests_total{{code=\"200\"}} {bad}\n");
            assert!(
                matches!(parse_err(&page), ParseError::InvalidValue { .. }),
                "{bad}"
            );
        }
        let page = "http_requests_total 1\n# TYPE http_request_duration_seconds histogram\n\
                    http_request_duration_seconds_bucket{le=\"+Inf\"} NaN\n";
        assert!(matches!(
            parse_err(page),
            ParseError::InvalidValue { metric, .. } if metric == "http_request_duration_seconds_bucket"
        ));
        // Values of series we do not use are not our business.
        let page = "http_requests_total 1\ntemperature_celsius -4\n";
        assert_eq!(parse(page).unwrap().total_requests(), 1.0);
    }

    #[test]
    fn metric_names_deserialize_with_defaults_and_reject_unknown_fields() {
        let names: MetricNames = serde_json::from_str(r#"{"requests":"reqs_total"}"#).unwrap();
        assert_eq!(
            names,
            MetricNames {
                requests: "reqs_total".into(),
                ..MetricNames::default()
            }
        );
        let err = serde_json::from_str::<MetricNames>(r#"{"request":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `request`"), "{err}");
        assert_eq!(MetricNames::default().errors, None);
        let names: MetricNames =
            serde_json::from_str(r#"{"errors":"worker_jobs_failed_total"}"#).unwrap();
        assert_eq!(names.errors.as_deref(), Some("worker_jobs_failed_total"));
    }

    fn sample(requests: f64, errors: f64, buckets: &[(f64, f64)], sum: f64) -> Sample {
        Sample::of(requests, errors, buckets, sum)
    }

    const INF: f64 = f64::INFINITY;

    #[test]
    fn delta_tracker_normal_increments() {
        let mut t = DeltaTracker::default();
        assert_eq!(
            t.observe(sample(100.0, 2.0, &[(0.1, 90.0), (INF, 100.0)], 5.0)),
            None
        );
        let w = t
            .observe(sample(150.0, 5.0, &[(0.1, 130.0), (INF, 150.0)], 7.5))
            .unwrap();
        assert_eq!(
            w,
            Window {
                requests: 50,
                errors: 3,
                buckets: vec![(0.1, 40), (INF, 50)],
                latency_sum: 2.5,
            }
        );
        let w = t
            .observe(sample(150.0, 5.0, &[(0.1, 130.0), (INF, 150.0)], 7.5))
            .unwrap();
        assert_eq!(
            w,
            Window {
                requests: 0,
                errors: 0,
                buckets: vec![(0.1, 0), (INF, 0)],
                latency_sum: 0.0,
            }
        );
    }

    fn started_at(mut s: Sample, start: f64) -> Sample {
        s.process_start = Some(start);
        s
    }

    #[test]
    fn a_changed_process_start_time_makes_every_series_count_its_current_value() {
        let mut t = DeltaTracker::default();
        t.observe(started_at(
            sample(1000.0, 5.0, &[(0.1, 900.0), (INF, 1000.0)], 50.0),
            1000.0,
        ));
        // Restarted: 10 requests since, 7 of them errors. The error series did not go down
        // on its own, but the new start time says it started over too.
        let w = t
            .observe(started_at(
                sample(10.0, 7.0, &[(0.1, 8.0), (INF, 10.0)], 0.5),
                2000.0,
            ))
            .unwrap();
        assert_eq!(
            w,
            Window {
                requests: 10,
                errors: 7,
                buckets: vec![(0.1, 8), (INF, 10)],
                latency_sum: 0.5,
            }
        );
        // And the new values are the baseline afterwards.
        let w = t
            .observe(started_at(
                sample(15.0, 7.0, &[(0.1, 12.0), (INF, 15.0)], 0.75),
                2000.0,
            ))
            .unwrap();
        assert_eq!((w.requests, w.errors, w.buckets[0]), (5, 0, (0.1, 4)));

        // Without the start time, each series is judged alone: the one that went down counts
        // its current value (3), the one that went up its increase (2).
        let mut t = DeltaTracker::default();
        t.observe(sample(1000.0, 5.0, &[], 0.0));
        let w = t.observe(sample(10.0, 7.0, &[], 0.0)).unwrap();
        assert_eq!((w.requests, w.errors), (5, 2));
    }

    #[test]
    fn a_histogram_series_that_went_down_counts_its_current_buckets_and_the_others_their_increase()
    {
        let page = |a: [u64; 3], b: [u64; 3]| {
            let mut p = String::from(
                "http_requests_total 1\n# TYPE http_request_duration_seconds histogram\n",
            );
            for (worker, counts) in [("a", a), ("b", b)] {
                for (le, c) in ["0.1", "1", "+Inf"].iter().zip(counts) {
                    p += &format!(
                        "http_request_duration_seconds_bucket{{worker=\"{worker}\",le=\"{le}\"}} {c}\n"
                    );
                }
                p += &format!(
                    "http_request_duration_seconds_sum{{worker=\"{worker}\"}} {}\n",
                    counts[2]
                );
            }
            p
        };
        let mut t = DeltaTracker::default();
        assert_eq!(
            window_of(&mut t, &page([900, 990, 1000], [800, 950, 1000])),
            None
        );
        // a: +10 in (0.1], +5 in (1, +Inf]. b restarted: 4 requests since.
        let w = window_of(&mut t, &page([910, 1000, 1015], [3, 4, 4])).unwrap();
        assert_eq!(w.buckets, vec![(0.1, 10 + 3), (1.0, 10 + 4), (INF, 15 + 4)]);
        assert_eq!(w.latency_sum, 15.0 + 4.0);
    }

    #[test]
    fn a_series_that_disappears_contributes_nothing_and_its_return_counts_its_increase() {
        let mut t = DeltaTracker::default();
        let before = [(100, 1), (100, 1), (100, 1), (100, 1)];
        window_of(&mut t, &workers_page(before, None));
        // Worker 3 is gone from the page (its process exited): the others' increase only.
        let page = workers_page([(110, 1), (110, 1), (110, 1), (0, 0)], None);
        let page: String = page
            .lines()
            .filter(|l| !l.contains("worker=\"3\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let w = window_of(&mut t, &page).unwrap();
        assert_eq!((w.requests, w.errors), (30, 0));
        // It comes back higher than it was: only its increase since it was last seen counts.
        let w = window_of(
            &mut t,
            &workers_page([(110, 1), (110, 1), (110, 1), (105, 2)], None),
        )
        .unwrap();
        assert_eq!((w.requests, w.errors), (6, 1));
    }

    #[test]
    fn a_series_first_seen_after_the_baseline_counts_its_full_value() {
        let mut t = DeltaTracker::default();
        let ok_only = "http_requests_total{code=\"200\"} 100\n";
        window_of(&mut t, ok_only);
        // The canary's first 500s: the client library creates the series on its first
        // increment, so all of its value happened in this interval.
        let w = window_of(
            &mut t,
            "http_requests_total{code=\"200\"} 150\nhttp_requests_total{code=\"500\"} 3\n",
        )
        .unwrap();
        assert_eq!((w.requests, w.errors), (53, 3));
    }

    #[test]
    fn a_series_absent_longer_than_the_retention_is_forgotten_and_counts_as_new() {
        let mut t = DeltaTracker::with_retention(3);
        let both = "http_requests_total{code=\"200\"} 10\nhttp_requests_total{code=\"500\"} 5\n";
        window_of(&mut t, both);
        assert_eq!(t.remembered(), 2);
        for n in 0..3 {
            let w = window_of(
                &mut t,
                &format!("http_requests_total{{code=\"200\"}} {}\n", 11 + n),
            );
            assert_eq!(w.map(|w| w.requests), Some(1));
        }
        // Absent from three samples: still remembered, its return would count its increase.
        assert_eq!(t.remembered(), 2);
        window_of(&mut t, "http_requests_total{code=\"200\"} 14\n");
        assert_eq!(t.remembered(), 1, "absent from four samples: forgotten");
        let w = window_of(
            &mut t,
            "http_requests_total{code=\"200\"} 14\nhttp_requests_total{code=\"500\"} 6\n",
        )
        .unwrap();
        assert_eq!((w.requests, w.errors), (6, 6));

        // One sample per 100ms: ten minutes' worth.
        assert_eq!(
            DeltaTracker::for_interval(Duration::from_millis(100)).retention,
            6000
        );
    }

    #[test]
    fn a_layout_change_of_one_histogram_series_leaves_the_window_without_buckets() {
        let mut t = DeltaTracker::default();
        let page = |b_les: &str| {
            format!(
                "http_requests_total 1\n\
                 http_request_duration_seconds_bucket{{w=\"a\",le=\"0.1\"}} 5\n\
                 http_request_duration_seconds_bucket{{w=\"a\",le=\"+Inf\"}} 10\n{b_les}"
            )
        };
        window_of(
            &mut t,
            &page("http_request_duration_seconds_bucket{w=\"b\",le=\"+Inf\"} 10\n"),
        );
        let w = window_of(
            &mut t,
            &page(
                "http_request_duration_seconds_bucket{w=\"b\",le=\"0.5\"} 11\n\
                 http_request_duration_seconds_bucket{w=\"b\",le=\"+Inf\"} 12\n",
            ),
        )
        .unwrap();
        assert_eq!(w.buckets, vec![]);
    }

    #[test]
    fn delta_tracker_bucket_layout_change() {
        let mut t = DeltaTracker::default();
        t.observe(sample(100.0, 1.0, &[(0.1, 90.0), (INF, 100.0)], 1.0));
        // Same counters going up, new layout: requests still count, buckets cannot.
        let w = t
            .observe(sample(
                120.0,
                2.0,
                &[(0.05, 50.0), (0.1, 108.0), (INF, 120.0)],
                1.5,
            ))
            .unwrap();
        assert_eq!(
            w,
            Window {
                requests: 20,
                errors: 1,
                buckets: vec![],
                latency_sum: 0.5,
            }
        );
        // The new layout is the baseline from now on.
        let w = t
            .observe(sample(
                130.0,
                2.0,
                &[(0.05, 55.0), (0.1, 117.0), (INF, 130.0)],
                1.7,
            ))
            .unwrap();
        assert_eq!(w.buckets, vec![(0.05, 5), (0.1, 9), (INF, 10)]);

        // New layout after a restart: the new values, buckets included.
        let w = t
            .observe(sample(3.0, 0.0, &[(0.5, 2.0), (INF, 3.0)], 0.2))
            .unwrap();
        assert_eq!(
            (w.requests, w.buckets.clone()),
            (3, vec![(0.5, 2), (INF, 3)])
        );
    }

    /// Four workers' request counters (`code="200"` and `code="500"` each) and the start time.
    fn workers_page(counts: [(u64, u64); 4], start: Option<f64>) -> String {
        let mut page = String::from("# TYPE http_requests_total counter\n");
        for (w, (ok, err)) in counts.iter().enumerate() {
            page += &format!("http_requests_total{{worker=\"{w}\",code=\"200\"}} {ok}\n");
            page += &format!("http_requests_total{{worker=\"{w}\",code=\"500\"}} {err}\n");
        }
        if let Some(start) = start {
            page += &format!("process_start_time_seconds {start}\n");
        }
        page
    }

    fn window_of(t: &mut DeltaTracker, page: &str) -> Option<Window> {
        t.observe(parse(page).unwrap())
    }

    #[test]
    fn one_worker_restarting_counts_only_the_real_increase_not_the_totals() {
        let mut t = DeltaTracker::default();
        let before = [(10_000, 10), (10_000, 10), (10_000, 10), (10_000, 10)];
        assert_eq!(window_of(&mut t, &workers_page(before, Some(1000.0))), None);
        // Workers 0-2 handled 100 requests each (1 error each); worker 3 restarted and has
        // handled 40 since (2 errors). The process start time is the parent's: unchanged.
        let after = [(10_099, 11), (10_099, 11), (10_099, 11), (38, 2)];
        let w = window_of(&mut t, &workers_page(after, Some(1000.0))).unwrap();
        assert_eq!((w.requests, w.errors), (3 * 100 + 40, 3 + 2));
        // The whole app restarts (a new start time): every series counts its current value,
        // even the error series, which are above their old values again.
        let restarted = [(20, 12), (20, 12), (20, 12), (20, 12)];
        let w = window_of(&mut t, &workers_page(restarted, Some(2000.0))).unwrap();
        assert_eq!((w.requests, w.errors), (4 * 32, 4 * 12));
    }

    // --- errors from a counter of their own (`MetricNames::errors`) ---

    fn worker_names() -> MetricNames {
        MetricNames {
            requests: "worker_jobs_processed_total".into(),
            errors: Some("worker_jobs_failed_total".into()),
            latency: "worker_job_duration_seconds".into(),
            ..MetricNames::default()
        }
    }

    /// A queue worker's page as prometheus-client writes it: processed and failed jobs per
    /// queue (`None`: no failed series for that queue yet), the start time, `# EOF`.
    fn queue_page(queues: &[(&str, u64, Option<u64>)], start: f64) -> String {
        let mut page = String::from(
            "# HELP worker_jobs_processed Jobs processed, failed ones included.\n\
             # TYPE worker_jobs_processed counter\n",
        );
        for (queue, processed, _) in queues {
            page += &format!("worker_jobs_processed_total{{queue=\"{queue}\"}} {processed}\n");
        }
        page += "# HELP worker_jobs_failed Jobs that failed.\n# TYPE worker_jobs_failed counter\n";
        for (queue, _, failed) in queues {
            if let Some(failed) = failed {
                page += &format!("worker_jobs_failed_total{{queue=\"{queue}\"}} {failed}\n");
            }
        }
        page += &format!(
            "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}\n# EOF\n"
        );
        page
    }

    fn worker_window(t: &mut DeltaTracker, page: &str) -> Option<Window> {
        t.observe(parse_sample(page, &worker_names()).unwrap())
    }

    #[test]
    fn an_errors_counter_is_summed_over_its_labels_and_the_status_label_is_not_read() {
        // `code="500"` on a processed series would be an error by status; with `errors` set it
        // is just work.
        let page = "# TYPE worker_jobs_processed_total counter\n\
                    worker_jobs_processed_total{queue=\"mail\",code=\"500\"} 120\n\
                    worker_jobs_processed_total{queue=\"sms\"} 30\n\
                    # TYPE worker_jobs_failed_total counter\n\
                    worker_jobs_failed_total{queue=\"mail\",reason=\"timeout\"} 4\n\
                    worker_jobs_failed_total{queue=\"mail\",reason=\"rejected\"} 2\n\
                    worker_jobs_failed_total{queue=\"sms\",reason=\"timeout\"} 1\n\
                    # TYPE worker_job_duration_seconds histogram\n\
                    worker_job_duration_seconds_bucket{le=\"0.01\"} 140\n\
                    worker_job_duration_seconds_bucket{le=\"+Inf\"} 150\n\
                    worker_job_duration_seconds_sum 0.9\n\
                    worker_job_duration_seconds_count 150\n";
        let s = parse_sample(page, &worker_names()).unwrap();
        assert_eq!((s.total_requests(), s.total_errors()), (150.0, 7.0));
        assert!(s.requests.values().all(|r| !r.error), "{s:?}");
        assert_eq!(s.errors.len(), 3);
        assert_eq!(s.total_buckets(), vec![(0.01, 140.0), (INF, 150.0)]);
        // The same page read by the status label: the `code="500"` series is the errors.
        let by_status = MetricNames {
            errors: None,
            ..worker_names()
        };
        assert_eq!(
            parse_sample(page, &by_status).unwrap().total_errors(),
            120.0
        );
    }

    #[test]
    fn a_page_without_the_errors_counter_has_no_errors_but_one_without_requests_is_an_error() {
        let page = queue_page(&[("mail", 40, None)], 1000.0);
        let s = parse_sample(&page, &worker_names()).unwrap();
        assert_eq!((s.total_requests(), s.total_errors()), (40.0, 0.0));
        let only_failed = "worker_jobs_failed_total 3\n";
        assert!(matches!(
            parse_sample(only_failed, &worker_names()),
            Err(ScrapeError::Parse {
                source: ParseError::MissingMetric(m),
                ..
            }) if m == "worker_jobs_processed_total"
        ));
    }

    #[test]
    fn an_errors_counter_with_an_impossible_value_is_an_error_naming_it() {
        let page = "worker_jobs_processed_total 5\nworker_jobs_failed_total -2\n";
        let err = parse_sample(page, &worker_names()).unwrap_err().to_string();
        assert_eq!(
            err,
            "metric 'worker_jobs_failed_total' has invalid value -2 (counters must be finite and >= 0)"
        );
    }

    #[test]
    fn errors_counter_windows_are_its_increase_and_a_first_failure_series_counts_in_full() {
        let mut t = DeltaTracker::default();
        let base = queue_page(&[("mail", 1000, Some(10)), ("sms", 500, None)], 1000.0);
        assert_eq!(worker_window(&mut t, &base), None);
        // mail: 100 more jobs, 5 more failed; sms: 50 more, and its first 2 failures create
        // its failed series, which must count in full.
        let next = queue_page(&[("mail", 1100, Some(15)), ("sms", 550, Some(2))], 1000.0);
        let w = worker_window(&mut t, &next).unwrap();
        assert_eq!((w.requests, w.errors), (150, 7));
        // Nothing new: nothing counted.
        let w = worker_window(&mut t, &next).unwrap();
        assert_eq!((w.requests, w.errors), (0, 0));
        assert_eq!(t.remembered(), 4);
    }

    #[test]
    fn an_errors_series_that_went_down_counts_its_current_value_as_requests_do() {
        let mut t = DeltaTracker::default();
        let base = queue_page(&[("mail", 1000, Some(10)), ("sms", 500, Some(8))], 1000.0);
        worker_window(&mut t, &base);
        // The sms consumer restarted inside the app (same start time): both its counters
        // went down and count their current values; mail counts its increase.
        let next = queue_page(&[("mail", 1010, Some(11)), ("sms", 20, Some(3))], 1000.0);
        let w = worker_window(&mut t, &next).unwrap();
        assert_eq!((w.requests, w.errors), (10 + 20, 1 + 3));
        // The whole app restarted (new start time): every series counts its current value,
        // even a failed series that is above its old value again.
        let restarted = queue_page(&[("mail", 40, Some(12)), ("sms", 10, None)], 2000.0);
        let w = worker_window(&mut t, &restarted).unwrap();
        assert_eq!((w.requests, w.errors), (50, 12));
    }

    #[test]
    fn an_errors_series_that_disappears_counts_nothing_and_its_return_counts_its_increase() {
        let mut t = DeltaTracker::default();
        worker_window(&mut t, &queue_page(&[("mail", 100, Some(10))], 1000.0));
        let gone = queue_page(&[("mail", 150, None)], 1000.0);
        let w = worker_window(&mut t, &gone).unwrap();
        assert_eq!((w.requests, w.errors), (50, 0));
        let back = queue_page(&[("mail", 200, Some(13))], 1000.0);
        let w = worker_window(&mut t, &back).unwrap();
        assert_eq!((w.requests, w.errors), (50, 3));
    }

    #[test]
    fn errors_never_exceed_the_requests_of_the_window() {
        let mut t = DeltaTracker::default();
        worker_window(&mut t, &queue_page(&[("mail", 100, Some(10))], 1000.0));
        // Scraped between a job's failed and processed increments (or a failed counter that
        // counts something else): 1 job, 4 failures.
        let w = worker_window(&mut t, &queue_page(&[("mail", 101, Some(14))], 1000.0)).unwrap();
        assert_eq!((w.requests, w.errors), (1, 1));
        let w = worker_window(&mut t, &queue_page(&[("mail", 101, Some(20))], 1000.0)).unwrap();
        assert_eq!((w.requests, w.errors), (0, 0));
    }

    #[test]
    fn delta_tracker_forget_drops_the_errors_series_too() {
        let mut t = DeltaTracker::default();
        worker_window(&mut t, &queue_page(&[("mail", 100, Some(10))], 1000.0));
        t.forget();
        assert_eq!(t.remembered(), 0);
        let page = queue_page(&[("mail", 300, Some(30))], 1000.0);
        assert_eq!(worker_window(&mut t, &page), None);
        let page = queue_page(&[("mail", 310, Some(31))], 1000.0);
        let w = worker_window(&mut t, &page).unwrap();
        assert_eq!((w.requests, w.errors), (10, 1));
    }

    #[test]
    fn delta_tracker_forget_starts_a_new_baseline() {
        let mut t = DeltaTracker::default();
        t.observe(sample(100.0, 0.0, &[], 0.0));
        t.observe(sample(110.0, 0.0, &[], 0.0)).unwrap();
        t.forget();
        assert_eq!(t.observe(sample(500.0, 1.0, &[], 0.0)), None);
        let w = t.observe(sample(520.0, 1.0, &[], 0.0)).unwrap();
        assert_eq!((w.requests, w.errors), (20, 0));
    }

    // --- scraper against real local sockets ---

    /// Serves `response` (raw HTTP bytes) to every connection, after reading the request head.
    async fn raw_server(response: Vec<u8>) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let response = response.clone();
                tokio::spawn(async move {
                    read_request_head(&mut sock).await;
                    let _ = sock.write_all(&response).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (addr, task)
    }

    async fn read_request_head(sock: &mut TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn http(status: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn scraper(timeout_ms: u64) -> Scraper {
        Scraper::new(Duration::from_millis(timeout_ms)).unwrap()
    }

    #[tokio::test]
    async fn scrape_good_page() {
        let (addr, server) = raw_server(http("200 OK", PAGE.as_bytes())).await;
        let s = scraper(2000)
            .scrape(&format!("http://{addr}/metrics"), &MetricNames::default())
            .await
            .unwrap();
        assert_eq!(s, parse(PAGE).unwrap());
        server.abort();
    }

    #[tokio::test]
    async fn scrape_non_2xx_is_a_status_error() {
        let (addr, server) = raw_server(http("500 Internal Server Error", b"boom")).await;
        let url = format!("http://{addr}/metrics");
        let err = scraper(2000)
            .scrape(&url, &MetricNames::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ScrapeError::Status { status, .. } if status.as_u16() == 500),
            "{err:?}"
        );
        assert!(err.to_string().contains(&url), "{err}");
        assert!(err.to_string().contains("500"), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn scrape_garbage_body_is_a_parse_error_naming_the_url() {
        let (addr, server) = raw_server(http(
            "200 OK",
            b"<html><body>Welcome to nginx!</body></html>\n",
        ))
        .await;
        let url = format!("http://{addr}/metrics");
        let err = scraper(2000)
            .scrape(&url, &MetricNames::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                ScrapeError::Parse { url: Some(u), source: ParseError::Malformed { .. } } if *u == url
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("cannot scrape {url}: ")),
            "{err}"
        );
        server.abort();

        let (addr, server) = raw_server(http("200 OK", &[0xff, 0xfe, 0x00, 0x80, 0x41])).await;
        let err = scraper(2000)
            .scrape(&format!("http://{addr}/"), &MetricNames::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ScrapeError::Parse {
                    source: ParseError::NotUtf8(0),
                    ..
                }
            ),
            "{err:?}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn scrape_too_large_body_is_refused() {
        // Declared too large.
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let (addr, server) = raw_server(head.into_bytes()).await;
        let err = scraper(2000)
            .scrape(&format!("http://{addr}/"), &MetricNames::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ScrapeError::BodyTooLarge { .. }), "{err:?}");
        server.abort();

        // Undeclared length, streamed until close.
        let mut resp = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
        let line = b"http_requests_total{code=\"200\"} 1\n";
        while resp.len() < MAX_BODY_BYTES + 1024 {
            resp.extend_from_slice(line);
        }
        let (addr, server) = raw_server(resp).await;
        let err = scraper(5000)
            .scrape(&format!("http://{addr}/"), &MetricNames::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ScrapeError::BodyTooLarge { .. }), "{err:?}");
        server.abort();
    }

    #[tokio::test]
    async fn scrape_silent_server_times_out_quickly() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and reads, never answers.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let start = Instant::now();
        let err = scraper(200)
            .scrape(&format!("http://{addr}/metrics"), &MetricNames::default())
            .await
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(matches!(err, ScrapeError::Timeout { .. }), "{err:?}");
        assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn scrape_refused_connection_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        }; // listener dropped: nothing listens there now
        let url = format!("http://{addr}/metrics");
        let err = scraper(2000)
            .scrape(&url, &MetricNames::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ScrapeError::Connect { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    #[tokio::test]
    async fn scrape_invalid_url_is_reported_as_such() {
        let err = scraper(2000)
            .scrape("not a url", &MetricNames::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ScrapeError::InvalidUrl { .. }), "{err:?}");
    }
}
