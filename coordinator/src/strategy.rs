//! Rollout strategies: the TOML an operator writes, and its validated runtime form.
//!
//! Parsing happens in two steps, as Neon and Vector do: serde reads a raw file (unknown fields
//! rejected), then `Strategy::from_raw` checks every field and returns *all* problems at once,
//! each naming its field (`stages[2].weight: must be in 1..=100, got 120`).

use std::fmt;
use std::time::Duration;

use crate::analysis::sequential::{CeilingConfig, SequentialConfig};

use serde::{Deserialize, Serialize};

use crate::limits::{
    MAX_OVERRIDE_COOKIE, MAX_OVERRIDE_HEADER, MAX_STICKY_KEY, MAX_STRATEGY_NAME, MAX_STRATEGY_TOML,
    TooLong, check_len,
};

mod deploy;
pub use deploy::{
    CommandDeploy, DEFAULT_COMMAND_TIMEOUT, DEFAULT_HEALTH_TIMEOUT, DEFAULT_STOP_TIMEOUT, Deploy,
    DeployDriver, DeployModel, DockerDeploy, ShardSpec, check_template,
};
mod hook;
pub use hook::{DEFAULT_HOOK_RETRIES, DEFAULT_HOOK_TIMEOUT, Hook, HookOn};

/// Default minimum observation time of a stage.
pub const DEFAULT_MIN_DURATION: Duration = Duration::from_secs(60);
/// Default number of requests each variant must serve in a stage before a check can pass.
pub const DEFAULT_MIN_REQUESTS: u64 = 50;
/// Default sliding window of a trigger.
pub const DEFAULT_TRIGGER_WINDOW: Duration = Duration::from_secs(10);
/// Default number of requests a trigger window needs before the trigger may fire.
pub const DEFAULT_TRIGGER_MIN_REQUESTS: u64 = 20;
/// Most bucket bounds a latency sequential check compares.
pub const MAX_SLOWER_THAN: usize = 8;
/// Default relative tolerance of a `canary_share` check.
pub const DEFAULT_SHARE_TOLERANCE: f64 = 0.5;
/// Longest trigger window accepted (the coordinator keeps this much recent data per service).
pub const MAX_TRIGGER_WINDOW: Duration = Duration::from_secs(600);

/// A validated strategy: stages, checks and triggers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// Stages in order; weights strictly increasing, each in 1..=100.
    pub stages: Vec<Stage>,
    /// Checks that must all pass before a stage may end.
    pub checks: Vec<Check>,
    /// Conditions that roll back without waiting for the stage's end.
    pub triggers: Vec<Trigger>,
    /// How the weight becomes real on the load balancer.
    pub traffic: Traffic,
    /// HTTP webhooks around the rollout's transitions, in file order ([`crate::hooks`]).
    #[serde(default)]
    pub hooks: Vec<Hook>,
    /// How serin runs the versions behind managed instances ([`crate::deploy`]); `None`: serin
    /// deploys nothing and only moves traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
    /// What a stage does when its `max_duration` passes before its checks decided.
    #[serde(default)]
    pub on_inconclusive: OnInconclusive,
}

/// What an inconclusive stage leads to (`[analysis] on_inconclusive`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInconclusive {
    /// Pause and wait for an operator (`serin rollout resume` or `abort`).
    #[default]
    Pause,
    /// Roll back: a canary that cannot be shown good enough in time does not ship.
    RollBack,
}

/// One step of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Percentage of traffic sent to the canary, 1..=100.
    pub weight: u32,
    /// Minimum observation time before the stage may pass.
    #[serde(with = "humantime_serde")]
    pub min_duration: Duration,
    /// When set, a stage that has not passed by then pauses as inconclusive.
    #[serde(with = "humantime_serde")]
    pub max_duration: Option<Duration>,
    /// Wait for an operator (`serin rollout resume`) after the stage passes.
    pub manual_gate: bool,
}

/// Traffic settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// nginx variable for a sticky per-user split (e.g. `$cookie_uid`); `None` = weighted.
    pub sticky_key: Option<String>,
    /// A request header (e.g. `X-Serin-Variant`) whose value `canary` or `stable` sends the
    /// request to that variant whatever the split, while the rollout is active. Checked by
    /// [`serin_proto::overrides::check_header_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_header: Option<String>,
    /// A cookie (e.g. `serin_variant`) with the same meaning; the header wins when both carry
    /// a recognised value. Checked by [`serin_proto::overrides::check_cookie_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_cookie: Option<String>,
}

/// What a check or trigger measures, always over the canary (and stable, for ratios).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Share of requests answered with a 5xx status, 0..=1.
    ErrorRate,
    /// Latency quantiles in milliseconds, from merged histograms.
    LatencyP50,
    /// 90th percentile latency (ms).
    LatencyP90,
    /// 95th percentile latency (ms).
    LatencyP95,
    /// 99th percentile latency (ms).
    LatencyP99,
    /// The canary's share of all requests, 0..=1, judged against the stage's weight (a
    /// sample-ratio check: a crashing canary or broken routing serves far from its weight).
    CanaryShare,
    /// The highest memory use (0..=1) among the variant's hosts, from the agents' host samples.
    HostMemory,
    /// The highest CPU use (0..=1 of a host) among the variant's hosts.
    HostCpu,
}

impl Metric {
    /// All metrics with their TOML names.
    pub const ALL: [(&'static str, Metric); 8] = [
        ("error_rate", Metric::ErrorRate),
        ("latency_p50", Metric::LatencyP50),
        ("latency_p90", Metric::LatencyP90),
        ("latency_p95", Metric::LatencyP95),
        ("latency_p99", Metric::LatencyP99),
        ("canary_share", Metric::CanaryShare),
        ("host_memory", Metric::HostMemory),
        ("host_cpu", Metric::HostCpu),
    ];

    fn parse(name: &str) -> Option<Metric> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }

    /// The TOML name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// The latency quantile this metric asks for, if it is a latency metric.
    pub fn quantile(self) -> Option<f64> {
        match self {
            Metric::ErrorRate | Metric::CanaryShare | Metric::HostMemory | Metric::HostCpu => None,
            Metric::LatencyP50 => Some(0.50),
            Metric::LatencyP90 => Some(0.90),
            Metric::LatencyP95 => Some(0.95),
            Metric::LatencyP99 => Some(0.99),
        }
    }

    /// Whether values are fractions in 0..=1.
    pub fn is_fraction(self) -> bool {
        matches!(
            self,
            Metric::ErrorRate | Metric::CanaryShare | Metric::HostMemory | Metric::HostCpu
        )
    }

    /// Unit for display.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::ErrorRate | Metric::CanaryShare | Metric::HostMemory | Metric::HostCpu => "",
            _ => "ms",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The condition a metric must meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Rule {
    /// Canary value must be at most this.
    Max {
        /// The ceiling.
        limit: f64,
    },
    /// Canary value must be at most `ratio` x stable's, or stable + `slack`, whichever is larger.
    RatioToStable {
        /// Tolerated canary / stable ratio.
        ratio: f64,
        /// Absolute allowance for services whose stable value is near zero.
        slack: f64,
    },
    /// The canary's share of requests must lie within `tolerance` (relative) of the stage's
    /// weight; it fails only when the distance beyond that is statistically clear.
    NearWeight {
        /// Tolerated relative distance: 0.5 accepts 2.5%..7.5% at a 5% stage.
        tolerance: f64,
    },
    /// Anytime-valid sequential comparison with stable, second by second
    /// ([`crate::analysis::sequential::RatioTest`]): its fail score rolls back the moment it
    /// crosses `1 / alpha_fail`, at any stage; a stage passes only once its pass score reaches
    /// `1 / alpha_pass`.
    Sequential {
        /// The test's settings.
        config: SequentialConfig,
        /// For latency: the histogram bucket bounds (seconds) whose slower requests are
        /// compared ([`crate::analysis::sequential::LatencyTest`]); empty for error rates.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        slower_than: Vec<f64>,
    },
    /// The canary alone against an error-rate ceiling, second by second
    /// ([`crate::analysis::sequential::CeilingTest`]): rolls back the moment its score shows
    /// the canary above the ceiling; passes whenever the canary has served requests.
    Ceiling {
        /// The test's settings.
        config: CeilingConfig,
    },
}

impl Rule {
    /// Whether the leader scores this rule second by second (its failure rolls back at once).
    pub fn is_scored(&self) -> bool {
        matches!(self, Rule::Sequential { .. } | Rule::Ceiling { .. })
    }
}

/// A named pass criterion evaluated over the whole stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Name shown in verdicts and events.
    pub name: String,
    /// What is measured.
    pub metric: Metric,
    /// The condition.
    pub rule: Rule,
    /// Requests each variant the rule reads must have served before the check can pass.
    pub min_requests: u64,
}

/// How urgently a trigger rolls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Roll back at once.
    Critical,
    /// Roll back when the condition has held for the grace period.
    Warning,
}

/// A condition watched continuously over a sliding window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// The condition, as for checks.
    pub check: Check,
    /// Sliding window the condition is evaluated over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Critical or warning.
    pub severity: Severity,
    /// For warnings: how long the condition must hold.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// One problem found in a strategy, naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `stages[2].weight`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A strategy that could not be read or is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    /// The TOML itself is malformed or has unknown fields.
    #[error("{0}")]
    Syntax(FieldError),
    /// The TOML parsed but some fields are invalid.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

impl StrategyError {
    /// Every problem, one per field.
    pub fn problems(&self) -> Vec<FieldError> {
        match self {
            StrategyError::Syntax(e) => vec![e.clone()],
            StrategyError::Invalid(v) => v.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file format.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStrategy {
    #[serde(default)]
    stages: Vec<RawStage>,
    #[serde(default)]
    checks: Vec<RawCheck>,
    #[serde(default)]
    triggers: Vec<RawTrigger>,
    #[serde(default)]
    traffic: RawTraffic,
    #[serde(default)]
    hooks: Vec<hook::RawHook>,
    deploy: Option<deploy::RawDeploy>,
    #[serde(default)]
    analysis: RawAnalysis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    on_inconclusive: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    sticky_key: Option<String>,
    override_header: Option<String>,
    override_cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    weight: i64,
    min_duration: Option<String>,
    max_duration: Option<String>,
    #[serde(default)]
    manual_gate: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Option<String>,
    metric: String,
    max: Option<f64>,
    max_ratio: Option<f64>,
    slack: Option<f64>,
    tolerance: Option<f64>,
    min_requests: Option<i64>,
    test: Option<String>,
    slower_than: Option<Vec<f64>>,
    alpha_fail: Option<f64>,
    alpha_pass: Option<f64>,
    tolerated_ratio: Option<f64>,
    margin: Option<f64>,
    absolute_margin: Option<f64>,
    evidence_cap: Option<f64>,
}

impl RawCheck {
    /// The settings of score-based tests, as given.
    fn score_fields(&self) -> ScoreFields {
        ScoreFields {
            alpha_fail: self.alpha_fail,
            alpha_pass: self.alpha_pass,
            tolerated_ratio: self.tolerated_ratio,
            margin: self.margin,
            absolute_margin: self.absolute_margin,
            evidence_cap: self.evidence_cap,
        }
    }
}

/// The settings of a check's `test`, as given in the file.
#[derive(Debug, Clone, Copy, Default)]
struct ScoreFields {
    alpha_fail: Option<f64>,
    alpha_pass: Option<f64>,
    tolerated_ratio: Option<f64>,
    margin: Option<f64>,
    absolute_margin: Option<f64>,
    evidence_cap: Option<f64>,
}

impl ScoreFields {
    fn any(&self) -> bool {
        [
            self.alpha_fail,
            self.alpha_pass,
            self.tolerated_ratio,
            self.margin,
            self.absolute_margin,
            self.evidence_cap,
        ]
        .iter()
        .any(Option::is_some)
    }

    /// The settings of a sequential test, over the defaults.
    fn sequential(&self) -> SequentialConfig {
        let d = SequentialConfig::default();
        SequentialConfig {
            alpha_fail: self.alpha_fail.unwrap_or(d.alpha_fail),
            alpha_pass: self.alpha_pass.unwrap_or(d.alpha_pass),
            tolerated_ratio: self.tolerated_ratio.unwrap_or(d.tolerated_ratio),
            margin: self.margin.unwrap_or(d.margin),
            absolute_margin: self.absolute_margin.unwrap_or(d.absolute_margin),
            evidence_cap: self.evidence_cap.unwrap_or(d.evidence_cap),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    name: Option<String>,
    metric: String,
    max: Option<f64>,
    max_ratio: Option<f64>,
    slack: Option<f64>,
    min_requests: Option<i64>,
    window: Option<String>,
    severity: Option<String>,
    grace: Option<String>,
}

/// Collects problems while walking the raw file.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, field: &str, text: Option<&str>) -> Option<Duration> {
        let text = text?;
        match humantime::parse_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(
                    field,
                    format!("invalid duration '{text}' ({e}); write e.g. \"30s\" or \"5m\""),
                );
                None
            }
        }
    }
}

impl Strategy {
    /// Parses and validates a strategy's TOML text.
    pub fn from_toml(text: &str) -> Result<Strategy, StrategyError> {
        if let Err(e) = check_len("strategy", text, MAX_STRATEGY_TOML) {
            return Err(StrategyError::Syntax(too_long(e)));
        }
        let raw: RawStrategy = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|span| describe_position(text, span.start))
                .unwrap_or_else(|| "strategy".to_owned());
            StrategyError::Syntax(FieldError {
                field,
                reason: e.message().trim().to_owned(),
            })
        })?;
        Strategy::from_raw(raw)
    }

    fn from_raw(raw: RawStrategy) -> Result<Strategy, StrategyError> {
        let mut p = Problems::default();
        if raw.stages.is_empty() {
            p.push("stages", "at least one [[stages]] entry is required");
        }
        let mut stages = Vec::with_capacity(raw.stages.len());
        let mut previous: Option<i64> = None;
        for (i, s) in raw.stages.iter().enumerate() {
            let field = format!("stages[{i}]");
            if !(1..=100).contains(&s.weight) {
                p.push(
                    format!("{field}.weight"),
                    format!("must be in 1..=100 (percent of traffic), got {}", s.weight),
                );
            } else if let Some(prev) = previous
                && s.weight <= prev
            {
                p.push(
                    format!("{field}.weight"),
                    format!(
                        "stage weights must strictly increase, got {} after {prev}",
                        s.weight
                    ),
                );
            }
            previous = Some(s.weight.max(previous.unwrap_or(i64::MIN)));
            let min_duration = p
                .duration(&format!("{field}.min_duration"), s.min_duration.as_deref())
                .unwrap_or(DEFAULT_MIN_DURATION);
            let max_duration =
                p.duration(&format!("{field}.max_duration"), s.max_duration.as_deref());
            if let Some(max) = max_duration
                && max < min_duration
            {
                p.push(
                    format!("{field}.max_duration"),
                    format!(
                        "must be at least min_duration ({}), got {}",
                        humantime::format_duration(min_duration),
                        humantime::format_duration(max)
                    ),
                );
            }
            stages.push(Stage {
                weight: s.weight.clamp(0, 100) as u32,
                min_duration,
                max_duration,
                manual_gate: s.manual_gate,
            });
        }

        let mut names = std::collections::BTreeSet::new();
        let mut checks = Vec::with_capacity(raw.checks.len());
        for (i, c) in raw.checks.iter().enumerate() {
            let field = format!("checks[{i}]");
            let spec = RuleFields {
                name: c.name.as_deref(),
                metric: &c.metric,
                max: c.max,
                max_ratio: c.max_ratio,
                slack: c.slack,
                tolerance: c.tolerance,
                min_requests: c.min_requests,
                in_trigger: false,
                test: c.test.as_deref(),
                scores: c.score_fields(),
                slower_than: c.slower_than.as_deref(),
            };
            if let Some(check) = spec.validate(&field, DEFAULT_MIN_REQUESTS, &mut p) {
                if !names.insert(check.name.clone()) {
                    p.push(
                        format!("{field}.name"),
                        format!("duplicate check or trigger name '{}'", check.name),
                    );
                }
                checks.push(check);
            }
        }

        let mut triggers = Vec::with_capacity(raw.triggers.len());
        for (i, t) in raw.triggers.iter().enumerate() {
            let field = format!("triggers[{i}]");
            let spec = RuleFields {
                name: t.name.as_deref(),
                metric: &t.metric,
                max: t.max,
                max_ratio: t.max_ratio,
                slack: t.slack,
                tolerance: None,
                min_requests: t.min_requests,
                in_trigger: true,
                test: None,
                scores: ScoreFields::default(),
                slower_than: None,
            };
            let check = spec.validate(&field, DEFAULT_TRIGGER_MIN_REQUESTS, &mut p);
            let window = p
                .duration(&format!("{field}.window"), t.window.as_deref())
                .unwrap_or(DEFAULT_TRIGGER_WINDOW);
            if window.is_zero() || window > MAX_TRIGGER_WINDOW {
                p.push(
                    format!("{field}.window"),
                    format!(
                        "must be between 1s and {}, got {}",
                        humantime::format_duration(MAX_TRIGGER_WINDOW),
                        humantime::format_duration(window)
                    ),
                );
            }
            let severity = match t.severity.as_deref().unwrap_or("critical") {
                "critical" => Severity::Critical,
                "warning" => Severity::Warning,
                other => {
                    p.push(
                        format!("{field}.severity"),
                        format!("must be \"critical\" or \"warning\", got \"{other}\""),
                    );
                    Severity::Critical
                }
            };
            let grace = p.duration(&format!("{field}.grace"), t.grace.as_deref());
            match (severity, grace) {
                (Severity::Critical, Some(_)) => p.push(
                    format!("{field}.grace"),
                    "only warning triggers have a grace period (critical ones fire at once)",
                ),
                (Severity::Warning, None) if t.grace.is_none() => p.push(
                    format!("{field}.grace"),
                    "a warning trigger needs a grace period, e.g. grace = \"5m\"",
                ),
                _ => {}
            }
            if let Some(check) = check {
                if !names.insert(check.name.clone()) {
                    p.push(
                        format!("{field}.name"),
                        format!("duplicate check or trigger name '{}'", check.name),
                    );
                }
                triggers.push(Trigger {
                    check,
                    window,
                    severity,
                    grace: grace.unwrap_or(Duration::ZERO),
                });
            }
        }

        if let Some(key) = &raw.traffic.sticky_key {
            if let Err(e) = check_len("traffic.sticky_key", key, MAX_STICKY_KEY) {
                p.0.push(too_long(e));
            } else if let Err(reason) = validate_sticky_key(key) {
                p.push("traffic.sticky_key", reason);
            }
        }
        if let Some(header) = &raw.traffic.override_header {
            if let Err(e) = check_len("traffic.override_header", header, MAX_OVERRIDE_HEADER) {
                p.0.push(too_long(e));
            } else if let Err(reason) = serin_proto::overrides::check_header_name(header) {
                p.push("traffic.override_header", reason);
            }
        }
        if let Some(cookie) = &raw.traffic.override_cookie {
            if let Err(e) = check_len("traffic.override_cookie", cookie, MAX_OVERRIDE_COOKIE) {
                p.0.push(too_long(e));
            } else if let Err(reason) = serin_proto::overrides::check_cookie_name(cookie) {
                p.push("traffic.override_cookie", reason);
            }
        }

        let hooks = hook::validate_hooks(&raw.hooks, &mut p);
        let deploy = raw
            .deploy
            .as_ref()
            .and_then(|d| deploy::validate_deploy(d, raw.traffic.sticky_key.is_some(), &mut p));

        let on_inconclusive = match raw.analysis.on_inconclusive.as_deref() {
            None | Some("pause") => OnInconclusive::Pause,
            Some("roll_back") => OnInconclusive::RollBack,
            Some(other) => {
                p.push(
                    "analysis.on_inconclusive",
                    format!("expected \"pause\" or \"roll_back\", got \"{other}\""),
                );
                OnInconclusive::Pause
            }
        };
        if raw.analysis.on_inconclusive.is_some() && stages.iter().all(|s| s.max_duration.is_none())
        {
            p.push(
                "analysis.on_inconclusive",
                "no stage has a max_duration, so no stage can become inconclusive",
            );
        }

        if p.0.is_empty() {
            Ok(Strategy {
                stages,
                checks,
                triggers,
                on_inconclusive,
                traffic: Traffic {
                    sticky_key: raw.traffic.sticky_key,
                    override_header: raw.traffic.override_header,
                    override_cookie: raw.traffic.override_cookie,
                },
                hooks,
                deploy,
            })
        } else {
            Err(StrategyError::Invalid(p.0))
        }
    }

    /// The canary weight of stage `index` (0 when out of range).
    pub fn weight(&self, index: usize) -> u32 {
        self.stages.get(index).map_or(0, |s| s.weight)
    }

    /// The hooks that run `on`, in file order.
    pub fn hooks_on(&self, on: HookOn) -> impl Iterator<Item = &Hook> {
        self.hooks.iter().filter(move |h| h.on == on)
    }

    /// The hook named `name`, if the strategy has one.
    pub fn hook(&self, name: &str) -> Option<&Hook> {
        self.hooks.iter().find(|h| h.name == name)
    }

    /// The longest trigger window, which bounds how much recent data the analysis keeps.
    pub fn longest_trigger_window(&self) -> Duration {
        self.triggers
            .iter()
            .map(|t| t.window)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

struct RuleFields<'a> {
    name: Option<&'a str>,
    metric: &'a str,
    max: Option<f64>,
    max_ratio: Option<f64>,
    slack: Option<f64>,
    tolerance: Option<f64>,
    min_requests: Option<i64>,
    /// Triggers watch a sliding window, which may span stages of different weights.
    in_trigger: bool,
    /// `test = "..."`: the statistical test of a check (`sequential` or `ceiling`).
    test: Option<&'a str>,
    /// A check's test settings, as given.
    scores: ScoreFields,
    /// A latency sequential check's bucket bounds, in seconds.
    slower_than: Option<&'a [f64]>,
}

impl RuleFields<'_> {
    /// The rule of a check with a `test`.
    fn sequential_rule(
        &self,
        field: &str,
        metric: Option<Metric>,
        p: &mut Problems,
    ) -> Option<Rule> {
        let test = self.test.unwrap_or_default();
        if test != "sequential" && test != "ceiling" {
            p.push(
                format!("{field}.test"),
                format!("unknown test \"{test}\"; expected \"sequential\" or \"ceiling\""),
            );
            return None;
        }
        let latency = metric.is_some_and(|m| m.quantile().is_some());
        if metric.is_some_and(|m| m != Metric::ErrorRate) && !(latency && test == "sequential") {
            p.push(
                format!("{field}.metric"),
                format!(
                    "test = \"{test}\" reads error rates (metric = \"error_rate\"){}",
                    if test == "sequential" {
                        " or latency (latency_p50 ... latency_p99, with slower_than)"
                    } else {
                        ""
                    }
                ),
            );
        }
        let slower_than = self.slower_than.unwrap_or_default().to_vec();
        if latency && test == "sequential" {
            if slower_than.is_empty() {
                p.push(
                    format!("{field}.slower_than"),
                    "a latency sequential check needs slower_than: histogram bucket bounds in seconds (e.g. [0.25, 1.0]) whose slower requests are compared with stable's",
                );
            }
            if let Some(bad) = slower_than.iter().find(|b| !b.is_finite() || **b <= 0.0) {
                p.push(
                    format!("{field}.slower_than"),
                    format!("bounds must be finite numbers of seconds above 0, got {bad}"),
                );
            }
            if slower_than.len() > MAX_SLOWER_THAN {
                p.push(
                    format!("{field}.slower_than"),
                    format!(
                        "at most {MAX_SLOWER_THAN} bounds, got {}",
                        slower_than.len()
                    ),
                );
            }
        } else if self.slower_than.is_some() {
            p.push(
                format!("{field}.slower_than"),
                "slower_than only applies to a latency metric with test = \"sequential\"",
            );
        }
        if self.min_requests.is_some() {
            p.push(
                format!("{field}.min_requests"),
                "a score-based check needs no minimum: with few requests its score builds no evidence, so it can neither pass nor fail",
            );
        }
        if test == "ceiling" {
            return self.ceiling_rule(field, p);
        }
        if self.max.is_some()
            || self.max_ratio.is_some()
            || self.slack.is_some()
            || self.tolerance.is_some()
        {
            p.push(
                field,
                "a sequential check decides by its scores: set alpha_fail, alpha_pass, tolerated_ratio, margin, absolute_margin or evidence_cap, not `max`, `max_ratio`, `slack` or `tolerance`",
            );
        }
        let config = self.scores.sequential();
        if let Err(e) = config.validate() {
            let name = e.split_whitespace().next().unwrap_or_default();
            p.push(format!("{field}.{name}"), e);
        }
        Some(Rule::Sequential {
            config,
            slower_than,
        })
    }

    /// The rule of a check with `test = "ceiling"`: `max` is the ceiling.
    fn ceiling_rule(&self, field: &str, p: &mut Problems) -> Option<Rule> {
        let extra = [
            self.scores.alpha_pass,
            self.scores.tolerated_ratio,
            self.scores.margin,
            self.scores.absolute_margin,
        ];
        if self.max_ratio.is_some()
            || self.slack.is_some()
            || self.tolerance.is_some()
            || extra.iter().any(Option::is_some)
        {
            p.push(
                field,
                "a ceiling check takes `max` (the ceiling), `alpha_fail` and `evidence_cap` only",
            );
        }
        let Some(ceiling) = self.max else {
            p.push(
                format!("{field}.max"),
                "a ceiling check needs `max`, the canary's highest acceptable error rate (e.g. 0.05)",
            );
            return None;
        };
        let d = CeilingConfig::default();
        let config = CeilingConfig {
            ceiling,
            alpha: self.scores.alpha_fail.unwrap_or(d.alpha),
            horizon_ticks: d.horizon_ticks,
            evidence_cap: self.scores.evidence_cap.unwrap_or(d.evidence_cap),
        };
        if let Err(e) = config.validate() {
            let name = match e.split_whitespace().next().unwrap_or_default() {
                "ceiling" => "max",
                "alpha" => "alpha_fail",
                other => other,
            };
            p.push(format!("{field}.{name}"), e);
        }
        Some(Rule::Ceiling { config })
    }

    /// The rule of a `canary_share` check: a tolerance around the stage's weight.
    fn near_weight(&self, field: &str, p: &mut Problems) -> Option<Rule> {
        if self.in_trigger {
            p.push(
                format!("{field}.metric"),
                "canary_share is judged over a whole stage (a trigger's window can span stages of different weights); put it in [[checks]]",
            );
            return None;
        }
        if self.max.is_some() || self.max_ratio.is_some() || self.slack.is_some() {
            p.push(
                field,
                "canary_share is compared with the stage's weight: set `tolerance` (e.g. 0.5), not `max`, `max_ratio` or `slack`",
            );
        }
        let tolerance = self.tolerance.unwrap_or(DEFAULT_SHARE_TOLERANCE);
        if !tolerance.is_finite() || tolerance <= 0.0 || tolerance > 1.0 {
            p.push(
                format!("{field}.tolerance"),
                format!(
                    "must be a number in (0, 1] (relative to the weight: 0.5 = half of it either way), got {tolerance}"
                ),
            );
        }
        Some(Rule::NearWeight { tolerance })
    }

    fn validate(&self, field: &str, default_min: u64, p: &mut Problems) -> Option<Check> {
        let before = p.0.len();
        let metric = Metric::parse(self.metric);
        if metric.is_none() {
            let known: Vec<_> = Metric::ALL.iter().map(|(n, _)| *n).collect();
            p.push(
                format!("{field}.metric"),
                format!(
                    "unknown metric \"{}\"; expected one of {}",
                    self.metric,
                    known.join(", ")
                ),
            );
        }
        if metric != Some(Metric::CanaryShare) && self.tolerance.is_some() {
            p.push(
                format!("{field}.tolerance"),
                "tolerance only applies to metric \"canary_share\"",
            );
        }
        if self.scores.any() && self.test.is_none() {
            p.push(
                field,
                "alpha_fail, alpha_pass, tolerated_ratio, margin, absolute_margin and evidence_cap only apply with test = \"sequential\" (or alpha_fail and evidence_cap with test = \"ceiling\")",
            );
        }
        if self.in_trigger && matches!(metric, Some(Metric::HostMemory | Metric::HostCpu)) {
            p.push(
                format!("{field}.metric"),
                "host gauges are judged over a stage, never as a per-second rollback trigger on their own (a GC pause or a backup would roll back); put it in [[checks]]",
            );
        }
        let rule = match (self.max, self.max_ratio) {
            _ if self.test.is_some() => self.sequential_rule(field, metric, p),
            _ if metric == Some(Metric::CanaryShare) => self.near_weight(field, p),
            (Some(_), Some(_)) => {
                p.push(
                    field,
                    "set either `max` (absolute ceiling) or `max_ratio` (compared with stable), not both",
                );
                None
            }
            (None, None) => {
                p.push(
                    field,
                    "needs a rule: `max` (absolute ceiling) or `max_ratio` (compared with stable)",
                );
                None
            }
            (Some(limit), None) => {
                if !limit.is_finite() || limit < 0.0 {
                    p.push(
                        format!("{field}.max"),
                        format!("must be a finite number >= 0, got {limit}"),
                    );
                } else if let Some(m) = metric.filter(|m| m.is_fraction() && limit > 1.0) {
                    p.push(
                        format!("{field}.max"),
                        format!("{m} is a fraction in 0..=1 (0.01 = 1%), got {limit}"),
                    );
                }
                if self.slack.is_some() {
                    p.push(
                        format!("{field}.slack"),
                        "slack only applies to `max_ratio` rules",
                    );
                }
                Some(Rule::Max { limit })
            }
            (None, Some(ratio)) => {
                if !ratio.is_finite() || ratio < 1.0 {
                    p.push(
                        format!("{field}.max_ratio"),
                        format!("must be a finite number >= 1 (canary / stable), got {ratio}"),
                    );
                }
                let slack = self.slack.unwrap_or(0.0);
                if !slack.is_finite() || slack < 0.0 {
                    p.push(
                        format!("{field}.slack"),
                        format!("must be a finite number >= 0, got {slack}"),
                    );
                }
                Some(Rule::RatioToStable { ratio, slack })
            }
        };
        let min_requests = match self.min_requests {
            None => default_min,
            Some(n) if n >= 1 => n as u64,
            Some(n) => {
                p.push(
                    format!("{field}.min_requests"),
                    format!("must be at least 1 (a check never passes on no data), got {n}"),
                );
                default_min
            }
        };
        let name = match self.name {
            Some(n) if n.trim().is_empty() => {
                p.push(format!("{field}.name"), "must not be empty");
                String::new()
            }
            Some(n) => {
                if let Err(e) = check_len(&format!("{field}.name"), n, MAX_STRATEGY_NAME) {
                    p.0.push(too_long(e));
                }
                n.to_owned()
            }
            None => self.metric.to_owned(),
        };
        if p.0.len() > before {
            return None;
        }
        Some(Check {
            name,
            metric: metric?,
            rule: rule?,
            min_requests,
        })
    }
}

fn too_long(e: TooLong) -> FieldError {
    FieldError {
        field: e.field,
        reason: format!(
            "{} bytes is longer than the limit of {} bytes",
            e.length, e.limit
        ),
    }
}

/// An nginx variable expression: `$name` or `${name}`, letters, digits and `_` only.
fn validate_sticky_key(key: &str) -> Result<(), String> {
    let name = key
        .strip_prefix("${")
        .and_then(|k| k.strip_suffix('}'))
        .or_else(|| key.strip_prefix('$'));
    match name {
        Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            Ok(())
        }
        _ => Err(format!(
            "must be one nginx variable such as \"$cookie_uid\" or \"${{remote_addr}}\", got \"{key}\""
        )),
    }
}

/// Turns a byte offset into the nearest TOML key path, for syntax errors.
fn describe_position(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let mut table = None;
    for l in before.lines().rev() {
        let t = l.trim();
        if t.starts_with('[') {
            table = Some(t.trim_matches(|c| c == '[' || c == ']').to_owned());
            break;
        }
    }
    match table {
        Some(t) => format!("line {line} (in [{t}])"),
        None => format!("line {line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[traffic]
sticky_key = "$cookie_uid"
override_header = "X-Serin-Variant"
override_cookie = "serin_variant"

[[stages]]
weight = 1
min_duration = "30s"

[[stages]]
weight = 5
min_duration = "1m"
max_duration = "10m"

[[stages]]
weight = 50
manual_gate = true

[[stages]]
weight = 100

[[checks]]
name = "errors-vs-stable"
metric = "error_rate"
max_ratio = 1.5
slack = 0.005

[[checks]]
metric = "latency_p95"
max = 200
min_requests = 100

[[triggers]]
name = "hard-down"
metric = "error_rate"
max = 0.2
window = "5s"

[[triggers]]
name = "slow"
metric = "latency_p99"
max = 1000
severity = "warning"
grace = "5m"
"#;

    fn problems(text: &str) -> Vec<String> {
        match Strategy::from_toml(text) {
            Ok(_) => vec![],
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_full_strategy_parses_with_defaults() {
        let s = Strategy::from_toml(GOOD).expect("valid");
        assert_eq!(
            s.stages.iter().map(|s| s.weight).collect::<Vec<_>>(),
            [1, 5, 50, 100]
        );
        assert_eq!(s.stages[0].min_duration, Duration::from_secs(30));
        assert_eq!(s.stages[2].min_duration, DEFAULT_MIN_DURATION);
        assert_eq!(s.stages[1].max_duration, Some(Duration::from_secs(600)));
        assert!(s.stages[2].manual_gate);
        assert_eq!(
            s.checks[0].rule,
            Rule::RatioToStable {
                ratio: 1.5,
                slack: 0.005
            }
        );
        assert_eq!(s.checks[1].name, "latency_p95");
        assert_eq!(s.checks[1].min_requests, 100);
        assert_eq!(s.checks[0].min_requests, DEFAULT_MIN_REQUESTS);
        assert_eq!(s.triggers[0].severity, Severity::Critical);
        assert_eq!(s.triggers[0].window, Duration::from_secs(5));
        assert_eq!(s.triggers[1].grace, Duration::from_secs(300));
        assert_eq!(s.traffic.sticky_key.as_deref(), Some("$cookie_uid"));
        assert_eq!(
            s.traffic.override_header.as_deref(),
            Some("X-Serin-Variant")
        );
        assert_eq!(s.traffic.override_cookie.as_deref(), Some("serin_variant"));
        assert_eq!(s.longest_trigger_window(), DEFAULT_TRIGGER_WINDOW);
    }

    #[test]
    fn weight_120_is_named() {
        let p = problems("[[stages]]\nweight = 120\n");
        assert_eq!(
            p,
            ["stages[0].weight: must be in 1..=100 (percent of traffic), got 120"]
        );
    }

    #[test]
    fn zero_and_negative_weights_are_rejected() {
        assert_eq!(problems("[[stages]]\nweight = 0\n").len(), 1);
        assert_eq!(problems("[[stages]]\nweight = -5\n").len(), 1);
    }

    #[test]
    fn decreasing_and_repeated_stages_are_named() {
        let p =
            problems("[[stages]]\nweight = 50\n[[stages]]\nweight = 25\n[[stages]]\nweight = 25\n");
        assert_eq!(
            p,
            [
                "stages[1].weight: stage weights must strictly increase, got 25 after 50",
                "stages[2].weight: stage weights must strictly increase, got 25 after 50",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let p = problems(
            r#"
[[stages]]
weight = 120
min_duration = "soon"
[[checks]]
metric = "error_rates"
max = 0.1
[[checks]]
metric = "error_rate"
max = 2
[[triggers]]
metric = "latency_p95"
max = 100
severity = "loud"
window = "0s"
[traffic]
sticky_key = "cookie uid"
"#,
        );
        let fields: Vec<_> = p.iter().map(|l| l.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "stages[0].weight",
                "stages[0].min_duration",
                "checks[0].metric",
                "checks[1].max",
                "triggers[0].window",
                "triggers[0].severity",
                "traffic.sticky_key",
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_position() {
        let e = Strategy::from_toml("[[stages]]\nweight = 5\nwieght = 6\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("unknown field `wieght`"), "{text}");
        assert!(text.starts_with("line 3 (in [stages])"), "{text}");
        let e = Strategy::from_toml("[[stage]]\nweight = 5\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `stage`"), "{e}");
    }

    #[test]
    fn missing_stages_is_an_error() {
        assert_eq!(
            problems(""),
            ["stages: at least one [[stages]] entry is required"]
        );
    }

    #[test]
    fn rule_shapes_are_checked() {
        let base = "[[stages]]\nweight = 5\n";
        let p = problems(&format!("{base}[[checks]]\nmetric = \"error_rate\"\n"));
        assert!(p[0].starts_with("checks[0]: needs a rule"), "{p:?}");
        let p = problems(&format!(
            "{base}[[checks]]\nmetric = \"error_rate\"\nmax = 0.1\nmax_ratio = 2.0\n"
        ));
        assert!(p[0].starts_with("checks[0]: set either"), "{p:?}");
        let p = problems(&format!(
            "{base}[[checks]]\nmetric = \"error_rate\"\nmax_ratio = 0.5\n"
        ));
        assert!(p[0].starts_with("checks[0].max_ratio"), "{p:?}");
        let p = problems(&format!(
            "{base}[[checks]]\nmetric = \"error_rate\"\nmax = 0.1\nslack = 0.1\n"
        ));
        assert!(p[0].starts_with("checks[0].slack"), "{p:?}");
        let p = problems(&format!(
            "{base}[[checks]]\nmetric = \"error_rate\"\nmax = 0.1\nmin_requests = 0\n"
        ));
        assert!(p[0].starts_with("checks[0].min_requests"), "{p:?}");
    }

    #[test]
    fn durations_and_trigger_severity_are_checked() {
        let base = "[[stages]]\nweight = 5\n";
        let p = problems(&format!(
            "{base}[[triggers]]\nmetric = \"error_rate\"\nmax = 0.5\nseverity = \"warning\"\n"
        ));
        assert!(
            p[0].starts_with("triggers[0].grace: a warning trigger needs"),
            "{p:?}"
        );
        let p = problems(&format!(
            "{base}[[triggers]]\nmetric = \"error_rate\"\nmax = 0.5\ngrace = \"1m\"\n"
        ));
        assert!(p[0].starts_with("triggers[0].grace: only warning"), "{p:?}");
        let p = problems("[[stages]]\nweight = 5\nmin_duration = \"5m\"\nmax_duration = \"1m\"\n");
        assert!(
            p[0].starts_with("stages[0].max_duration: must be at least"),
            "{p:?}"
        );
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let p = problems(
            "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"error_rate\"\nmax = 0.1\n[[triggers]]\nmetric = \"error_rate\"\nmax = 0.5\n",
        );
        assert_eq!(
            p,
            ["triggers[0].name: duplicate check or trigger name 'error_rate'"]
        );
    }

    #[test]
    fn overlong_names_and_files_are_refused_with_field_limit_and_length() {
        let long = "n".repeat(65);
        let p = problems(&format!(
            "[[stages]]\nweight = 5\n[[checks]]\nname = \"{long}\"\nmetric = \"error_rate\"\nmax = 0.1\n\
             [[triggers]]\nname = \"{long}x\"\nmetric = \"error_rate\"\nmax = 0.5\n\
             [traffic]\nsticky_key = \"$cookie_{long}\"\n"
        ));
        assert_eq!(
            p,
            [
                "checks[0].name: 65 bytes is longer than the limit of 64 bytes",
                "triggers[0].name: 66 bytes is longer than the limit of 64 bytes",
                "traffic.sticky_key: 73 bytes is longer than the limit of 64 bytes",
            ]
        );
        let huge = format!("# {}\n[[stages]]\nweight = 5\n", "x".repeat(70_000));
        let p = problems(&huge);
        assert_eq!(
            p,
            [format!(
                "strategy: {} bytes is longer than the limit of 65536 bytes",
                huge.len()
            )]
        );
    }

    #[test]
    fn override_names_are_checked_and_refusals_name_the_field() {
        let p = problems(
            "[[stages]]\nweight = 5\n[traffic]\noverride_header = \"X_Serin\"\n\
             override_cookie = \"serin-variant\"\n",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].starts_with("traffic.override_header: \"X_Serin\" is not usable: '_'"),
            "{p:#?}"
        );
        assert!(
            p[1].starts_with("traffic.override_cookie: \"serin-variant\" is not usable: '-'"),
            "{p:#?}"
        );
        let p = problems("[[stages]]\nweight = 5\n[traffic]\noverride_header = \"\"\n");
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with("traffic.override_header: \"\" is not usable: it is empty"));
        let long = "a".repeat(65);
        let p = problems(&format!(
            "[[stages]]\nweight = 5\n[traffic]\noverride_header = \"{long}\"\n\
             override_cookie = \"{long}\"\n"
        ));
        assert_eq!(
            p,
            [
                "traffic.override_header: 65 bytes is longer than the limit of 64 bytes",
                "traffic.override_cookie: 65 bytes is longer than the limit of 64 bytes",
            ]
        );
        // Unknown keys next to them are still refused.
        let p = problems("[[stages]]\nweight = 5\n[traffic]\noverride = \"X\"\n");
        assert_eq!(p.len(), 1, "{p:#?}");

        // Either one alone is fine, and neither is the default.
        let s = Strategy::from_toml(
            "[[stages]]\nweight = 5\n[traffic]\noverride_cookie = \"serin_variant\"\n",
        )
        .unwrap();
        assert_eq!(
            (
                s.traffic.override_header,
                s.traffic.override_cookie.as_deref()
            ),
            (None, Some("serin_variant"))
        );
        let s = Strategy::from_toml("[[stages]]\nweight = 5\n").unwrap();
        assert_eq!(s.traffic, Traffic::default());
    }

    #[test]
    fn a_strategy_stored_before_overrides_existed_still_reads() {
        let stored = r#"{"stages":[],"checks":[],"triggers":[],"traffic":{"sticky_key":null}}"#;
        let s: Strategy = serde_json::from_str(stored).unwrap();
        assert_eq!(s.traffic, Traffic::default());
    }

    #[test]
    fn sticky_keys() {
        assert!(validate_sticky_key("$cookie_uid").is_ok());
        assert!(validate_sticky_key("${remote_addr}").is_ok());
        for bad in ["cookie", "$", "${}", "$a b", "$a;", "${a", "$cookie-uid"] {
            assert!(validate_sticky_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strategies_round_trip_through_serde() {
        let s = Strategy::from_toml(GOOD).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let back: Strategy = serde_json::from_str(&json).unwrap();
        assert_eq!(s, back);
    }

    #[test]
    fn a_canary_share_check_takes_a_tolerance_around_the_stage_weight() {
        let s = Strategy::from_toml(
            "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"canary_share\"\n\
             [[checks]]\nname = \"split-tight\"\nmetric = \"canary_share\"\ntolerance = 0.2\n",
        )
        .unwrap();
        assert_eq!(
            s.checks[0].rule,
            Rule::NearWeight {
                tolerance: DEFAULT_SHARE_TOLERANCE
            }
        );
        assert_eq!(s.checks[0].name, "canary_share");
        assert_eq!(s.checks[1].rule, Rule::NearWeight { tolerance: 0.2 });
    }

    #[test]
    fn a_canary_share_check_refuses_other_rules_triggers_and_bad_tolerances() {
        let stage = "[[stages]]\nweight = 5\n";
        let p = problems(&format!(
            "{stage}[[checks]]\nmetric = \"canary_share\"\nmax = 0.1\n"
        ));
        assert!(p[0].contains("set `tolerance`"), "{p:?}");
        let p = problems(&format!(
            "{stage}[[checks]]\nmetric = \"canary_share\"\ntolerance = 0\n"
        ));
        assert!(p[0].starts_with("checks[0].tolerance"), "{p:?}");
        let p = problems(&format!(
            "{stage}[[checks]]\nmetric = \"error_rate\"\nmax = 0.1\ntolerance = 0.5\n"
        ));
        assert!(
            p[0].contains("only applies to metric \"canary_share\""),
            "{p:?}"
        );
        let p = problems(&format!(
            "{stage}[[triggers]]\nmetric = \"canary_share\"\nwindow = \"10s\"\n"
        ));
        assert!(p[0].contains("put it in [[checks]]"), "{p:?}");
    }

    #[test]
    fn a_sequential_check_takes_its_settings_over_the_defaults() {
        let s = Strategy::from_toml(
            "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"error_rate\"\ntest = \"sequential\"\n\
             alpha_fail = 0.001\nevidence_cap = 2.0\n",
        )
        .unwrap();
        let Rule::Sequential { config, .. } = s.checks[0].rule else {
            panic!("expected a sequential rule: {:?}", s.checks[0].rule);
        };
        assert_eq!(config.alpha_fail, 0.001);
        assert_eq!(config.evidence_cap, 2.0);
        assert_eq!(config.alpha_pass, SequentialConfig::default().alpha_pass);
    }

    #[test]
    fn a_sequential_check_names_every_bad_setting() {
        let stage = "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"error_rate\"\n";
        let p = problems(&format!("{stage}test = \"bayes\"\n"));
        assert!(
            p[0].starts_with("checks[0].test: unknown test \"bayes\""),
            "{p:?}"
        );
        let p = problems(&format!("{stage}test = \"sequential\"\nalpha_fail = 1.5\n"));
        assert!(
            p[0].starts_with("checks[0].alpha_fail: alpha_fail must be a probability"),
            "{p:?}"
        );
        let p = problems(&format!("{stage}test = \"sequential\"\nmax = 0.1\n"));
        assert!(p[0].contains("decides by its scores"), "{p:?}");
        let p = problems(&format!(
            "{stage}test = \"sequential\"\nmin_requests = 10\n"
        ));
        assert!(p[0].starts_with("checks[0].min_requests"), "{p:?}");
        let p = problems(&format!("{stage}max = 0.1\nalpha_fail = 0.01\n"));
        assert!(
            p[0].contains("only apply with test = \"sequential\""),
            "{p:?}"
        );
        let p = problems(
            "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"latency_p95\"\ntest = \"sequential\"\n",
        );
        assert!(
            p[0].starts_with("checks[0].slower_than: a latency sequential check needs"),
            "{p:?}"
        );
        let p = problems(
            "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"canary_share\"\ntest = \"sequential\"\n",
        );
        assert!(p[0].starts_with("checks[0].metric"), "{p:?}");
        let p = problems(&format!(
            "{stage}test = \"sequential\"\nslower_than = [0.5]\n"
        ));
        assert!(
            p[0].starts_with("checks[0].slower_than: slower_than only applies"),
            "{p:?}"
        );
        let s = Strategy::from_toml(
            "[[stages]]\nweight = 5\n[[checks]]\nmetric = \"latency_p99\"\ntest = \"sequential\"\nslower_than = [0.25, 1.0]\n",
        )
        .unwrap();
        assert!(
            matches!(&s.checks[0].rule, Rule::Sequential { slower_than, .. } if slower_than == &[0.25, 1.0])
        );
    }

    #[test]
    fn on_inconclusive_is_pause_by_default_and_roll_back_when_asked() {
        let stage = "[[stages]]\nweight = 5\nmax_duration = \"10m\"\n";
        assert_eq!(
            Strategy::from_toml(stage).unwrap().on_inconclusive,
            OnInconclusive::Pause
        );
        let s = Strategy::from_toml(&format!(
            "{stage}[analysis]\non_inconclusive = \"roll_back\"\n"
        ))
        .unwrap();
        assert_eq!(s.on_inconclusive, OnInconclusive::RollBack);
        let p = problems(&format!("{stage}[analysis]\non_inconclusive = \"retry\"\n"));
        assert_eq!(
            p,
            ["analysis.on_inconclusive: expected \"pause\" or \"roll_back\", got \"retry\""]
        );
        let p = problems("[[stages]]\nweight = 5\n[analysis]\non_inconclusive = \"roll_back\"\n");
        assert!(p[0].contains("no stage has a max_duration"), "{p:?}");
    }

    #[test]
    fn host_gauges_are_checks_with_fractions_never_triggers() {
        let stage = "[[stages]]\nweight = 5\n";
        let s = Strategy::from_toml(&format!(
            "{stage}[[checks]]\nmetric = \"host_memory\"\nmax = 0.8\n"
        ))
        .unwrap();
        assert_eq!(s.checks[0].metric, Metric::HostMemory);
        let p = problems(&format!(
            "{stage}[[checks]]\nmetric = \"host_cpu\"\nmax = 80\n"
        ));
        assert!(p[0].contains("host_cpu is a fraction in 0..=1"), "{p:?}");
        let p = problems(&format!(
            "{stage}[[triggers]]\nmetric = \"host_memory\"\nmax = 0.8\nwindow = \"10s\"\n"
        ));
        assert!(
            p[0].contains("never as a per-second rollback trigger"),
            "{p:?}"
        );
    }
}
