//! serin agent.
//!
//! Layout:
//! - [`config`]: the agent's TOML file, parsed then validated into [`config::AgentConfig`].
//! - [`runtime`]: [`runtime::run`] wires everything together until shutdown (collector,
//!   applier and connection tasks), a module per concern: `runtime/collector.rs`,
//!   `runtime/applier.rs` (with `runtime/pacing.rs`: one nginx reload per second),
//!   `runtime/report.rs` (proto mapping), `runtime/standalone.rs` (the applier on its own,
//!   for benchmarks). The applier's generation logic and the collector's report building
//!   are generic over the two I/O edges below.
//! - [`connection`]: the gRPC session with the coordinator, reconnected with backoff.
//! - [`lease`]: the canary lease, pure: when no leader was reachable for too long during a
//!   canary, and the stable-only state a revert applies (the task is `runtime/lease.rs`).
//! - [`store`]: the local sled store of the last applied desired state.
//! - [`error`]: [`error::AgentError`], the agent's fatal errors.
//! - [`traffic`]: the balancer-neutral traffic model, below `config` and every balancer:
//!   [`traffic::Variant`], [`traffic::Server`], [`traffic::Upstreams`] (servers per
//!   service), [`traffic::Route`] and the exact-share [`traffic::server_weights`] (pure).
//! - [`actuator`]: [`actuator::TrafficActuator`], the I/O edge that makes a desired state's
//!   traffic real on this host, routed to given upstreams, with the contract every
//!   implementation keeps.
//! - [`balancer`]: [`balancer::Balancer`], the set of actuators the config chooses from
//!   (an enum dispatching to each: nginx or HAProxy).
//! - [`collect`]: metrics collectors (app Prometheus pages, host CPU and memory) and
//!   [`collect::MetricsSource`], the I/O edge the collector scrapes through
//!   ([`collect::Scraper`] implements it).
//! - [`logs`]: whether the binaries colour their log lines (only on a terminal).
//! - [`nginx`]: the nginx traffic actuator ([`nginx::NginxActuator`] implements
//!   [`actuator::TrafficActuator`]) and its `[nginx]` settings.
//! - [`haproxy`]: the HAProxy traffic actuator ([`haproxy::HaproxyActuator`]: runtime API
//!   weights and pre-provisioned server slots, reloads only for structural changes) and its
//!   `[haproxy]` settings.
pub mod actuator;
pub mod balancer;
pub mod collect;
pub mod config;
pub mod connection;
pub mod deploy;
pub mod error;
pub mod haproxy;
pub mod lease;
pub mod logs;
pub mod nginx;
pub mod runtime;
pub mod store;
pub mod traffic;

#[cfg(test)]
pub(crate) mod test_support;
