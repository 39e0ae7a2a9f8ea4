//! Anytime-valid sequential scores: the canary judged every tick, with an error guarantee that
//! holds however often the scores are looked at (the design is the project's analysis note;
//! docs/benchmarks.md §15 has what they measured). Pure: no I/O, no clock; the caller folds
//! each newly completed second (or tick) into the tests and asks for a decision.
//!
//! - [`RatioTest`]: canary error (or slow-request) rate against the stable variant's, from the
//!   per-tick counts of both. Its **fail score** is an e-process under "the canary's rate is at
//!   most `tolerated_ratio` × the stable's": by Ville's inequality it ever reaches
//!   `1 / alpha_fail` with probability at most `alpha_fail`, so it is checked every tick and
//!   carried across stages. Its **pass score** (restarted by [`RatioTest::start_stage`]) is an
//!   e-process under "the canary is worse than the margin"; a stage may pass when it reaches
//!   `1 / alpha_pass`.
//! - [`CeilingTest`]: the canary alone against an absolute ceiling (error rate ≤ 5%); fires on
//!   the second tick of a hard-down canary (the first with a larger cap), however long the
//!   canary was healthy before (it is a restarting change detector, with a guarantee over a
//!   horizon of ticks).
//! - [`LatencyTest`]: [`RatioTest`]s on "requests slower than a bucket bound", one per bound,
//!   read from histogram counts ([`Counts::slower_than`]).
//!
//! How a tick counts. With `ρ = nB / (nA + nB)` and a rate ratio `r` (canary / stable), the
//! canary's share of the tick's errors is `Binomial(xA + xB, θ(r))` with
//! `θ(r) = rρ / (rρ + 1 − ρ)`, so one tick's log likelihood ratio of `r` against `r0` is
//! `ℓ(r; r0) = xB·ln(r / r0) − (xA + xB)·ln((1 + ρ(r − 1)) / (1 + ρ(r0 − 1)))` (the note's
//! formula, rearranged so that it needs no `θ` near 0 or 1). Each tick adds `min(ℓ, c)`: the
//! cap `c` keeps one tick (one host's hiccup) from deciding alone, and capping a likelihood
//! ratio from above keeps it a supermartingale. A tick with no requests on either side, or no
//! errors at all, adds nothing. Sums stay in log space; a score is a log-mean-exp over a grid
//! of alternatives, so nothing overflows and the state is a few finite numbers.
//!
//! Pass score and low error rates. Evidence that the canary is *not worse* comes from errors:
//! with no errors on either side the ratio part learns nothing, ever. So the pass score is
//! the mean of two e-processes under the same "bad" hypothesis, canary rate above
//! `bound = max((1 + δ)·p̂, p̂ + Δ_abs)` with `p̂` the stable's rate at stage start:
//! the ratio part (canary/stable ratio ≥ `r_m = bound / p̂`) and a one-sample part on the canary
//! alone (canary rate ≥ `bound`). The second lets a service that never errs pass once the
//! canary has served enough error-free requests (at the defaults, with p̂ = 0 where the
//! one-sample part is the whole score, between 3 / bound and 4.4 / bound: 3,000-4,400 requests
//! for a bound of 0.1%), and never with fewer. The
//! one-sample part trusts `p̂`; a stable whose real rate is below its estimate makes it a little
//! lenient (the note's design fixes `p̂` too). With no canary requests nothing passes.
//!
//! Known limits: the fail score needs the stable variant in the same tick, so at a 100% stage
//! only the [`CeilingTest`] watches errors, and it cannot tell the canary's fault from a
//! shared outage there: set its ceiling well above the stable's usual rate (§15 measured
//! 1.00% false rollbacks with 5% over a 1%-error service with bursts, 0.04% with
//! max(5%, 10 × p̂)). Evidence gathered while the canary was fine is negative and carried, so a
//! fault that appears only later takes longer to detect (§15: 10-26 s after its onset).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Window;

/// Alternatives of the fail score, as multiples of the tolerated ratio (all above it).
pub const FAIL_GRID: [f64; 8] = [1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0];

/// Alternatives of the ratio pass score, as fractions of the margin ratio `r_m` (all below it;
/// with the default margin 1.2 they are 0.12, 0.3, 0.6, 0.9 and 1.08).
pub const PASS_GRID: [f64; 5] = [0.1, 0.25, 0.5, 0.75, 0.9];

/// Alternatives of the one-sample pass score, as fractions of the acceptable bound.
pub const ABSOLUTE_PASS_GRID: [f64; 4] = [0.1, 0.25, 0.5, 0.75];

/// Alternatives of the ceiling score, as multiples of the ceiling's odds (so every `p < 1`).
pub const CEILING_ODDS_GRID: [f64; 7] = [1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0];

/// The largest margin ratio used, for a stable variant with (almost) no errors.
pub const MAX_MARGIN_RATIO: f64 = 1000.0;

/// Requests and errors (or slow requests) of one variant in one tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests served.
    pub requests: u64,
    /// Of those, errors (or requests slower than a bound); never more than `requests`.
    pub errors: u64,
}

impl Counts {
    /// Counts with `errors` clamped to `requests`.
    pub fn new(requests: u64, errors: u64) -> Counts {
        Counts {
            requests,
            errors: errors.min(requests),
        }
    }

    /// Requests and errors of a window (a window of a failed scrape has none).
    pub fn from_window(window: &Window) -> Counts {
        Counts::new(window.requests, window.errors)
    }

    /// Requests of a window's histogram and how many were slower than `bound` seconds, which
    /// must be one of its bucket bounds. `None` when the window has no such bucket (the tick
    /// then counts neither way).
    pub fn slower_than(window: &Window, bound: f64) -> Option<Counts> {
        let index = window.bounds.iter().position(|&le| same_bound(le, bound))?;
        let at_or_under = *window.counts.get(index)?;
        let total = match window.bounds.last() {
            Some(last) if last.is_infinite() => window.observed(),
            _ => window.observed().max(window.requests),
        };
        Some(Counts::new(total, total.saturating_sub(at_or_under)))
    }

    /// Error share in 0..=1, `None` without requests.
    pub fn rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

fn same_bound(a: f64, b: f64) -> bool {
    a == b || (a.is_finite() && b.is_finite() && (a - b).abs() <= 1e-9 * a.abs().max(b.abs()))
}

/// Settings of a [`RatioTest`] (and of each bound of a [`LatencyTest`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SequentialConfig {
    /// Chance of a false rollback over the whole rollout (fail threshold `1 / alpha_fail`).
    pub alpha_fail: f64,
    /// Chance, per stage, of passing a canary worse than the margin (threshold `1 / alpha_pass`).
    pub alpha_pass: f64,
    /// Canary/stable ratio still tolerated: the fail score tests "ratio above this".
    pub tolerated_ratio: f64,
    /// Relative margin δ of the pass score: "the canary's rate is below (1 + δ) × stable's".
    pub margin: f64,
    /// Absolute margin Δ_abs of the pass score: "... or below stable's + Δ_abs" (for services
    /// whose error rate is tiny).
    pub absolute_margin: f64,
    /// Cap `c` on one tick's log evidence, in nats.
    pub evidence_cap: f64,
}

impl Default for SequentialConfig {
    fn default() -> SequentialConfig {
        SequentialConfig {
            alpha_fail: 0.01,
            alpha_pass: 0.05,
            tolerated_ratio: 1.1,
            margin: 0.2,
            absolute_margin: 0.001,
            evidence_cap: 1.0,
        }
    }
}

impl SequentialConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        check_alpha("alpha_fail", self.alpha_fail)?;
        check_alpha("alpha_pass", self.alpha_pass)?;
        if !(self.tolerated_ratio.is_finite() && self.tolerated_ratio >= 1.0) {
            return Err(format!(
                "tolerated_ratio must be a finite ratio of at least 1, not {}",
                self.tolerated_ratio
            ));
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(format!(
                "margin must be finite and at least 0, not {}",
                self.margin
            ));
        }
        if !(0.0..1.0).contains(&self.absolute_margin) {
            return Err(format!(
                "absolute_margin must be a rate in [0, 1), not {}",
                self.absolute_margin
            ));
        }
        check_cap("evidence_cap", self.evidence_cap)
    }

    /// The fail threshold `1 / alpha_fail`.
    pub fn fail_threshold(&self) -> f64 {
        1.0 / self.alpha_fail
    }

    /// The pass threshold `1 / alpha_pass`.
    pub fn pass_threshold(&self) -> f64 {
        1.0 / self.alpha_pass
    }
}

fn check_alpha(field: &str, alpha: f64) -> Result<(), String> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(format!(
            "{field} must be a probability strictly between 0 and 1, not {alpha}"
        ))
    }
}

fn check_cap(field: &str, cap: f64) -> Result<(), String> {
    if cap.is_finite() && cap > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "{field} must be a finite number of nats above 0, not {cap}"
        ))
    }
}

/// What the scores say now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SequentialDecision {
    /// The fail score reached its threshold: roll back.
    Fail,
    /// The pass score reached its threshold (and the fail score did not): the stage may pass
    /// once its minimum time has elapsed.
    Pass,
    /// Neither yet.
    Continue,
}

/// A decision with the numbers behind it, for the evidence record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    /// The decision the scores give.
    pub decision: SequentialDecision,
    /// The fail score (1 with no evidence).
    pub fail_score: f64,
    /// `1 / alpha_fail`.
    pub fail_threshold: f64,
    /// The pass score of the current stage (1 with no evidence).
    pub pass_score: f64,
    /// `1 / alpha_pass`.
    pub pass_threshold: f64,
}

impl ScoreReport {
    fn new(fail_score: f64, pass_score: f64, config: &SequentialConfig) -> ScoreReport {
        let fail_threshold = config.fail_threshold();
        let pass_threshold = config.pass_threshold();
        let decision = if fail_score >= fail_threshold {
            SequentialDecision::Fail
        } else if pass_score >= pass_threshold {
            SequentialDecision::Pass
        } else {
            SequentialDecision::Continue
        };
        ScoreReport {
            decision,
            fail_score,
            fail_threshold,
            pass_score,
            pass_threshold,
        }
    }
}

impl fmt::Display for ScoreReport {
    /// E.g. "fail: fail score 312.4 ≥ 100" or "continue: fail score 3.1 < 100, pass score
    /// 4.2 < 20".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fail = compare("fail score", self.fail_score, self.fail_threshold);
        let pass = compare("pass score", self.pass_score, self.pass_threshold);
        match self.decision {
            SequentialDecision::Fail => write!(f, "fail: {fail}"),
            SequentialDecision::Pass => write!(f, "pass: {pass} ({fail})"),
            SequentialDecision::Continue => write!(f, "continue: {fail}, {pass}"),
        }
    }
}

fn compare(name: &str, score: f64, threshold: f64) -> String {
    let sign = if score >= threshold { '≥' } else { '<' };
    format!("{name} {} {sign} {}", show(score), show(threshold))
}

fn show(value: f64) -> String {
    if value.is_infinite() {
        "∞".to_string()
    } else if value >= 1e6 {
        format!("{value:.3e}")
    } else {
        format!("{:.1}", value).trim_end_matches(".0").to_string()
    }
}

/// `ln(mean(exp(values)))`, without overflow; 0 (a score of 1) for no values.
fn log_mean_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.is_empty() || max == f64::NEG_INFINITY {
        return if values.is_empty() { 0.0 } else { max };
    }
    if max == f64::INFINITY {
        return max;
    }
    let sum: f64 = values.iter().map(|v| (v - max).exp()).sum();
    max + (sum / values.len() as f64).ln()
}

/// One tick's log likelihood ratio of a canary/stable ratio `r` against `r0`, given the
/// canary's traffic share `rho` in (0, 1) and the errors of both sides.
fn ratio_log_lr(r: f64, r0: f64, rho: f64, stable_errors: f64, canary_errors: f64) -> f64 {
    let spread = (rho * (r - 1.0)).ln_1p() - (rho * (r0 - 1.0)).ln_1p();
    canary_errors * (r / r0).ln() - (stable_errors + canary_errors) * spread
}

/// One tick's log likelihood ratio of an error rate `p` against `p0` (both in (0, 1)) for
/// `errors` of `requests`.
fn binomial_log_lr(p: f64, p0: f64, requests: f64, errors: f64) -> f64 {
    errors * (p / p0).ln() + (requests - errors) * ((-p).ln_1p() - (-p0).ln_1p())
}

/// The canary's traffic share and both sides' errors, when the tick carries ratio evidence.
fn ratio_inputs(stable: Counts, canary: Counts) -> Option<(f64, f64, f64)> {
    let stable = Counts::new(stable.requests, stable.errors);
    let canary = Counts::new(canary.requests, canary.errors);
    if stable.requests == 0 || canary.requests == 0 || stable.errors + canary.errors == 0 {
        return None;
    }
    let rho = canary.requests as f64 / (stable.requests as f64 + canary.requests as f64);
    Some((rho, stable.errors as f64, canary.errors as f64))
}

/// Canary against stable rates, tick by tick: fail score over the whole rollout, pass score per
/// stage. See the module documentation for the statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioTest {
    config: SequentialConfig,
    /// Σ capped evidence per [`FAIL_GRID`] alternative.
    fail_log_evidence: Vec<f64>,
    /// The stage's pass margins; `None` before the first [`RatioTest::start_stage`].
    stage: Option<StageMargin>,
    /// Σ capped evidence per [`PASS_GRID`] alternative, this stage.
    pass_log_evidence: Vec<f64>,
    /// Σ capped evidence per [`ABSOLUTE_PASS_GRID`] alternative, this stage.
    absolute_log_evidence: Vec<f64>,
    /// Ticks observed in the rollout and in the stage.
    ticks: u64,
    stage_ticks: u64,
}

/// What "worse than the margin" means in the current stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageMargin {
    /// The stable's rate at stage start, p̂.
    pub stable_rate: f64,
    /// The margin ratio `r_m = max(1 + δ, 1 + Δ_abs / p̂)` (at most [`MAX_MARGIN_RATIO`]).
    pub ratio: f64,
    /// The canary rate that counts as acceptable, `max((1 + δ)·p̂, p̂ + Δ_abs)` (below 1).
    pub bound: f64,
}

impl StageMargin {
    /// Whether the ratio part of the pass score counts: not when p̂ is 0, where no ratio
    /// margin follows from the bound (a canary far above a stable that merely had no errors
    /// yet could look "under 1000x" and pass).
    pub fn has_ratio_part(&self) -> bool {
        self.stable_rate > 0.0
    }

    fn new(config: &SequentialConfig, stable_rate: f64) -> StageMargin {
        let stable_rate = if stable_rate.is_finite() {
            stable_rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let absolute = if stable_rate > 0.0 {
            1.0 + config.absolute_margin / stable_rate
        } else {
            MAX_MARGIN_RATIO
        };
        let ratio = (1.0 + config.margin).max(absolute).min(MAX_MARGIN_RATIO);
        let bound = (stable_rate * (1.0 + config.margin))
            .max(stable_rate + config.absolute_margin)
            .clamp(1e-12, 1.0 - 1e-9);
        StageMargin {
            stable_rate,
            ratio,
            bound,
        }
    }
}

impl RatioTest {
    /// A test with no evidence; the pass score stays 1 until [`RatioTest::start_stage`].
    pub fn new(config: SequentialConfig) -> Result<RatioTest, String> {
        config.validate()?;
        Ok(RatioTest {
            config,
            fail_log_evidence: vec![0.0; FAIL_GRID.len()],
            stage: None,
            pass_log_evidence: Vec::new(),
            absolute_log_evidence: Vec::new(),
            ticks: 0,
            stage_ticks: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SequentialConfig {
        &self.config
    }

    /// Starts a stage: the pass score restarts from 1 with margins from `stable_rate` (p̂, the
    /// stable's error rate so far). The fail score carries on.
    pub fn start_stage(&mut self, stable_rate: f64) {
        self.stage = Some(StageMargin::new(&self.config, stable_rate));
        self.pass_log_evidence = vec![0.0; PASS_GRID.len()];
        self.absolute_log_evidence = vec![0.0; ABSOLUTE_PASS_GRID.len()];
        self.stage_ticks = 0;
    }

    /// The current stage's margins, `None` before the first stage.
    pub fn stage_margin(&self) -> Option<StageMargin> {
        self.stage
    }

    /// Folds one tick of both variants in. A tick with no requests on a side or no errors adds
    /// no ratio evidence; the one-sample pass part needs only canary requests.
    pub fn observe(&mut self, stable: Counts, canary: Counts) {
        self.ticks += 1;
        self.stage_ticks += 1;
        let cap = self.config.evidence_cap;
        if let Some((rho, stable_errors, canary_errors)) = ratio_inputs(stable, canary) {
            let tolerated = self.config.tolerated_ratio;
            for (sum, multiple) in self.fail_log_evidence.iter_mut().zip(FAIL_GRID) {
                let r = tolerated * multiple;
                *sum += ratio_log_lr(r, tolerated, rho, stable_errors, canary_errors).min(cap);
            }
            if let Some(margin) = self.stage.filter(StageMargin::has_ratio_part) {
                for (sum, fraction) in self.pass_log_evidence.iter_mut().zip(PASS_GRID) {
                    let r = margin.ratio * fraction;
                    let lr = ratio_log_lr(r, margin.ratio, rho, stable_errors, canary_errors);
                    *sum += lr.min(cap);
                }
            }
        }
        let canary = Counts::new(canary.requests, canary.errors);
        if let (Some(margin), true) = (self.stage, canary.requests > 0) {
            let (requests, errors) = (canary.requests as f64, canary.errors as f64);
            for (sum, fraction) in self
                .absolute_log_evidence
                .iter_mut()
                .zip(ABSOLUTE_PASS_GRID)
            {
                let p = margin.bound * fraction;
                *sum += binomial_log_lr(p, margin.bound, requests, errors).min(cap);
            }
        }
    }

    /// Folds one tick of windows in (a failed scrape adds nothing).
    pub fn observe_windows(&mut self, stable: &Window, canary: &Window) {
        self.observe(Counts::from_window(stable), Counts::from_window(canary));
    }

    /// Ticks observed since the test started.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Ticks observed since the stage started.
    pub fn stage_ticks(&self) -> u64 {
        self.stage_ticks
    }

    /// ln of the fail score (finite however strong the evidence).
    pub fn log_fail_score(&self) -> f64 {
        log_mean_exp(&self.fail_log_evidence)
    }

    /// The fail score: 1 with no evidence; roll back at `1 / alpha_fail`.
    pub fn fail_score(&self) -> f64 {
        self.log_fail_score().exp()
    }

    /// ln of the ratio part of the pass score.
    pub fn log_ratio_pass_score(&self) -> f64 {
        log_mean_exp(&self.pass_log_evidence)
    }

    /// ln of the one-sample part of the pass score.
    pub fn log_absolute_pass_score(&self) -> f64 {
        log_mean_exp(&self.absolute_log_evidence)
    }

    /// ln of the pass score.
    pub fn log_pass_score(&self) -> f64 {
        match self.stage {
            None => 0.0,
            Some(margin) if margin.has_ratio_part() => {
                log_mean_exp(&[self.log_ratio_pass_score(), self.log_absolute_pass_score()])
            }
            Some(_) => self.log_absolute_pass_score(),
        }
    }

    /// The pass score of the stage: mean of the ratio part and the one-sample part (the
    /// one-sample part alone when the stable had no errors at stage start); 1 with no evidence;
    /// the stage may pass at `1 / alpha_pass`.
    pub fn pass_score(&self) -> f64 {
        self.log_pass_score().exp()
    }

    /// The decision of the scores now.
    pub fn decision(&self) -> SequentialDecision {
        self.report().decision
    }

    /// The decision with its scores and thresholds.
    pub fn report(&self) -> ScoreReport {
        ScoreReport::new(self.fail_score(), self.pass_score(), &self.config)
    }
}

/// Settings of a [`CeilingTest`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CeilingConfig {
    /// The canary's highest acceptable error rate, p0.
    pub ceiling: f64,
    /// Chance of firing within `horizon_ticks` for a canary at or under the ceiling.
    pub alpha: f64,
    /// The longest rollout the guarantee covers, in ticks (the threshold is
    /// `horizon_ticks / alpha`).
    pub horizon_ticks: u64,
    /// Cap on one tick's log evidence, in nats. The default 7.5 is just over half of what
    /// firing needs (`ln(horizon_ticks / alpha)` ≈ 12.8 nats, plus up to ln 7 for the grid), so
    /// one tick never decides alone and a hard-down canary fires on its second tick. A cap of
    /// 20 fires on the first tick of a hard-down canary (50% of 100 requests), and also on one
    /// tick of one canary host's hiccup: with the simulated hiccups of docs/benchmarks.md §15
    /// that was 18% false rollbacks at 10k rps.
    pub evidence_cap: f64,
}

impl Default for CeilingConfig {
    fn default() -> CeilingConfig {
        CeilingConfig {
            ceiling: 0.05,
            alpha: 0.01,
            horizon_ticks: 3600,
            evidence_cap: 7.5,
        }
    }
}

impl CeilingConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.ceiling > 0.0 && self.ceiling < 1.0) {
            return Err(format!(
                "ceiling must be an error rate strictly between 0 and 1, not {}",
                self.ceiling
            ));
        }
        check_alpha("alpha", self.alpha)?;
        if self.horizon_ticks == 0 {
            return Err("horizon_ticks must be at least 1".into());
        }
        check_cap("evidence_cap", self.evidence_cap)
    }

    /// The firing threshold, `horizon_ticks / alpha`.
    pub fn threshold(&self) -> f64 {
        self.horizon_ticks as f64 / self.alpha
    }
}

/// The canary alone against an absolute error-rate ceiling, as a change detector: per
/// alternative error rate above the ceiling (odds × [`CEILING_ODDS_GRID`]) the log evidence
/// restarts from 0 whenever it would go below (CUSUM: `S = max(S, 0) + min(ℓ, cap)`), and the
/// score is the mean of `exp(S)` over the alternatives.
///
/// Why a detector and not an e-process like [`RatioTest`]'s fail score: a canary that is
/// healthy for minutes builds thousands of nats of evidence *against* a high error rate, and an
/// e-process would then take as many to notice a crash. Restarting keeps a crash detectable in
/// one or two ticks at any time. The price is the guarantee's form: the score is at most the
/// Shiryaev-Roberts statistic, whose expectation under the ceiling grows by at most 1 a tick,
/// so by Doob's inequality it reaches `horizon_ticks / alpha` within `horizon_ticks` ticks with
/// probability at most `alpha`.
///
/// A tick in which the stable variant also breaches the ceiling counts neither way (both
/// breaching: pause, do not blame the canary); with no stable traffic (a 100% stage) every
/// tick counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeilingTest {
    config: CeilingConfig,
    log_evidence: Vec<f64>,
    ticks: u64,
    skipped_ticks: u64,
    /// Canary requests in the ticks that counted.
    #[serde(default)]
    canary_requests: u64,
}

/// A ceiling test's state for the evidence record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CeilingReport {
    /// Whether the score reached its threshold.
    pub fired: bool,
    /// The score (1 with no evidence).
    pub score: f64,
    /// `horizon_ticks / alpha`.
    pub threshold: f64,
    /// The ceiling tested.
    pub ceiling: f64,
}

impl fmt::Display for CeilingReport {
    /// E.g. "ceiling 5%: score 4.2e8 ≥ 360000".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let score = compare("score", self.score, self.threshold);
        write!(f, "ceiling {}%: {score}", self.ceiling * 100.0)
    }
}

impl CeilingTest {
    /// A test with no evidence.
    pub fn new(config: CeilingConfig) -> Result<CeilingTest, String> {
        config.validate()?;
        Ok(CeilingTest {
            config,
            log_evidence: vec![0.0; CEILING_ODDS_GRID.len()],
            ticks: 0,
            skipped_ticks: 0,
            canary_requests: 0,
        })
    }

    /// Whether any counted tick had canary requests.
    pub fn canary_seen(&self) -> bool {
        self.canary_requests > 0
    }

    /// Folds one tick in; `stable` only decides whether the tick counts.
    pub fn observe(&mut self, stable: Counts, canary: Counts) {
        self.ticks += 1;
        let stable = Counts::new(stable.requests, stable.errors);
        let canary = Counts::new(canary.requests, canary.errors);
        if stable.rate().is_some_and(|rate| rate > self.config.ceiling) {
            self.skipped_ticks += 1;
            return;
        }
        if canary.requests == 0 {
            return;
        }
        self.canary_requests += canary.requests;
        let p0 = self.config.ceiling;
        let odds0 = p0 / (1.0 - p0);
        let (requests, errors) = (canary.requests as f64, canary.errors as f64);
        for (sum, multiple) in self.log_evidence.iter_mut().zip(CEILING_ODDS_GRID) {
            let odds = odds0 * multiple;
            let p = odds / (1.0 + odds);
            let evidence = binomial_log_lr(p, p0, requests, errors).min(self.config.evidence_cap);
            *sum = sum.max(0.0) + evidence;
        }
    }

    /// Ticks observed, and of those the ones skipped because the stable breached too.
    pub fn ticks(&self) -> (u64, u64) {
        (self.ticks, self.skipped_ticks)
    }

    /// ln of the score.
    pub fn log_score(&self) -> f64 {
        let restarted: Vec<f64> = self.log_evidence.iter().map(|s| s.max(0.0)).collect();
        log_mean_exp(&restarted)
    }

    /// The score: 1 with no evidence; fires at [`CeilingConfig::threshold`].
    pub fn score(&self) -> f64 {
        self.log_score().exp()
    }

    /// Whether the canary is shown above the ceiling.
    pub fn fired(&self) -> bool {
        self.log_score() >= self.config.threshold().ln()
    }

    /// The state for the evidence record.
    pub fn report(&self) -> CeilingReport {
        CeilingReport {
            fired: self.fired(),
            score: self.score(),
            threshold: self.config.threshold(),
            ceiling: self.config.ceiling,
        }
    }
}

/// Latency against stable through histogram buckets: per bound, requests slower than it are
/// "errors" of a [`RatioTest`]. The fail score is the mean of the bounds' fail scores (an
/// e-process while the canary is no slower at every bound); the pass score is their minimum
/// (a stage passes only if it passes at every bound).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyTest {
    bounds: Vec<f64>,
    tests: Vec<RatioTest>,
}

impl LatencyTest {
    /// A test at `bounds` (seconds, bucket bounds of the histograms, e.g. near stable's p90
    /// and p99 and the SLO bound), each with `config`.
    pub fn new(config: SequentialConfig, bounds: Vec<f64>) -> Result<LatencyTest, String> {
        config.validate()?;
        if bounds.is_empty() {
            return Err("bounds must name at least one bucket bound".into());
        }
        if let Some(bad) = bounds.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
            return Err(format!("bounds must be finite positive seconds, not {bad}"));
        }
        let tests = bounds
            .iter()
            .map(|_| RatioTest::new(config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LatencyTest { bounds, tests })
    }

    /// The bounds tested.
    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// The per-bound tests.
    pub fn tests(&self) -> &[RatioTest] {
        &self.tests
    }

    /// Starts a stage with each bound's p̂ read from the stable's window so far (the share of
    /// its requests slower than the bound; 0 when the window lacks the bucket).
    pub fn start_stage(&mut self, stable_so_far: &Window) {
        for (test, &bound) in self.tests.iter_mut().zip(&self.bounds) {
            let rate = Counts::slower_than(stable_so_far, bound)
                .and_then(|c| c.rate())
                .unwrap_or(0.0);
            test.start_stage(rate);
        }
    }

    /// Starts a stage with each bound's p̂ given, in the order of the bounds (a missing one
    /// counts as 0).
    pub fn start_stage_with_rates(&mut self, slow_rates: &[f64]) {
        for (i, test) in self.tests.iter_mut().enumerate() {
            test.start_stage(slow_rates.get(i).copied().unwrap_or(0.0));
        }
    }

    /// Folds one tick of both variants' windows in; a bound missing from a window's layout
    /// adds nothing for that bound.
    pub fn observe(&mut self, stable: &Window, canary: &Window) {
        for (test, &bound) in self.tests.iter_mut().zip(&self.bounds) {
            let stable = Counts::slower_than(stable, bound).unwrap_or_default();
            let canary = Counts::slower_than(canary, bound).unwrap_or_default();
            test.observe(stable, canary);
        }
    }

    /// Folds one tick in from slow counts already computed, one pair per bound.
    pub fn observe_counts(&mut self, per_bound: &[(Counts, Counts)]) {
        for (test, &(stable, canary)) in self.tests.iter_mut().zip(per_bound) {
            test.observe(stable, canary);
        }
    }

    /// The fail score: the mean of the bounds' fail scores.
    pub fn fail_score(&self) -> f64 {
        let logs: Vec<f64> = self.tests.iter().map(RatioTest::log_fail_score).collect();
        log_mean_exp(&logs).exp()
    }

    /// The pass score: the smallest of the bounds' pass scores.
    pub fn pass_score(&self) -> f64 {
        self.tests
            .iter()
            .map(RatioTest::pass_score)
            .fold(f64::INFINITY, f64::min)
    }

    /// The decision of the scores now.
    pub fn decision(&self) -> SequentialDecision {
        self.report().decision
    }

    /// The decision with its scores and thresholds.
    pub fn report(&self) -> ScoreReport {
        // Every bound shares one config; `new` refuses an empty list.
        let config = self.tests.first().map(|t| *t.config()).unwrap_or_default();
        ScoreReport::new(self.fail_score(), self.pass_score(), &config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A Poisson draw (Knuth's product of uniforms, in steps of mean 30). Poisson errors are
    /// the model the ratio test conditions on: given the total, the canary's share is exactly
    /// binomial.
    fn poisson(rng: &mut StdRng, mean: f64) -> u64 {
        let mut left = mean;
        let mut count = 0;
        while left > 0.0 {
            let step = left.min(30.0);
            left -= step;
            let limit = (-step).exp();
            let mut product: f64 = rng.random();
            while product > limit {
                count += 1;
                product *= rng.random::<f64>();
            }
        }
        count
    }

    /// One tick: `requests` split by `canary_share`, stable errors at `stable_rate`, canary
    /// errors at `ratio` × that.
    fn tick(
        rng: &mut StdRng,
        requests: u64,
        canary_share: f64,
        stable_rate: f64,
        ratio: f64,
    ) -> (Counts, Counts) {
        let canary_requests = (requests as f64 * canary_share).round() as u64;
        let stable_requests = requests - canary_requests;
        let stable_errors = poisson(rng, stable_requests as f64 * stable_rate);
        let canary_errors = poisson(rng, canary_requests as f64 * (stable_rate * ratio).min(1.0));
        (
            Counts::new(stable_requests, stable_errors),
            Counts::new(canary_requests, canary_errors),
        )
    }

    fn ratio_test(config: SequentialConfig) -> RatioTest {
        RatioTest::new(config).expect("valid config")
    }

    fn default_ratio_test() -> RatioTest {
        ratio_test(SequentialConfig::default())
    }

    #[test]
    fn every_score_is_one_before_any_data() {
        let test = default_ratio_test();
        assert_eq!(test.fail_score(), 1.0);
        assert_eq!(test.pass_score(), 1.0);
        assert_eq!(test.decision(), SequentialDecision::Continue);
        let ceiling = CeilingTest::new(CeilingConfig::default()).expect("valid");
        assert_eq!(ceiling.score(), 1.0);
        assert!(!ceiling.fired());
        let latency = LatencyTest::new(SequentialConfig::default(), vec![0.1, 0.5]).expect("valid");
        assert_eq!(latency.fail_score(), 1.0);
        assert_eq!(latency.pass_score(), 1.0);
    }

    #[test]
    fn a_stage_just_started_scores_one_on_both_sides() {
        let mut test = default_ratio_test();
        test.start_stage(0.01);
        assert_eq!(test.fail_score(), 1.0);
        assert!((test.pass_score() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ticks_without_requests_on_a_side_or_without_errors_add_no_evidence() {
        let mut test = default_ratio_test();
        test.start_stage(0.01);
        for _ in 0..1000 {
            // No stable traffic (ρ = 1), no canary traffic (ρ = 0), no errors at all.
            test.observe(Counts::new(0, 0), Counts::new(100, 50));
            test.observe(Counts::new(100, 50), Counts::new(0, 0));
            test.observe(Counts::new(0, 0), Counts::new(0, 0));
            test.observe(Counts::new(9900, 0), Counts::new(0, 0));
        }
        assert_eq!(test.fail_score(), 1.0);
        assert_eq!(test.log_ratio_pass_score(), 0.0);
        assert_eq!(test.ticks(), 4000);
    }

    #[test]
    fn errors_are_clamped_to_requests() {
        assert_eq!(Counts::new(10, 50), Counts::new(10, 10));
        let mut clamped = default_ratio_test();
        let mut honest = default_ratio_test();
        clamped.observe(
            Counts::new(1000, 10),
            Counts {
                requests: 10,
                errors: 500,
            },
        );
        honest.observe(Counts::new(1000, 10), Counts::new(10, 10));
        assert_eq!(clamped.fail_score(), honest.fail_score());
    }

    #[test]
    fn the_fail_score_grows_under_a_clearly_worse_canary() {
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut test = default_ratio_test();
            let mut failed_at = None;
            let mut after_three = 0.0;
            for t in 1..=60 {
                let (stable, canary) = tick(&mut rng, 10_000, 0.01, 0.01, 5.0);
                test.observe(stable, canary);
                if t == 3 {
                    after_three = test.fail_score();
                }
                if failed_at.is_none() && test.decision() == SequentialDecision::Fail {
                    failed_at = Some(t);
                }
            }
            let failed_at = failed_at.expect("a 5x canary fails within 60 ticks");
            // The cap (1 nat a tick) needs at least ln(1 / α) ≈ 4.6 ticks of evidence.
            assert!(failed_at >= 5, "seed {seed}: failed at tick {failed_at}");
            assert!(
                failed_at <= 30,
                "seed {seed}: failed only at tick {failed_at}"
            );
            assert!(test.fail_score() > after_three);
        }
    }

    #[test]
    fn the_fail_score_rarely_crosses_under_a_canary_at_the_tolerated_ratio() {
        // Ville: with the canary exactly at the tolerated ratio (the hardest null), a score that
        // is checked every tick for 300 ticks crosses 1/α in at most α of the runs.
        let config = SequentialConfig {
            alpha_fail: 0.05,
            ..SequentialConfig::default()
        };
        let runs = 2000;
        let shares = [0.01, 0.05, 0.25, 0.5];
        let mut crossed = 0;
        for seed in 0..runs {
            let mut rng = StdRng::seed_from_u64(1000 + seed);
            let mut test = ratio_test(config);
            for t in 0..300 {
                let share = shares[t / 75];
                let (stable, canary) = tick(&mut rng, 2000, share, 0.005, 1.1);
                test.observe(stable, canary);
                if test.decision() == SequentialDecision::Fail {
                    crossed += 1;
                    break;
                }
            }
        }
        let rate = crossed as f64 / runs as f64;
        assert!(rate <= 0.05 * 1.5 + 0.01, "crossing rate {rate}");
    }

    #[test]
    fn the_fail_score_stays_bounded_for_equal_canaries_at_the_default_alpha() {
        let runs = 2000;
        let mut crossed = 0;
        let mut highest: f64 = 0.0;
        for seed in 0..runs {
            let mut rng = StdRng::seed_from_u64(50_000 + seed);
            let mut test = default_ratio_test();
            for _ in 0..300 {
                let (stable, canary) = tick(&mut rng, 5000, 0.05, 0.002, 1.0);
                test.observe(stable, canary);
                highest = highest.max(test.fail_score());
            }
            if test.fail_score() >= test.config().fail_threshold() {
                crossed += 1;
            }
        }
        let rate = crossed as f64 / runs as f64;
        assert!(rate <= 0.01 * 1.5 + 0.005, "crossing rate {rate}");
        assert!(highest.is_finite());
    }

    #[test]
    fn the_cap_limits_what_one_tick_can_add() {
        let config = SequentialConfig::default();
        let mut capped = ratio_test(config);
        // One host's hiccup: every canary request failed, no stable error.
        capped.observe(Counts::new(9900, 0), Counts::new(100, 100));
        assert!(capped.fail_score() > 1.0);
        assert!(capped.log_fail_score() <= config.evidence_cap + 1e-12);
        let mut uncapped = ratio_test(SequentialConfig {
            evidence_cap: 500.0,
            ..config
        });
        uncapped.observe(Counts::new(9900, 0), Counts::new(100, 100));
        assert!(uncapped.fail_score() > 1000.0 * capped.fail_score());
    }

    #[test]
    fn the_pass_score_stays_one_without_traffic_however_long() {
        let mut test = default_ratio_test();
        test.start_stage(0.01);
        for _ in 0..10_000 {
            test.observe(Counts::default(), Counts::default());
        }
        assert_eq!(test.pass_score(), 1.0);
        assert_eq!(test.decision(), SequentialDecision::Continue);
    }

    #[test]
    fn without_errors_only_enough_error_free_canary_requests_can_pass() {
        // Stable never erred: p̂ = 0, so the acceptable canary rate is Δ_abs = 0.1% and the
        // pass score is the one-sample part alone. The best alternative (0.01%) gains
        // g = ln((1 − 0.0001) / (1 − 0.001)) ≈ 0.0009 nats a request, so reaching 20 takes at
        // least ln(20) / g requests (all four alternatives at the best's level) and at most
        // ln(4 · 20) / g (the best one alone).
        let config = SequentialConfig::default();
        let per_tick = 100.0 * ((-0.0001f64).ln_1p() - (-0.001f64).ln_1p());
        let needed = config.pass_threshold();
        let earliest = (needed.ln() / per_tick).floor() as u64;
        let latest = ((4.0 * needed).ln() / per_tick).ceil() as u64;
        let mut test = ratio_test(config);
        test.start_stage(0.0);
        let mut passed_at = None;
        for t in 1..=200 {
            test.observe(Counts::new(9900, 0), Counts::new(100, 0));
            assert_eq!(
                test.log_ratio_pass_score(),
                0.0,
                "no errors, no ratio evidence"
            );
            let passed = test.decision() == SequentialDecision::Pass;
            if passed && passed_at.is_none() {
                passed_at = Some(t);
            }
            assert!(
                passed || passed_at.is_none(),
                "passing is kept once reached"
            );
        }
        let passed_at = passed_at.expect("passes with 20,000 error-free requests");
        assert!(
            (earliest..=latest).contains(&passed_at),
            "passed at {passed_at}, expected {earliest}..={latest}"
        );
        assert!(earliest >= 30, "not with fewer than 3,000 requests");
    }

    #[test]
    fn a_stable_without_errors_at_stage_start_gives_no_ratio_pass_evidence() {
        let mut test = default_ratio_test();
        test.start_stage(0.0);
        for _ in 0..1000 {
            // Stable errs a little after all (0.005%); the canary at 0.5% (> Δ_abs) is worse: the
            // old ratio part (r_m capped at 1000) gained ~0.4 nats every two ticks and passed it.
            test.observe(Counts::new(9900, 1), Counts::new(100, 0));
            test.observe(Counts::new(9900, 0), Counts::new(100, 1));
        }
        assert_eq!(test.log_ratio_pass_score(), 0.0);
        assert_ne!(
            test.decision(),
            SequentialDecision::Pass,
            "{}",
            test.report()
        );
    }

    #[test]
    fn an_equal_canary_passes_a_busy_stage() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut test = default_ratio_test();
            test.start_stage(0.01);
            let passed = (1..=100).find(|_| {
                let (stable, canary) = tick(&mut rng, 10_000, 0.5, 0.01, 1.0);
                test.observe(stable, canary);
                test.decision() == SequentialDecision::Pass
            });
            assert!(
                passed.is_some(),
                "seed {seed}: pass score {}",
                test.pass_score()
            );
        }
    }

    #[test]
    fn a_worse_canary_never_passes() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut test = ratio_test(SequentialConfig {
                alpha_fail: 1e-300,
                ..SequentialConfig::default()
            });
            test.start_stage(0.01);
            for _ in 0..500 {
                let (stable, canary) = tick(&mut rng, 10_000, 0.25, 0.01, 1.5);
                test.observe(stable, canary);
                assert_ne!(test.decision(), SequentialDecision::Pass, "seed {seed}");
            }
        }
    }

    #[test]
    fn a_stage_restarts_the_pass_score_and_keeps_the_fail_score() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut test = default_ratio_test();
        test.start_stage(0.01);
        for _ in 0..50 {
            let (stable, canary) = tick(&mut rng, 10_000, 0.5, 0.01, 1.0);
            test.observe(stable, canary);
        }
        let fail = test.fail_score();
        assert!(test.pass_score() > 1.0);
        test.start_stage(0.01);
        assert!((test.pass_score() - 1.0).abs() < 1e-12);
        assert_eq!(test.fail_score(), fail);
        assert_eq!(test.stage_ticks(), 0);
        assert_eq!(test.ticks(), 50);
    }

    #[test]
    fn the_margin_widens_for_a_stable_with_a_tiny_error_rate() {
        let mut test = default_ratio_test();
        test.start_stage(0.01);
        let busy = test.stage_margin().expect("stage started");
        assert!((busy.ratio - 1.2).abs() < 1e-12);
        assert!((busy.bound - 0.012).abs() < 1e-12);
        test.start_stage(0.0001);
        let quiet = test.stage_margin().expect("stage started");
        assert!((quiet.ratio - 11.0).abs() < 1e-9);
        assert!((quiet.bound - 0.0011).abs() < 1e-12);
        test.start_stage(0.0);
        assert_eq!(test.stage_margin().map(|m| m.ratio), Some(MAX_MARGIN_RATIO));
        test.start_stage(f64::NAN);
        assert_eq!(test.stage_margin().map(|m| m.stable_rate), Some(0.0));
    }

    #[test]
    fn hard_down_canary_trips_the_ceiling_on_its_second_tick() {
        for (stable, canary) in [
            // 10k rps at a 1% stage: 100 canary requests a tick, 50 errors.
            (Counts::new(9900, 99), Counts::new(100, 50)),
            // 1k rps at a 1% stage: 10 requests, 5 errors.
            (Counts::new(990, 10), Counts::new(10, 5)),
        ] {
            let mut ceiling = CeilingTest::new(CeilingConfig::default()).expect("valid");
            ceiling.observe(stable, canary);
            assert!(!ceiling.fired(), "one tick alone: {}", ceiling.report());
            ceiling.observe(stable, canary);
            assert!(ceiling.fired(), "{}", ceiling.report());
        }
    }

    #[test]
    fn a_larger_cap_trips_the_ceiling_on_a_hard_down_canarys_first_tick() {
        let mut ceiling = CeilingTest::new(CeilingConfig {
            evidence_cap: 20.0,
            ..CeilingConfig::default()
        })
        .expect("valid");
        ceiling.observe(Counts::new(9900, 99), Counts::new(100, 50));
        assert!(ceiling.fired(), "{}", ceiling.report());
    }

    #[test]
    fn one_hosts_hiccup_between_healthy_ticks_never_trips_the_ceiling() {
        let mut ceiling = CeilingTest::new(CeilingConfig::default()).expect("valid");
        for _ in 0..1000 {
            // The canary's only host at 31% for a tick, then four healthy ticks.
            ceiling.observe(Counts::new(9500, 285), Counts::new(500, 155));
            assert!(!ceiling.fired(), "{}", ceiling.report());
            for _ in 0..4 {
                ceiling.observe(Counts::new(9500, 95), Counts::new(500, 5));
            }
        }
    }

    #[test]
    fn the_ceiling_ignores_a_healthy_canary_and_a_shared_outage() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut ceiling = CeilingTest::new(CeilingConfig::default()).expect("valid");
        for _ in 0..10_000 {
            let (stable, canary) = tick(&mut rng, 10_000, 0.01, 0.01, 1.0);
            ceiling.observe(stable, canary);
            assert!(!ceiling.fired());
        }
        // Both variants at 50%: not the canary's fault, the tick counts neither way.
        let before = ceiling.score();
        ceiling.observe(Counts::new(9900, 4950), Counts::new(100, 50));
        assert_eq!(ceiling.score(), before);
        assert_eq!(ceiling.ticks(), (10_001, 1));
        // With no stable traffic (a 100% stage) the canary alone counts, and 10,000 healthy
        // ticks before do not slow the detection of a crash: two ticks, as from the start.
        ceiling.observe(Counts::new(0, 0), Counts::new(100, 50));
        assert!(!ceiling.fired(), "{}", ceiling.report());
        ceiling.observe(Counts::new(0, 0), Counts::new(100, 50));
        assert!(ceiling.fired(), "{}", ceiling.report());
    }

    #[test]
    fn the_ceiling_rarely_fires_for_a_canary_exactly_at_the_ceiling() {
        let runs = 500;
        let mut fired = 0;
        for seed in 0..runs {
            let mut rng = StdRng::seed_from_u64(9000 + seed);
            let mut ceiling = CeilingTest::new(CeilingConfig {
                alpha: 0.05,
                horizon_ticks: 300,
                ..CeilingConfig::default()
            })
            .expect("valid");
            for _ in 0..300 {
                let errors = poisson(&mut rng, 5.0);
                ceiling.observe(Counts::default(), Counts::new(100, errors));
                if ceiling.fired() {
                    fired += 1;
                    break;
                }
            }
        }
        let rate = fired as f64 / runs as f64;
        assert!(rate <= 0.05 * 1.5 + 0.02, "fired in {rate} of runs");
    }

    fn histogram(requests: u64, under_fast: u64, under_slow: u64) -> Window {
        Window::from_counts(
            requests,
            0,
            &[
                (0.1, under_fast),
                (0.5, under_slow),
                (f64::INFINITY, requests),
            ],
            0.0,
        )
    }

    #[test]
    fn slow_requests_are_read_from_the_cumulative_buckets() {
        let window = histogram(100, 80, 95);
        assert_eq!(
            Counts::slower_than(&window, 0.1),
            Some(Counts::new(100, 20))
        );
        assert_eq!(Counts::slower_than(&window, 0.5), Some(Counts::new(100, 5)));
        assert_eq!(Counts::slower_than(&window, 0.3), None);
        assert_eq!(Counts::slower_than(&Window::missing(), 0.1), None);
        // Without a +Inf bucket the request count is the total.
        let open = Window::from_counts(100, 0, &[(0.1, 70)], 0.0);
        assert_eq!(Counts::slower_than(&open, 0.1), Some(Counts::new(100, 30)));
    }

    #[test]
    fn a_tail_only_latency_regression_fails_and_does_not_pass() {
        let config = SequentialConfig::default();
        let mut latency = LatencyTest::new(config, vec![0.1, 0.5]).expect("valid");
        latency.start_stage(&histogram(90_000, 81_000, 89_100));
        let mut rng = StdRng::seed_from_u64(11);
        let mut failed = false;
        for _ in 0..120 {
            // Stable: 10% slower than 0.1 s, 1% slower than 0.5 s; canary: same p90, p99 tail 3x.
            let stable_slow = poisson(&mut rng, 900.0);
            let stable_tail = poisson(&mut rng, 90.0).min(stable_slow);
            let canary_slow = poisson(&mut rng, 100.0);
            let canary_tail = poisson(&mut rng, 30.0).min(canary_slow);
            let stable = histogram(9000, 9000 - stable_slow, 9000 - stable_tail);
            let canary = histogram(1000, 1000 - canary_slow, 1000 - canary_tail);
            latency.observe(&stable, &canary);
            assert_ne!(latency.decision(), SequentialDecision::Pass);
            failed |= latency.decision() == SequentialDecision::Fail;
        }
        assert!(failed, "{}", latency.report());
        let tail = &latency.tests()[1];
        assert!(tail.fail_score() > latency.tests()[0].fail_score());
        assert!(latency.pass_score() <= latency.tests()[0].pass_score());
    }

    #[test]
    fn a_stage_started_from_rates_matches_one_started_from_a_window() {
        let config = SequentialConfig::default();
        let mut from_window = LatencyTest::new(config, vec![0.1, 0.5]).expect("valid");
        let mut from_rates = from_window.clone();
        from_window.start_stage(&histogram(1000, 900, 990));
        from_rates.start_stage_with_rates(&[0.1, 0.01]);
        let margins = |t: &LatencyTest| -> Vec<Option<StageMargin>> {
            t.tests().iter().map(RatioTest::stage_margin).collect()
        };
        assert_eq!(margins(&from_window), margins(&from_rates));
        assert!(margins(&from_rates).iter().all(Option::is_some));
    }

    #[test]
    fn a_bound_missing_from_the_layout_counts_neither_way() {
        let mut latency = LatencyTest::new(SequentialConfig::default(), vec![0.25]).expect("valid");
        for _ in 0..100 {
            latency.observe(&histogram(9000, 8000, 8900), &histogram(1000, 0, 0));
        }
        assert_eq!(latency.fail_score(), 1.0);
    }

    #[test]
    fn a_bad_config_is_refused_with_its_field_named() {
        let base = SequentialConfig::default();
        assert_eq!(base.validate(), Ok(()));
        let cases = [
            (
                "alpha_fail",
                SequentialConfig {
                    alpha_fail: 0.0,
                    ..base
                },
            ),
            (
                "alpha_fail",
                SequentialConfig {
                    alpha_fail: 1.0,
                    ..base
                },
            ),
            (
                "alpha_pass",
                SequentialConfig {
                    alpha_pass: f64::NAN,
                    ..base
                },
            ),
            (
                "tolerated_ratio",
                SequentialConfig {
                    tolerated_ratio: 0.9,
                    ..base
                },
            ),
            (
                "margin",
                SequentialConfig {
                    margin: -0.1,
                    ..base
                },
            ),
            (
                "absolute_margin",
                SequentialConfig {
                    absolute_margin: 1.0,
                    ..base
                },
            ),
            (
                "evidence_cap",
                SequentialConfig {
                    evidence_cap: 0.0,
                    ..base
                },
            ),
            (
                "evidence_cap",
                SequentialConfig {
                    evidence_cap: f64::INFINITY,
                    ..base
                },
            ),
        ];
        for (field, config) in cases {
            let error = config.validate().expect_err(field);
            assert!(error.starts_with(field), "{error}");
            assert!(RatioTest::new(config).is_err());
        }
        let ceiling = CeilingConfig::default();
        assert_eq!(ceiling.validate(), Ok(()));
        for (field, config) in [
            (
                "ceiling",
                CeilingConfig {
                    ceiling: 0.0,
                    ..ceiling
                },
            ),
            (
                "alpha",
                CeilingConfig {
                    alpha: 2.0,
                    ..ceiling
                },
            ),
            (
                "horizon_ticks",
                CeilingConfig {
                    horizon_ticks: 0,
                    ..ceiling
                },
            ),
            (
                "evidence_cap",
                CeilingConfig {
                    evidence_cap: -1.0,
                    ..ceiling
                },
            ),
        ] {
            let error = config.validate().expect_err(field);
            assert!(error.starts_with(field), "{error}");
        }
        assert!(LatencyTest::new(base, vec![]).is_err());
        let error = LatencyTest::new(base, vec![0.1, f64::NAN]).expect_err("NaN bound");
        assert!(error.starts_with("bounds"), "{error}");
    }

    #[test]
    fn the_report_reads_as_evidence() {
        let mut test = default_ratio_test();
        for _ in 0..20 {
            test.observe(Counts::new(9900, 99), Counts::new(100, 50));
        }
        let report = test.report();
        assert_eq!(report.decision, SequentialDecision::Fail);
        assert_eq!(report.fail_threshold, 100.0);
        let text = report.to_string();
        assert!(text.starts_with("fail: fail score "), "{text}");
        assert!(text.ends_with(" ≥ 100"), "{text}");
        let fresh = default_ratio_test().report().to_string();
        assert_eq!(fresh, "continue: fail score 1 < 100, pass score 1 < 20");
    }

    #[test]
    fn state_survives_a_serde_round_trip_and_continues_identically() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut ratio = default_ratio_test();
        ratio.start_stage(0.01);
        let mut ceiling = CeilingTest::new(CeilingConfig::default()).expect("valid");
        let mut latency = LatencyTest::new(SequentialConfig::default(), vec![0.1]).expect("ok");
        latency.start_stage(&histogram(1000, 900, 990));
        let mut ticks = Vec::new();
        for _ in 0..40 {
            ticks.push(tick(&mut rng, 10_000, 0.05, 0.01, 1.3));
        }
        for &(stable, canary) in &ticks[..20] {
            ratio.observe(stable, canary);
            ceiling.observe(stable, canary);
            latency.observe_counts(&[(stable, canary)]);
        }
        let mut ratio_copy: RatioTest =
            serde_json::from_str(&serde_json::to_string(&ratio).expect("ser")).expect("de");
        let mut ceiling_copy: CeilingTest =
            serde_json::from_str(&serde_json::to_string(&ceiling).expect("ser")).expect("de");
        let mut latency_copy: LatencyTest =
            serde_json::from_str(&serde_json::to_string(&latency).expect("ser")).expect("de");
        // serde_json's default float parser may be one ulp off: compare scores, not bits.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
        assert!(close(ratio_copy.log_fail_score(), ratio.log_fail_score()));
        for &(stable, canary) in &ticks[20..] {
            ratio.observe(stable, canary);
            ratio_copy.observe(stable, canary);
            ceiling.observe(stable, canary);
            ceiling_copy.observe(stable, canary);
            latency.observe_counts(&[(stable, canary)]);
            latency_copy.observe_counts(&[(stable, canary)]);
        }
        assert_eq!(ratio_copy.decision(), ratio.decision());
        assert_eq!(ratio_copy.stage_margin(), ratio.stage_margin());
        assert!(close(ratio_copy.log_fail_score(), ratio.log_fail_score()));
        assert!(close(ratio_copy.log_pass_score(), ratio.log_pass_score()));
        assert!(ratio.fail_score() != 1.0 && ratio.pass_score() != 1.0);
        assert!(close(ceiling_copy.log_score(), ceiling.log_score()));
        assert_eq!(ceiling_copy.ticks(), ceiling.ticks());
        assert!(close(
            latency_copy.fail_score().ln(),
            latency.fail_score().ln()
        ));
    }

    #[test]
    fn overwhelming_evidence_stays_finite_in_log_space() {
        let mut test = ratio_test(SequentialConfig {
            evidence_cap: 50.0,
            ..SequentialConfig::default()
        });
        test.start_stage(0.5);
        for _ in 0..100_000 {
            test.observe(
                Counts::new(1_000_000_000_000, 1),
                Counts::new(1_000_000_000_000, 900_000_000_000),
            );
        }
        assert!(test.log_fail_score().is_finite());
        assert!(test.log_fail_score() > 1e6);
        assert_eq!(test.fail_score(), f64::INFINITY);
        assert!(test.log_pass_score().is_finite());
        assert_eq!(test.decision(), SequentialDecision::Fail);
        assert!(test.report().to_string().contains("∞ ≥ 100"));
        let json = serde_json::to_string(&test).expect("finite state serializes");
        assert!(!json.contains("null"), "{json}");
    }
}
