//! The invariants, checked from what the harness observes: at most one leader per term, one
//! committed history (same index → same term and bytes on every node), every acknowledged
//! proposal in it exactly once (and no dropped one), no stage passed twice, and at the end
//! every node's state equal to replaying that history. Pure: it sees only values.

use std::collections::{BTreeMap, BTreeSet};

use serin_coordinator::rollout::{Command, Generation, Registry, RolloutId};

/// What a proposer was told about its proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied successfully.
    Applied,
    /// Committed, and the state machine rejected it.
    Rejected,
    /// Overwritten by another leader's entry: never committed.
    Dropped,
    /// The node was not the leader: never in the log.
    NotLeader,
    /// No answer (the node crashed first): may or may not be committed.
    Unknown,
}

/// One committed entry as first seen.
#[derive(Debug, Clone)]
struct Committed {
    term: u64,
    data: Vec<u8>,
    seen_on: u64,
}

/// Collects observations and reports the first broken invariant.
#[derive(Debug, Default)]
pub struct Checker {
    leaders: BTreeMap<u64, u64>,
    history: BTreeMap<u64, Committed>,
    outcomes: BTreeMap<Vec<u8>, (String, Outcome)>,
    /// The index of the bootstrap snapshot every node starts from.
    base: u64,
}

impl Checker {
    /// Every node starts from a bootstrap snapshot at `index`: the history begins after it.
    pub fn start_after(&mut self, index: u64) {
        self.base = index;
    }

    /// Node `id` is leader in `term`.
    pub fn leader(&mut self, term: u64, id: u64) -> Result<(), String> {
        match self.leaders.insert(term, id) {
            Some(other) if other != id => Err(format!(
                "two leaders in term {term}: node {other} and node {id}"
            )),
            _ => Ok(()),
        }
    }

    /// Node `node` has committed `data` at `index` in `term` (empty data: no command).
    pub fn committed(
        &mut self,
        node: u64,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<(), String> {
        match self.history.get(&index) {
            Some(c) if c.term != term || c.data != data => Err(format!(
                "index {index} was committed as term {} on node {}{} but as term {term} on node {node}{}",
                c.term,
                c.seen_on,
                describe(&c.data),
                describe(data)
            )),
            Some(_) => Ok(()),
            None => {
                self.history.insert(
                    index,
                    Committed {
                        term,
                        data: data.to_vec(),
                        seen_on: node,
                    },
                );
                Ok(())
            }
        }
    }

    /// The proposer of `data` (a unique command, described as `what`) was told `outcome`.
    pub fn outcome(&mut self, data: Vec<u8>, what: String, outcome: Outcome) {
        self.outcomes.insert(data, (what, outcome));
    }

    /// The highest committed index seen.
    pub fn last_index(&self) -> u64 {
        self.history
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.base)
    }

    /// The index `data` was committed at, if it was seen committed.
    pub fn index_of(&self, data: &[u8]) -> Option<u64> {
        self.history
            .iter()
            .find(|(_, c)| c.data == data)
            .map(|(&index, _)| index)
    }

    /// Replays the history onto an empty registry, checking the proposals' outcomes and that
    /// no stage passed twice; returns the registry after the last committed index.
    pub fn replay(&self) -> Result<Registry, String> {
        let (registry, results, seen) = self.replay_to(self.last_index())?;
        self.check_outcomes(&results, &seen)?;
        Ok(registry)
    }

    /// The registry after replaying the history up to `last`.
    pub fn registry_at(&self, last: u64) -> Result<Registry, String> {
        Ok(self.replay_to(last)?.0)
    }

    /// Replays up to `last`: the registry, whether each command applied, and its index.
    #[allow(clippy::type_complexity)]
    fn replay_to(
        &self,
        last: u64,
    ) -> Result<(Registry, BTreeMap<&[u8], bool>, BTreeMap<&[u8], u64>), String> {
        let mut registry = Registry::default();
        let mut seen: BTreeMap<&[u8], u64> = BTreeMap::new();
        let mut stages_passed: BTreeSet<(RolloutId, usize)> = BTreeSet::new();
        let mut results: BTreeMap<&[u8], bool> = BTreeMap::new();
        for expected in self.base + 1..=last {
            let Some(entry) = self.history.get(&expected) else {
                return Err(format!(
                    "no node was seen committing index {expected} (below {last})"
                ));
            };
            if entry.data.is_empty() {
                continue;
            }
            if let Some(first) = seen.insert(&entry.data, expected) {
                return Err(format!(
                    "one proposal committed twice, at {first} and {expected}:{}",
                    describe(&entry.data)
                ));
            }
            let command: Command = serde_json::from_slice(&entry.data)
                .map_err(|e| format!("index {expected} is not a command: {e}"))?;
            let stage = match &command {
                Command::StagePassed { id, stage, .. } => Some((id.clone(), *stage)),
                _ => None,
            };
            let generation = Generation {
                term: entry.term,
                index: expected,
            };
            let ok = registry.apply(command, generation).is_ok();
            if let (true, Some(stage)) = (ok, stage)
                && !stages_passed.insert(stage.clone())
            {
                return Err(format!(
                    "stage {} of rollout {} passed twice (again at index {expected})",
                    stage.1, stage.0
                ));
            }
            results.insert(&entry.data, ok);
        }
        Ok((registry, results, seen))
    }

    fn check_outcomes(
        &self,
        results: &BTreeMap<&[u8], bool>,
        seen: &BTreeMap<&[u8], u64>,
    ) -> Result<(), String> {
        for (data, (what, outcome)) in &self.outcomes {
            let committed = results.get(data.as_slice());
            let fine = match outcome {
                Outcome::Applied => committed == Some(&true),
                Outcome::Rejected => committed == Some(&false),
                Outcome::Dropped | Outcome::NotLeader => committed.is_none(),
                Outcome::Unknown => true,
            };
            if !fine {
                let found = match committed {
                    None => "is not in the committed history".to_string(),
                    Some(&ok) => format!(
                        "is committed at index {} and {} on replay",
                        seen[data.as_slice()],
                        if ok { "applies" } else { "is rejected" }
                    ),
                };
                return Err(format!("{what} was answered {outcome:?} but {found}"));
            }
        }
        Ok(())
    }
}

/// A short description of an entry's command, for messages.
fn describe(data: &[u8]) -> String {
    if data.is_empty() {
        return " (empty)".into();
    }
    match serde_json::from_slice::<Command>(data) {
        Ok(c) => format!(
            " ({} {:?})",
            c.action(),
            c.rollout_id().map(|r| r.0.clone())
        ),
        Err(_) => " (undecodable)".into(),
    }
}

#[cfg(test)]
mod tests {
    use serin_coordinator::rollout::Actor;

    use super::*;

    fn pause(reason: &str) -> Vec<u8> {
        serde_json::to_vec(&Command::Pause {
            id: RolloutId("r1".into()),
            actor: Actor::Controller,
            reason: reason.into(),
            at: 0,
        })
        .unwrap()
    }

    #[test]
    fn a_second_leader_in_a_term_is_reported() {
        let mut c = Checker::default();
        c.leader(2, 1).unwrap();
        c.leader(2, 1).unwrap();
        c.leader(3, 2).unwrap();
        assert!(
            c.leader(2, 3)
                .unwrap_err()
                .contains("two leaders in term 2")
        );
    }

    #[test]
    fn the_same_index_committed_differently_is_reported() {
        let mut c = Checker::default();
        c.committed(1, 1, 1, &pause("a")).unwrap();
        c.committed(2, 1, 1, &pause("a")).unwrap();
        assert!(c.committed(3, 1, 2, &pause("a")).is_err());
        assert!(c.committed(3, 1, 1, &pause("b")).is_err());
    }

    #[test]
    fn an_acknowledged_proposal_missing_from_the_history_is_reported() {
        let mut c = Checker::default();
        c.committed(1, 1, 1, &[]).unwrap();
        c.outcome(pause("a"), "pause a".into(), Outcome::Rejected);
        let error = c.replay().unwrap_err();
        assert!(
            error.contains("pause a was answered Rejected but is not in"),
            "{error}"
        );
    }

    #[test]
    fn a_dropped_proposal_found_in_the_history_is_reported() {
        let mut c = Checker::default();
        c.committed(1, 1, 1, &pause("a")).unwrap();
        c.outcome(pause("a"), "pause a".into(), Outcome::Dropped);
        assert!(
            c.replay()
                .unwrap_err()
                .contains("answered Dropped but is committed at index 1")
        );
    }

    #[test]
    fn a_hole_in_the_history_is_reported() {
        let mut c = Checker::default();
        c.committed(1, 1, 1, &[]).unwrap();
        c.committed(1, 3, 1, &[]).unwrap();
        assert!(c.replay().unwrap_err().contains("index 2"));
    }

    #[test]
    fn a_proposal_committed_twice_is_reported() {
        let mut c = Checker::default();
        c.committed(1, 1, 1, &pause("a")).unwrap();
        c.committed(1, 2, 1, &pause("a")).unwrap();
        assert!(
            c.replay()
                .unwrap_err()
                .contains("committed twice, at 1 and 2")
        );
    }
}
