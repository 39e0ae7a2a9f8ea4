//! The leader's soft state of agent measurements, per service and variant.
//!
//! Reports arrive every interval from every agent. They are not replicated (too many, and fresh
//! ones arrive every second). Each report is folded once, on arrival, into per-second totals of
//! its service and variant, and into the running total of the service's current stage; nothing
//! per report is kept. Reading a window merges its seconds, so a control-loop tick costs
//! O(windows × seconds) whatever the number of agents and reports. Seconds are kept as long as
//! the longest window in use ([`MetricsStore::prune`]). Time is passed in, so this is tested
//! without a clock.
//!
//! A stage's total holds the reports received from its start on, and a report belongs to one
//! stage only. A stage ends when the control loop reads its total as evidence; the next stage
//! starts at that instant, possibly the very millisecond a report arrived, and time alone cannot
//! tell whether such a report was already in the ended stage's total (found by `serin demo`,
//! which compares the coordinator's counts with its load generator's: each boundary counted one
//! report twice). So the store also keeps what arrived since the stage total was last read
//! (`unread`, per second), and a new stage starts from that.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::analysis::{Pair, Window};
use crate::rollout::{Millis, RolloutId};

/// The span of one aggregate, in milliseconds.
pub const SECOND: Millis = 1_000;

/// Which side of a rollout a measurement belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The stable variant.
    Stable,
    /// The canary variant.
    Canary,
}

/// Identifies a stage's observation: a new key starts a new stage total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageKey {
    /// Rollout.
    pub rollout: RolloutId,
    /// Stage index.
    pub stage: usize,
    /// When the stage's observation started (a resume restarts it).
    pub started_at: Millis,
}

/// Everything received in one second.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    /// Its start, a multiple of [`SECOND`].
    pub start: Millis,
    /// When its first and last reports were received: a window starting inside this second
    /// still reads it whole when every report came at or after the window's start.
    pub received: (Millis, Millis),
    /// Stable and canary totals.
    pub data: Pair,
}

impl Second {
    fn new(start: Millis, at: Millis) -> Second {
        Second {
            start,
            received: (at, at),
            data: Pair::default(),
        }
    }

    /// Whether every report of this second was received at or after `since`.
    pub fn all_since(&self, since: Millis) -> bool {
        self.start >= since || self.received.0 >= since
    }
}

/// Adds `window` of `side` into the second holding `at` (created if needed; a clock that went
/// back finds or inserts its second in order).
fn fold(seconds: &mut VecDeque<Second>, side: Side, window: &Window, at: Millis) {
    let start = at.div_euclid(SECOND) * SECOND;
    let index = match seconds.back() {
        Some(last) if last.start == start => seconds.len() - 1,
        Some(last) if last.start > start => {
            let i = seconds.partition_point(|s| s.start < start);
            if seconds.get(i).is_none_or(|s| s.start != start) {
                seconds.insert(i, Second::new(start, at));
            }
            i
        }
        _ => {
            seconds.push_back(Second::new(start, at));
            seconds.len() - 1
        }
    };
    let second = &mut seconds[index];
    second.received = (second.received.0.min(at), second.received.1.max(at));
    side_of(&mut second.data, side).merge(window);
}

fn side_of(pair: &mut Pair, side: Side) -> &mut Window {
    match side {
        Side::Stable => &mut pair.stable,
        Side::Canary => &mut pair.canary,
    }
}

/// Drops the seconds that ended at or before `horizon`.
fn drop_before(seconds: &mut VecDeque<Second>, horizon: Millis) {
    while seconds.front().is_some_and(|s| s.start + SECOND <= horizon) {
        seconds.pop_front();
    }
}

#[derive(Debug, Default)]
struct ServiceMetrics {
    /// Per-second totals, oldest first.
    seconds: VecDeque<Second>,
    /// What arrived since the stage total was last read, per second.
    unread: VecDeque<Second>,
    stage: Option<StageKey>,
    stage_data: Pair,
    scrape_errors: HashMap<Side, (Millis, String)>,
}

/// Recent measurements of every service.
#[derive(Debug)]
pub struct MetricsStore {
    services: HashMap<String, ServiceMetrics>,
    retain: Duration,
}

impl MetricsStore {
    /// A store keeping `retain` of history per service until [`MetricsStore::prune`] says
    /// otherwise.
    pub fn new(retain: Duration) -> MetricsStore {
        MetricsStore {
            services: HashMap::new(),
            retain,
        }
    }

    /// Folds one instance's window received at `at` into its service's seconds and stage total.
    pub fn record(&mut self, service: &str, side: Side, window: Window, at: Millis) {
        let entry = match self.services.get_mut(service) {
            Some(entry) => entry,
            None => self.services.entry(service.to_owned()).or_default(),
        };
        side_of(&mut entry.stage_data, side).merge(&window);
        fold(&mut entry.seconds, side, &window, at);
        fold(&mut entry.unread, side, &window, at);
        // Bounded even while no control loop prunes (a node that is not leading).
        let horizon = at - self.retain.as_millis() as Millis;
        drop_before(&mut entry.seconds, horizon);
        drop_before(&mut entry.unread, horizon);
    }

    /// Records that an instance's metrics could not be read at `at` (the interval also counts
    /// as missing data through a [`Window::missing`] passed to [`MetricsStore::record`]).
    pub fn record_scrape_error(&mut self, service: &str, side: Side, error: String, at: Millis) {
        let entry = self.services.entry(service.to_owned()).or_default();
        entry.scrape_errors.insert(side, (at, error));
    }

    /// The latest scrape error of `service`'s `side` at or after `since`.
    pub fn scrape_error(&self, service: &str, side: Side, since: Millis) -> Option<&str> {
        self.services
            .get(service)?
            .scrape_errors
            .get(&side)
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.as_str())
    }

    /// Everything measured for `service` since the stage identified by `key` started. When the
    /// key changes the total starts over, from `checkpoint` when one is given (a leader resuming
    /// a stage another leader, or an earlier run of this one, was observing), with what arrived
    /// in the seconds since the stage started that the previous total was not read with (see
    /// the module docs).
    pub fn stage(&mut self, service: &str, key: &StageKey, checkpoint: Option<&Pair>) -> Pair {
        let entry = self.services.entry(service.to_owned()).or_default();
        if entry.stage.as_ref() != Some(key) {
            let mut data = checkpoint.cloned().unwrap_or_default();
            for s in entry
                .unread
                .iter()
                .filter(|s| s.received.1 >= key.started_at)
            {
                data.merge(&s.data);
            }
            entry.stage = Some(key.clone());
            entry.stage_data = data;
        }
        entry.unread.clear();
        entry.stage_data.clone()
    }

    /// Everything measured for `service` in the seconds whose reports were all received at or
    /// after `since` (the current, partial second included). A second that mixes reports from
    /// before and after `since` is left out: a rollout's trigger window never reads what came
    /// before the rollout started.
    pub fn since(&self, service: &str, since: Millis) -> Pair {
        let mut data = Pair::default();
        let seconds = self.seconds(service, since.div_euclid(SECOND) * SECOND);
        for s in seconds.filter(|s| s.all_since(since)) {
            data.merge(&s.data);
        }
        data
    }

    /// Everything measured for `service` in the seconds that start in `from..until`.
    pub fn span(&self, service: &str, from: Millis, until: Millis) -> Pair {
        let mut data = Pair::default();
        for s in self.seconds(service, from) {
            if s.start >= until {
                break;
            }
            data.merge(&s.data);
        }
        data
    }

    /// The per-second totals of `service` from the second starting at or after `since`, oldest
    /// first.
    pub fn seconds(&self, service: &str, since: Millis) -> impl Iterator<Item = &Second> {
        let seconds = self.services.get(service).map(|e| &e.seconds);
        let first = seconds.map_or(0, |s| s.partition_point(|s| s.start < since));
        seconds.into_iter().flat_map(move |s| s.range(first..))
    }

    /// Keeps `retain` of history from now on (the longest window in use) and drops what is
    /// older than that before `now`.
    pub fn prune(&mut self, now: Millis, retain: Duration) {
        self.retain = retain;
        let horizon = now - retain.as_millis() as Millis;
        for entry in self.services.values_mut() {
            drop_before(&mut entry.seconds, horizon);
            drop_before(&mut entry.unread, horizon);
        }
    }

    /// How much history is kept.
    pub fn retention(&self) -> Duration {
        self.retain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(requests: u64, errors: u64) -> Window {
        Window::from_counts(
            requests,
            errors,
            &[(0.1, requests), (f64::INFINITY, requests)],
            0.0,
        )
    }

    fn key(stage: usize, started_at: Millis) -> StageKey {
        StageKey {
            rollout: RolloutId("r".into()),
            stage,
            started_at,
        }
    }

    #[test]
    fn stage_totals_accumulate_and_restart_with_the_stage() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        assert_eq!(m.stage("api", &key(0, 0), None), Pair::default());
        m.record("api", Side::Canary, w(10, 1), 1_000);
        m.record("api", Side::Stable, w(90, 0), 1_000);
        m.record("api", Side::Canary, w(10, 0), 2_000);
        let p = m.stage("api", &key(0, 0), None);
        assert_eq!(
            (p.canary.requests, p.canary.errors, p.stable.requests),
            (20, 1, 90)
        );
        // Next stage started at 1500: only what arrived since (and was not read as stage 0's)
        // counts.
        m.record("api", Side::Canary, w(10, 0), 2_500);
        let p = m.stage("api", &key(1, 1_500), None);
        assert_eq!((p.canary.requests, p.stable.requests), (10, 0));
        m.record("api", Side::Canary, w(5, 5), 3_000);
        assert_eq!(m.stage("api", &key(1, 1_500), None).canary.requests, 15);
        // Other services are separate.
        assert_eq!(m.stage("web", &key(1, 1_500), None), Pair::default());
    }

    #[test]
    fn a_report_received_in_the_millisecond_a_stage_ends_counts_in_that_stage_only() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        m.stage("api", &key(0, 0), None);
        m.record("api", Side::Canary, w(10, 0), 1_000);
        m.record("api", Side::Canary, w(7, 0), 2_000);
        // The stage ends at 2000, read with the report of 2000 in it (its evidence) ...
        assert_eq!(m.stage("api", &key(0, 0), None).canary.requests, 17);
        // ... and a report arriving in that same millisecond after the read belongs to the
        // next stage, which starts at 2000.
        m.record("api", Side::Canary, w(3, 0), 2_000);
        m.record("api", Side::Stable, w(4, 0), 2_500);
        let p = m.stage("api", &key(1, 2_000), None);
        assert_eq!((p.canary.requests, p.stable.requests), (3, 4));
        // Every report counted exactly once over the two stages: 17 + 3 canary.
    }

    #[test]
    fn a_new_leader_resumes_from_the_checkpoint() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        let checkpoint = Pair {
            canary: w(30, 2),
            stable: w(300, 1),
        };
        m.record("api", Side::Canary, w(5, 0), 10_000);
        let p = m.stage("api", &key(2, 1_000), Some(&checkpoint));
        assert_eq!(
            (p.canary.requests, p.canary.errors, p.stable.requests),
            (35, 2, 300)
        );
        // The checkpoint seeds only once: later calls with the same key keep accumulating.
        m.record("api", Side::Canary, w(5, 0), 11_000);
        let p = m.stage("api", &key(2, 1_000), Some(&checkpoint));
        assert_eq!(p.canary.requests, 40);
    }

    #[test]
    fn sliding_windows_and_pruning() {
        let mut m = MetricsStore::new(Duration::from_secs(10));
        for t in 0..20 {
            m.record("api", Side::Canary, w(1, t % 2), t as Millis * 1_000);
        }
        // Retention 10 s: entries older than 19 s - 10 s are gone.
        assert_eq!(m.since("api", 0).canary.requests, 11);
        assert_eq!(m.since("api", 15_000).canary.requests, 5);
        assert_eq!(m.since("api", 15_000).canary.errors, 3); // t = 15, 17, 19
        m.prune(100_000, Duration::from_secs(10));
        assert_eq!(m.since("api", 0).canary.requests, 0);
        m.record_scrape_error("api", Side::Canary, "c1: timeout".into(), 5_000);
        assert_eq!(
            m.scrape_error("api", Side::Canary, 4_000),
            Some("c1: timeout")
        );
        assert_eq!(m.scrape_error("api", Side::Canary, 6_000), None);
        assert_eq!(m.scrape_error("api", Side::Stable, 0), None);
        assert_eq!(m.since("nope", 0), Pair::default());
    }

    #[test]
    fn reports_of_one_second_share_one_aggregate_whatever_their_number() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        for agent in 0..1_000u64 {
            m.record(
                "api",
                Side::Stable,
                w(10, agent % 2),
                5_000 + (agent % 1_000) as Millis,
            );
        }
        m.record("api", Side::Canary, w(3, 1), 6_000);
        let seconds: Vec<_> = m.seconds("api", 0).collect();
        assert_eq!(seconds.len(), 2);
        assert_eq!(seconds[0].start, 5_000);
        assert_eq!(
            (
                seconds[0].data.stable.requests,
                seconds[0].data.stable.errors
            ),
            (10_000, 500)
        );
        assert_eq!(seconds[1].data.canary.requests, 3);
        assert_eq!(m.services["api"].unread.len(), 2);
    }

    #[test]
    fn a_clock_that_goes_back_folds_into_the_right_second() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        m.record("api", Side::Canary, w(1, 0), 3_000);
        m.record("api", Side::Canary, w(2, 0), 5_500);
        m.record("api", Side::Canary, w(4, 0), 3_999);
        m.record("api", Side::Canary, w(8, 0), 4_100);
        let seconds: Vec<_> = m
            .seconds("api", 0)
            .map(|s| (s.start, s.data.canary.requests))
            .collect();
        assert_eq!(seconds, [(3_000, 5), (4_000, 8), (5_000, 2)]);
    }

    #[test]
    fn spans_read_whole_seconds_and_exclude_the_one_in_progress_when_asked() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        for t in 0..10 {
            m.record("api", Side::Stable, w(10, 0), t * 1_000 + 500);
        }
        // At 9.7 s, the last five complete seconds are 4..9.
        assert_eq!(m.span("api", 4_000, 9_000).stable.requests, 50);
        // A window starting inside a second leaves that second out when it holds reports from
        // before the window's start, and reads it whole when not.
        assert_eq!(m.since("api", 4_600).stable.requests, 50);
        assert_eq!(m.since("api", 4_300).stable.requests, 60);
        assert_eq!(m.since("api", 4_000).stable.requests, 60);
    }

    #[test]
    fn history_is_kept_as_long_as_the_longest_window_in_use() {
        let mut m = MetricsStore::new(Duration::from_secs(600));
        for t in 0..100 {
            m.record("api", Side::Stable, w(1, 0), t * 1_000);
        }
        assert_eq!(m.seconds("api", 0).count(), 100);
        m.prune(99_500, Duration::from_secs(30));
        assert_eq!(m.retention(), Duration::from_secs(30));
        assert_eq!(m.seconds("api", 0).next().map(|s| s.start), Some(69_000));
        // Recording keeps the bound too, between prunes.
        for t in 100..200 {
            m.record("api", Side::Stable, w(1, 0), t * 1_000);
        }
        assert_eq!(m.seconds("api", 0).count(), 31);
        // What no stage read is bounded the same way.
        assert_eq!(m.services["api"].unread.len(), 31);
    }

    #[test]
    fn a_stage_started_later_than_unread_reports_leaves_out_their_earlier_seconds() {
        let mut m = MetricsStore::new(Duration::from_secs(60));
        m.stage("api", &key(0, 0), None);
        m.record("api", Side::Canary, w(5, 0), 1_200);
        m.record("api", Side::Canary, w(7, 0), 3_200);
        // An operator resumed at 2.5 s: the second 1..2 ended before, 3..4 is in.
        assert_eq!(m.stage("api", &key(0, 2_500), None).canary.requests, 7);
    }
}
