//! serin agent.
//!
//! Layout:
//! - [`config`]: the agent's TOML file, parsed then validated into [`config::AgentConfig`].
//! - [`runtime`]: [`runtime::run`] wires everything together until shutdown (collector,
//!   applier and connection tasks).
//! - [`connection`]: the gRPC session with the coordinator, reconnected with backoff.
//! - [`store`]: the local sled store of the last applied desired state.
//! - [`error`]: [`error::AgentError`], the agent's fatal errors.
//! - [`collect`]: metrics collectors (app Prometheus pages, host CPU and memory).
//! - [`nginx`]: the nginx traffic actuator.
pub mod collect;
pub mod config;
pub mod connection;
pub mod error;
pub mod nginx;
pub mod runtime;
pub mod store;
