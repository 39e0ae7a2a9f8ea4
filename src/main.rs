//! `serin`: the operator's CLI, which also runs the coordinator, the agent, the demo service and
//! the demo. This file only parses arguments and wires the libraries together.
#![forbid(unsafe_code)]

mod cli;
mod demo;
mod demo_app;
mod demo_bot;
mod demo_gateway;
mod demo_worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serin_agent::config::{AgentConfig, ConfigOverrides};
use serin_coordinator::server::CoordinatorSettings;
use tokio_util::sync::CancellationToken;

/// Progressive delivery for fleets that do not run Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "serin", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a coordinator node.
    Coordinator {
        #[command(subcommand)]
        command: CoordinatorCommand,
    },
    /// Run the agent of this host.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Start, watch and steer rollouts.
    Rollout {
        #[command(subcommand)]
        command: cli::rollout::RolloutCommand,
    },
    /// See and change the coordinator group: members, leader, each member's lag.
    Cluster {
        #[command(subcommand)]
        command: cli::cluster::ClusterCommand,
    },
    /// Work with strategy files.
    Strategy {
        #[command(subcommand)]
        command: cli::strategy::StrategyCommand,
    },
    /// Run the demo HTTP service (stable or canary instance of a fake app).
    DemoApp(demo_app::DemoAppArgs),
    /// Run the demo queue worker (no HTTP traffic; judged on its job counters).
    DemoWorker(demo_worker::DemoWorkerArgs),
    /// Run the demo sharded bot: serves the shards it is given (SHARD_IDS, then
    /// PUT /__serin/shards), started through a demo gateway.
    DemoBot(demo_bot::DemoBotArgs),
    /// Run the demo gateway: Discord's session start limiter and shard books, for demo bots.
    DemoGateway(demo_gateway::DemoGatewayArgs),
    /// Run a full demo on loopback: a good canary promoted, a bad one rolled back.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand, Debug)]
enum CoordinatorCommand {
    /// Run a coordinator until SIGINT/SIGTERM.
    ///
    /// Example: serin coordinator run --data-dir /var/lib/serin --listen 0.0.0.0:7000
    ///
    /// A group of three: on each machine, its own --node-id and --listen and the same
    /// --peers 1=http://10.0.0.1:7000,2=http://10.0.0.2:7000,3=http://10.0.0.3:7000
    Run {
        /// TOML config file (node_id, listen, data_dir, [peers], join); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The members of a new group, this node included: ID=http://HOST:PORT,… (read
        /// when the data directory is new; membership is in the log after that).
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Option<Vec<(String, String)>>,
        /// Join a running group: start with no membership; the leader adds this node with
        /// `serin cluster add ID ADDRESS`. --peers names at least one running member.
        #[arg(long)]
        join: bool,
        /// Raft node id (non-zero).
        #[arg(long)]
        node_id: Option<u64>,
        /// gRPC listen address for agents and operators.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory for the raft log and state.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Run the agent until SIGINT/SIGTERM.
    ///
    /// Example: serin agent run --config /etc/serin/agent.toml
    Run {
        /// Agent config file (see deploy/agent.toml).
        #[arg(long)]
        config: PathBuf,
        /// Coordinator address(es), comma-separated; overrides the config's `coordinators`.
        #[arg(long, env = "SERIN_COORDINATOR", value_delimiter = ',')]
        coordinator: Option<Vec<String>>,
    },
    /// List the agents the coordinator knows: connected or not, the generation each applied,
    /// its instances and the last error it reported.
    ///
    /// Example: serin agent list --json
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show the fleet by service instead: each service's instances by variant and host,
        /// whether each is in the balancers' upstreams, the balancers and what each applied,
        /// and the latest upstream changes.
        #[arg(long)]
        services: bool,
        #[command(flatten)]
        coordinator: cli::CoordinatorArgs,
    },
    /// Remove a disconnected agent from the list now (the coordinator forgets agents
    /// disconnected for longer than its `forget_agents_after`, 1 hour by default).
    ///
    /// Example: serin agent forget host-7
    Forget {
        /// The agent's name.
        name: String,
        #[command(flatten)]
        coordinator: cli::CoordinatorArgs,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SERIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(serin_agent::logs::stderr_ansi())
        .init();
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// `ID=ADDRESS` of `--peers` (the address is checked with the rest of the config).
fn parse_peer(text: &str) -> Result<(String, String), String> {
    let (id, address) = text.split_once('=').ok_or_else(|| {
        format!("`{text}`: expected ID=http://HOST:PORT, e.g. 1=http://10.0.0.1:7000")
    })?;
    Ok((id.trim().to_owned(), address.trim().to_owned()))
}

async fn run_coordinator(command: CoordinatorCommand) -> anyhow::Result<ExitCode> {
    let CoordinatorCommand::Run {
        config,
        peers,
        join,
        node_id,
        listen,
        data_dir,
    } = command;
    let file = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read coordinator config {}", path.display()))?;
            CoordinatorSettings::from_toml(&text)
                .with_context(|| format!("in {}", path.display()))?
        }
        None => CoordinatorSettings::default(),
    };
    let flags = CoordinatorSettings {
        node_id,
        listen,
        peers: peers.map(|p| p.into_iter().collect()),
        join: join.then_some(true),
        data_dir,
        forget_agents_after: None,
        remove_unhealthy_after: None,
    };
    let cfg = file.merge(flags).resolve()?;
    serin_coordinator::server::run(cfg, shutdown_on_signals(), None).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_agent(command: AgentCommand) -> anyhow::Result<ExitCode> {
    let (config, coordinator) = match command {
        AgentCommand::Run {
            config,
            coordinator,
        } => (config, coordinator),
        AgentCommand::List {
            json,
            services: true,
            coordinator,
        } => {
            return cli::fleet::list(json, &coordinator).await;
        }
        AgentCommand::List {
            json, coordinator, ..
        } => {
            return cli::agents::list(json, &coordinator).await;
        }
        AgentCommand::Forget { name, coordinator } => {
            return cli::agents::forget(&name, &coordinator).await;
        }
    };
    let overrides = ConfigOverrides {
        coordinators: coordinator,
    };
    let cfg = AgentConfig::load_with(&config, &overrides)?;
    serin_agent::runtime::run(cfg, shutdown_on_signals()).await?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent runs on one thread: a scrape per instance and a report per interval need no
    // more, and every worker thread costs resident memory on every host.
    let runtime = match cli.command {
        Command::Agent {
            command: AgentCommand::Run { .. },
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Coordinator { command } => {
            init_logging("info,raft=warn");
            run_coordinator(command).await
        }
        Command::Agent { command } => {
            init_logging(if !matches!(command, AgentCommand::Run { .. }) {
                "warn"
            } else {
                "info"
            });
            run_agent(command).await
        }
        Command::Rollout { command } => {
            init_logging("warn");
            cli::rollout::run_rollout(command).await
        }
        Command::Cluster { command } => {
            init_logging("warn");
            cli::cluster::run_cluster(command).await
        }
        Command::Strategy { command } => {
            init_logging("warn");
            cli::strategy::run_strategy(command)
        }
        Command::DemoApp(args) => {
            init_logging("info");
            let stop = shutdown_on_signals();
            demo_app::run(args, stop.cancelled_owned())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::DemoWorker(args) => {
            init_logging("info");
            let stop = shutdown_on_signals();
            demo_worker::run(args, stop.cancelled_owned())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::DemoBot(args) => {
            init_logging("info");
            let stop = shutdown_on_signals();
            demo_bot::run(args, stop.cancelled_owned())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::DemoGateway(args) => {
            init_logging("info");
            let stop = shutdown_on_signals();
            demo_gateway::run(args, stop.cancelled_owned())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            init_logging("warn");
            demo::run(args).await
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
