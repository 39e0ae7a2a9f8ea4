//! [`StandaloneApplier`]: the agent's applier task on its own, without a coordinator or a
//! collector, for benchmarks and tools that drive a balancer exactly as a running agent
//! does (generations, pacing, retries, the store, acks). `benches/weight_changes.rs` uses it
//! to measure nginx's reloads per second under a burst of desired states.

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ACK_QUEUE;
use super::applier::Applier;
use crate::actuator::TrafficActuator;
use crate::error::AgentError;
use crate::store::{DesiredState, Generation, LocalStore};
use crate::traffic::Upstreams;

/// One acknowledgement the applier sent: the generation and the services that failed it,
/// each with its error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandaloneAck {
    /// The generation acknowledged.
    pub generation: Generation,
    /// `(service, error)` for each service that did not apply it; empty on success.
    pub failures: Vec<(String, String)>,
}

/// The applier task running on its own: [`send`](Self::send) plays the coordinator's
/// desired states, [`take_acks`](Self::take_acks) reads what would go back to it.
pub struct StandaloneApplier {
    desired: watch::Sender<Option<DesiredState>>,
    applied: watch::Receiver<Option<Generation>>,
    acks: mpsc::Receiver<serin_proto::v1::Ack>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl StandaloneApplier {
    /// Starts an applier driving `actuator`, routing to `local_upstreams` where a desired
    /// state does not bring the coordinator's servers, recording in `store` (whose last
    /// applied generation fences older states, as at an agent's start). Must be called
    /// inside a tokio runtime.
    pub fn start<A: TrafficActuator>(
        actuator: A,
        local_upstreams: Upstreams,
        store: LocalStore,
    ) -> Result<Self, AgentError> {
        let applied = store.last_applied()?.map(|d| d.generation);
        let (desired, desired_rx) = watch::channel(None);
        let (applied_tx, applied_rx) = watch::channel(applied);
        let (ack_tx, acks) = mpsc::channel(ACK_QUEUE);
        let applier = Applier::new(
            local_upstreams,
            store,
            Some(actuator),
            applied,
            desired_rx,
            applied_tx,
            ack_tx,
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(applier.run(shutdown.clone()));
        Ok(StandaloneApplier {
            desired,
            applied: applied_rx,
            acks,
            shutdown,
            task,
        })
    }

    /// Hands the applier a new desired state, replacing any it has not picked up yet (as
    /// the agent's connection does).
    pub fn send(&self, desired: DesiredState) {
        self.desired.send_replace(Some(desired));
    }

    /// Waits until `generation`, or a newer one, is applied and recorded; `false` if the
    /// applier stopped first.
    pub async fn wait_applied(&mut self, generation: Generation) -> bool {
        self.applied
            .wait_for(|applied| applied.is_some_and(|a| a >= generation))
            .await
            .is_ok()
    }

    /// The acknowledgements sent since the last call, oldest first. Up to 16 wait; more
    /// are dropped by the applier (as when an agent's connection is down), so call this
    /// often.
    pub fn take_acks(&mut self) -> Vec<StandaloneAck> {
        let mut acks = Vec::new();
        while let Ok(ack) = self.acks.try_recv() {
            let Some(generation) = ack.generation else {
                continue;
            };
            acks.push(StandaloneAck {
                generation: generation.into(),
                failures: ack
                    .failures
                    .into_iter()
                    .map(|f| (f.service, f.error))
                    .collect(),
            });
        }
        acks
    }

    /// Stops the applier (an apply in progress finishes first) and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!("the standalone applier ended badly: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::fake::FakeActuator;
    use crate::test_support::traffic;

    fn state(index: u64, weight: u32) -> DesiredState {
        DesiredState {
            generation: Generation { term: 1, index },
            services: vec![traffic("web", weight, None)],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_standalone_applier_applies_records_and_acks_like_the_agents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store opens");
        let mut fake = FakeActuator::new(&["web"]);
        fake.min_change_interval = Some(std::time::Duration::from_secs(1));
        let mut applier =
            StandaloneApplier::start(fake, Upstreams::default(), store.clone()).expect("starts");
        applier.send(state(1, 10));
        assert!(applier.wait_applied(Generation { term: 1, index: 1 }).await);
        // Within the second: 2 is held, then replaced by 3, which alone is applied.
        applier.send(state(2, 25));
        tokio::task::yield_now().await;
        applier.send(state(3, 50));
        assert!(applier.wait_applied(Generation { term: 1, index: 3 }).await);
        let acked: Vec<u64> = applier
            .take_acks()
            .into_iter()
            .map(|a| {
                assert!(a.failures.is_empty(), "{a:?}");
                a.generation.index
            })
            .collect();
        assert_eq!(acked, [1, 3]);
        applier.stop().await;
        let stored = store.last_applied().expect("store readable");
        assert_eq!(stored.map(|d| d.generation.index), Some(3));
    }
}
