//! [`AgentError`]: why the agent could not start or had to stop.
//!
//! Everything here is fatal. Transient trouble (a coordinator that is down, a metrics page
//! that does not answer, an nginx reload that fails) is retried, reported or acknowledged as
//! a failure by the runtime, never returned.
//!
//! Also `error_chain`: an error and its causes as one line of text, for logs and acks.

use crate::collect::{HostError, ScrapeError};
use crate::haproxy::HaproxyError;
use crate::nginx::NginxError;
use crate::store::StoreError;

/// A fatal agent error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The local store could not be opened or read at startup.
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    /// The `[nginx]` section does not describe a usable nginx (binary, main config, site
    /// directory).
    #[error("nginx: {0}")]
    Nginx(#[from] NginxError),
    /// The `[haproxy]` section does not describe a usable HAProxy (binary, config
    /// directory).
    #[error("haproxy: {0}")]
    Haproxy(#[from] HaproxyError),
    /// The scraper's HTTP client could not be built.
    #[error("metrics scraper: {0}")]
    Scraper(#[from] ScrapeError),
    /// Host metrics cannot be read on this platform.
    #[error("host metrics: {0}")]
    Host(#[from] HostError),
    /// A configured coordinator address is not a usable gRPC endpoint.
    #[error("coordinator address '{address}': {reason}")]
    Coordinator { address: String, reason: String },
    /// The coordinator refused this agent's first session: another agent with the same
    /// name (and another instance id) is connected. `0` is the coordinator's message.
    #[error("the coordinator refused this agent: {0}")]
    DuplicateName(String),
    /// One of the agent's tasks panicked; the others were stopped.
    #[error("agent task '{task}' failed: {reason}")]
    TaskFailed { task: &'static str, reason: String },
}

/// An error's message followed by its causes, skipping causes already quoted in it.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let s = inner.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = inner.source();
    }
    text
}
