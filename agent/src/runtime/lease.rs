//! The canary lease task: runs the [`LeaseClock`] against the connection's leader signal
//! and, when the lease expires during a canary, holds or reverts this host (the decisions
//! are pure, in [`crate::lease`]; docs/agent.md, "Canary lease").
//!
//! On expiry it reads the newest desired state the connection received (or, before any, the
//! one the store recorded at start) and the newest workload assignments. Without a canary
//! there it does nothing but log at debug level. Otherwise it logs one warning naming the
//! services, and with `revert` hands the stable-only traffic to the applier (its own
//! channel: the applier applies it without the generation check a coordinator state gets)
//! and the stable-only assignments to the workload reconciler (the same channel as the
//! connection's: the coordinator's next state, of the same generation or newer, replaces
//! it). Either way it leaves a [`pb::LeaseExpiry`] for the connection to put in the next
//! `Register`, so the leader records an event.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_proto::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CanaryLease, InstanceConfig, LeaseAction};
use crate::lease::{
    LeaseClock, canary_services, describe, stable_only_traffic, stable_only_workloads,
};
use crate::store::DesiredState;

/// The canary lease task's inputs and outputs.
pub(super) struct Lease {
    pub(super) config: CanaryLease,
    /// The managed instances (their declared variant decides what a revert runs there).
    pub(super) instances: Vec<InstanceConfig>,
    /// `true` while a session with a leader is registered.
    pub(super) leader: watch::Receiver<bool>,
    /// The newest desired state the connection received.
    pub(super) desired: watch::Receiver<Option<DesiredState>>,
    /// What the store recorded at start: the last state before any is received.
    pub(super) stored: Option<DesiredState>,
    /// The workload reconciler's assignments, when this agent has managed instances.
    pub(super) workloads: Option<watch::Sender<Option<pb::DesiredState>>>,
    /// Stable-only traffic for the applier.
    pub(super) reverts: watch::Sender<Option<DesiredState>>,
    /// The expiry for the next `Register`.
    pub(super) expiry: watch::Sender<Option<pb::LeaseExpiry>>,
}

impl Lease {
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut clock = LeaseClock::new(self.config.after, Instant::now());
        loop {
            let deadline = clock.deadline();
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = self.leader.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *self.leader.borrow_and_update() {
                        clock.leader_registered();
                    } else {
                        clock.leader_lost(Instant::now());
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() =>
                {
                    let now = Instant::now();
                    if clock.poll(now) {
                        self.expire(clock.without_leader(now).unwrap_or(self.config.after));
                    }
                }
            }
        }
    }

    /// The lease expired after `without_leader`: hold or revert a canary, if one runs here.
    fn expire(&self, without_leader: Duration) {
        let traffic = self
            .desired
            .borrow()
            .clone()
            .or_else(|| self.stored.clone());
        let workloads = self.workloads.as_ref().and_then(|tx| tx.borrow().clone());
        let services = canary_services(traffic.as_ref(), workloads.as_ref());
        let generation = traffic.as_ref().map(|d| d.generation).or_else(|| {
            workloads
                .as_ref()
                .and_then(|w| w.generation.map(Into::into))
        });
        if services.is_empty() {
            tracing::debug!(
                ?without_leader,
                "no leader reachable, but no canary runs here: the canary lease changes nothing"
            );
            return;
        }
        let action = self.config.on_expiry;
        let canaries = describe(&services);
        let generation_text = generation.map_or_else(|| "none".to_owned(), |g| g.to_string());
        match action {
            LeaseAction::Revert => {
                if let Some(traffic) = &traffic {
                    self.reverts
                        .send_replace(Some(stable_only_traffic(traffic)));
                }
                if let (Some(tx), Some(workloads)) = (&self.workloads, &workloads) {
                    tx.send_replace(Some(stable_only_workloads(workloads, &self.instances)));
                }
                tracing::warn!(
                    ?without_leader,
                    generation = %generation_text,
                    canaries = %canaries,
                    "canary lease expired: no leader reachable during a canary; reverted this host \
                     to stable (canary share 0, canary workloads stopped or back on the stable \
                     version; sharded services held); the leader's desired state is applied \
                     again once one is reachable"
                );
            }
            LeaseAction::Hold => {
                tracing::warn!(
                    ?without_leader,
                    generation = %generation_text,
                    canaries = %canaries,
                    "canary lease expired: no leader reachable during a canary; holding the last \
                     desired state (canary_lease.on_expiry = \"hold\")"
                );
            }
        }
        let expired_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.expiry.send_replace(Some(pb::LeaseExpiry {
            expired_at_ms,
            after_ms: u64::try_from(self.config.after.as_millis()).unwrap_or(u64::MAX),
            action: action.as_str().to_owned(),
            generation: generation.map(Into::into),
            services: services.into_iter().map(Into::into).collect(),
        }));
    }
}

/// The channels between the lease task, the connection and the applier.
pub(super) struct LeaseLinks {
    pub(super) leader: watch::Sender<bool>,
    pub(super) expiry: watch::Sender<Option<pb::LeaseExpiry>>,
    pub(super) reverts: watch::Receiver<Option<DesiredState>>,
}

/// The lease task for `config`, and the ends the connection and the applier hold.
pub(super) fn lease(
    config: CanaryLease,
    instances: Vec<InstanceConfig>,
    desired: watch::Receiver<Option<DesiredState>>,
    stored: Option<DesiredState>,
    workloads: Option<watch::Sender<Option<pb::DesiredState>>>,
) -> (Lease, LeaseLinks) {
    let (leader_tx, leader_rx) = watch::channel(false);
    let (expiry_tx, _) = watch::channel(None);
    let (reverts_tx, reverts_rx) = watch::channel(None);
    let task = Lease {
        config,
        instances,
        leader: leader_rx,
        desired,
        stored,
        workloads,
        reverts: reverts_tx,
        expiry: expiry_tx.clone(),
    };
    let links = LeaseLinks {
        leader: leader_tx,
        expiry: expiry_tx,
        reverts: reverts_rx,
    };
    (task, links)
}
