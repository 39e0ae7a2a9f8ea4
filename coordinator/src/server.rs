//! A running coordinator: the raft node, the control loop and the gRPC server, started together
//! and stopped together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serin_proto::v1::{
    agent_service_server::AgentServiceServer, control_service_server::ControlServiceServer,
};
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::agents::AgentRegistry;
use crate::control::{self, Shared};
use crate::metrics::MetricsStore;
use crate::raft::node::{self, NoPeers, NodeConfig, NodeError};
use crate::service::Api;
use crate::strategy::MAX_TRIGGER_WINDOW;

/// Coordinator settings, from flags or a TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// This node's raft id (non-zero).
    #[serde(default = "default_node_id")]
    pub node_id: u64,
    /// Address of the gRPC server (agents and operators).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the raft log and state live.
    pub data_dir: PathBuf,
}

fn default_node_id() -> u64 {
    1
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000))
}

impl CoordinatorConfig {
    /// Reads a TOML config file.
    pub fn from_toml(text: &str) -> Result<CoordinatorConfig, CoordinatorError> {
        let config: CoordinatorConfig =
            toml::from_str(text).map_err(|e| CoordinatorError::Config(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the fields.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        if self.node_id == 0 {
            return Err(CoordinatorError::Config(
                "node_id: must be at least 1 (raft reserves 0)".into(),
            ));
        }
        Ok(())
    }
}

/// Why a coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Invalid settings.
    #[error("invalid coordinator config: {0}")]
    Config(String),
    /// The data directory could not be opened.
    #[error("cannot open the data directory {path}: {source} (is another coordinator using it?)")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: sled::Error,
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
        source: e.into(),
    })?;
    let db = crate::raft::storage::open_db(
        &config.data_dir.join("raft.sled"),
        std::time::Duration::from_secs(2),
    )
    .map_err(|source| CoordinatorError::DataDir {
        path: config.data_dir.clone(),
        source,
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
    let (raft, node_task) = node::start(
        &db,
        &NodeConfig::single(config.node_id),
        NoPeers,
        node_shutdown.clone(),
    )?;
    let shared = Shared {
        raft: raft.clone(),
        metrics: Arc::new(Mutex::new(MetricsStore::new(MAX_TRIGGER_WINDOW))),
        agents: Arc::new(AgentRegistry::default()),
        live: Arc::new(Mutex::new(HashMap::new())),
        wake: Arc::new(Notify::new()),
    };
    let tasks = CancellationToken::new();
    let control_task = tokio::spawn(control::run(shared.clone(), tasks.clone()));
    let push_task = tokio::spawn(push_desired(shared.clone(), tasks.clone()));

    let sessions = tokio_util::task::TaskTracker::new();
    let api = Api::new(shared, shutdown.clone(), sessions.clone());
    tracing::info!(%addr, node_id = config.node_id, data_dir = %config.data_dir.display(), "coordinator listening");
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }
    let server = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(api.clone()))
        .add_service(ControlServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled());
    let served = server.await;

    sessions.close();
    sessions.wait().await;
    tasks.cancel();
    let _ = control_task.await;
    let _ = push_task.await;
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

/// Pushes desired state to agents whenever the applied registry changes.
async fn push_desired(shared: Shared, shutdown: CancellationToken) {
    let mut view = shared.raft.subscribe();
    loop {
        let registry = view.borrow_and_update().registry.clone();
        shared.agents.push_desired(&registry);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
            // Retries sends that found a full channel, and re-sends failed generations.
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
