//! Failed requests and reloads during 100 weight changes under load: HAProxy, nginx as the
//! agent drove it before the one-reload-per-second limit, and nginx now, side by side
//! (docs/benchmarks.md §8).
//!
//! ```sh
//! cargo build --release --example weight_changes
//! target/release/examples/weight_changes --runs 3 --changes 100
//! ```
//!
//! Per mode and run: two in-process HTTP backends (stable, canary; axum, keep-alive), a
//! private balancer started for the run (`LocalHaproxy` / `LocalNginx`) driven by the
//! agent's real actuator (`HaproxyActuator`: runtime API; `NginxActuator`: render, `nginx -t`,
//! reload, confirm) through the agent's real applier ([`StandaloneApplier`]: generations,
//! pacing, the store, acks), and two `wrk` processes for the whole run: one keep-alive
//! client and one connection-per-request client (`-H "Connection: close"`), each `-t1 -c4`.
//! `--changes` desired states are then handed to the applier `--gap-ms` apart (the canary
//! share cycling 5, 10, 25, 50, 75, 50, 25, 10 %), as a coordinator would send them; once
//! the last one is applied, wrk is stopped with SIGINT 500 ms later. Failed requests =
//! wrk's socket errors (connect, read, write, timeout) + non-2xx answers.
//!
//! Modes: `haproxy`; `nginx-unpaced`, nginx with the actuator's `min_change_interval`
//! overridden to none (the applier as it was before the limit: it coalesced only the states
//! that arrived during an apply); `nginx`, the actuator as shipped (one reload per second).
//! The modes alternate within each run, so they share the machine's conditions. Needs
//! haproxy, nginx and wrk (`apt-get install -y haproxy nginx-light wrk`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serin_agent::actuator::{ActuatorFailure, ActuatorOutcome, TrafficActuator};
use serin_agent::haproxy::{HaproxyActuator, HaproxyService, LocalHaproxy, find_haproxy};
use serin_agent::nginx::{BalancedService, LocalNginx, NginxActuator, find_nginx};
use serin_agent::runtime::StandaloneApplier;
use serin_agent::store::{DesiredState, Generation, LocalStore, ServiceTraffic};
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

/// An actuator as the applier sees it, recording when each change went live and how long
/// its apply took; `unpaced` answers no `min_change_interval` (the applier before the limit).
struct Observed<A> {
    inner: A,
    unpaced: bool,
    /// (when the change went live, how long the apply took), one per `Changed`.
    changes: std::sync::Arc<std::sync::Mutex<Vec<(Instant, Duration)>>>,
}

impl<A: TrafficActuator> TrafficActuator for Observed<A> {
    fn services(&self) -> Vec<String> {
        self.inner.services()
    }

    fn resync_interval(&self) -> Option<Duration> {
        self.inner.resync_interval()
    }

    fn min_change_interval(&self) -> Option<Duration> {
        if self.unpaced {
            None
        } else {
            self.inner.min_change_interval()
        }
    }

    async fn apply(
        &mut self,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> Result<ActuatorOutcome, ActuatorFailure> {
        let started = Instant::now();
        let outcome = self.inner.apply(desired, upstreams).await;
        if let Ok(ActuatorOutcome::Changed { .. }) = outcome {
            self.changes
                .lock()
                .expect("changes lock")
                .push((Instant::now(), started.elapsed()));
        }
        outcome
    }
}

/// One run's numbers.
#[derive(Debug, Clone, Copy)]
struct Run {
    keep_alive: WrkResult,
    per_request: WrkResult,
    /// Changes of live traffic (nginx: reloads) during the run.
    changes_applied: usize,
    /// The most changes that went live within any one second.
    max_per_second: usize,
    /// Median time of one apply that changed traffic.
    apply_median: Duration,
    /// From the first desired state sent to the last one applied.
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

/// The most instants of `times` (sorted) within any window of one second.
fn max_per_second(times: &[Instant]) -> usize {
    let mut max = 0;
    for (i, start) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        max = max.max(within);
    }
    max
}

async fn run_changes<A: TrafficActuator>(
    actuator: A,
    unpaced: bool,
    upstreams: &Upstreams,
    url: &str,
    args: &Args,
) -> anyhow::Result<Run> {
    let store_dir = tempfile::tempdir()?;
    let store = LocalStore::open(store_dir.path())?;
    let changes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let observed = Observed {
        inner: actuator,
        unpaced,
        changes: changes.clone(),
    };
    let mut applier = StandaloneApplier::start(observed, Upstreams::default(), store)?;
    // The upstreams come with each desired state, as from the coordinator's inventory.
    let with_servers = |index: u64, share: u32| {
        let mut d = desired(index, share);
        d.services[0].from_inventory = true;
        d.services[0].servers = upstreams
            .of("web")
            .iter()
            .map(|s| serin_agent::store::UpstreamServer {
                instance: s.name.clone(),
                address: s.address.clone(),
                variant: s.variant,
                weight: 1,
                agent: "bench".into(),
            })
            .collect();
        d
    };
    applier.send(with_servers(1, 0));
    anyhow::ensure!(
        applier.wait_applied(Generation { term: 1, index: 1 }).await,
        "the applier stopped before the first state"
    );
    // Let the first reload settle, and its interval pass, before the load starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut acks = applier.take_acks();
    let keep_alive = Wrk::start(&args.wrk, url, false)?;
    let per_request = Wrk::start(&args.wrk, url, true)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    changes.lock().expect("changes lock").clear();
    let started = Instant::now();
    let last = args.changes as u64 + 1;
    for i in 0..args.changes {
        let share = SHARES[i % SHARES.len()];
        applier.send(with_servers(i as u64 + 2, share));
        acks.extend(applier.take_acks());
        tokio::time::sleep(args.gap).await;
    }
    anyhow::ensure!(
        applier
            .wait_applied(Generation {
                term: 1,
                index: last
            })
            .await,
        "the applier stopped before the last state"
    );
    let changes_took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keep_alive = keep_alive.stop().await?;
    let per_request = per_request.stop().await?;
    acks.extend(applier.take_acks());
    applier.stop().await;
    // Every ack a success, in order, ending with the newest.
    anyhow::ensure!(
        acks.iter().all(|a| a.failures.is_empty()),
        "failed applies: {acks:?}"
    );
    anyhow::ensure!(
        acks.windows(2).all(|w| w[0].generation < w[1].generation),
        "acks out of order: {acks:?}"
    );
    anyhow::ensure!(
        acks.last().map(|a| a.generation.index) == Some(last),
        "the newest state was not the last acked: {acks:?}"
    );
    let changes = changes.lock().expect("changes lock").clone();
    let times: Vec<Instant> = changes.iter().map(|(at, _)| *at).collect();
    let mut applies: Vec<Duration> = changes.iter().map(|(_, took)| *took).collect();
    applies.sort();
    Ok(Run {
        keep_alive,
        per_request,
        changes_applied: changes.len(),
        max_per_second: max_per_second(&times),
        apply_median: applies.get(applies.len() / 2).copied().unwrap_or_default(),
        changes_took,
    })
}

async fn one_run(mode: &str, args: &Args) -> anyhow::Result<Run> {
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
    let run = match mode {
        "haproxy" => {
            let binary = find_haproxy().ok_or_else(|| anyhow::anyhow!("haproxy not installed"))?;
            let haproxy = LocalHaproxy::start(&dir.path().join("haproxy"), &binary).await?;
            let actuator = HaproxyActuator::new(haproxy.settings(vec![HaproxyService {
                service: "web".into(),
                listen: listen.clone(),
                algorithm: None,
            }]))
            .await?;
            let run = run_changes(actuator, false, &upstreams, &url, args).await;
            haproxy.stop().await;
            run?
        }
        _ => {
            let binary = find_nginx().ok_or_else(|| anyhow::anyhow!("nginx not installed"))?;
            let nginx = LocalNginx::start(&dir.path().join("nginx"), &binary).await?;
            let actuator = NginxActuator::new(nginx.settings(vec![BalancedService {
                service: "web".into(),
                listen: listen.clone(),
            }]))
            .await?;
            let run = run_changes(actuator, mode == "nginx-unpaced", &upstreams, &url, args).await;
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

const MODES: [&str; 3] = ["haproxy", "nginx-unpaced", "nginx"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    println!(
        "| mode | run | keep-alive requests | keep-alive failed | per-request requests | per-request failed | changes applied | most in 1 s | {} states took | apply p50 |",
        args.changes
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); MODES.len()];
    for r in 1..=args.runs {
        for (m, mode) in MODES.iter().enumerate() {
            let run = one_run(mode, &args).await?;
            println!(
                "| {mode} | {r} | {} | {} | {} | {} | {} | {} | {:.1} s | {:.1} ms |",
                run.keep_alive.requests,
                run.keep_alive.failed,
                run.per_request.requests,
                run.per_request.failed,
                run.changes_applied,
                run.max_per_second,
                run.changes_took.as_secs_f64(),
                run.apply_median.as_secs_f64() * 1000.0
            );
            runs[m].push(run);
        }
    }
    println!("\nMedians over {} runs:\n", args.runs);
    println!(
        "| mode | keep-alive failed | per-request failed | changes applied | most in 1 s | keep-alive failed per change applied | {} states took |",
        args.changes
    );
    println!("|---|---|---|---|---|---|---|");
    for (mode, runs) in MODES.iter().zip(&runs) {
        let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let per_change = m(&|r| r.keep_alive.failed as f64 / r.changes_applied.max(1) as f64);
        println!(
            "| {mode} | {} | {} | {} | {} | {per_change:.2} | {:.1} s |",
            m(&|r| r.keep_alive.failed as f64),
            m(&|r| r.per_request.failed as f64),
            m(&|r| r.changes_applied as f64),
            m(&|r| r.max_per_second as f64),
            m(&|r| r.changes_took.as_secs_f64()),
        );
    }
    Ok(())
}
