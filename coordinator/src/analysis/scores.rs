//! The scored checks of one rollout ([`Rule::Sequential`], [`Rule::Ceiling`]), fed the leader's
//! per-second totals as each second completes. Pure: the caller passes the seconds and the
//! time.
//!
//! A second is fed once, when it has ended (reports are folded into the second they arrive
//! in, so an ended second no longer changes). Its fail score carries across stages; at a new
//! stage the pass scores restart against the stable's error rate before the stage
//! ([`RolloutScores::advance`]'s `baseline`). A second that holds reports from before the
//! rollout started is not fed (see [`Second::all_since`]).
//!
//! The scores live in the leader's memory: a new leader starts them again from its own
//! reports, so a failover delays a decision (by as long as the evidence took to build), and
//! never makes one.

use crate::analysis::sequential::{
    CeilingTest, Counts, LatencyTest, RatioTest, ScoreReport, SequentialDecision,
};
use crate::analysis::{CheckResult, Verdict, Window};
use crate::metrics::{SECOND, Second};
use crate::rollout::Millis;
use crate::strategy::{Check, Rule};

/// Which stage the scores are for: its index and when its observation started.
pub type StageMark = (usize, Millis);

/// One scored check's test.
#[derive(Debug, Clone)]
enum ScoreTest {
    Ratio(RatioTest),
    Latency(LatencyTest),
    Ceiling(CeilingTest),
}

#[cfg(test)]
impl ScoreTest {
    /// Seconds fed.
    fn ticks(&self) -> u64 {
        match self {
            ScoreTest::Ratio(t) => t.ticks(),
            ScoreTest::Latency(t) => t.tests().first().map_or(0, RatioTest::ticks),
            ScoreTest::Ceiling(t) => t.ticks().0,
        }
    }
}

/// The scored tests of one rollout.
#[derive(Debug, Clone)]
pub struct RolloutScores {
    /// The stage the pass scores belong to; `None` before the first second.
    stage: Option<StageMark>,
    /// Seconds starting before this were fed.
    fed_until: Millis,
    /// One per scored check, in strategy order: (check, test).
    tests: Vec<(Check, ScoreTest)>,
}

impl RolloutScores {
    /// Tests for the scored checks among `checks`, for a rollout started at `started_at`
    /// (checks whose settings do not validate are left out; the strategy was validated).
    pub fn new(checks: &[Check], started_at: Millis) -> RolloutScores {
        let tests = checks
            .iter()
            .filter_map(|c| {
                let test = match &c.rule {
                    Rule::Sequential {
                        config,
                        slower_than,
                    } if !slower_than.is_empty() => LatencyTest::new(*config, slower_than.clone())
                        .ok()
                        .map(ScoreTest::Latency),
                    Rule::Sequential { config, .. } => {
                        RatioTest::new(*config).ok().map(ScoreTest::Ratio)
                    }
                    Rule::Ceiling { config } => {
                        CeilingTest::new(*config).ok().map(ScoreTest::Ceiling)
                    }
                    _ => None,
                };
                test.map(|t| (c.clone(), t))
            })
            .collect();
        RolloutScores {
            stage: None,
            fed_until: started_at,
            tests,
        }
    }

    /// Whether the rollout has any sequential check.
    pub fn is_empty(&self) -> bool {
        self.tests.is_empty()
    }

    /// Feeds every second that has ended by `now` and was not fed yet, in order. Seconds from
    /// `stage.1` on belong to `stage`: when it differs from the previous one the pass scores
    /// restart, against `baseline` (the stable's window before the stage: its error rate, and
    /// its share of requests slower than each latency bound).
    pub fn advance<'a>(
        &mut self,
        stage: StageMark,
        baseline: &Window,
        seconds: impl IntoIterator<Item = &'a Second>,
        now: Millis,
    ) {
        if self.stage.is_none() {
            self.start_stage(stage, baseline);
        }
        for second in seconds {
            if second.start < self.fed_until.div_euclid(SECOND) * SECOND {
                continue;
            }
            if second.start + SECOND > now {
                break;
            }
            if !second.all_since(self.fed_until) {
                // Mixed with reports from before the rollout (or a skipped second).
                self.fed_until = second.start + SECOND;
                continue;
            }
            if self.stage != Some(stage) && second.all_since(stage.1) {
                self.start_stage(stage, baseline);
            }
            let stable = Counts::from_window(&second.data.stable);
            let canary = Counts::from_window(&second.data.canary);
            for (_, test) in &mut self.tests {
                match test {
                    ScoreTest::Ratio(t) => t.observe(stable, canary),
                    ScoreTest::Latency(t) => t.observe(&second.data.stable, &second.data.canary),
                    ScoreTest::Ceiling(t) => t.observe(stable, canary),
                }
            }
            self.fed_until = second.start + SECOND;
        }
        if self.stage != Some(stage) && self.fed_until >= stage.1 {
            self.start_stage(stage, baseline);
        }
    }

    fn start_stage(&mut self, stage: StageMark, baseline: &Window) {
        self.stage = Some(stage);
        let error_rate = baseline.error_rate().unwrap_or(0.0).clamp(0.0, 1.0);
        for (_, test) in &mut self.tests {
            match test {
                ScoreTest::Ratio(t) => t.start_stage(error_rate),
                ScoreTest::Latency(t) => t.start_stage(baseline),
                ScoreTest::Ceiling(_) => {}
            }
        }
    }

    /// The verdict of every scored check at a stage sending `canary_weight`% to the canary.
    /// A sequential check: fail once its fail score crossed, pass once its pass score did,
    /// inconclusive in between; skipped at 100%, where stable serves nothing (unless it had
    /// failed). A ceiling check: fail when its detector fires, pass once the canary served
    /// requests, no data before.
    pub fn results(&self, canary_weight: u32) -> Vec<CheckResult> {
        self.tests
            .iter()
            .map(|(check, test)| {
                let (verdict, detail) = match test {
                    ScoreTest::Ratio(test) => {
                        ratio_verdict(test.report(), test.stage_ticks(), canary_weight)
                    }
                    ScoreTest::Latency(test) => {
                        let ticks = test.tests().first().map_or(0, RatioTest::stage_ticks);
                        ratio_verdict(test.report(), ticks, canary_weight)
                    }
                    ScoreTest::Ceiling(test) => ceiling_verdict(test),
                };
                CheckResult {
                    name: check.name.clone(),
                    metric: check.metric,
                    verdict,
                    detail,
                }
            })
            .collect()
    }
}

fn ratio_verdict(
    report: ScoreReport,
    stage_ticks: u64,
    canary_weight: u32,
) -> (Verdict, Option<String>) {
    if canary_weight >= 100 && report.decision != SequentialDecision::Fail {
        let reason = "no stable traffic to compare with at 100%".to_owned();
        return (Verdict::Skipped { reason }, None);
    }
    let verdict = match report.decision {
        SequentialDecision::Fail => Verdict::Fail {
            value: report.fail_score,
            threshold: report.fail_threshold,
        },
        SequentialDecision::Pass => Verdict::Pass {
            value: report.pass_score,
            threshold: report.pass_threshold,
        },
        SequentialDecision::Continue => Verdict::Inconclusive {
            reason: report.to_string(),
        },
    };
    let detail = format!("{report}; {stage_ticks} s scored in this stage");
    (verdict, Some(detail))
}

fn ceiling_verdict(test: &CeilingTest) -> (Verdict, Option<String>) {
    let report = test.report();
    let (ticks, skipped) = test.ticks();
    let detail = format!("{report}; {ticks} s scored, {skipped} skipped as stable breached too");
    let verdict = if report.fired {
        Verdict::Fail {
            value: report.score,
            threshold: report.threshold,
        }
    } else if ticks > skipped && test.canary_seen() {
        Verdict::Pass {
            value: report.score,
            threshold: report.threshold,
        }
    } else {
        return (
            Verdict::NoData {
                reason: "no canary requests scored yet".to_owned(),
            },
            None,
        );
    };
    (verdict, Some(detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Pair, Window};
    use crate::strategy::Strategy;

    fn checks() -> Vec<Check> {
        Strategy::from_toml(
            "[[stages]]\nweight = 10\n[[stages]]\nweight = 50\n\
             [[checks]]\nname = \"errors\"\nmetric = \"error_rate\"\ntest = \"sequential\"\n\
             [[checks]]\nname = \"ceiling\"\nmetric = \"error_rate\"\nmax = 0.5\n",
        )
        .unwrap()
        .checks
    }

    fn second(start: Millis, stable: (u64, u64), canary: (u64, u64)) -> Second {
        let w = |(n, x): (u64, u64)| Window::from_counts(n, x, &[], 0.0);
        Second {
            start,
            received: (start, start + 999),
            data: Pair {
                stable: w(stable),
                canary: w(canary),
            },
        }
    }

    /// A stable window with error rate `p` (over a million requests).
    fn rate(p: f64) -> Window {
        Window::from_counts(1_000_000, (p * 1_000_000.0) as u64, &[], 0.0)
    }

    fn verdict(scores: &RolloutScores, weight: u32) -> &'static str {
        let results = scores.results(weight);
        assert_eq!(results.len(), 1, "only the sequential check is scored here");
        results[0].verdict.label()
    }

    #[test]
    fn a_canary_ten_times_worse_fails_within_seconds_and_says_why() {
        let mut scores = RolloutScores::new(&checks(), 0);
        assert!(!scores.is_empty());
        let seconds: Vec<_> = (0..30)
            .map(|t| second(t * SECOND, (9_000, 9), (1_000, 10)))
            .collect();
        let mut failed_at = None;
        for now in 1..=30 {
            scores.advance((0, 0), &rate(0.001), &seconds, now * SECOND);
            if verdict(&scores, 10) == "fail" {
                failed_at = Some(now);
                break;
            }
        }
        let failed_at = failed_at.expect("a 10x worse canary fails");
        assert!(failed_at <= 10, "failed after {failed_at} s");
        let text = scores.results(10)[0].describe();
        assert!(text.starts_with("errors: fail (fail: fail score"), "{text}");
    }

    #[test]
    fn an_equal_canary_passes_the_stage_and_the_pass_score_restarts_at_the_next() {
        let mut scores = RolloutScores::new(&checks(), 0);
        // 1% errors on both sides, 20% canary share, for ten minutes.
        let seconds: Vec<_> = (0..600)
            .map(|t| second(t * SECOND, (8_000, 80), (2_000, 20)))
            .collect();
        scores.advance((0, 0), &rate(0.01), &seconds, 600 * SECOND);
        assert_eq!(verdict(&scores, 20), "pass");
        // A new stage: nothing fed for it yet, so its pass score starts again.
        scores.advance((1, 600 * SECOND), &rate(0.01), &seconds, 600 * SECOND);
        assert_eq!(verdict(&scores, 50), "inconclusive");
        let text = scores.results(50)[0].describe();
        assert!(text.contains("0 s scored in this stage"), "{text}");
    }

    #[test]
    fn seconds_are_fed_once_and_only_when_they_have_ended() {
        let mut scores = RolloutScores::new(&checks(), 0);
        let seconds: Vec<_> = (0..5)
            .map(|t| second(t * SECOND, (900, 1), (100, 0)))
            .collect();
        scores.advance((0, 0), &rate(0.0), &seconds, 2_500);
        assert_eq!(scores.tests[0].1.ticks(), 2, "seconds 0 and 1 have ended");
        scores.advance((0, 0), &rate(0.0), &seconds, 2_600);
        assert_eq!(scores.tests[0].1.ticks(), 2, "nothing new ended");
        scores.advance((0, 0), &rate(0.0), &seconds, 10_000);
        assert_eq!(scores.tests[0].1.ticks(), 5);
    }

    #[test]
    fn a_second_holding_reports_from_before_the_rollout_is_not_fed() {
        let mut scores = RolloutScores::new(&checks(), 1_500);
        let mut mixed = second(1_000, (100, 50), (100, 100));
        mixed.received = (1_200, 1_900);
        let after = second(2_000, (900, 1), (100, 0));
        scores.advance((0, 1_500), &rate(0.0), [&mixed, &after], 5_000);
        assert_eq!(scores.tests[0].1.ticks(), 1);
    }

    #[test]
    fn no_traffic_never_passes_and_a_full_canary_is_skipped_unless_it_failed() {
        let mut scores = RolloutScores::new(&checks(), 0);
        let empty: Vec<_> = (0..600)
            .map(|t| second(t * SECOND, (0, 0), (0, 0)))
            .collect();
        scores.advance((0, 0), &rate(0.0), &empty, 600 * SECOND);
        assert_eq!(verdict(&scores, 10), "inconclusive");
        assert_eq!(verdict(&scores, 100), "skipped");
        let bad: Vec<_> = (600..660)
            .map(|t| second(t * SECOND, (9_000, 9), (1_000, 500)))
            .collect();
        scores.advance((0, 0), &rate(0.0), &bad, 660 * SECOND);
        assert_eq!(
            verdict(&scores, 100),
            "fail",
            "a crossed fail score stays crossed"
        );
    }

    fn ceiling_checks() -> Vec<Check> {
        Strategy::from_toml(
            "[[stages]]\nweight = 10\n\
             [[checks]]\nname = \"ceiling\"\nmetric = \"error_rate\"\ntest = \"ceiling\"\nmax = 0.05\n",
        )
        .unwrap()
        .checks
    }

    #[test]
    fn a_ceiling_check_fires_on_a_hard_down_canary_within_two_seconds_and_passes_a_healthy_one() {
        let mut healthy = RolloutScores::new(&ceiling_checks(), 0);
        assert_eq!(verdict(&healthy, 10), "no_data");
        let good: Vec<_> = (0..600)
            .map(|t| second(t * SECOND, (9_000, 90), (1_000, 10)))
            .collect();
        healthy.advance((0, 0), &rate(0.01), &good, 600 * SECOND);
        assert_eq!(verdict(&healthy, 10), "pass");
        // The same canary after ten healthy minutes goes hard-down: the detector restarts, so
        // the history does not slow it.
        let down: Vec<_> = (600..610)
            .map(|t| second(t * SECOND, (9_000, 90), (1_000, 500)))
            .collect();
        let mut fired_after = None;
        for s in 1..=10 {
            healthy.advance((0, 0), &rate(0.01), &down, (600 + s) * SECOND);
            if verdict(&healthy, 10) == "fail" {
                fired_after = Some(s);
                break;
            }
        }
        assert!(
            fired_after.is_some_and(|s| s <= 2),
            "fired after {fired_after:?} s"
        );
        let text = healthy.results(10)[0].describe();
        assert!(
            text.starts_with("ceiling: fail (ceiling 5%: score"),
            "{text}"
        );
        // At 100% the ceiling still watches the canary alone.
        assert_eq!(verdict(&healthy, 100), "fail");
    }

    #[test]
    fn a_ceiling_check_does_not_blame_the_canary_when_stable_breaches_too() {
        let mut scores = RolloutScores::new(&ceiling_checks(), 0);
        let outage: Vec<_> = (0..30)
            .map(|t| second(t * SECOND, (9_000, 4_500), (1_000, 500)))
            .collect();
        scores.advance((0, 0), &rate(0.0), &outage, 30 * SECOND);
        assert_eq!(verdict(&scores, 10), "no_data");
    }

    /// A second whose histograms put `slow` of every 1,000 requests over 100 ms.
    fn latency_second(start: Millis, stable_slow: u64, canary_slow: u64) -> Second {
        let w = |n: u64, slow: u64| {
            Window::from_counts(
                n,
                0,
                &[(0.1, n - n * slow / 1_000), (f64::INFINITY, n)],
                0.0,
            )
        };
        Second {
            start,
            received: (start, start + 999),
            data: Pair {
                stable: w(9_000, stable_slow),
                canary: w(1_000, canary_slow),
            },
        }
    }

    #[test]
    fn a_latency_sequential_check_compares_slow_requests_at_its_bounds() {
        let checks = Strategy::from_toml(
            "[[stages]]\nweight = 10\n[[checks]]\nname = \"p99\"\nmetric = \"latency_p99\"\n\
             test = \"sequential\"\nslower_than = [0.1]\n",
        )
        .unwrap()
        .checks;
        // The canary is five times as often slower than 100 ms as stable (5% vs 1%).
        let slow: Vec<_> = (0..60)
            .map(|t| latency_second(t * SECOND, 10, 50))
            .collect();
        let mut scores = RolloutScores::new(&checks, 0);
        let baseline = latency_second(0, 10, 10).data.stable;
        let mut failed_at = None;
        for now in 1..=60 {
            scores.advance((0, 0), &baseline, &slow, now * SECOND);
            if verdict(&scores, 10) == "fail" {
                failed_at = Some(now);
                break;
            }
        }
        assert!(
            failed_at.is_some_and(|t| t <= 15),
            "failed after {failed_at:?} s"
        );
        // As slow as stable: no failure over ten minutes.
        let same: Vec<_> = (0..600)
            .map(|t| latency_second(t * SECOND, 10, 10))
            .collect();
        let mut scores = RolloutScores::new(&checks, 0);
        scores.advance((0, 0), &baseline, &same, 600 * SECOND);
        assert_ne!(verdict(&scores, 10), "fail");
    }
}
