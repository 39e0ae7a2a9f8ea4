//! The demo's verdict: pure functions over what the load generator received and what the
//! coordinator recorded, so every rule is tested without a network.
//!
//! Why these rules, and their tolerances:
//!
//! - **Counts.** The coordinator's per-variant totals of a rollout (the sum of its stage
//!   evidence) must equal the answers the load generator received from that variant between the
//!   rollout's start and its end, within *one agent interval at each edge*: an app agent's first
//!   report after the start covers its last interval, which began before the start (so the
//!   coordinator may hold up to one interval of traffic more), and traffic after its last report
//!   before the end is in no report yet (up to one interval less). The edge is measured from the
//!   load generator's own records: whatever that variant served in the interval before the
//!   start, or before the end. The app counts a request at some instant between the moment the
//!   load generator sent it and the moment it read the answer (a busy machine can put a few
//!   hundred milliseconds between the two), so a request counts as surely inside when it was
//!   sent after the start and answered before the end's edge, and as possibly inside when it
//!   was answered after the start's edge and sent before the end.
//!   Inside the rollout nothing is lost or counted twice: a stage's evidence holds every report
//!   received from its start up to its end, and the next stage starts at that same instant.
//! - **Split.** At a stage of weight `w`, the share of requests answered by the canary through
//!   the balancer must lie within `z` standard deviations of a binomial(n, w/100) (plus one
//!   request for discreteness). nginx's weighted round robin is tighter than that; the binomial
//!   is what a random split would still pass, so a wrong weight fails and a right one does not.
//! - **Host death.** After the balancer applied the upstream without the dead host, not one
//!   request may fail; before that nginx retries a refused connection on another server, so
//!   failures there are reported, not judged.

use serin_coordinator::metrics::Side;

/// Standard deviations of the split's binomial tolerance: a right split fails this less than
/// once in 100,000 stages.
pub const SPLIT_Z: f64 = 4.5;

/// Fewest requests a stage needs before its split is judged.
pub const SPLIT_MIN_REQUESTS: u64 = 100;

/// How one request ended, as the load generator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `200` from a demo app.
    Ok,
    /// A `5xx` from a demo app (it carries the app's version: the app failed on purpose).
    AppError,
    /// No answer, or an answer from no demo app (nginx's own `502`, a timeout, a refused
    /// connection).
    Failed,
}

/// One request the load generator sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// When it was sent, Unix milliseconds.
    pub sent_ms: i64,
    /// When the answer (or the failure) arrived, Unix milliseconds.
    pub at_ms: i64,
    /// Which variant's instances answered, from the version they answered with.
    pub side: Option<Side>,
    /// How it ended.
    pub outcome: Outcome,
}

/// Answers received in `[from, to)`.
fn within(answers: &[Answer], from: i64, to: i64) -> impl Iterator<Item = &Answer> {
    answers
        .iter()
        .filter(move |a| a.at_ms >= from && a.at_ms < to)
}

/// Answers from `side` received in `[from, to)`.
pub fn served(answers: &[Answer], side: Side, from: i64, to: i64) -> u64 {
    within(answers, from, to)
        .filter(|a| a.side == Some(side))
        .count() as u64
}

/// Requests sent and, of those, not answered by an app (`Failed`) or answered with an error
/// (`AppError`), in `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Every request.
    pub requests: u64,
    /// Answered by no demo app.
    pub failed: u64,
    /// Answered by a demo app with a 5xx.
    pub app_errors: u64,
}

impl Tally {
    /// Requests that did not get a `200`.
    pub fn not_ok(&self) -> u64 {
        self.failed + self.app_errors
    }
}

/// Counts the answers in `[from, to)`.
pub fn tally(answers: &[Answer], from: i64, to: i64) -> Tally {
    within(answers, from, to).fold(Tally::default(), |mut t, a| {
        t.requests += 1;
        match a.outcome {
            Outcome::Ok => {}
            Outcome::AppError => t.app_errors += 1,
            Outcome::Failed => t.failed += 1,
        }
        t
    })
}

/// The coordinator's count of one variant over a rollout against the load generator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountCheck {
    /// The variant.
    pub side: Side,
    /// What the coordinator recorded (the sum of the rollout's stage evidence).
    pub coordinator: u64,
    /// What the load generator received from the variant between the rollout's start and end.
    pub sent: u64,
    /// The smallest count that holds: the requests surely counted (sent after the start,
    /// answered before the edge before the end).
    pub low: u64,
    /// The largest count that holds: the requests possibly counted (answered after the edge
    /// before the start, sent before the end).
    pub high: u64,
}

impl CountCheck {
    /// Whether the coordinator's count lies within the one-interval edges.
    pub fn holds(&self) -> bool {
        (self.low..=self.high).contains(&self.coordinator)
    }

    /// Also holds when the coordinator missed what this side answered within `lost` (Unix
    /// ms, `[from, to)`): a leader that dies takes with it the reports it received since its
    /// last committed checkpoint and those in flight to it (see docs/cluster.md).
    pub fn allowing_loss(mut self, answers: &[Answer], (from, to): (i64, i64)) -> CountCheck {
        let lost = within(answers, from, to)
            .filter(|a| a.side == Some(self.side))
            .count() as u64;
        self.low = self.low.saturating_sub(lost);
        self
    }
}

/// Compares `coordinator` (the coordinator's total of `side` over a rollout that ran over
/// `[start_ms, end_ms)`) with the load generator's answers, allowing one agent interval
/// (`edge_ms`, with report latency) of that side's traffic at each edge (see the module docs).
pub fn count_check(
    answers: &[Answer],
    side: Side,
    coordinator: u64,
    (start_ms, end_ms): (i64, i64),
    edge_ms: i64,
) -> CountCheck {
    let of_side = || answers.iter().filter(move |a| a.side == Some(side));
    let count = |keep: &dyn Fn(&Answer) -> bool| of_side().filter(|a| keep(a)).count() as u64;
    CountCheck {
        side,
        coordinator,
        sent: served(answers, side, start_ms, end_ms),
        low: count(&|a| a.sent_ms >= start_ms && a.at_ms < end_ms - edge_ms),
        high: count(&|a| a.at_ms >= start_ms - edge_ms && a.sent_ms < end_ms),
    }
}

/// The canary's share of the answers at one stage against the stage's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitCheck {
    /// The stage's canary weight, in percent.
    pub weight: u32,
    /// Answers from the canary.
    pub canary: u64,
    /// Answers from either variant.
    pub total: u64,
    /// `total × weight / 100`.
    pub expected: f64,
    /// How far from `expected` the canary count may be.
    pub tolerance: f64,
}

impl SplitCheck {
    /// Whether there were enough answers to judge.
    pub fn judged(&self) -> bool {
        self.total >= SPLIT_MIN_REQUESTS
    }

    /// Whether the canary's count lies within the tolerance (false when not judged).
    pub fn holds(&self) -> bool {
        self.judged() && (self.canary as f64 - self.expected).abs() <= self.tolerance
    }

    /// The measured canary share in percent (0 without answers).
    pub fn share_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.canary as f64 * 100.0 / self.total as f64
        }
    }
}

/// The split of the answers in `[from, to)` against `weight` percent, within [`SPLIT_Z`]
/// standard deviations of the binomial plus one request.
pub fn split_check(answers: &[Answer], weight: u32, from: i64, to: i64) -> SplitCheck {
    let canary = served(answers, Side::Canary, from, to);
    let total = canary + served(answers, Side::Stable, from, to);
    let p = f64::from(weight.min(100)) / 100.0;
    let n = total as f64;
    SplitCheck {
        weight,
        canary,
        total,
        expected: n * p,
        tolerance: SPLIT_Z * (n * p * (1.0 - p)).sqrt() + 1.0,
    }
}

/// What the verification found: every failed rule, in words.
#[derive(Debug, Default)]
pub struct Verdict {
    failures: Vec<String>,
}

impl Verdict {
    /// Records a rule: when `holds` is false, `reason` says what went wrong.
    pub fn require(&mut self, holds: bool, reason: impl FnOnce() -> String) {
        if !holds {
            self.failures.push(reason());
        }
    }

    /// Whether every rule held.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The failed rules, in the order they were checked.
    pub fn failures(&self) -> &[String] {
        &self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(at_ms: i64, side: Side) -> Answer {
        Answer {
            sent_ms: at_ms,
            at_ms,
            side: Some(side),
            outcome: Outcome::Ok,
        }
    }

    /// `per_second` answers a second from `side`, evenly spaced over `[from, to)`.
    fn steady(from: i64, to: i64, per_second: i64, side: Side) -> Vec<Answer> {
        let step = 1000 / per_second;
        (0..)
            .map(|k| from + k * step)
            .take_while(|t| *t < to)
            .map(|t| answer(t, side))
            .collect()
    }

    #[test]
    fn served_counts_one_side_in_a_half_open_range() {
        let answers = [
            answer(99, Side::Stable),
            answer(100, Side::Stable),
            answer(150, Side::Canary),
            answer(199, Side::Stable),
            answer(200, Side::Stable),
        ];
        assert_eq!(served(&answers, Side::Stable, 100, 200), 2);
        assert_eq!(served(&answers, Side::Canary, 100, 200), 1);
        assert_eq!(served(&answers, Side::Canary, 151, 200), 0);
    }

    const ONE_SECOND: i64 = 1_000;

    #[test]
    fn a_count_equal_to_what_was_sent_holds() {
        let answers = steady(0, 10_000, 10, Side::Stable);
        let check = count_check(&answers, Side::Stable, 80, (1_000, 9_000), ONE_SECOND);
        assert_eq!((check.sent, check.low, check.high), (80, 70, 90));
        assert!(check.holds());
    }

    #[test]
    fn a_count_off_by_one_interval_at_either_edge_holds_and_one_more_does_not() {
        let answers = steady(0, 10_000, 10, Side::Stable);
        for (count, holds) in [(69, false), (70, true), (90, true), (91, false)] {
            let check = count_check(&answers, Side::Stable, count, (1_000, 9_000), ONE_SECOND);
            assert_eq!(check.holds(), holds, "count {count}: {check:?}");
        }
    }

    #[test]
    fn the_edges_are_the_variants_own_traffic_so_a_side_without_traffic_must_match_exactly() {
        // No canary traffic before the start: the coordinator may not count any extra there.
        let mut answers = steady(0, 10_000, 10, Side::Stable);
        answers.extend(steady(5_000, 10_000, 10, Side::Canary));
        let canary = count_check(&answers, Side::Canary, 41, (1_000, 9_000), ONE_SECOND);
        assert_eq!((canary.sent, canary.low, canary.high), (40, 30, 40));
        assert!(!canary.holds());
        // A rollout shorter than the edge: nothing is surely counted.
        let short = count_check(&answers, Side::Stable, 0, (1_000, 1_500), ONE_SECOND);
        assert_eq!((short.sent, short.low, short.high), (5, 0, 15));
        assert!(short.holds());
    }

    #[test]
    fn a_request_answered_after_an_edge_but_sent_before_it_may_be_counted_on_either_side() {
        // Each request takes 300 ms from sending to the answer: the app counted it somewhere
        // in between.
        let answers: Vec<Answer> = steady(0, 10_000, 10, Side::Stable)
            .into_iter()
            .map(|a| Answer {
                sent_ms: a.at_ms - 300,
                ..a
            })
            .collect();
        let check = count_check(&answers, Side::Stable, 80, (1_000, 9_000), ONE_SECOND);
        // Received in [1000, 9000): 80. Surely counted: sent >= 1000 and answered before 8000,
        // i.e. answered in [1300, 8000): 67. Possibly: answered >= 0 and sent before 9000, i.e.
        // answered in [0, 9300): 93.
        assert_eq!((check.sent, check.low, check.high), (80, 67, 93));
        for (count, holds) in [(66, false), (67, true), (93, true), (94, false)] {
            let check = count_check(&answers, Side::Stable, count, (1_000, 9_000), ONE_SECOND);
            assert_eq!(check.holds(), holds, "count {count}: {check:?}");
        }
    }

    #[test]
    fn the_exact_split_holds_at_every_weight_and_a_wrong_weight_fails() {
        for weight in [1, 5, 25, 50, 75, 99] {
            let total = 1000_i64;
            let canary = total * i64::from(weight) / 100;
            let mut answers: Vec<Answer> = (0..canary).map(|t| answer(t, Side::Canary)).collect();
            answers.extend((canary..total).map(|t| answer(t, Side::Stable)));
            let check = split_check(&answers, weight, 0, total);
            assert!(check.holds(), "weight {weight}: {check:?}");
            // The same traffic judged against a weight twice as large (or half) fails.
            let wrong = if weight > 50 { weight / 2 } else { weight * 2 };
            if weight >= 5 {
                assert!(
                    !split_check(&answers, wrong, 0, total).holds(),
                    "{weight}→{wrong}"
                );
            }
        }
    }

    #[test]
    fn the_split_tolerance_is_the_binomials_standard_deviation_times_z_plus_one() {
        // n = 400, p = 0.5: sd = 10, tolerance = 46.
        let mut answers: Vec<Answer> = (0..246).map(|t| answer(t, Side::Canary)).collect();
        answers.extend((246..400).map(|t| answer(t, Side::Stable)));
        let check = split_check(&answers, 50, 0, 400);
        assert!((check.tolerance - 46.0).abs() < 1e-9, "{check:?}");
        assert!(check.holds(), "{check:?}");
        answers[246] = answer(246, Side::Canary);
        assert!(!split_check(&answers, 50, 0, 400).holds());
    }

    #[test]
    fn a_stage_with_too_few_answers_is_not_judged_and_does_not_hold() {
        let answers = steady(0, 1_000, 50, Side::Stable);
        let check = split_check(&answers, 1, 0, 1_000);
        assert_eq!(check.total, 50);
        assert!(!check.judged());
        assert!(!check.holds());
        assert_eq!(split_check(&[], 10, 0, 1).share_percent(), 0.0);
    }

    #[test]
    fn tally_tells_failures_from_the_apps_deliberate_errors() {
        let failed = |at_ms| Answer {
            side: None,
            outcome: Outcome::Failed,
            ..answer(at_ms, Side::Stable)
        };
        let answers = [
            answer(1, Side::Stable),
            Answer {
                outcome: Outcome::AppError,
                ..answer(2, Side::Canary)
            },
            failed(3),
            failed(9),
        ];
        let t = tally(&answers, 0, 5);
        assert_eq!(
            t,
            Tally {
                requests: 3,
                failed: 1,
                app_errors: 1
            }
        );
        assert_eq!(t.not_ok(), 2);
    }

    #[test]
    fn a_verdict_holds_only_when_every_rule_held_and_names_each_failure() {
        let mut v = Verdict::default();
        v.require(true, || unreachable!("not called when the rule holds"));
        assert!(v.ok());
        v.require(false, || "web: promoted expected".into());
        v.require(false, || "api: 3 requests failed".into());
        assert!(!v.ok());
        assert_eq!(
            v.failures(),
            ["web: promoted expected", "api: 3 requests failed"]
        );
    }

    #[test]
    fn a_loss_window_lowers_the_floor_by_what_the_side_answered_in_it() {
        let answer = |at_ms, side| Answer {
            sent_ms: at_ms - 5,
            at_ms,
            side: Some(side),
            outcome: Outcome::Ok,
        };
        let answers = vec![
            answer(1_000, Side::Stable),
            answer(2_000, Side::Stable),
            answer(2_500, Side::Canary),
            answer(3_000, Side::Stable),
        ];
        let check = count_check(&answers, Side::Stable, 2, (0, 10_000), 100);
        assert!(!check.holds(), "{check:?}");
        let check = check.allowing_loss(&answers, (1_500, 2_600));
        assert_eq!(check.low, 2);
        assert!(check.holds());
    }
}
