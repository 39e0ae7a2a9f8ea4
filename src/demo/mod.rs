//! `serin demo`: real rollouts on the fleet shape serin is for, on one machine, shown live and
//! checked.
//!
//! The shape ([`fleet`]): a coordinator group of three processes ([`cluster`]), a balancer host running nginx and a
//! balancer-only agent, and six app hosts, each on its own loopback address with its own
//! `serin demo-app` and its own `serin agent` process that declares and scrapes only that
//! host's instance. The balancer's upstreams come from the coordinator's inventory, as on a
//! real fleet. Then ([`scenario`]):
//! 1. `web` v1.0.0 → v1.1.0, a good canary, through 1 → 5 → 25 → 50 → 100 % to promotion;
//!    at 25 % the coordinator leader is SIGKILLed: another member is elected, the agents and
//!    the demo follow it, the killed member is restarted, and the rollout carries on;
//! 2. `api` v2.3.0 → v2.4.0: at 25 % the canary fails half its requests; serin must roll it
//!    back by itself and the balancer must stop sending it traffic;
//! 3. a stable `api` host dies; the coordinator must take it out of the upstream after
//!    `remove_unhealthy_after` (3 s here) and traffic must keep flowing with no failure;
//! 4. `worker` v3.0.0 → v3.1.0 with the hosts model: serin starts the workers itself;
//! 5. `bot` v5.0.0 → v5.1.0 with the shards model ([`bots`]): serin starts the bots and moves
//!    the demo gateway's 16 shards to the canary bot and back to the replaced stable bots.
//!
//! Finally ([`verify`]) the coordinator's per-variant counts are compared with what the load
//! generator received, and the split through the balancer with each stage's weight. The exit
//! code is 0 only when every check held. Every child process is killed on exit, on error and
//! on Ctrl-C.

mod bots;
mod cluster;
mod fleet;
mod load;
mod scenario;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serin_agent::nginx::find_nginx;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The coordinator's `remove_unhealthy_after` in the demo (30 s by default), so a dead host
/// leaves the upstream within seconds.
pub const REMOVE_UNHEALTHY_AFTER: Duration = Duration::from_secs(3);

/// Options of `serin demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Minimum observation time of each stage, in seconds (1 to 600).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub stage_seconds: u64,
    /// Requests per second sent through the balancer to each service (1 to 2000).
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub rps: u32,
    /// Keep the demo's files (configs, logs, raft data) in this directory instead of a
    /// temporary one (a temporary one is kept too when the demo fails).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Install nginx with apt-get when it is missing (needs root).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub install_nginx: bool,
}

/// Runs the demo; exit 0 only when every verification held (see the module docs), 130 when
/// interrupted.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let nginx_binary = ensure_nginx(args.install_nginx).await?;
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            temp = None;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new().prefix("serin-demo-").tempdir()?;
            let path = t.path().to_owned();
            temp = Some(t);
            path
        }
    };
    say(
        "serin demo — runs the fleet shape: one agent process per host (a balancer, six app hosts, three worker hosts, three bot hosts and their gateway)",
    );
    say(&format!("files in {}", dir.display()));

    let stop = CancellationToken::new();
    let interrupted = interrupt_token();
    let mut tasks: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    // Dropping the scenario (interrupted) drops the fleet, which kills every child process.
    let result = tokio::select! {
        r = scenario::run(&args, &dir, &nginx_binary, &stop, &mut tasks) => Some(r),
        () = interrupted.cancelled() => None,
    };
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let keep = |temp: Option<tempfile::TempDir>| {
        if let Some(t) = temp {
            say(&format!("files kept in {}", t.keep().display()));
        }
    };
    match result {
        None => {
            say("interrupted: every process of the demo was stopped");
            Ok(ExitCode::from(130))
        }
        Some(Err(e)) => {
            keep(temp);
            Err(e)
        }
        Some(Ok(ok)) => {
            if !ok {
                keep(temp);
            }
            say(&format!(
                "demo finished in {elapsed:.0} s{}",
                if elapsed > 180.0 {
                    " (longer than the 3 minutes it should take: is the machine busy?)"
                } else {
                    ""
                }
            ));
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM.
fn interrupt_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = tokio::signal::ctrl_c().await;
            t.cancel();
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

/// One line of the demo's output.
fn say(line: &str) {
    println!("{line}");
}

/// Finds nginx, installing Debian's package when allowed and possible.
async fn ensure_nginx(install: bool) -> anyhow::Result<PathBuf> {
    if let Some(p) = find_nginx() {
        return Ok(p);
    }
    let can_install = install && Path::new("/usr/bin/apt-get").exists() && is_root();
    if !can_install {
        bail!(
            "nginx is not installed. Install Debian's package first: `sudo apt-get install -y nginx` (or nginx-light)"
        );
    }
    say("nginx not found: installing Debian's nginx package (apt-get install -y nginx-light)…");
    for args in [
        vec!["update", "-qq"],
        vec!["install", "-y", "-qq", "nginx-light"],
    ] {
        let status = tokio::process::Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await
            .context("running apt-get")?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed ({status}); install nginx by hand",
                args.join(" ")
            );
        }
    }
    find_nginx().context("nginx still not found after installing it")
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The demo's strategy: the classic five stages with short observation times.
pub fn demo_strategy(stage_seconds: u64) -> String {
    let mut s = String::from("# Written by `serin demo`: five stages, short observation times.\n");
    for w in [1, 5, 25, 50, 100] {
        s.push_str(&format!(
            "\n[[stages]]\nweight = {w}\nmin_duration = \"{stage_seconds}s\"\n"
        ));
    }
    s.push_str(
        r#"
# The canary's error rate may not exceed stable's by more than 2x (plus 1 point of slack).
[[checks]]
name = "error-rate-vs-stable"
metric = "error_rate"
max_ratio = 2.0
slack = 0.01
min_requests = 10

# Absolute latency ceiling.
[[checks]]
name = "p95-latency"
metric = "latency_p95"
max = 200
min_requests = 10

# The split itself: the canary's share of requests within half of the stage's weight either
# way; a canary that crashes, or routing gone wrong, fails here (4 standard errors outside).
[[checks]]
name = "traffic-split"
metric = "canary_share"
tolerance = 0.5
min_requests = 100

# A canary failing more than 20% of requests over 3 s is rolled back at once.
[[triggers]]
name = "canary-error-spike"
metric = "error_rate"
max = 0.2
window = "3s"
min_requests = 10
severity = "critical"
"#,
    );
    s
}

/// The worker rollout's strategy: the hosts model (a third, two thirds, then all of the worker
/// hosts run the new version in place), the worker started and stopped by command templates
/// that run `serin` (at `serin`) with pid files and logs in `workers_dir`, and a trigger on the
/// worker's own failure counter.
pub fn worker_strategy(serin: &Path, workers_dir: &Path, stage_seconds: u64) -> String {
    let (serin, dir) = (serin.display(), workers_dir.display());
    let mut s = String::from(
        "# Written by `serin demo`: serin deploys the worker versions itself (hosts model).\n",
    );
    for w in [33, 66, 100] {
        s.push_str(&format!(
            "\n[[stages]]\nweight = {w}\nmin_duration = \"{stage_seconds}s\"\n"
        ));
    }
    s.push_str(&format!(
        r#"
# More than 10% failed jobs over 3 s rolls back at once.
[[triggers]]
name = "job-failures"
metric = "error_rate"
max = 0.1
window = "3s"
min_requests = 20

[deploy]
model = "hosts"
health_path = "/healthz"
health_timeout = "15s"

[deploy.command]
start = "setsid {serin} demo-worker --host {{host}} --port {{port}} --version {{version}} > {dir}/{{instance}}-{{version}}.log 2>&1 < /dev/null & echo $! > {dir}/{{instance}}.pid"
stop = "pid=$(cat {dir}/{{instance}}.pid) && kill $pid && while kill -0 $pid 2>/dev/null; do sleep 0.05; done; rm -f {dir}/{{instance}}.pid"
timeout = "10s"
"#
    ));
    s
}

/// Shards of the demo bot, session start buckets, and the least time between two starts in
/// a bucket (the demo gateway's rules; Discord's interval is 5 s).
pub const BOT_SHARDS: u32 = 16;
/// See [`BOT_SHARDS`].
pub const BOT_BUCKETS: u32 = 4;
/// See [`BOT_SHARDS`].
pub const BOT_START_INTERVAL: Duration = Duration::from_secs(1);

/// The bot rollout's strategy: the shards model (a quarter, half, then all of the
/// [`BOT_SHARDS`] gateway shards move to the canary bot, paced by the gateway's start limit),
/// the bots started and stopped by command templates that run `serin` with pid files and logs
/// in `bots_dir`, and a trigger on the bot's failed events.
pub fn bot_strategy(serin: &Path, bots_dir: &Path, gateway: &str, stage_seconds: u64) -> String {
    let (serin, dir) = (serin.display(), bots_dir.display());
    let mut s = String::from(
        "# Written by `serin demo`: serin moves the bot's gateway shards itself (shards model).\n",
    );
    for w in [25, 50, 100] {
        s.push_str(&format!(
            "\n[[stages]]\nweight = {w}\nmin_duration = \"{stage_seconds}s\"\n"
        ));
    }
    s.push_str(&format!(
        r#"
# More than 10% failed guild events over 3 s rolls back at once.
[[triggers]]
name = "event-failures"
metric = "error_rate"
max = 0.1
window = "3s"
min_requests = 20

[deploy]
model = "shards"
health_path = "/healthz"
health_timeout = "15s"

[deploy.shards]
count = {BOT_SHARDS}
max_concurrency = {BOT_BUCKETS}
start_interval = "{interval}ms"

[deploy.command]
start = "setsid {serin} demo-bot --host {{host}} --port {{port}} --version {{version}} --gateway {gateway} --shard-count {{shard_count}} --name {{instance}}-{{version}} > {dir}/{{instance}}-{{version}}.log 2>&1 < /dev/null & echo $! > {dir}/{{instance}}.pid"
stop = "pid=$(cat {dir}/{{instance}}.pid) && kill $pid && while kill -0 $pid 2>/dev/null; do sleep 0.05; done; rm -f {dir}/{{instance}}.pid"
timeout = "10s"
"#,
        interval = BOT_START_INTERVAL.as_millis(),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_strategy_is_valid_for_every_stage_time() {
        for seconds in [1, 6, 60] {
            let text = demo_strategy(seconds);
            let strategy = serin_coordinator::strategy::Strategy::from_toml(&text)
                .unwrap_or_else(|e| panic!("{seconds}s: {e:?}\n{text}"));
            assert_eq!(strategy.stages.len(), 5);
        }
    }

    #[test]
    fn the_worker_strategy_is_a_valid_hosts_rollout_with_one_then_two_then_three_of_three_hosts() {
        let text = worker_strategy(Path::new("/usr/bin/serin"), Path::new("/tmp/w"), 5);
        let strategy = serin_coordinator::strategy::Strategy::from_toml(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let deploy = strategy.deploy.expect("[deploy]");
        assert_eq!(
            deploy.model,
            serin_coordinator::strategy::DeployModel::Hosts
        );
        let hosts: Vec<usize> = strategy
            .stages
            .iter()
            .map(|s| serin_coordinator::deploy::canary_hosts(3, s.weight))
            .collect();
        assert_eq!(hosts, [1, 2, 3]);
    }

    #[test]
    fn the_bot_strategy_is_a_valid_shards_rollout_of_four_then_eight_then_sixteen_shards() {
        let text = bot_strategy(
            Path::new("/usr/bin/serin"),
            Path::new("/tmp/b"),
            "http://127.0.1.40:7400",
            4,
        );
        let strategy = serin_coordinator::strategy::Strategy::from_toml(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let deploy = strategy.deploy.expect("[deploy]");
        assert_eq!(
            deploy.model,
            serin_coordinator::strategy::DeployModel::Shards
        );
        let shards = deploy.shards.expect("[deploy.shards]");
        assert_eq!(shards.count, BOT_SHARDS);
        assert_eq!(shards.max_concurrency, Some(BOT_BUCKETS));
        assert_eq!(shards.start_interval, BOT_START_INTERVAL);
        let canary: Vec<usize> = strategy
            .stages
            .iter()
            .map(|s| serin_coordinator::deploy::canary_hosts(BOT_SHARDS as usize, s.weight))
            .collect();
        assert_eq!(canary, [4, 8, 16]);
    }
}
