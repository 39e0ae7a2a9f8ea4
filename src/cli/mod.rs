//! The operator commands of the `serin` binary.
//!
//! # Layout
//!
//! - this module: [`CoordinatorArgs`] (where the coordinator is) and [`connect`];
//! - [`strategy`]: `serin strategy check`, local validation of strategy files;
//! - [`rollout`]: `serin rollout start|status|list|pause|resume|promote|abort`, the
//!   ControlService client, with the pure renderers [`rollout::render_status`] and
//!   [`rollout::rollout_json`];
//! - [`revisions`]: `serin rollout undo|history`, a service's revisions and going back to one;
//! - [`agents`]: `serin agent list`, the agents a coordinator knows;
//! - [`cluster`]: `serin cluster status|add|remove`, the coordinator group;
//! - [`evidence`]: `serin rollout evidence`, per-stage measurements and the audit trail;
//! - [`output`]: padded tables, UTC times and other text formatting.
//!
//! Commands return an [`std::process::ExitCode`] for outcomes scripts branch on (2 = invalid
//! strategy, 3 = a change was sent but its answer was lost, so its outcome is unknown) and an
//! `anyhow` error for failures (the caller prints it and exits 1).

pub mod agents;
pub mod cluster;
pub mod evidence;
pub mod fleet;
pub mod output;
pub mod revisions;
pub mod rollout;
pub mod strategy;

use std::time::Duration;

use serin_proto::v1::ClusterStatusRequest;
use serin_proto::v1::control_service_client::ControlServiceClient;
use tonic::transport::{Channel, Endpoint};

/// How long each coordinator address gets to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a single request may take before the CLI gives up on it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Where to find the coordinator.
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Coordinator address(es), comma-separated; the first that answers is used.
    #[arg(
        long,
        env = "SERIN_COORDINATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7000"
    )]
    pub coordinator: Vec<String>,
}

impl CoordinatorArgs {
    /// The addresses to try, in order, each with a scheme (`host:port` gets `http://`).
    pub fn addresses(&self) -> Vec<String> {
        self.coordinator
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(normalize_address)
            .collect()
    }
}

/// `host:port` → `http://host:port`; addresses with a scheme are kept as they are.
pub fn normalize_address(address: &str) -> String {
    let address = address.trim();
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// How long [`connect`] waits for a group that is electing a leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(6);

/// Connects to the leader of the coordinator group: the first address that answers, or the
/// leader it names (any member answers `ClusterStatus` with the leader's address). While the
/// group elects a leader it retries for up to [`LEADER_WAIT`], then settles for a member
/// that answers (whose refusals then say that no leader is elected).
pub async fn connect(args: &CoordinatorArgs) -> anyhow::Result<ControlServiceClient<Channel>> {
    let addresses = args.addresses();
    if addresses.is_empty() {
        anyhow::bail!("no coordinator address given (set --coordinator or SERIN_COORDINATOR)");
    }
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let mut failures = Vec::with_capacity(addresses.len());
        let mut member = None;
        // Connected, but the status call failed: the request itself will say why.
        let mut unexplained = None;
        for address in &addresses {
            let mut client = match open_channel(address).await {
                Ok(channel) => ControlServiceClient::new(channel),
                Err(cause) => {
                    failures.push((address.clone(), cause));
                    continue;
                }
            };
            let status = match client.cluster_status(ClusterStatusRequest {}).await {
                Ok(reply) => reply.into_inner(),
                // A coordinator without the call: a group of one.
                Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(client),
                Err(_) => {
                    unexplained.get_or_insert(client);
                    continue;
                }
            };
            if status.role == "leader" {
                return Ok(client);
            }
            if !status.leader_address.is_empty()
                && let Ok(channel) = open_channel(&status.leader_address).await
            {
                return Ok(ControlServiceClient::new(channel));
            }
            member.get_or_insert(client);
        }
        let Some(member) = member else {
            return unexplained.ok_or_else(|| anyhow::anyhow!(unreachable_message(&failures)));
        };
        if tokio::time::Instant::now() >= deadline {
            return Ok(member);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Connects to the first coordinator address that answers, leader or not.
pub async fn connect_any(
    args: &CoordinatorArgs,
) -> anyhow::Result<(String, ControlServiceClient<Channel>)> {
    let addresses = args.addresses();
    if addresses.is_empty() {
        anyhow::bail!("no coordinator address given (set --coordinator or SERIN_COORDINATOR)");
    }
    let mut failures = Vec::with_capacity(addresses.len());
    for address in addresses {
        match open_channel(&address).await {
            Ok(channel) => return Ok((address, ControlServiceClient::new(channel))),
            Err(cause) => failures.push((address, cause)),
        }
    }
    Err(anyhow::anyhow!(unreachable_message(&failures)))
}

/// Connects to one address.
pub async fn connect_to(address: &str) -> Result<ControlServiceClient<Channel>, String> {
    open_channel(address).await.map(ControlServiceClient::new)
}

async fn open_channel(address: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| format!("invalid address ({})", error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// `cannot reach the coordinator at A: cause, nor at B: cause (set --coordinator or …)`.
fn unreachable_message(failures: &[(String, String)]) -> String {
    let parts: Vec<String> = failures
        .iter()
        .map(|(address, cause)| format!("{address}: {cause}"))
        .collect();
    format!(
        "cannot reach the coordinator at {} (set --coordinator or SERIN_COORDINATOR)",
        parts.join(", nor at ")
    )
}

/// An error and its sources, `a: b: c`, leaving out generic wrappers that add nothing.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        let generic = matches!(text.as_str(), "transport error" | "client error (Connect)");
        if !generic && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    }

    #[test]
    fn addresses_are_split_and_get_a_scheme() {
        let cli = Cli::try_parse_from([
            "serin",
            "--coordinator",
            "10.0.0.1:7000, https://c2:7000,,http://c3:7000",
        ])
        .unwrap();
        assert_eq!(
            cli.coordinator.addresses(),
            ["http://10.0.0.1:7000", "https://c2:7000", "http://c3:7000"]
        );
    }

    #[test]
    fn the_default_is_the_local_coordinator() {
        // SERIN_COORDINATOR may be set in the environment running the tests.
        if std::env::var_os("SERIN_COORDINATOR").is_none() {
            let cli = Cli::try_parse_from(["serin"]).unwrap();
            assert_eq!(cli.coordinator.addresses(), ["http://127.0.0.1:7000"]);
        }
    }

    #[test]
    fn the_unreachable_message_names_every_address_and_the_fix() {
        let msg = unreachable_message(&[
            ("http://a:7000".into(), "connection refused".into()),
            ("http://b:7000".into(), "no answer within 3s".into()),
        ]);
        assert_eq!(
            msg,
            "cannot reach the coordinator at http://a:7000: connection refused, \
             nor at http://b:7000: no answer within 3s (set --coordinator or SERIN_COORDINATOR)"
        );
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_fails_with_a_clear_message() {
        // Bind then drop a listener to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args = CoordinatorArgs {
            coordinator: vec![format!("127.0.0.1:{port}")],
        };
        let err = connect(&args).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cannot reach the coordinator at http://127.0.0.1:{port}: "
            )),
            "{err}"
        );
        assert!(
            err.ends_with("(set --coordinator or SERIN_COORDINATOR)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_empty_address_list_is_an_error() {
        let args = CoordinatorArgs {
            coordinator: vec![" ".into()],
        };
        let err = connect(&args).await.unwrap_err().to_string();
        assert!(err.starts_with("no coordinator address given"), "{err}");
    }
}
