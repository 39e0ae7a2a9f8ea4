//! Scraping an application's Prometheus metrics page.
//!
//! Three steps, each usable alone:
//! 1. [`Scraper::scrape`] fetches the page over plain HTTP (timeout, 4 MiB cap, no proxy) and
//! 2. [`parse_sample`] reads the configured series ([`MetricNames`]) into a cumulative
//!    [`Sample`], summing over every label except the status code;
//! 3. [`DeltaTracker`] turns successive samples into per-interval [`Window`]s, handling app
//!    restarts (counter resets) and histogram layout changes.
//!
//! Steps 1 and 2 together are [`Scraper`]'s [`MetricsSource`] implementation, which the
//! runtime's collector uses.
//!
//! Parsing uses the `prometheus-parse` crate. That crate never reports an error: it silently
//! skips lines it cannot read. [`parse_sample`] therefore first checks every line with the
//! crate's own line classifier and rejects pages that are not in the text format (an HTML error
//! page, random bytes) instead of reporting them as "no traffic".

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
    /// Counter of handled requests (all series of this name are summed).
    #[serde(default = "default_requests")]
    pub requests: String,
    /// Label of `requests` holding the HTTP status; values starting with `5` are errors.
    #[serde(default = "default_status_label")]
    pub status_label: String,
    /// Base name of the request-duration histogram (`<latency>_bucket`, `<latency>_sum`).
    #[serde(default = "default_latency")]
    pub latency: String,
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
        }
    }
}

/// Cumulative counters read from one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sum of every `requests` series.
    pub requests: f64,
    /// Sum of the `requests` series whose status label starts with `5`.
    pub errors: f64,
    /// `(le, cumulative count)` summed over label sets, sorted by `le`; `+Inf` is
    /// `f64::INFINITY`. Empty when the page has no latency histogram.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of every `<latency>_sum` series, in the histogram's unit (seconds by convention).
    pub latency_sum: f64,
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
/// Series are summed over all labels (errors: over those whose status label starts with `5`).
/// A page without the latency histogram yields empty buckets; a page without the requests
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
    let mut requests: Option<f64> = None;
    let mut errors = 0.0;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut latency_sum = 0.0;

    for s in &scrape.samples {
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                if s.metric == names.requests {
                    let v = counter(&s.metric, *v)?;
                    *requests.get_or_insert(0.0) += v;
                    if s.labels
                        .get(&names.status_label)
                        .is_some_and(|code| code.starts_with('5'))
                    {
                        errors += v;
                    }
                } else if s.metric == sum_name {
                    latency_sum += counter(&s.metric, *v)?;
                } else if s.metric == bucket_name {
                    // A histogram without a `# TYPE` line: its buckets come through as plain
                    // samples carrying an `le` label.
                    if let Some(le) = s.labels.get("le").and_then(parse_le) {
                        add_bucket(&mut buckets, le, counter(&s.metric, *v)?);
                    }
                }
            }
            Value::Histogram(counts) if s.metric == names.latency => {
                for c in counts {
                    add_bucket(&mut buckets, c.less_than, counter(&bucket_name, c.count)?);
                }
            }
            Value::Histogram(_) | Value::Summary(_) => {}
        }
    }

    let requests = requests.ok_or_else(|| ParseError::MissingMetric(names.requests.clone()))?;
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Sample {
        requests,
        errors,
        buckets,
        latency_sum,
    })
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
    /// Of those, requests answered with a 5xx status.
    pub errors: u64,
    /// `(le, requests of the interval that took at most le)`, sorted by `le`. Empty when the
    /// page has no histogram, or when the bucket layout changed during this interval without a
    /// restart (the two layouts cannot be subtracted).
    pub buckets: Vec<(f64, u64)>,
    /// Total latency of the interval's requests, in the histogram's unit.
    pub latency_sum: f64,
}

/// Turns successive cumulative [`Sample`]s into per-interval [`Window`]s.
///
/// If any counter (requests, errors, or a bucket of an unchanged layout) went down, the app
/// restarted: the new sample's values are the interval's counts, as Prometheus' `rate()` does.
/// If the bucket layout changed but nothing went down, requests and errors are subtracted as
/// usual and the window's buckets are left empty for that one interval.
#[derive(Debug, Default)]
pub struct DeltaTracker {
    last: Option<Sample>,
}

impl DeltaTracker {
    /// Records `sample` as the new baseline and returns the interval since the previous one;
    /// `None` for the first sample (no baseline yet).
    pub fn observe(&mut self, sample: Sample) -> Option<Window> {
        let window = self.last.as_ref().map(|prev| delta(prev, &sample));
        self.last = Some(sample);
        window
    }

    /// Drops the baseline, after a failed scrape, so the next success starts a new one instead
    /// of attributing two intervals' traffic to one.
    pub fn forget(&mut self) {
        self.last = None;
    }
}

fn delta(prev: &Sample, cur: &Sample) -> Window {
    let same_layout = prev.buckets.len() == cur.buckets.len()
        && prev
            .buckets
            .iter()
            .zip(&cur.buckets)
            .all(|(p, c)| p.0 == c.0);
    let went_down = cur.requests < prev.requests
        || cur.errors < prev.errors
        || (same_layout
            && prev
                .buckets
                .iter()
                .zip(&cur.buckets)
                .any(|(p, c)| c.1 < p.1));

    if went_down {
        tracing::debug!(
            requests_before = prev.requests,
            requests_now = cur.requests,
            "counter reset: the app restarted"
        );
        return Window {
            requests: count(cur.requests),
            errors: count(cur.errors),
            buckets: cur.buckets.iter().map(|&(le, c)| (le, count(c))).collect(),
            latency_sum: cur.latency_sum.max(0.0),
        };
    }

    let buckets = if same_layout {
        prev.buckets
            .iter()
            .zip(&cur.buckets)
            .map(|(p, c)| (c.0, count(c.1 - p.1)))
            .collect()
    } else {
        tracing::debug!("histogram bucket layout changed: no latency for this interval");
        Vec::new()
    };
    Window {
        requests: count(cur.requests - prev.requests),
        errors: count(cur.errors - prev.errors),
        buckets,
        latency_sum: (cur.latency_sum - prev.latency_sum).max(0.0),
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
        assert_eq!(s.requests, 1027.0 + 3.0 + 7.0 + 12.0 + 2.0);
        assert_eq!(s.errors, 14.0);
        assert_eq!(
            s.buckets,
            vec![(0.05, 901.0), (0.1, 1002.0), (f64::INFINITY, 1051.0)]
        );
        assert_eq!(s.latency_sum, 41.75);
    }

    #[test]
    fn parses_openmetrics_from_prometheus_client_with_crlf() {
        // prometheus-client writes `# TYPE http_requests counter` and a `_total` sample, and
        // ends with `# EOF`; some servers use CRLF.
        let page = "# HELP http_requests Requests.\r\n# TYPE http_requests counter\r\n\
                    http_requests_total{code=\"200\"} 5\r\nhttp_requests_total{code=\"500\"} 1\r\n\
                    # EOF\r\n";
        let s = parse(page).unwrap();
        assert_eq!((s.requests, s.errors), (6.0, 1.0));
        assert!(s.buckets.is_empty());
        assert_eq!(s.latency_sum, 0.0);
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
        };
        let s = parse_sample(page, &names).unwrap();
        assert_eq!((s.requests, s.errors), (10.0, 4.0));
        assert_eq!(s.buckets, vec![(1.0, 7.0), (f64::INFINITY, 10.0)]);
        assert_eq!(s.latency_sum, 3.5);
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
        assert_eq!(parse(page).unwrap().requests, 1.0);
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
    }

    fn sample(requests: f64, errors: f64, buckets: &[(f64, f64)], sum: f64) -> Sample {
        Sample {
            requests,
            errors,
            buckets: buckets.to_vec(),
            latency_sum: sum,
        }
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

    #[test]
    fn delta_tracker_counter_reset_uses_new_values() {
        let mut t = DeltaTracker::default();
        t.observe(sample(1000.0, 5.0, &[(0.1, 900.0), (INF, 1000.0)], 50.0));
        // Restarted: 10 requests since, 7 of them errors. Errors did not go down on their own,
        // but the restart covers them too.
        let w = t
            .observe(sample(10.0, 7.0, &[(0.1, 8.0), (INF, 10.0)], 0.5))
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
            .observe(sample(15.0, 7.0, &[(0.1, 12.0), (INF, 15.0)], 0.75))
            .unwrap();
        assert_eq!((w.requests, w.errors, w.buckets[0]), (5, 0, (0.1, 4)));

        // Without a histogram, requests alone reveal the restart.
        let mut t = DeltaTracker::default();
        t.observe(sample(1000.0, 5.0, &[], 0.0));
        let w = t.observe(sample(10.0, 7.0, &[], 0.0)).unwrap();
        assert_eq!((w.requests, w.errors), (10, 7));

        // A bucket alone going down is a reset too.
        let mut t = DeltaTracker::default();
        t.observe(sample(100.0, 0.0, &[(0.1, 90.0), (INF, 100.0)], 1.0));
        let w = t
            .observe(sample(100.0, 0.0, &[(0.1, 3.0), (INF, 100.0)], 1.0))
            .unwrap();
        assert_eq!(w.requests, 100);
        assert_eq!(w.buckets, vec![(0.1, 3), (INF, 100)]);
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
