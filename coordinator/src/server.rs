//! A running coordinator: the raft node, the control loop and the gRPC server, started together
//! and stopped together.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serin_proto::v1::{
    agent_service_server::AgentServiceServer, control_service_server::ControlServiceServer,
    raft_service_server::RaftServiceServer,
};
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::agents::AgentRegistry;
use crate::control::{self, Shared};
use crate::metrics::MetricsStore;
use crate::raft::node::{NodeConfig, NodeError, RaftNode, SNAPSHOT_EVERY};
use crate::raft::storage::{self, OpenDbError};
use crate::raft::transport::{AddressBook, MAX_RAFT_MESSAGE_BYTES, PeerTransport, RaftApi};
use crate::service::{Api, MAX_MESSAGE_BYTES};
use crate::strategy::MAX_TRIGGER_WINDOW;

/// How long a connection may be quiet before the server pings it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long an unanswered ping may wait before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Coordinator settings, validated.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This node's raft id (non-zero).
    pub node_id: u64,
    /// Address of the gRPC server (agents, operators and the other members).
    pub listen: SocketAddr,
    /// The members of a new group and their gRPC addresses, this node included; empty: a group
    /// of one. Only read when the data directory is new (membership lives in the log after
    /// that); the addresses also seed where to reach the members.
    pub peers: BTreeMap<u64, String>,
    /// Join a running group instead of forming a new one: start with no membership and wait
    /// for the leader to add this node (`serin cluster add`).
    pub join: bool,
    /// Where the raft log and state live.
    pub data_dir: PathBuf,
    /// How long a disconnected agent stays in `serin agent list` before it is forgotten.
    pub forget_agents_after: Duration,
    /// How long an instance may be unhealthy (its agent disconnected, its scrapes failing)
    /// before it leaves the balancers' upstreams.
    pub remove_unhealthy_after: Duration,
}

/// Default of [`CoordinatorConfig::remove_unhealthy_after`].
pub const REMOVE_UNHEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Coordinator settings as written in a TOML file or given as flags; every field optional
/// until [`CoordinatorSettings::resolve`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Raft node id; default 1.
    pub node_id: Option<u64>,
    /// gRPC listen address; default 127.0.0.1:7000.
    pub listen: Option<SocketAddr>,
    /// Members by id: `1 = "http://10.0.0.1:7000"` (TOML table `[peers]`) or
    /// `--peers 1=http://10.0.0.1:7000,2=…`.
    pub peers: Option<BTreeMap<String, String>>,
    /// Join a running group (`--join`).
    pub join: Option<bool>,
    /// Data directory; required.
    pub data_dir: Option<PathBuf>,
    /// How long a disconnected agent is listed before it is forgotten; default 1 hour.
    #[serde(default, with = "humantime_serde")]
    pub forget_agents_after: Option<Duration>,
    /// How long an instance may be unhealthy before it leaves the upstreams; default 30 s.
    #[serde(default, with = "humantime_serde")]
    pub remove_unhealthy_after: Option<Duration>,
}

impl CoordinatorSettings {
    /// Reads a TOML config file's text.
    pub fn from_toml(text: &str) -> Result<CoordinatorSettings, CoordinatorError> {
        toml::from_str(text).map_err(|e| CoordinatorError::Config(e.message().trim().to_owned()))
    }

    /// Fields set in `overrides` (flags) win over `self` (the file).
    pub fn merge(self, overrides: CoordinatorSettings) -> CoordinatorSettings {
        CoordinatorSettings {
            node_id: overrides.node_id.or(self.node_id),
            listen: overrides.listen.or(self.listen),
            peers: overrides.peers.or(self.peers),
            join: overrides.join.or(self.join),
            data_dir: overrides.data_dir.or(self.data_dir),
            forget_agents_after: overrides.forget_agents_after.or(self.forget_agents_after),
            remove_unhealthy_after: overrides
                .remove_unhealthy_after
                .or(self.remove_unhealthy_after),
        }
    }

    /// Applies defaults and checks the result.
    pub fn resolve(self) -> Result<CoordinatorConfig, CoordinatorError> {
        let mut peers = BTreeMap::new();
        for (key, address) in self.peers.unwrap_or_default() {
            let id: u64 = key.trim().parse().map_err(|_| {
                CoordinatorError::Config(format!(
                    "peers: `{key}` is not a node id (expected a number, e.g. 1 = \"http://10.0.0.1:7000\")"
                ))
            })?;
            peers.insert(id, address);
        }
        let config = CoordinatorConfig {
            peers,
            join: self.join.unwrap_or(false),
            node_id: self.node_id.unwrap_or(1),
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7000))),
            data_dir: self.data_dir.ok_or_else(|| {
                CoordinatorError::Config(
                    "data_dir: required (set it in the config file or pass --data-dir)".into(),
                )
            })?,
            forget_agents_after: self
                .forget_agents_after
                .unwrap_or(crate::agents::FORGET_DISCONNECTED_AFTER),
            remove_unhealthy_after: self
                .remove_unhealthy_after
                .unwrap_or(REMOVE_UNHEALTHY_AFTER),
        };
        config.validate()?;
        Ok(config)
    }
}

impl CoordinatorConfig {
    /// Node 1 on a free loopback port with its data in `data_dir` and default settings: for
    /// the demo and tests.
    pub fn on_loopback(data_dir: PathBuf) -> CoordinatorConfig {
        CoordinatorConfig {
            node_id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: BTreeMap::new(),
            join: false,
            data_dir,
            forget_agents_after: crate::agents::FORGET_DISCONNECTED_AFTER,
            remove_unhealthy_after: REMOVE_UNHEALTHY_AFTER,
        }
    }

    /// Checks the fields.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        if self.node_id == 0 {
            return Err(CoordinatorError::Config(
                "node_id: must be at least 1 (raft reserves 0)".into(),
            ));
        }
        for (id, address) in &self.peers {
            if *id == 0 {
                return Err(CoordinatorError::Config(
                    "peers: node id 0 is reserved by raft; number members from 1".into(),
                ));
            }
            check_peer_address(address)
                .map_err(|e| CoordinatorError::Config(format!("peers: node {id}: {e}")))?;
        }
        if !self.peers.is_empty() && !self.join && !self.peers.contains_key(&self.node_id) {
            return Err(CoordinatorError::Config(format!(
                "peers: must include this node (node_id {}) with its own address",
                self.node_id
            )));
        }
        if self.join && !self.peers.keys().any(|id| *id != self.node_id) {
            return Err(CoordinatorError::Config(
                "join: name at least one running member in peers, e.g. --peers 1=http://10.0.0.1:7000".into(),
            ));
        }
        if self.remove_unhealthy_after < Duration::from_secs(1) {
            return Err(CoordinatorError::Config(format!(
                "remove_unhealthy_after: must be at least 1s, got {}",
                humantime::format_duration(self.remove_unhealthy_after)
            )));
        }
        Ok(())
    }
}

/// Checks a member's gRPC address: `http://HOST:PORT`, nothing after the port.
pub fn check_peer_address(address: &str) -> Result<(), String> {
    let rest = address
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{address}` must start with http://, e.g. http://10.0.0.1:7000"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` has no port, e.g. http://10.0.0.1:7000"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!(
            "`{address}` has no host, e.g. http://10.0.0.1:7000"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "`{address}`: the port must be a number from 1 to 65535, with nothing after it"
        )),
    }
}

impl CoordinatorConfig {
    /// The voters of a brand-new group: the peers, this node alone, or none when joining.
    pub fn initial_voters(&self) -> Vec<u64> {
        match (self.join, self.peers.is_empty()) {
            (true, _) => Vec::new(),
            (false, true) => vec![self.node_id],
            (false, false) => self.peers.keys().copied().collect(),
        }
    }

    /// The address book to start from: the peers, and this node's own address (its entry in
    /// the peers, else its listen address).
    fn address_book(&self, bound: SocketAddr) -> AddressBook {
        let mut book = self.peers.clone();
        book.entry(self.node_id)
            .or_insert_with(|| format!("http://{bound}"));
        AddressBook::new(book)
    }
}

/// Why a coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Invalid settings.
    #[error("invalid coordinator config: {0}")]
    Config(String),
    /// The data directory could not be opened.
    #[error("cannot open the data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// The data directory's files are damaged or foreign.
    #[error(
        "the data directory {path} is corrupted or was written by another program ({detail}): \
         restore it from a backup, or move it aside to start an empty node"
    )]
    CorruptDataDir {
        /// The directory.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The raft node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs a coordinator until `shutdown` fires. `ready` receives the bound address once the server
/// accepts connections.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| CoordinatorError::DataDir {
        path: config.data_dir.clone(),
        reason: e.to_string(),
    })?;
    let corrupt = |detail: String| CoordinatorError::CorruptDataDir {
        path: config.data_dir.clone(),
        detail,
    };
    let db = storage::open_db(
        &config.data_dir.join("raft.sled"),
        std::time::Duration::from_secs(2),
    )
    .map_err(|e| match e {
        OpenDbError::Damaged(detail) => corrupt(detail),
        e @ (OpenDbError::Locked(_) | OpenDbError::Io(_)) => CoordinatorError::DataDir {
            path: config.data_dir.clone(),
            reason: e.to_string(),
        },
    })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen,
            source,
        })?;

    let node_shutdown = CancellationToken::new();
    // Reading the stored state is where damage beyond sled's own checks shows: every error
    // (and any panic of sled or raft-rs on what it read) here is about the files.
    let book = config.address_book(addr);
    let node_config = NodeConfig {
        id: config.node_id,
        initial_voters: config.initial_voters(),
        snapshot_every: SNAPSHOT_EVERY,
        book: book.clone(),
        election_timeout_ticks: None,
    };
    let (reports, reports_rx) = tokio::sync::mpsc::unbounded_channel();
    let transport =
        PeerTransport::new(config.node_id, book.clone(), reports, node_shutdown.clone());
    let (node, raft) = storage::contain_panic(|| RaftNode::open(&db, &node_config, transport))
        .map_err(|panic| corrupt(format!("reading the raft state panicked: {panic}")))?
        .map_err(|e| corrupt(e.to_string()))?;
    let node_task = tokio::spawn(node.with_reports(reports_rx).run(node_shutdown.clone()));
    let shared = Shared {
        raft: raft.clone(),
        metrics: Arc::new(Mutex::new(MetricsStore::new(MAX_TRIGGER_WINDOW))),
        agents: Arc::new(AgentRegistry::default()),
        live: Arc::new(Mutex::new(HashMap::new())),
        wake: Arc::new(Notify::new()),
    };
    let tasks = CancellationToken::new();
    let control_task = tokio::spawn(control::run(shared.clone(), tasks.clone()));
    let push_task = tokio::spawn(push_desired(
        shared.clone(),
        config.forget_agents_after,
        tasks.clone(),
    ));
    let upstreams_task = tokio::spawn(reconcile_upstreams(
        shared.clone(),
        config.remove_unhealthy_after,
        tasks.clone(),
    ));

    let sessions = tokio_util::task::TaskTracker::new();
    let raft_api = RaftApi::new(raft.clone(), book.clone());
    let api = Api::new(shared, shutdown.clone(), sessions.clone()).with_addresses(book.clone());
    tracing::info!(%addr, node_id = config.node_id, peers = book.all().len(), data_dir = %config.data_dir.display(), "coordinator listening");
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }
    let server = tonic::transport::Server::builder()
        // Ping every connection that is quiet for 5 s and drop it when a ping goes unanswered
        // for 10 s: a partitioned agent sends nothing and a half-open TCP connection never
        // ends by itself, so without this a cut-off agent stayed listed as connected for as
        // long as the partition lasted (found by tests/fleet.rs).
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(
            AgentServiceServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(ControlServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(
            RaftServiceServer::new(raft_api)
                .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled());
    let served = server.await;

    sessions.close();
    sessions.wait().await;
    tasks.cancel();
    let _ = control_task.await;
    let _ = push_task.await;
    let _ = upstreams_task.await;
    node_shutdown.cancel();
    let node_result = node_task.await;
    db.flush().ok();
    served?;
    match node_result {
        Ok(result) => result?,
        Err(join) => tracing::error!(error = %join, "raft node task panicked"),
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// On the leader, once a second: for every service a connected balancer carries, commits the
/// upstream membership the inventory calls for when it differs from the committed one
/// ([`crate::inventory::target_membership`]; docs/fleet.md). Each change is a `SetUpstreams`
/// command, so it is an event in the service's history and a new generation for its balancers.
async fn reconcile_upstreams(shared: Shared, remove_after: Duration, shutdown: CancellationToken) {
    let mut leader_since: Option<crate::rollout::Millis> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let view = shared.raft.view();
        if view.role != crate::raft::Role::Leader {
            leader_since = None;
            continue;
        }
        let now = control::now_millis();
        let since = *leader_since.get_or_insert(now);
        for service in shared.agents.balanced_services() {
            let instances = shared.agents.instances(&service, now);
            let committed = view
                .registry
                .services
                .get(&service)
                .and_then(|s| s.upstreams.as_deref());
            let Some((members, reason)) = crate::inventory::target_membership(
                &instances,
                committed,
                remove_after,
                now,
                since,
            ) else {
                continue;
            };
            tracing::info!(%service, %reason, "changing upstreams");
            let command = crate::rollout::Command::SetUpstreams {
                service: service.clone(),
                members,
                reason,
                at: now,
            };
            if let Err(e) = shared.raft.propose(command).await {
                tracing::warn!(%service, error = %e, "upstream change not committed");
            }
        }
    }
}

/// Pushes desired state to agents whenever the applied registry changes.
///
/// Also forgets agents disconnected for longer than `forget_after`, checked once a minute.
async fn push_desired(shared: Shared, forget_after: Duration, shutdown: CancellationToken) {
    let mut view = shared.raft.subscribe();
    let mut last_forget = control::now_millis();
    loop {
        let registry = view.borrow_and_update().registry.clone();
        let now = control::now_millis();
        shared.agents.push_desired(&registry, now);
        if now - last_forget >= 60_000 {
            shared.agents.forget_disconnected(forget_after, now);
            last_forget = now;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
            // Retries sends that found a full channel (agents retry failed applies themselves).
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_data_dir_is_required() {
        let file =
            CoordinatorSettings::from_toml("node_id = 3\nlisten = \"127.0.0.1:7100\"\n").unwrap();
        let err = file.clone().resolve().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid coordinator config: data_dir: required (set it in the config file or pass --data-dir)"
        );
        let config = file
            .merge(CoordinatorSettings {
                data_dir: Some("/tmp/x".into()),
                node_id: Some(4),
                ..CoordinatorSettings::default()
            })
            .resolve()
            .unwrap();
        assert_eq!(config.node_id, 4);
        assert_eq!(config.listen, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn bad_files_are_named_errors() {
        let e = CoordinatorSettings::from_toml("node_id = 1\nlistne = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `listne`"), "{e}");
        let e = CoordinatorSettings::from_toml("listen = \"not an address\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
        let zero = CoordinatorSettings {
            node_id: Some(0),
            data_dir: Some("/tmp/x".into()),
            ..CoordinatorSettings::default()
        };
        assert!(zero.resolve().unwrap_err().to_string().contains("node_id"));
    }

    fn with_peers(node_id: u64, peers: &[(&str, &str)], join: bool) -> CoordinatorSettings {
        CoordinatorSettings {
            node_id: Some(node_id),
            data_dir: Some("/tmp/x".into()),
            peers: Some(
                peers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            join: Some(join),
            ..CoordinatorSettings::default()
        }
    }

    #[test]
    fn peers_give_the_initial_voters_and_joining_starts_with_none() {
        let peers = [
            ("1", "http://a:7000"),
            ("2", "http://b:7000"),
            ("3", "http://c:7000"),
        ];
        let config = with_peers(2, &peers, false).resolve().unwrap();
        assert_eq!(config.initial_voters(), [1, 2, 3]);
        let config = with_peers(4, &peers, true).resolve().unwrap();
        assert!(config.initial_voters().is_empty());
        let alone = CoordinatorSettings {
            node_id: Some(5),
            data_dir: Some("/tmp/x".into()),
            ..CoordinatorSettings::default()
        };
        assert_eq!(alone.resolve().unwrap().initial_voters(), [5]);
        let file = CoordinatorSettings::from_toml(
            "node_id = 1\ndata_dir = \"/d\"\n[peers]\n1 = \"http://a:1\"\n2 = \"http://b:2\"\n",
        )
        .unwrap();
        assert_eq!(file.resolve().unwrap().peers.len(), 2);
    }

    #[test]
    fn bad_peers_are_refused_naming_the_problem() {
        /// (node_id, peers, join, what the error says)
        type Case<'a> = (u64, &'a [(&'a str, &'a str)], bool, &'a str);
        let cases: &[Case] = &[
            (
                1,
                &[("x", "http://a:1")],
                false,
                "peers: `x` is not a node id",
            ),
            (1, &[("0", "http://a:1")], false, "node id 0 is reserved"),
            (
                1,
                &[("1", "a:1")],
                false,
                "peers: node 1: `a:1` must start with http://",
            ),
            (1, &[("1", "http://a")], false, "has no port"),
            (
                1,
                &[("1", "http://a:1/x")],
                false,
                "the port must be a number",
            ),
            (1, &[("1", "http://:1")], false, "has no host"),
            (
                3,
                &[("1", "http://a:1"), ("2", "http://b:1")],
                false,
                "must include this node (node_id 3)",
            ),
            (
                3,
                &[("3", "http://c:1")],
                true,
                "join: name at least one running member",
            ),
        ];
        for (node_id, peers, join, needle) in cases {
            let err = with_peers(*node_id, peers, *join)
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{peers:?}: {err}");
        }
    }
}
