//! Listing rollouts a page at a time, newest first.
//!
//! Why: a coordinator keeps every rollout it ever ran, so "all of them" grows without bound and
//! would one day no longer fit an API reply. Pages are cut by a cursor (the start time and id of
//! the last rollout shown) rather than an offset, so a rollout started between two pages shifts
//! nothing: paging through the whole list shows every older rollout exactly once.

use std::fmt;

use super::{Millis, Registry, Rollout, RolloutId};

/// Where the next page starts: just after (older than) this rollout in the newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The start time of the last rollout of the previous page.
    pub started_at: Millis,
    /// Its id (ties on the start time are ordered by id, descending).
    pub id: RolloutId,
}

/// A page token that is not one the coordinator handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("page_token: {0:?} is not a token from a previous `rollout list` page")]
pub struct BadToken(pub String);

impl Cursor {
    /// The cursor as an opaque page token: `<started_at_ms>:<id>`.
    pub fn token(&self) -> String {
        format!("{}:{}", self.started_at, self.id)
    }

    /// Reads a token made by [`Cursor::token`].
    pub fn from_token(token: &str) -> Result<Cursor, BadToken> {
        let bad = || BadToken(token.to_owned());
        let (at, id) = token.split_once(':').ok_or_else(bad)?;
        let started_at = at.parse::<Millis>().map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(Cursor {
            started_at,
            id: RolloutId(id.to_owned()),
        })
    }

    fn of(rollout: &Rollout) -> Cursor {
        Cursor {
            started_at: rollout.started_at,
            id: rollout.id.clone(),
        }
    }

    fn key(&self) -> (Millis, &RolloutId) {
        (self.started_at, &self.id)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.token())
    }
}

/// One page of the newest-first listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<'a> {
    /// At most `limit` rollouts, newest first.
    pub rollouts: Vec<&'a Rollout>,
    /// Where the next page starts, when there are more.
    pub next: Option<Cursor>,
}

impl Registry {
    /// Up to `limit` rollouts started before `after` (all when `None`), newest first by start
    /// time, ties by id; only live ones when `running_only`.
    /// A `limit` of 0 counts as 1.
    pub fn page(&self, limit: usize, after: Option<&Cursor>, running_only: bool) -> Page<'_> {
        let limit = limit.max(1);
        let mut matching: Vec<&Rollout> = self
            .rollouts
            .values()
            .filter(|r| !running_only || !r.state.is_terminal())
            .filter(|r| after.is_none_or(|c| (r.started_at, &r.id) < c.key()))
            .collect();
        let newest_first =
            |a: &&Rollout, b: &&Rollout| (b.started_at, &b.id).cmp(&(a.started_at, &a.id));
        let more = matching.len() > limit;
        if more {
            // Only the first `limit` need sorting.
            matching.select_nth_unstable_by(limit, newest_first);
            matching.truncate(limit);
        }
        matching.sort_unstable_by(newest_first);
        let next = if more {
            matching.last().map(|r| Cursor::of(r))
        } else {
            None
        };
        Page {
            rollouts: matching,
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::rollout::{Actor, Command, Generation, RolloutState};
    use crate::strategy::{Stage, Strategy, Traffic};

    fn strategy() -> Strategy {
        Strategy {
            stages: vec![Stage {
                weight: 10,
                min_duration: Duration::from_secs(1),
                max_duration: None,
                manual_gate: false,
            }],
            checks: vec![],
            triggers: vec![],
            traffic: Traffic::default(),
            hooks: Vec::new(),
            deploy: None,
            on_inconclusive: crate::strategy::OnInconclusive::Pause,
        }
    }

    /// `finished` rollouts of one service, each started and aborted, started one second apart
    /// (every third pair at the same millisecond, to exercise ties), then one still running.
    fn registry(finished: usize) -> Registry {
        let mut reg = Registry::default();
        let mut index = 0;
        let mut next = || {
            index += 1;
            Generation { term: 1, index }
        };
        let start = |i: usize, at: Millis| Command::Start {
            id: RolloutId(format!("api-{i:06x}")),
            service: "api".into(),
            version: "v2".into(),
            stable_version: Some("v1".into()),
            strategy: strategy(),
            actor: Actor::Operator("ana".into()),
            at,
        };
        for i in 0..=finished {
            let at = 1_000_000 + (i as Millis / 2) * 1000;
            reg.apply(start(i, at), next()).unwrap();
            if i < finished {
                let abort = Command::Abort {
                    id: RolloutId(format!("api-{i:06x}")),
                    actor: Actor::Operator("ana".into()),
                    reason: "next".into(),
                    analysis: None,
                    at: at + 1,
                };
                reg.apply(abort, next()).unwrap();
            }
        }
        reg
    }

    fn ids(page: &Page<'_>) -> Vec<String> {
        page.rollouts.iter().map(|r| r.id.0.clone()).collect()
    }

    #[test]
    fn over_500_finished_rollouts_page_newest_first_each_exactly_once() {
        let reg = registry(520);
        let first = reg.page(50, None, false);
        assert_eq!(first.rollouts.len(), 50);
        // The running one started last: it comes first.
        assert_eq!(first.rollouts[0].id.0, "api-000208");
        assert_eq!(first.rollouts[0].state, RolloutState::Progressing);

        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = reg.page(50, after.as_ref(), false);
            seen.extend(page.rollouts.iter().map(|r| (r.started_at, r.id.clone())));
            pages += 1;
            match page.next {
                Some(next) => after = Some(Cursor::from_token(&next.token()).unwrap()),
                None => break,
            }
        }
        assert_eq!(pages, 11, "521 rollouts in pages of 50");
        assert_eq!(seen.len(), 521);
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), 521, "no rollout twice");
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(seen, sorted, "newest first, ties by id");
    }

    #[test]
    fn a_rollout_started_between_two_pages_shifts_nothing() {
        let mut reg = registry(10);
        let first = reg.page(4, None, false);
        let cursor = first.next.clone().unwrap();
        let before = ids(&reg.page(4, Some(&cursor), false));
        // Finish the running one and start a newer rollout.
        let running = first.rollouts[0].id.clone();
        reg.apply(
            Command::Abort {
                id: running,
                actor: Actor::Controller,
                reason: "x".into(),
                analysis: None,
                at: 9_000_000,
            },
            Generation {
                term: 1,
                index: 999,
            },
        )
        .unwrap();
        assert_eq!(ids(&reg.page(4, Some(&cursor), false)), before);
    }

    #[test]
    fn the_last_page_has_no_next_and_running_only_skips_finished_ones() {
        let reg = registry(3);
        let all = reg.page(4, None, false);
        assert_eq!(all.rollouts.len(), 4);
        assert_eq!(all.next, None);
        let running = reg.page(1, None, true);
        assert_eq!(ids(&running), ["api-000003"]);
        assert_eq!(running.next, None);
        assert_eq!(reg.page(0, None, false).rollouts.len(), 1);
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let cursor = Cursor {
            started_at: 1_777_636_800_000,
            id: RolloutId("api-3f9a1c".into()),
        };
        assert_eq!(cursor.token(), "1777636800000:api-3f9a1c");
        assert_eq!(Cursor::from_token(&cursor.token()), Ok(cursor));
        for bad in ["", "api-1", "x:api-1", "12:"] {
            let err = Cursor::from_token(bad).unwrap_err();
            assert!(err.to_string().starts_with("page_token: "), "{err}");
        }
    }
}
