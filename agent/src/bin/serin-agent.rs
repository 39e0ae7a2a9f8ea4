//! `serin-agent`: the agent alone, for hosts where memory is tight.
//!
//! `serin agent run` runs the same agent from the all-in-one `serin` binary; this binary leaves
//! out the coordinator, raft, CLI and demo code, so far fewer code pages are resident (see
//! docs/benchmarks.md: about 9-11 MiB instead of 14 MiB). It runs on a current-thread tokio
//! runtime: the agent's work is a scrape per instance and a report per interval.
//!
//! ```text
//! serin-agent run --config /etc/serin/agent.toml [--coordinator http://10.0.0.1:7000,...]
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use serin_agent::config::{AgentConfig, ConfigOverrides};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
serin-agent: run the serin agent of this host until SIGINT/SIGTERM

Usage: serin-agent run --config FILE [--coordinator ADDR[,ADDR...]]

Options:
  --config FILE          agent config (see deploy/agent.toml)
  --coordinator ADDRS    coordinator address(es), comma-separated; overrides the config's
                         `coordinators` (default: $SERIN_COORDINATOR when set)
  -h, --help             print this help
  -V, --version          print the version

The same agent runs as `serin agent run` from the all-in-one serin binary.";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Invocation {
    Help,
    Version,
    Run {
        config: PathBuf,
        coordinators: Option<Vec<String>>,
    },
}

fn parse(args: &[String], env_coordinator: Option<String>) -> Result<Invocation, String> {
    match args.first().map(String::as_str) {
        None => return Err("missing command: expected `run`".into()),
        Some("-h" | "--help" | "help") => return Ok(Invocation::Help),
        Some("-V" | "--version") => return Ok(Invocation::Version),
        Some("run") => {}
        Some(other) => return Err(format!("unknown command '{other}': expected `run`")),
    }
    let mut config = None;
    let mut coordinators = env_coordinator.filter(|s| !s.is_empty());
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| rest.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--config" => config = Some(PathBuf::from(value()?)),
            "--coordinator" => coordinators = Some(value()?),
            "-h" | "--help" => return Ok(Invocation::Help),
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    Ok(Invocation::Run {
        config: config.ok_or("--config FILE is required")?,
        coordinators: coordinators.map(|c| c.split(',').map(|s| s.trim().to_owned()).collect()),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, coordinators) = match parse(&args, std::env::var("SERIN_COORDINATOR").ok()) {
        Ok(Invocation::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("serin-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Run {
            config,
            coordinators,
        }) => (config, coordinators),
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SERIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(serin_agent::logs::stderr_ansi())
        .init();
    let cfg = match AgentConfig::load_with(&config, &ConfigOverrides { coordinators }) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let signals = tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = token.cancelled() => {}
            }
            token.cancel();
        });
        let result = serin_agent::runtime::run(cfg, stop.clone()).await;
        stop.cancel();
        let _ = signals.await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", serin_agent::error::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn run_needs_a_config_and_takes_coordinators() {
        assert_eq!(
            parse(&args(&["run", "--config", "a.toml"]), None),
            Ok(Invocation::Run {
                config: "a.toml".into(),
                coordinators: None
            })
        );
        assert_eq!(
            parse(
                &args(&[
                    "run",
                    "--config=a.toml",
                    "--coordinator",
                    "http://x:1,http://y:2"
                ]),
                Some("http://env:3".into())
            ),
            Ok(Invocation::Run {
                config: "a.toml".into(),
                coordinators: Some(vec!["http://x:1".into(), "http://y:2".into()])
            })
        );
        // The environment is the default for --coordinator.
        assert_eq!(
            parse(
                &args(&["run", "--config", "a.toml"]),
                Some("http://env:3".into())
            ),
            Ok(Invocation::Run {
                config: "a.toml".into(),
                coordinators: Some(vec!["http://env:3".into()])
            })
        );
    }

    #[test]
    fn bad_command_lines_are_named() {
        assert_eq!(
            parse(&args(&["run"]), None),
            Err("--config FILE is required".into())
        );
        assert_eq!(
            parse(&args(&["run", "--config"]), None),
            Err("--config needs a value".into())
        );
        assert_eq!(
            parse(&args(&["start"]), None),
            Err("unknown command 'start': expected `run`".into())
        );
        assert_eq!(
            parse(&args(&["run", "--confg", "x"]), None),
            Err("unknown option '--confg'".into())
        );
        assert_eq!(parse(&args(&["--help"]), None), Ok(Invocation::Help));
        assert!(parse(&args(&[]), None).is_err());
    }
}
