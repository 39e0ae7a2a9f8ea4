//! Analysis: merging what agents measured and judging the canary against it. Pure: no I/O.
//!
//! - [`Window`]: request, error and latency-histogram counts of one variant over some time,
//!   mergeable across instances, agents and ticks.
//! - [`evaluate_check`]: one check over a pair of windows → [`Verdict`]. A check never passes on
//!   missing or too little data; it answers [`Verdict::NoData`] and the stage keeps observing.
//! - [`StageAnalysis`] and [`judge_stage`]: all checks of a stage together.
//!
//! The statistical engine (sequential tests) will be another [`Rule`] kind evaluated here; the
//! verdict type already has the three answers it needs (pass, fail, not enough data).

use serde::{Deserialize, Serialize};

use crate::strategy::{Check, Metric, Rule};
pub mod scores;
pub mod sequential;

/// Counts of one variant over a span of time. Histogram buckets are cumulative by upper bound
/// (Prometheus `le`), in seconds, and must share one layout to be merged exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Requests served.
    pub requests: u64,
    /// Of those, errors (5xx).
    pub errors: u64,
    /// Upper bounds in seconds, ascending; the last may be +Inf.
    #[serde(with = "bounds_serde")]
    pub bounds: Vec<f64>,
    /// Cumulative count of requests at or under each bound.
    pub counts: Vec<u64>,
    /// Sum of latencies in seconds.
    pub latency_sum: f64,
    /// Intervals whose scrape failed (missing data).
    pub missing: u64,
    /// Host samples of the variant's hosts: how many, and the highest memory use (0..=1) and
    /// CPU use (0..=1 of the host) among them.
    #[serde(default, skip_serializing_if = "HostPeak::is_empty")]
    pub hosts: HostPeak,
}

/// The peak of host gauges over hosts and time, mergeable (a max).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostPeak {
    /// Host samples merged in.
    pub samples: u64,
    /// Highest memory use, as a fraction of the host's memory.
    pub memory: f64,
    /// Highest CPU use, as a fraction of the host.
    pub cpu: f64,
}

impl HostPeak {
    /// One host sample; `None` when the host reported no memory total.
    pub fn sample(cpu_percent: f64, memory_used: u64, memory_total: u64) -> Option<HostPeak> {
        (memory_total > 0).then(|| HostPeak {
            samples: 1,
            memory: (memory_used as f64 / memory_total as f64).clamp(0.0, 1.0),
            cpu: (cpu_percent / 100.0).clamp(0.0, 1.0),
        })
    }

    fn is_empty(&self) -> bool {
        self.samples == 0
    }

    fn merge(&mut self, other: &HostPeak) {
        self.samples += other.samples;
        self.memory = self.memory.max(other.memory);
        self.cpu = self.cpu.max(other.cpu);
    }
}

impl Window {
    /// A window from one report.
    pub fn from_counts(requests: u64, errors: u64, buckets: &[(f64, u64)], sum: f64) -> Window {
        Window {
            requests,
            errors: errors.min(requests),
            bounds: buckets.iter().map(|b| b.0).collect(),
            counts: buckets.iter().map(|b| b.1).collect(),
            latency_sum: sum,
            missing: 0,
            hosts: HostPeak::default(),
        }
    }

    /// A window recording one failed scrape.
    pub fn missing() -> Window {
        Window {
            missing: 1,
            ..Window::default()
        }
    }

    /// Adds `other` into `self`. Histograms with different bucket layouts are merged onto the
    /// union of bounds, each count carried to the next bound it is known to lie under
    /// (conservative: a quantile never reads lower than the truth).
    pub fn merge(&mut self, other: &Window) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency_sum += other.latency_sum;
        self.missing += other.missing;
        self.hosts.merge(&other.hosts);
        if other.bounds.is_empty() {
            return;
        }
        if self.bounds.is_empty() {
            self.bounds = other.bounds.clone();
            self.counts = other.counts.clone();
            return;
        }
        if self.bounds == other.bounds {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
            return;
        }
        let mut bounds: Vec<f64> = self.bounds.iter().chain(&other.bounds).copied().collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let counts = bounds
            .iter()
            .map(|&le| {
                cumulative_at(&self.bounds, &self.counts, le)
                    + cumulative_at(&other.bounds, &other.counts, le)
            })
            .collect();
        self.bounds = bounds;
        self.counts = counts;
    }

    /// Error share in 0..=1, or `None` with no requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// Number of requests counted by the histogram.
    pub fn observed(&self) -> u64 {
        self.counts.last().copied().unwrap_or(0)
    }

    /// Latency quantile `q` in seconds, interpolated linearly within the bucket as Prometheus'
    /// `histogram_quantile` does. `None` with no observations. A quantile in the +Inf bucket
    /// answers the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.observed();
        if total == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for (&le, &count) in self.bounds.iter().zip(&self.counts) {
            if count as f64 >= rank && count > lower_count {
                if le.is_infinite() {
                    return Some(lower_bound);
                }
                let in_bucket = (count - lower_count) as f64;
                let fraction = (rank - lower_count as f64) / in_bucket;
                return Some(lower_bound + (le - lower_bound) * fraction.clamp(0.0, 1.0));
            }
            if le.is_finite() {
                lower_bound = le;
            }
            lower_count = count;
        }
        Some(lower_bound)
    }

    /// The value of `metric` (error rate as a fraction, latencies in milliseconds); `None` for
    /// the canary's share, which needs both variants ([`Pair::canary_share`]).
    pub fn metric(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::CanaryShare => None,
            Metric::ErrorRate => self.error_rate(),
            Metric::HostMemory => (self.hosts.samples > 0).then_some(self.hosts.memory),
            Metric::HostCpu => (self.hosts.samples > 0).then_some(self.hosts.cpu),
            _ => metric
                .quantile()
                .and_then(|q| self.quantile(q))
                .map(|s| s * 1000.0),
        }
    }

    /// How many requests back `metric`: all requests for error rate, histogram observations
    /// for latency.
    pub fn support(&self, metric: Metric) -> u64 {
        match metric {
            Metric::ErrorRate | Metric::CanaryShare => self.requests,
            Metric::HostMemory | Metric::HostCpu => self.hosts.samples,
            _ => self.observed(),
        }
    }
}

/// JSON has no infinity: bucket bounds are written as numbers, with `"+Inf"` for the last.
mod bounds_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Bound {
        Finite(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(bounds: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let out: Vec<Bound> = bounds
            .iter()
            .map(|&b| {
                if b.is_finite() {
                    Bound::Finite(b)
                } else {
                    Bound::Text("+Inf".to_owned())
                }
            })
            .collect();
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<Bound>::deserialize(d)?
            .into_iter()
            .map(|b| match b {
                Bound::Finite(f) => Ok(f),
                Bound::Text(t) if t == "+Inf" => Ok(f64::INFINITY),
                Bound::Text(t) => Err(serde::de::Error::custom(format!(
                    "bucket bound must be a number or \"+Inf\", got {t:?}"
                ))),
            })
            .collect()
    }
}

/// Cumulative count at `le` of a histogram with `bounds`: the count of the largest bound ≤ `le`.
fn cumulative_at(bounds: &[f64], counts: &[u64], le: f64) -> u64 {
    let below = bounds.partition_point(|&b| b <= le);
    if below == 0 { 0 } else { counts[below - 1] }
}

/// Stable and canary windows over the same span.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// The stable variant.
    pub stable: Window,
    /// The canary variant.
    pub canary: Window,
}

impl Pair {
    /// Adds both of `other`'s windows into this pair's.
    pub fn merge(&mut self, other: &Pair) {
        self.stable.merge(&other.stable);
        self.canary.merge(&other.canary);
    }

    /// The canary's share of all requests, 0..=1, and the number of requests it is read from;
    /// `None` with no requests.
    pub fn canary_share(&self) -> Option<(f64, u64)> {
        let total = self.stable.requests + self.canary.requests;
        (total > 0).then(|| (self.canary.requests as f64 / total as f64, total))
    }
}

/// How many standard errors beyond the tolerated band a canary's share must lie before a
/// `canary_share` check fails (about 3e-5 one-sided: rare by chance even when checked every
/// tick of a long stage).
pub const SHARE_FAIL_Z: f64 = 4.0;

/// The answer of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// The condition holds on enough data.
    Pass {
        /// Canary value.
        value: f64,
        /// The limit it was compared with.
        threshold: f64,
    },
    /// The condition is broken on enough data.
    Fail {
        /// Canary value.
        value: f64,
        /// The limit it broke.
        threshold: f64,
    },
    /// Not enough data to say either.
    NoData {
        /// Why, e.g. "canary has 12 of 50 requests".
        reason: String,
    },
    /// Data, but its evidence decides neither way yet (a sequential check whose scores are
    /// both under their thresholds). Holds the stage like missing data.
    Inconclusive {
        /// The scores, e.g. "fail score 3.1 < 100, pass score 4.2 < 20".
        reason: String,
    },
    /// The check does not apply here: a comparison with stable at a 100% stage, where stable
    /// serves nothing. Neither passes nor holds the stage; absolute checks and triggers still
    /// watch the canary.
    Skipped {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    /// Short name: pass, fail or no_data.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass { .. } => "pass",
            Verdict::Fail { .. } => "fail",
            Verdict::NoData { .. } => "no_data",
            Verdict::Inconclusive { .. } => "inconclusive",
            Verdict::Skipped { .. } => "skipped",
        }
    }
}

/// A check's name with its verdict, as recorded in evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// The metric it measured.
    pub metric: Metric,
    /// The answer.
    pub verdict: Verdict,
    /// How a score-based verdict was reached, e.g. "fail score 312.4 ≥ 100"; when set,
    /// [`CheckResult::describe`] shows it instead of value and threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl CheckResult {
    /// One line for humans: `errors-vs-stable: fail (error_rate 0.2 > 0.015)`.
    pub fn describe(&self) -> String {
        let unit = self.metric.unit();
        if let Some(detail) = &self.detail {
            return format!("{}: {} ({detail})", self.name, self.verdict.label());
        }
        match &self.verdict {
            Verdict::Pass { value, threshold } => format!(
                "{}: pass ({} {}{unit} <= {}{unit})",
                self.name,
                self.metric,
                round(*value),
                round(*threshold)
            ),
            Verdict::Fail { value, threshold } => format!(
                "{}: fail ({} {}{unit} > {}{unit})",
                self.name,
                self.metric,
                round(*value),
                round(*threshold)
            ),
            Verdict::NoData { reason } => format!("{}: not enough data ({reason})", self.name),
            Verdict::Inconclusive { reason } => format!("{}: inconclusive ({reason})", self.name),
            Verdict::Skipped { reason } => format!("{}: skipped ({reason})", self.name),
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// Evaluates one check over stable and canary windows measured while the canary had
/// `canary_weight`% of traffic.
pub fn evaluate_check(check: &Check, data: &Pair, canary_weight: u32) -> CheckResult {
    let verdict = verdict(check, data, canary_weight);
    let detail = match (&check.rule, &verdict) {
        (
            Rule::NearWeight { tolerance },
            Verdict::Pass { value, .. } | Verdict::Fail { value, .. },
        ) => {
            let (low, high) = share_band(canary_weight, *tolerance);
            let position = if (low..=high).contains(value) {
                "within"
            } else {
                "outside"
            };
            Some(format!(
                "canary_share {} {position} {}..{} around the stage's {canary_weight}%",
                percent(*value),
                percent(low),
                percent(high)
            ))
        }
        _ => None,
    };
    CheckResult {
        name: check.name.clone(),
        metric: check.metric,
        verdict,
        detail,
    }
}

/// The tolerated band of a canary's share at `canary_weight`%: weight × (1 ± tolerance).
fn share_band(canary_weight: u32, tolerance: f64) -> (f64, f64) {
    let weight = f64::from(canary_weight) / 100.0;
    (
        weight * (1.0 - tolerance),
        (weight * (1.0 + tolerance)).min(1.0),
    )
}

/// A `canary_share` check: pass inside the band `weight × (1 ± tolerance)`, fail when the share
/// lies outside it by [`SHARE_FAIL_Z`] standard errors, no data in between (not yet clear).
fn share_verdict(check: &Check, data: &Pair, canary_weight: u32, tolerance: f64) -> Verdict {
    let Some((share, total)) = data
        .canary_share()
        .filter(|(_, n)| *n >= check.min_requests)
    else {
        let total = data.stable.requests + data.canary.requests;
        return Verdict::NoData {
            reason: format!(
                "the variants served {total} of {} requests needed",
                check.min_requests
            ),
        };
    };
    let weight = f64::from(canary_weight) / 100.0;
    let (low, high) = (
        weight * (1.0 - tolerance),
        (weight * (1.0 + tolerance)).min(1.0),
    );
    if (low..=high).contains(&share) {
        // Passing reports the edge it was nearest to.
        let threshold = if share < weight { low } else { high };
        return Verdict::Pass {
            value: share,
            threshold,
        };
    }
    let edge = if share < low { low } else { high };
    // Standard error at the edge; an edge at 0 or 1 has none, so any share beyond it is clear.
    let se = (edge * (1.0 - edge) / total as f64).sqrt();
    let z = if se > 0.0 {
        (share - edge).abs() / se
    } else {
        f64::INFINITY
    };
    if z >= SHARE_FAIL_Z {
        Verdict::Fail {
            value: share,
            threshold: edge,
        }
    } else {
        Verdict::NoData {
            reason: format!(
                "canary share {} is outside {}..{} of {total} requests but not yet clearly (z {:.1} of {SHARE_FAIL_Z})",
                percent(share),
                percent(low),
                percent(high),
                z
            ),
        }
    }
}

fn percent(v: f64) -> String {
    format!("{}%", (v * 10_000.0).round() / 100.0)
}

fn verdict(check: &Check, data: &Pair, canary_weight: u32) -> Verdict {
    match check.rule {
        Rule::NearWeight { tolerance } => {
            return share_verdict(check, data, canary_weight, tolerance);
        }
        Rule::Sequential { .. } | Rule::Ceiling { .. } => {
            return Verdict::NoData {
                reason: "scored second by second by the leader; no score yet".to_owned(),
            };
        }
        Rule::Max { .. } | Rule::RatioToStable { .. } => {}
    }
    let canary_support = data.canary.support(check.metric);
    if canary_support < check.min_requests {
        return Verdict::NoData {
            reason: format!(
                "canary has {canary_support} of {} requests needed",
                check.min_requests
            ),
        };
    }
    let Some(value) = data.canary.metric(check.metric) else {
        return Verdict::NoData {
            reason: "canary has no measurements".to_owned(),
        };
    };
    let threshold = match check.rule {
        Rule::Max { limit } => limit,
        Rule::NearWeight { .. } | Rule::Sequential { .. } | Rule::Ceiling { .. } => {
            unreachable!("judged before the threshold rules above")
        }
        Rule::RatioToStable { ratio, slack } => {
            let stable_support = data.stable.support(check.metric);
            if stable_support < check.min_requests {
                return Verdict::NoData {
                    reason: format!(
                        "stable has {stable_support} of {} requests needed",
                        check.min_requests
                    ),
                };
            }
            let Some(stable) = data.stable.metric(check.metric) else {
                return Verdict::NoData {
                    reason: "stable has no measurements".to_owned(),
                };
            };
            (stable * ratio).max(stable + slack)
        }
    };
    if value <= threshold {
        Verdict::Pass { value, threshold }
    } else {
        Verdict::Fail { value, threshold }
    }
}

/// Everything measured in one stage and what each check said of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageAnalysis {
    /// The data.
    pub data: Pair,
    /// One result per check, in strategy order.
    pub checks: Vec<CheckResult>,
}

/// What the checks of a stage say together.
#[derive(Debug, Clone, PartialEq)]
pub enum StageVerdict {
    /// Every check passed (a stage with no checks passes on time alone).
    Pass,
    /// This check failed.
    Fail(CheckResult),
    /// At least one check lacks data and none failed.
    NotYet,
}

/// Evaluates every check of a stage that sends `canary_weight`% of traffic to the canary.
/// Comparisons with stable are skipped at 100%, where stable serves nothing.
pub fn analyse_stage(checks: &[Check], data: Pair, canary_weight: u32) -> StageAnalysis {
    let checks = checks
        .iter()
        .map(|c| match c.rule {
            Rule::RatioToStable { .. } | Rule::Sequential { .. } if canary_weight >= 100 => {
                CheckResult {
                    name: c.name.clone(),
                    metric: c.metric,
                    verdict: Verdict::Skipped {
                        reason: "no stable traffic to compare with at 100%".into(),
                    },
                    detail: None,
                }
            }
            _ => evaluate_check(c, &data, canary_weight),
        })
        .collect();
    StageAnalysis { data, checks }
}

/// Combines check results: any failure fails, any missing data waits, else pass (skipped
/// checks count neither way).
pub fn judge_stage(analysis: &StageAnalysis) -> StageVerdict {
    if let Some(failed) = analysis
        .checks
        .iter()
        .find(|c| matches!(c.verdict, Verdict::Fail { .. }))
    {
        return StageVerdict::Fail(failed.clone());
    }
    if analysis.checks.iter().any(|c| {
        matches!(
            c.verdict,
            Verdict::NoData { .. } | Verdict::Inconclusive { .. }
        )
    }) {
        return StageVerdict::NotYet;
    }
    StageVerdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 5] = [0.01, 0.05, 0.1, 0.5, f64::INFINITY];

    fn window(requests: u64, errors: u64, counts: [u64; 5]) -> Window {
        let buckets: Vec<_> = BOUNDS.iter().copied().zip(counts).collect();
        Window::from_counts(requests, errors, &buckets, 0.0)
    }

    fn check(metric: Metric, rule: Rule, min_requests: u64) -> Check {
        Check {
            name: "c".into(),
            metric,
            rule,
            min_requests,
        }
    }

    #[test]
    fn merging_same_layout_adds_counts() {
        let mut a = window(10, 1, [1, 5, 8, 10, 10]);
        a.merge(&window(20, 4, [0, 10, 15, 19, 20]));
        assert_eq!(a.requests, 30);
        assert_eq!(a.errors, 5);
        assert_eq!(a.counts, [1, 15, 23, 29, 30]);
    }

    #[test]
    fn merging_into_empty_takes_the_layout() {
        let mut a = Window::default();
        a.merge(&window(10, 0, [1, 5, 8, 10, 10]));
        assert_eq!(a.bounds, BOUNDS);
        assert_eq!(a.counts, [1, 5, 8, 10, 10]);
        let mut b = window(10, 0, [1, 5, 8, 10, 10]);
        b.merge(&Window::missing());
        assert_eq!(b.counts, [1, 5, 8, 10, 10]);
        assert_eq!(b.missing, 1);
    }

    #[test]
    fn merging_different_layouts_uses_the_union_of_bounds() {
        let mut a = Window::from_counts(4, 0, &[(0.1, 2), (1.0, 4), (f64::INFINITY, 4)], 0.0);
        let b = Window::from_counts(6, 0, &[(0.5, 3), (f64::INFINITY, 6)], 0.0);
        a.merge(&b);
        assert_eq!(a.bounds, [0.1, 0.5, 1.0, f64::INFINITY]);
        // at 0.1: 2 + 0 (b's first bound is 0.5); at 0.5: 2 + 3; at 1.0: 4 + 3; +Inf: 10.
        assert_eq!(a.counts, [2, 5, 7, 10]);
        assert_eq!(a.observed(), 10);
    }

    #[test]
    fn merging_is_order_independent() {
        let parts = [
            window(10, 1, [1, 5, 8, 10, 10]),
            Window::from_counts(6, 2, &[(0.05, 3), (f64::INFINITY, 6)], 1.0),
            window(7, 0, [7, 7, 7, 7, 7]),
        ];
        let mut forward = Window::default();
        parts.iter().for_each(|p| forward.merge(p));
        let mut backward = Window::default();
        parts.iter().rev().for_each(|p| backward.merge(p));
        assert_eq!(forward.requests, backward.requests);
        assert_eq!(forward.bounds, backward.bounds);
        assert_eq!(forward.counts, backward.counts);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        // 100 requests: 50 under 10 ms, 40 in (10, 50], 10 in (50, 100].
        let w = window(100, 0, [50, 90, 100, 100, 100]);
        assert!((w.quantile(0.5).unwrap() - 0.01).abs() < 1e-12);
        // p95: rank 95, bucket (0.05, 0.1] holds 90..100 → 0.05 + 0.05 * 0.5.
        assert!((w.quantile(0.95).unwrap() - 0.075).abs() < 1e-12);
        assert!((w.metric(Metric::LatencyP95).unwrap() - 75.0).abs() < 1e-9);
        // Only the +Inf bucket above 0.5 s: answers the highest finite bound.
        let slow = window(10, 0, [0, 0, 0, 0, 10]);
        assert_eq!(slow.quantile(0.99), Some(0.5));
        assert_eq!(Window::default().quantile(0.5), None);
        assert_eq!(w.quantile(1.5), None);
    }

    #[test]
    fn windows_with_infinite_bounds_round_trip_through_json() {
        let w = window(10, 1, [1, 5, 8, 10, 10]);
        let text = serde_json::to_string(&w).unwrap();
        assert!(text.contains("\"+Inf\""), "{text}");
        assert_eq!(serde_json::from_str::<Window>(&text).unwrap(), w);
        assert!(serde_json::from_str::<Window>(&text.replace("+Inf", "lots")).is_err());
    }

    #[test]
    fn error_rate_needs_requests() {
        assert_eq!(Window::default().error_rate(), None);
        assert_eq!(window(200, 10, [0; 5]).error_rate(), Some(0.05));
        // errors can never exceed requests, even from a confused exporter.
        assert_eq!(Window::from_counts(5, 9, &[], 0.0).error_rate(), Some(1.0));
    }

    #[test]
    fn absolute_checks() {
        let c = check(Metric::ErrorRate, Rule::Max { limit: 0.05 }, 100);
        let ok = Pair {
            canary: window(200, 2, [0; 5]),
            ..Pair::default()
        };
        assert_eq!(evaluate_check(&c, &ok, 10).verdict.label(), "pass");
        let bad = Pair {
            canary: window(200, 20, [0; 5]),
            ..Pair::default()
        };
        assert_eq!(
            evaluate_check(&c, &bad, 10).verdict,
            Verdict::Fail {
                value: 0.1,
                threshold: 0.05
            }
        );
    }

    #[test]
    fn too_little_data_never_passes_or_fails() {
        let c = check(Metric::ErrorRate, Rule::Max { limit: 0.05 }, 100);
        // 99 requests, all errors: still not enough to judge.
        let few = Pair {
            canary: window(99, 99, [0; 5]),
            ..Pair::default()
        };
        let r = evaluate_check(&c, &few, 10);
        assert_eq!(r.verdict.label(), "no_data");
        assert!(
            r.describe().contains("canary has 99 of 100"),
            "{}",
            r.describe()
        );
        let missing = Pair {
            canary: Window::missing(),
            ..Pair::default()
        };
        assert_eq!(evaluate_check(&c, &missing, 10).verdict.label(), "no_data");
    }

    #[test]
    fn ratio_checks_compare_with_stable_and_honour_slack() {
        let c = check(
            Metric::ErrorRate,
            Rule::RatioToStable {
                ratio: 1.5,
                slack: 0.0,
            },
            50,
        );
        let data = |ce, se| Pair {
            canary: window(100, ce, [0; 5]),
            stable: window(1000, se, [0; 5]),
        };
        assert_eq!(evaluate_check(&c, &data(3, 20), 10).verdict.label(), "pass"); // 3% vs 2%*1.5
        assert_eq!(evaluate_check(&c, &data(4, 20), 10).verdict.label(), "fail"); // 4% > 3%
        // Stable at zero errors: any canary error fails without slack...
        assert_eq!(evaluate_check(&c, &data(1, 0), 10).verdict.label(), "fail");
        // ...and passes with an absolute allowance.
        let slack = check(
            Metric::ErrorRate,
            Rule::RatioToStable {
                ratio: 1.5,
                slack: 0.02,
            },
            50,
        );
        assert_eq!(
            evaluate_check(&slack, &data(1, 0), 10).verdict.label(),
            "pass"
        );
        // Stable without data: cannot compare.
        let no_stable = Pair {
            canary: window(100, 0, [0; 5]),
            stable: window(10, 0, [0; 5]),
        };
        assert_eq!(
            evaluate_check(&c, &no_stable, 10).verdict.label(),
            "no_data"
        );
    }

    #[test]
    fn latency_checks_read_the_histogram() {
        let c = check(Metric::LatencyP95, Rule::Max { limit: 60.0 }, 50);
        let fast = Pair {
            canary: window(100, 0, [50, 100, 100, 100, 100]),
            ..Pair::default()
        };
        assert_eq!(evaluate_check(&c, &fast, 10).verdict.label(), "pass");
        let slow = Pair {
            canary: window(100, 0, [10, 20, 30, 100, 100]),
            ..Pair::default()
        };
        assert_eq!(evaluate_check(&c, &slow, 10).verdict.label(), "fail");
        // Requests counted but no histogram: no data, not a pass.
        let no_hist = Pair {
            canary: Window::from_counts(100, 0, &[], 0.0),
            ..Pair::default()
        };
        assert_eq!(evaluate_check(&c, &no_hist, 10).verdict.label(), "no_data");
    }

    #[test]
    fn stage_judgement_combines_checks() {
        let checks = vec![
            check(Metric::ErrorRate, Rule::Max { limit: 0.05 }, 10),
            check(Metric::LatencyP95, Rule::Max { limit: 60.0 }, 10),
        ];
        let good = analyse_stage(
            &checks,
            Pair {
                canary: window(100, 0, [50, 100, 100, 100, 100]),
                ..Pair::default()
            },
            10,
        );
        assert_eq!(judge_stage(&good), StageVerdict::Pass);
        let waiting = analyse_stage(&checks, Pair::default(), 10);
        assert_eq!(judge_stage(&waiting), StageVerdict::NotYet);
        let failing = analyse_stage(
            &checks,
            Pair {
                canary: window(100, 50, [0, 0, 0, 0, 0]),
                ..Pair::default()
            },
            10,
        );
        // The error check fails even though latency has no data.
        assert!(
            matches!(judge_stage(&failing), StageVerdict::Fail(r) if r.metric == Metric::ErrorRate)
        );
        assert_eq!(
            judge_stage(&analyse_stage(&[], Pair::default(), 10)),
            StageVerdict::Pass
        );
    }

    #[test]
    fn comparisons_with_stable_are_skipped_at_100_percent() {
        let checks = vec![
            check(
                Metric::ErrorRate,
                Rule::RatioToStable {
                    ratio: 2.0,
                    slack: 0.0,
                },
                10,
            ),
            check(Metric::ErrorRate, Rule::Max { limit: 0.05 }, 10),
        ];
        // All traffic on the canary: stable has nothing to compare with.
        let data = Pair {
            canary: window(100, 1, [0; 5]),
            ..Pair::default()
        };
        let at_50 = analyse_stage(&checks, data.clone(), 50);
        assert_eq!(at_50.checks[0].verdict.label(), "no_data");
        assert_eq!(judge_stage(&at_50), StageVerdict::NotYet);
        let at_100 = analyse_stage(&checks, data, 100);
        assert_eq!(at_100.checks[0].verdict.label(), "skipped");
        assert!(at_100.checks[0].describe().contains("no stable traffic"));
        assert_eq!(judge_stage(&at_100), StageVerdict::Pass);
        // The absolute check still judges the canary at 100%.
        let bad = analyse_stage(
            &checks,
            Pair {
                canary: window(100, 50, [0; 5]),
                ..Pair::default()
            },
            100,
        );
        assert!(matches!(judge_stage(&bad), StageVerdict::Fail(_)));
        // And a 100% stage with only comparisons still needs its minimum time (decide's job)
        // but no data.
        assert_eq!(
            judge_stage(&analyse_stage(&checks[..1], Pair::default(), 100)),
            StageVerdict::Pass
        );
    }

    fn share_check(tolerance: f64, min_requests: u64) -> Check {
        check(
            Metric::CanaryShare,
            Rule::NearWeight { tolerance },
            min_requests,
        )
    }

    fn split(stable: u64, canary: u64) -> Pair {
        Pair {
            stable: window(stable, 0, [stable; 5]),
            canary: window(canary, 0, [canary; 5]),
        }
    }

    #[test]
    fn a_canary_share_near_its_weight_passes_and_one_far_from_it_fails_only_when_clear() {
        let c = share_check(0.5, 50);
        let judge = |data: Pair, weight| evaluate_check(&c, &data, weight).verdict;
        // 5% stage, band 2.5%..7.5%.
        assert!(
            matches!(judge(split(950, 50), 5), Verdict::Pass { value, .. } if (value - 0.05).abs() < 1e-12)
        );
        assert_eq!(judge(split(930, 70), 5).label(), "pass");
        // A crashed canary serves nothing: clearly below the band.
        match judge(split(1_000, 0), 5) {
            Verdict::Fail { value, threshold } => {
                assert_eq!(value, 0.0);
                assert!((threshold - 0.025).abs() < 1e-12);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // Routing sends 20% to a 5% canary.
        assert!(
            matches!(judge(split(800, 200), 5), Verdict::Fail { threshold, .. } if (threshold - 0.075).abs() < 1e-12)
        );
        // Outside the band on little traffic: not yet clear, so neither pass nor fail.
        let unclear = judge(split(98, 2), 5);
        assert_eq!(unclear.label(), "no_data", "{unclear:?}");
        assert!(
            format!("{unclear:?}").contains("not yet clearly"),
            "{unclear:?}"
        );
        // Below the needed requests.
        assert_eq!(judge(split(30, 1), 5).label(), "no_data");
        assert_eq!(judge(Pair::default(), 5).label(), "no_data");
        // 100%: stable serves nothing and the canary everything.
        assert_eq!(judge(split(0, 500), 100).label(), "pass");
        // A 100% canary still sent only half: clearly below 50%..100%? No: 50% is the edge.
        assert_eq!(judge(split(500, 500), 100).label(), "pass");
        assert_eq!(judge(split(600, 400), 100).label(), "fail");
    }

    #[test]
    fn a_canary_share_verdict_reads_as_a_sentence() {
        let c = share_check(0.5, 10);
        let result = evaluate_check(&c, &split(1_000, 0), 5);
        assert_eq!(
            result.describe(),
            "c: fail (canary_share 0% outside 2.5%..7.5% around the stage's 5%)"
        );
        let result = evaluate_check(&c, &split(950, 50), 5);
        assert_eq!(
            result.describe(),
            "c: pass (canary_share 5% within 2.5%..7.5% around the stage's 5%)"
        );
    }

    #[test]
    fn host_gauges_merge_as_peaks_and_a_check_reads_the_highest() {
        let mut a = window(10, 0, [10; 5]);
        a.hosts = HostPeak::sample(35.0, 3 << 30, 4 << 30).unwrap();
        let mut b = window(10, 0, [10; 5]);
        b.hosts = HostPeak::sample(90.0, 1 << 30, 4 << 30).unwrap();
        a.merge(&b);
        assert_eq!(a.hosts.samples, 2);
        assert_eq!(a.metric(Metric::HostMemory), Some(0.75));
        assert_eq!(a.metric(Metric::HostCpu), Some(0.9));
        assert_eq!(
            HostPeak::sample(10.0, 1, 0),
            None,
            "no memory total, no sample"
        );
        let memory = check(Metric::HostMemory, Rule::Max { limit: 0.8 }, 2);
        let data = Pair {
            stable: Window::default(),
            canary: a.clone(),
        };
        assert_eq!(evaluate_check(&memory, &data, 10).verdict.label(), "pass");
        let cpu = check(Metric::HostCpu, Rule::Max { limit: 0.8 }, 2);
        assert_eq!(evaluate_check(&cpu, &data, 10).verdict.label(), "fail");
        // Without host samples there is no data, whatever the requests.
        let none = Pair {
            stable: Window::default(),
            canary: window(100, 0, [100; 5]),
        };
        assert_eq!(
            evaluate_check(&memory, &none, 10).verdict.label(),
            "no_data"
        );
        // Serialized windows without host samples read as before.
        let json = serde_json::to_string(&window(1, 0, [1; 5])).unwrap();
        assert!(!json.contains("hosts"), "{json}");
        let back: Window = serde_json::from_str(&json).unwrap();
        assert_eq!(back.hosts, HostPeak::default());
    }
}
