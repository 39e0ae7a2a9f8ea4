//! Failed requests during 100 weight changes under load, HAProxy and nginx side by side
//! (docs/benchmarks.md §8).
//!
//! ```sh
//! cargo build --release --example weight_changes
//! target/release/examples/weight_changes --runs 3 --changes 100
//! ```
//!
//! Per balancer and run: two in-process HTTP backends (stable, canary; axum, keep-alive),
//! a private balancer started for the run (`LocalHaproxy` / `LocalNginx`) driven by the
//! agent's real actuator (`HaproxyActuator`: runtime API; `NginxActuator`: render, `nginx -t`,
//! reload, confirm), and two `wrk` processes for the whole run: one keep-alive client and
//! one connection-per-request client (`-H "Connection: close"`), each `-t1 -c4`. The
//! actuator then applies `--changes` desired states one after the other (the canary share
//! cycling 5, 10, 25, 50, 75, 50, 25, 10 %), `--gap-ms` apart; wrk is stopped with SIGINT
//! 500 ms after the last one. Failed requests = wrk's socket errors (connect, read, write,
//! timeout) + non-2xx answers. Needs haproxy, nginx and wrk (`apt-get install -y haproxy
//! nginx-light wrk`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serin_agent::actuator::TrafficActuator;
use serin_agent::haproxy::{HaproxyActuator, HaproxyService, LocalHaproxy, find_haproxy};
use serin_agent::nginx::{BalancedService, LocalNginx, NginxActuator, find_nginx};
use serin_agent::store::{DesiredState, Generation, ServiceTraffic};
use serin_agent::traffic::{Server, Upstreams, Variant};

const SHARES: [u32; 8] = [5, 10, 25, 50, 75, 50, 25, 10];

struct Args {
    runs: usize,
    changes: usize,
    gap: Duration,
    wrk: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        runs: 3,
        changes: 100,
        gap: Duration::from_millis(50),
        wrk: PathBuf::from("/usr/bin/wrk"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--runs" => args.runs = value()?.parse()?,
            "--changes" => args.changes = value()?.parse()?,
            "--gap-ms" => args.gap = Duration::from_millis(value()?.parse()?),
            "--wrk" => args.wrk = PathBuf::from(value()?),
            other => anyhow::bail!(
                "unknown argument {other:?} (--runs N, --changes N, --gap-ms MS, --wrk PATH)"
            ),
        }
    }
    Ok(args)
}

/// One backend answering every request with its version in `x-serin-version`.
async fn backend(
    version: &'static str,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .fallback(move || async move { ([("x-serin-version", version)], version) });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

/// What one wrk process counted.
#[derive(Debug, Clone, Copy, Default)]
struct WrkResult {
    requests: u64,
    failed: u64,
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    let mut saw_requests = false;
    for line in text.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            result.requests = n.trim().parse()?;
            saw_requests = true;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            for part in errors.split(',') {
                let n = part.split_whitespace().last().unwrap_or("0");
                result.failed += n.parse::<u64>()?;
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.failed += n.trim().parse::<u64>()?;
        }
    }
    anyhow::ensure!(saw_requests, "no request count in wrk's output:\n{text}");
    Ok(result)
}

/// A running wrk, stopped with SIGINT (it then prints its summary).
struct Wrk {
    child: tokio::process::Child,
}

impl Wrk {
    fn start(wrk: &Path, url: &str, close: bool) -> anyhow::Result<Wrk> {
        let mut command = tokio::process::Command::new(wrk);
        command.args(["-t1", "-c4", "-d600s", "--timeout", "5s"]);
        if close {
            command.args(["-H", "Connection: close"]);
        }
        let child = command
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Wrk { child })
    }

    async fn stop(self) -> anyhow::Result<WrkResult> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("wrk exited early"))?;
        tokio::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await?;
        let output = self.child.wait_with_output().await?;
        parse_wrk(&String::from_utf8_lossy(&output.stdout))
    }
}

/// One run's numbers.
#[derive(Debug, Clone, Copy)]
struct Run {
    keep_alive: WrkResult,
    per_request: WrkResult,
    /// Median time of one apply (the actuator's own `Changed` time is not comparable).
    apply_median: Duration,
    /// Wall time of the changes.
    changes_took: Duration,
}

fn desired(index: u64, share: u32) -> DesiredState {
    DesiredState {
        generation: Generation { term: 1, index },
        services: vec![ServiceTraffic {
            service: "web".into(),
            canary_weight: share,
            stable_version: "v1".into(),
            canary_version: "v2".into(),
            rollout_id: "bench".into(),
            ..Default::default()
        }],
    }
}

async fn run_changes<A: TrafficActuator>(
    actuator: &mut A,
    upstreams: &Upstreams,
    url: &str,
    args: &Args,
) -> anyhow::Result<Run> {
    let first = actuator.apply(&desired(1, 0), upstreams).await;
    anyhow::ensure!(first.is_ok(), "first apply: {first:?}");
    // Let the first reload settle before the load starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keep_alive = Wrk::start(&args.wrk, url, false)?;
    let per_request = Wrk::start(&args.wrk, url, true)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut applies = Vec::with_capacity(args.changes);
    for i in 0..args.changes {
        let share = SHARES[i % SHARES.len()];
        let t = Instant::now();
        let result = actuator
            .apply(&desired(i as u64 + 2, share), upstreams)
            .await;
        applies.push(t.elapsed());
        anyhow::ensure!(result.is_ok(), "change {i} to {share}%: {result:?}");
        tokio::time::sleep(args.gap).await;
    }
    let changes_took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keep_alive = keep_alive.stop().await?;
    let per_request = per_request.stop().await?;
    applies.sort();
    Ok(Run {
        keep_alive,
        per_request,
        apply_median: applies[applies.len() / 2],
        changes_took,
    })
}

async fn one_run(balancer: &str, args: &Args) -> anyhow::Result<Run> {
    let (stable, stable_task) = backend("v1").await?;
    let (canary, canary_task) = backend("v2").await?;
    let upstreams: Upstreams = [
        Server {
            name: "stable".into(),
            address: stable.to_string(),
            variant: Variant::Stable,
        },
        Server {
            name: "canary".into(),
            address: canary.to_string(),
            variant: Variant::Canary,
        },
    ]
    .into_iter()
    .map(|s| ("web".to_owned(), s))
    .collect();
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}/");
    let run = match balancer {
        "haproxy" => {
            let binary = find_haproxy().ok_or_else(|| anyhow::anyhow!("haproxy not installed"))?;
            let haproxy = LocalHaproxy::start(&dir.path().join("haproxy"), &binary).await?;
            let mut actuator = HaproxyActuator::new(haproxy.settings(vec![HaproxyService {
                service: "web".into(),
                listen: listen.clone(),
                algorithm: None,
            }]))
            .await?;
            let run = run_changes(&mut actuator, &upstreams, &url, args).await;
            haproxy.stop().await;
            run?
        }
        _ => {
            let binary = find_nginx().ok_or_else(|| anyhow::anyhow!("nginx not installed"))?;
            let nginx = LocalNginx::start(&dir.path().join("nginx"), &binary).await?;
            let mut actuator = NginxActuator::new(nginx.settings(vec![BalancedService {
                service: "web".into(),
                listen: listen.clone(),
            }]))
            .await?;
            let run = run_changes(&mut actuator, &upstreams, &url, args).await;
            nginx.stop().await;
            run?
        }
    };
    stable_task.abort();
    canary_task.abort();
    Ok(run)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    println!(
        "| balancer | run | keep-alive requests | keep-alive failed | per-request requests | per-request failed | {} changes took | apply p50 |",
        args.changes
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for balancer in ["haproxy", "nginx"] {
        let mut runs = Vec::new();
        for r in 1..=args.runs {
            let run = one_run(balancer, &args).await?;
            println!(
                "| {balancer} | {r} | {} | {} | {} | {} | {:.1} s | {:.1} ms |",
                run.keep_alive.requests,
                run.keep_alive.failed,
                run.per_request.requests,
                run.per_request.failed,
                run.changes_took.as_secs_f64(),
                run.apply_median.as_secs_f64() * 1000.0
            );
            runs.push(run);
        }
        let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        summary.push((
            balancer,
            m(&|r| r.keep_alive.failed as f64),
            m(&|r| r.per_request.failed as f64),
            m(&|r| r.changes_took.as_secs_f64()),
            m(&|r| r.apply_median.as_secs_f64() * 1000.0),
        ));
    }
    println!("\nMedians over {} runs:\n", args.runs);
    println!(
        "| balancer | keep-alive failed | per-request failed | {} changes took | apply p50 |",
        args.changes
    );
    println!("|---|---|---|---|---|");
    for (balancer, ka, pr, took, apply) in summary {
        println!("| {balancer} | {ka} | {pr} | {took:.1} s | {apply:.1} ms |");
    }
    Ok(())
}
