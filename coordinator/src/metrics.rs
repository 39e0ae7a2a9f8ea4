//! The leader's soft state of agent measurements, per service and variant.
//!
//! Reports arrive every interval from every agent. They are not replicated (too many, and fresh
//! ones arrive every second): the leader keeps a short history for trigger windows and a running
//! total for the current stage. Time is passed in, so this is tested without a clock.
//!
//! A stage's total holds the reports received from its start on, and a report belongs to one
//! stage only. The control loop wakes on each report, so a stage often ends (its evidence is the
//! total read at that instant) in the very millisecond a report arrived; the next stage starts
//! at that millisecond. Time alone cannot tell whether such a report was already in the ended
//! stage's total, so every record gets a sequence number and a new stage starts after the last
//! record the previous stage's total was read with (found by `serin demo`, which compares the
//! coordinator's counts with its load generator's: each boundary counted one report twice).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::analysis::{Pair, Window};
use crate::rollout::{Millis, RolloutId};

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

/// One instance's window as received.
#[derive(Debug)]
struct Record {
    /// Position among the service's records, from 0.
    seq: u64,
    /// When it was received.
    at: Millis,
    side: Side,
    window: Window,
}

#[derive(Debug, Default)]
struct ServiceMetrics {
    recent: VecDeque<Record>,
    /// The `seq` of the next record.
    next_seq: u64,
    stage: Option<StageKey>,
    stage_data: Pair,
    /// Records before this `seq` were in the stage total when it was last read.
    read_upto: u64,
    scrape_errors: HashMap<Side, (Millis, String)>,
}

/// Recent measurements of every service.
#[derive(Debug)]
pub struct MetricsStore {
    services: HashMap<String, ServiceMetrics>,
    retain: Duration,
}

impl MetricsStore {
    /// A store keeping `retain` of history per service (at least the longest trigger window).
    pub fn new(retain: Duration) -> MetricsStore {
        MetricsStore {
            services: HashMap::new(),
            retain,
        }
    }

    /// Records one instance's window received at `at`.
    pub fn record(&mut self, service: &str, side: Side, window: Window, at: Millis) {
        let entry = self.services.entry(service.to_owned()).or_default();
        let target = match side {
            Side::Stable => &mut entry.stage_data.stable,
            Side::Canary => &mut entry.stage_data.canary,
        };
        target.merge(&window);
        entry.recent.push_back(Record {
            seq: entry.next_seq,
            at,
            side,
            window,
        });
        entry.next_seq += 1;
        let horizon = at - self.retain.as_millis() as Millis;
        while entry.recent.front().is_some_and(|r| r.at < horizon) {
            entry.recent.pop_front();
        }
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
    /// a stage another leader, or an earlier run of this one, was observing), with the records
    /// received since the stage started that the previous total was not read with (see the
    /// module docs).
    pub fn stage(&mut self, service: &str, key: &StageKey, checkpoint: Option<&Pair>) -> Pair {
        let entry = self.services.entry(service.to_owned()).or_default();
        if entry.stage.as_ref() != Some(key) {
            // Keep what arrived since the stage started and was not read as the previous
            // stage's; drop the rest.
            let mut data = checkpoint.cloned().unwrap_or_default();
            for r in &entry.recent {
                if r.at >= key.started_at && r.seq >= entry.read_upto {
                    match r.side {
                        Side::Stable => data.stable.merge(&r.window),
                        Side::Canary => data.canary.merge(&r.window),
                    }
                }
            }
            entry.stage = Some(key.clone());
            entry.stage_data = data;
        }
        entry.read_upto = entry.next_seq;
        entry.stage_data.clone()
    }

    /// Everything measured for `service` at or after `since`.
    pub fn since(&self, service: &str, since: Millis) -> Pair {
        let mut data = Pair::default();
        if let Some(entry) = self.services.get(service) {
            for r in entry.recent.iter().rev() {
                if r.at < since {
                    break;
                }
                match r.side {
                    Side::Stable => data.stable.merge(&r.window),
                    Side::Canary => data.canary.merge(&r.window),
                }
            }
        }
        data
    }

    /// Drops history older than the retention before `now`.
    pub fn prune(&mut self, now: Millis) {
        let horizon = now - self.retain.as_millis() as Millis;
        for entry in self.services.values_mut() {
            while entry.recent.front().is_some_and(|r| r.at < horizon) {
                entry.recent.pop_front();
            }
        }
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
        m.prune(100_000);
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
}
