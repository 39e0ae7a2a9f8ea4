//! The serin coordinator: a Raft-replicated control plane that runs rollouts.
//!
//! # Layout
//!
//! - [`limits`]: every size limit of operator input and of stored history, in one place.
//! - [`strategy`]: strategy TOML, parsed then validated into a runtime type (pure).
//! - [`analysis`]: merging agent measurements and judging checks (pure).
//! - [`rollout`]: the rollout state machine and the controller's decisions (pure, time passed in);
//!   [`rollout::revisions`]: a service's revisions and `Undo`.
//! - [`deploy`]: which version every managed instance must run now, and when a promotion's
//!   deployment has settled (pure).
//! - [`raft`]: the Raft node (raft-rs `RawNode` owned by one task) and its sled storage.
//! - [`metrics`]: the leader's soft state of recent agent reports per service and variant.
//! - [`agents`]: connected agents, their sessions and desired-state pushes.
//! - [`control`]: the leader's control loop: analysis → decision → proposal.
//! - [`hooks`]: rollout hooks: what each kind means (pure), the HTTP runner, the leader's hook tasks.
//! - [`service`]: the gRPC services (agent streams and the operator API).
//! - [`server`]: wiring of all of the above into a running coordinator.
//!
//! Every change of rollout state is a [`rollout::Command`] proposed through Raft and applied by
//! [`rollout::Registry::apply`]; nothing is decided outside the log.
#![forbid(unsafe_code)]

pub mod agents;
pub mod analysis;
pub mod control;
pub mod deploy;
pub mod hooks;
pub mod inventory;
pub mod limits;
pub mod metrics;
pub mod raft;
pub mod rollout;
pub mod server;
pub mod service;
pub mod strategy;
