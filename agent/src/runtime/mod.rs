//! The agent's runtime: [`run`] wires the collectors, the actuator, the local store and the
//! coordinator connection together until shutdown.
//!
//! The two I/O edges are traits, and the tasks are generic over them: the collector scrapes
//! through a [`MetricsSource`](crate::collect::MetricsSource) ([`Scraper`] in production)
//! and the applier drives a [`TrafficActuator`](crate::actuator::TrafficActuator) (a
//! [`Balancer`] chosen by the config: [`NginxActuator`] when it has `[nginx]`,
//! [`HaproxyActuator`] when it has `[haproxy]`; none otherwise). The unit tests beside each task run its logic against in-memory fakes.
//!
//! Four tasks (five with managed instances), each owning its state and stopped by one
//! cancellation token:
//! - **collector** (`collector`): every `interval` scrapes every instance and the host and
//!   sends a `Report`, connected or not.
//! - **connection** ([`crate::connection`]): the gRPC session, reconnected with backoff.
//! - **applier** (`applier`): owns the traffic actuator and the store; applies desired
//!   states serially, newest first, records each success in the store *before*
//!   acknowledging it, and retries a failed apply with backoff until it succeeds or a newer
//!   desired state arrives.
//! - **lease** (`lease`): the canary lease: when no leader was reachable for
//!   `canary_lease.after` during a canary, holds or reverts this host to stable
//!   ([`crate::lease`]).
//! - **workloads** (`workloads`, with managed instances): runs what the coordinator assigns.
//!
//! An apply in progress is allowed to finish at shutdown (the actuator restores the
//! previous nginx site file on failure, and interrupting it halfway would leave a written
//! but unconfirmed file); everything else stops at once. [`run`] returns after all three
//! tasks have ended.
//!
//! Layout, by concern:
//! - this file: [`run`] and the wiring: everything is built and checked before any task
//!   runs, then the three tasks run until shutdown or the first failure.
//! - `collector`: the collector task, generic over the metrics source.
//! - `applier`: the applier task, generic over the traffic actuator: generations, retries,
//!   pacing, the store, acks.
//! - `pacing`: when a new desired state may be applied through an actuator with a minimum
//!   change interval (nginx: one reload per second; a change taking traffic away goes at
//!   once), pure.
//! - `report`: config and samples as proto messages (`Register`, a report's instance
//!   windows and host metrics).
//! - [`shards`]: the shards model's shard set of each managed instance: the due shards pushed
//!   to the process, what it holds read back ([`shards::GrantClock`]: which are due, pure).
//! - `lease`: the canary lease task, wired to the connection's leader signal, the applier's
//!   revert channel and the workload reconciler's assignments.
//! - `standalone`: [`StandaloneApplier`], the applier task on its own (benchmarks, tools).
//! - `testing` (tests only): the scaffolding of the end-to-end tests: a fake coordinator,
//!   in-test HTTP endpoints, starting and stopping an agent.
//! - `tests`: [`run`] end to end against the fake coordinator, and through real nginx.

mod applier;
mod collector;
mod lease;
mod pacing;
mod report;
pub mod shards;
mod standalone;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod workloads;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::balancer::Balancer;
use crate::collect::{HostCollector, Scraper};
use crate::config::AgentConfig;
use crate::connection::{self, Backoff, Connection, Coordinators};
pub use crate::error::AgentError;
use crate::haproxy::HaproxyActuator;
use crate::nginx::NginxActuator;
use crate::store::LocalStore;
use applier::Applier;
use collector::Collector;
pub(crate) use report::merge_reports;
use report::register;
pub use standalone::{StandaloneAck, StandaloneApplier};

/// Reports waiting for the connection; more are dropped (they are soft state).
const REPORT_QUEUE: usize = 2;
/// Acks waiting for the connection (kept across a reconnect).
const ACK_QUEUE: usize = 16;

/// Runs the agent until `shutdown` is cancelled.
///
/// Fails at once, before connecting anywhere, when the store cannot be opened, the
/// `[nginx]` section does not describe a usable nginx, or a coordinator address is not a
/// usable endpoint. Afterwards only a panicking task, or the coordinator refusing the first
/// session because another agent with this name is connected
/// ([`AgentError::DuplicateName`]), makes it return an error; unreachable coordinators,
/// failing scrapes and failing applies are retried or reported.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let span = tracing::info_span!("agent", agent = %config.name);
    async move {
        let tasks = start(config).await?;
        tasks.run(shutdown).await
    }
    .instrument(span)
    .await
}

/// Everything [`run`] starts, built and checked before any task runs.
struct Tasks {
    collector: Collector<Scraper>,
    applier: Applier<Balancer>,
    connection: Connection,
    /// The workload reconciler, when the agent has managed instances.
    workloads: Option<workloads::Workloads>,
    lease: lease::Lease,
}

async fn start(config: AgentConfig) -> Result<Tasks, AgentError> {
    for address in &config.coordinators {
        connection::endpoint(address).map_err(|reason| AgentError::Coordinator {
            address: address.clone(),
            reason,
        })?;
    }

    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || LocalStore::open(&dir))
        .await
        .map_err(|e| AgentError::TaskFailed {
            task: "store open",
            reason: e.to_string(),
        })??;
    let last_applied = store.last_applied()?;
    let instance_id = store.instance_id()?;
    let applied = last_applied.as_ref().map(|d| d.generation);

    let actuator = balancer(&config).await?;
    let scraper = Scraper::new(config.scrape_timeout)?;
    let host = HostCollector::new()?;

    let config = Arc::new(config);
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
    let (desired_tx, desired_rx) = watch::channel(None);
    let (applied_tx, applied_rx) = watch::channel(applied);
    let board = workloads::WorkloadBoard::default();
    let managed: Vec<_> = config
        .instances
        .iter()
        .filter(|i| i.managed)
        .cloned()
        .collect();
    let (workloads_tx, workloads) = if managed.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = watch::channel(None);
        let drivers = crate::deploy::Drivers::new(config.data_dir.join("workloads"));
        let reconciler = workloads::Workloads {
            instances: managed.clone(),
            drivers: Arc::new(drivers),
            board: board.clone(),
            desired: rx,
        };
        (Some(tx), Some(reconciler))
    };
    let (lease, lease_links) = lease::lease(
        config.canary_lease,
        managed,
        desired_tx.subscribe(),
        last_applied,
        workloads_tx.clone(),
    );

    if config.does_nothing() {
        tracing::warn!(
            "this agent has no [[instances]] and no [nginx] or [haproxy]: it will report no traffic and \
             steer none; it only registers and reports host metrics"
        );
    }
    tracing::info!(
        store = %store.path().display(),
        last_applied = ?applied,
        instances = config.instances.len(),
        "agent starting"
    );

    Ok(Tasks {
        collector: Collector::new(Arc::clone(&config), scraper, host, report_tx, board),
        applier: Applier::new(
            config.local_upstreams(),
            store,
            actuator,
            applied,
            desired_rx,
            applied_tx,
            ack_tx,
        )
        .with_lease_reverts(lease_links.reverts),
        connection: Connection {
            coordinators: Coordinators::new(config.coordinators.clone()),
            register: register(&config, instance_id),
            applied: applied_rx,
            reports: report_rx,
            acks: ack_rx,
            desired: desired_tx,
            workloads: workloads_tx,
            backoff: Backoff::default(),
            failures: 0,
            registered: false,
            leader: lease_links.leader,
            lease_expiry: lease_links.expiry,
        },
        workloads,
        lease,
    })
}

/// The balancer the config asks for, checked up front; `None` when this host carries no
/// traffic.
async fn balancer(config: &AgentConfig) -> Result<Option<Balancer>, AgentError> {
    // Config validation allows at most one balancer section.
    if let Some(settings) = &config.nginx {
        let actuator = NginxActuator::new(settings.clone()).await?;
        tracing::info!(version = actuator.version(), site = %settings.site.display(), "nginx ready");
        return Ok(Some(Balancer::Nginx(actuator)));
    }
    if let Some(settings) = &config.haproxy {
        let actuator = HaproxyActuator::new(settings.clone()).await?;
        tracing::info!(
            version = actuator.version(),
            config = %settings.config.display(),
            socket = %settings.socket.display(),
            "haproxy ready"
        );
        return Ok(Some(Balancer::Haproxy(actuator)));
    }
    Ok(None)
}

impl Tasks {
    async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        // Any task ending stops the others: normally that is the shutdown itself.
        let stop = shutdown.child_token();
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        let span = tracing::Span::current();
        let collector = self.collector.run(stop.clone());
        let id = set
            .spawn(
                async {
                    collector.await;
                    Ok(())
                }
                .instrument(span.clone()),
            )
            .id();
        names.insert(id, "collector");
        let applier = self.applier.run(stop.clone());
        let id = set
            .spawn(
                async {
                    applier.await;
                    Ok(())
                }
                .instrument(span.clone()),
            )
            .id();
        names.insert(id, "applier");
        let lease = self.lease.run(stop.clone());
        let id = set
            .spawn(
                async {
                    lease.await;
                    Ok(())
                }
                .instrument(span.clone()),
            )
            .id();
        names.insert(id, "lease");
        if let Some(workloads) = self.workloads {
            let workloads = workloads.run(stop.clone());
            let id = set
                .spawn(
                    async {
                        workloads.await;
                        Ok(())
                    }
                    .instrument(span.clone()),
                )
                .id();
            names.insert(id, "workloads");
        }
        let id = set
            .spawn(self.connection.run(stop.clone()).instrument(span))
            .id();
        names.insert(id, "connection");

        let mut result = Ok(());
        while let Some(joined) = set.join_next_with_id().await {
            let (id, reason) = match joined {
                // A fatal error of the task's own (logged by the task): stop the others.
                Ok((_, Err(e))) => {
                    stop.cancel();
                    if result.is_ok() {
                        result = Err(e);
                    }
                    continue;
                }
                // Ended because of shutdown, or because another task failed first.
                Ok((id, Ok(()))) if stop.is_cancelled() => (id, None),
                Ok((id, Ok(()))) => (id, Some("stopped before shutdown".to_owned())),
                Err(e) => (e.id(), Some(join_error_text(e))),
            };
            stop.cancel();
            if let Some(reason) = reason {
                let task = names.get(&id).copied().unwrap_or("unknown");
                tracing::error!(task, %reason, "agent task failed; stopping");
                if result.is_ok() {
                    result = Err(AgentError::TaskFailed { task, reason });
                }
            }
        }
        tracing::info!("agent stopped");
        result
    }
}

fn join_error_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let panic = e.into_panic();
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_owned()
    }
}
