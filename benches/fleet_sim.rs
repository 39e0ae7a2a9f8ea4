//! A simulated fleet against a real coordinator process: how long N agents take to connect, and
//! to reconnect after the coordinator restarts; with `--rollout`, what the leader costs with a
//! rollout running (CPU, RSS, report lag, operator call latency) and how fast a hard-down
//! canary's rollback reaches every balancer.
//!
//! ```sh
//! cargo build --release --bin serin --example fleet_sim
//! ulimit -n 65536   # one TCP connection per simulated agent, on both sides
//! target/release/examples/fleet_sim --serin target/release/serin --agents 10000
//! target/release/examples/fleet_sim --serin target/release/serin --agents 10000 --rollout --duration 60
//! ```
//!
//! In `--rollout` mode a tenth of `svc-0`'s instances are canaries, `--balancers` more agents
//! (20 by default) balance `svc-0`, and a rollout of `svc-0` runs at 10% with a critical error
//! trigger. Every agent reports every second at its own phase, with a latency histogram. After
//! `--duration` seconds of measuring, the canaries turn hard-down (every request an error) and
//! the program waits for each balancer to be sent 0% canary.
//!
//! Each simulated agent is what a real one does at the session level: its own TCP connection
//! (its own tonic `Channel`), a `Register` with one instance, then it waits for the first
//! desired state with the agent's 10 s open timeout, and retries after a jittered backoff
//! (100 ms doubling to 5 s) when the open fails or times out. Once connected it sends a small
//! report every second. The coordinator is started (and restarted) by this program as a child
//! process on loopback, so its CPU and memory are its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serin_proto::v1::{
    AgentMessage, Bucket, GetRolloutRequest, HostMetrics, InstanceWindow, ListAgentsRequest,
    Register, Report, StartRolloutRequest, Target, Variant, agent_message::Body,
    agent_service_client::AgentServiceClient, control_service_client::ControlServiceClient,
    coordinator_message,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// The agent's own session-open timeout.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    serin: PathBuf,
    agents: usize,
    services: usize,
    restart: bool,
    rollout: bool,
    duration: Duration,
    balancers: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        serin: PathBuf::from("target/release/serin"),
        agents: 1000,
        services: 10,
        restart: true,
        rollout: false,
        duration: Duration::from_secs(60),
        balancers: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--serin" => args.serin = value().into(),
            "--agents" => args.agents = value().parse().expect("--agents: a number"),
            "--services" => args.services = value().parse().expect("--services: a number"),
            "--no-restart" => args.restart = false,
            "--rollout" => args.rollout = true,
            "--duration" => {
                args.duration = Duration::from_secs(value().parse().expect("--duration: seconds"))
            }
            "--balancers" => args.balancers = value().parse().expect("--balancers: a number"),
            other => panic!("unknown flag {other}; see the module docs"),
        }
    }
    args
}

/// Counters shared by every simulated agent.
#[derive(Default)]
struct Fleet {
    connected: AtomicUsize,
    open_timeouts: AtomicU64,
    open_errors: AtomicU64,
    sessions_lost: AtomicU64,
    changed: Notify,
    /// Set when the canaries turn hard-down.
    hard_down: std::sync::OnceLock<Instant>,
    /// When the first hard-down report was sent.
    first_bad_report: std::sync::OnceLock<Instant>,
    /// Per balancer: how long after the first bad report it was sent 0% canary.
    reactions: std::sync::Mutex<Vec<Duration>>,
}

/// What a simulated agent is.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Stable,
    Canary,
    /// A balancer of `svc-0`, with no instances.
    Balancer,
}

impl Role {
    /// In `--rollout` mode a tenth of `svc-0`'s instances are canaries.
    fn of(i: usize, services: usize, rollout: bool) -> Role {
        if rollout && i.is_multiple_of(services) && (i / services).is_multiple_of(10) {
            Role::Canary
        } else {
            Role::Stable
        }
    }
}

struct Coordinator {
    child: tokio::process::Child,
}

async fn start_coordinator(
    serin: &PathBuf,
    dir: &std::path::Path,
    addr: SocketAddr,
) -> Coordinator {
    let child = tokio::process::Command::new(serin)
        .args([
            "coordinator",
            "run",
            "--listen",
            &addr.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .env("SERIN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the coordinator");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Coordinator { child };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coordinator did not listen on {addr}");
}

impl Coordinator {
    /// SIGTERM, then wait.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }

    fn rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

fn register(i: usize, services: usize, role: Role) -> AgentMessage {
    let variant = match role {
        Role::Canary => Variant::Canary,
        _ => Variant::Stable,
    };
    let (targets, balancer_services) = if role == Role::Balancer {
        (Vec::new(), vec!["svc-0".to_owned()])
    } else {
        let target = Target {
            name: format!("app-{i}"),
            service: format!("svc-{}", i % services),
            variant: variant as i32,
            address: format!("127.0.0.1:{}", 10_000 + i % 50_000),
            ..Target::default()
        };
        (vec![target], Vec::new())
    };
    AgentMessage {
        body: Some(Body::Register(Register {
            agent: match role {
                Role::Balancer => format!("lb-{i:05}"),
                _ => format!("sim-{i:05}"),
            },
            instance_id: format!("sim-instance-{i}"),
            targets,
            balancer_services,
            ..Register::default()
        })),
    }
}

/// A latency histogram of `requests` (cumulative, Prometheus-style bounds in seconds).
fn latency(requests: u64) -> Vec<Bucket> {
    let bounds = [
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        f64::INFINITY,
    ];
    let shares = [0.05, 0.2, 0.5, 0.8, 0.9, 0.97, 0.99, 0.995, 0.999, 1.0];
    bounds
        .iter()
        .zip(shares)
        .map(|(&le, share)| Bucket {
            le,
            count: (requests as f64 * share) as u64,
        })
        .collect()
}

fn report(i: usize, seq: u64, services: usize, role: Role, fleet: &Fleet) -> AgentMessage {
    let variant = match role {
        Role::Canary => Variant::Canary,
        _ => Variant::Stable,
    };
    let requests = 20;
    let errors = if role == Role::Canary && fleet.hard_down.get().is_some() {
        fleet.first_bad_report.get_or_init(Instant::now);
        requests
    } else {
        0
    };
    let instances = if role == Role::Balancer {
        Vec::new()
    } else {
        vec![InstanceWindow {
            instance: format!("app-{i}"),
            service: format!("svc-{}", i % services),
            variant: variant as i32,
            scrape_ok: true,
            requests,
            errors,
            latency: latency(requests),
            latency_sum_seconds: requests as f64 * 0.02,
            ..InstanceWindow::default()
        }]
    };
    AgentMessage {
        body: Some(Body::Report(Report {
            seq,
            interval_ms: 1000,
            host: Some(HostMetrics {
                cpu_percent: 3.0,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 4 << 30,
            }),
            instances,
            workloads: Vec::new(),
        })),
    }
}

/// One simulated agent: connect, hold the session, reconnect when it ends.
async fn agent(i: usize, addr: SocketAddr, services: usize, role: Role, fleet: Arc<Fleet>) {
    let mut backoff = Duration::from_millis(100);
    let mut seq = 0;
    loop {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            let mut client = AgentServiceClient::connect(format!("http://{addr}"))
                .await
                .ok()?;
            let (tx, rx) = mpsc::channel(4);
            tx.send(register(i, services, role)).await.ok()?;
            let mut inbound = client
                .session(ReceiverStream::new(rx))
                .await
                .ok()?
                .into_inner();
            let first = inbound.message().await.ok()??;
            matches!(first.body, Some(coordinator_message::Body::Desired(_)))
                .then_some((inbound, tx))
        })
        .await;
        let (mut inbound, tx) = match opened {
            Ok(Some(session)) => session,
            Ok(None) => {
                fleet.open_errors.fetch_add(1, Ordering::Relaxed);
                sleep_jittered(&mut backoff).await;
                continue;
            }
            Err(_) => {
                fleet.open_timeouts.fetch_add(1, Ordering::Relaxed);
                sleep_jittered(&mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        fleet.connected.fetch_add(1, Ordering::Relaxed);
        fleet.changed.notify_waiters();
        // Each agent reports at its own phase of the second.
        let phase = Duration::from_millis(rand::random_range(0..1000));
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
        let mut reacted = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    if tx.send(report(i, seq, services, role, &fleet)).await.is_err() {
                        break;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if role == Role::Balancer && !reacted {
                            reacted = record_reaction(&message, &fleet);
                        }
                    }
                    _ => break,
                },
            }
        }
        fleet.connected.fetch_sub(1, Ordering::Relaxed);
        fleet.sessions_lost.fetch_add(1, Ordering::Relaxed);
        fleet.changed.notify_waiters();
        sleep_jittered(&mut backoff).await;
    }
}

/// Records a balancer's reaction when `message` sends `svc-0` 0% canary after the canaries
/// turned hard-down; whether it did.
fn record_reaction(message: &serin_proto::v1::CoordinatorMessage, fleet: &Fleet) -> bool {
    let Some(coordinator_message::Body::Desired(desired)) = &message.body else {
        return false;
    };
    let Some(first_bad) = fleet.first_bad_report.get() else {
        return false;
    };
    let zero = desired
        .services
        .iter()
        .any(|s| s.service == "svc-0" && s.canary_weight == 0);
    if zero {
        let mut reactions = fleet.reactions.lock().unwrap_or_else(|e| e.into_inner());
        reactions.push(first_bad.elapsed());
    }
    zero
}

async fn sleep_jittered(backoff: &mut Duration) {
    let jitter = rand::random_range(0.5..1.0);
    tokio::time::sleep(backoff.mul_f64(jitter)).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// Waits until `target` agents are connected; returns the time it took (or `None` after
/// `limit`).
async fn wait_connected(fleet: &Fleet, target: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let notified = fleet.changed.notified();
        let now = fleet.connected.load(Ordering::Relaxed);
        if now >= target {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("  … {now}/{target} connected after {:.1?}", start.elapsed());
            last_print = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
    }
}

fn counters(fleet: &Fleet) -> String {
    format!(
        "open timeouts {}, open errors {}",
        fleet.open_timeouts.load(Ordering::Relaxed),
        fleet.open_errors.load(Ordering::Relaxed)
    )
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let coordinator = start_coordinator(&args.serin, dir.path(), addr).await;
    // Let the single voter elect itself.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let fleet = Arc::new(Fleet::default());
    println!(
        "fleet_sim: {} agents over {} services against {}",
        args.agents,
        args.services,
        args.serin.display()
    );
    let balancers = if args.rollout { args.balancers } else { 0 };
    for i in 0..args.agents {
        let role = Role::of(i, args.services, args.rollout);
        tokio::spawn(agent(i, addr, args.services, role, fleet.clone()));
    }
    for i in args.agents..args.agents + balancers {
        tokio::spawn(agent(i, addr, args.services, Role::Balancer, fleet.clone()));
    }
    let limit = Duration::from_secs(180);
    match wait_connected(&fleet, args.agents + balancers, limit).await {
        Some(t) => println!(
            "connect:   all {} connected in {:.2} s ({})",
            args.agents + balancers,
            t.as_secs_f64(),
            counters(&fleet)
        ),
        None => println!(
            "connect:   only {} of {} connected within {limit:?} ({})",
            fleet.connected.load(Ordering::Relaxed),
            args.agents,
            counters(&fleet)
        ),
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "steady:    coordinator RSS {:.1} MiB with every agent reporting once a second",
        coordinator.rss_mib()
    );
    if args.rollout {
        rollout_phase(&args, addr, &coordinator, &fleet).await;
        coordinator.stop().await;
        return;
    }
    if !args.restart {
        coordinator.stop().await;
        return;
    }

    let timeouts_before = fleet.open_timeouts.load(Ordering::Relaxed);
    let errors_before = fleet.open_errors.load(Ordering::Relaxed);
    let stopped = Instant::now();
    coordinator.stop().await;
    let coordinator = start_coordinator(&args.serin, dir.path(), addr).await;
    let downtime = stopped.elapsed();
    match wait_connected(&fleet, args.agents, limit).await {
        Some(t) => println!(
            "restart:   all {} reconnected {:.2} s after the new coordinator listened (down {:.2} s; open timeouts {}, open errors {})",
            args.agents,
            t.as_secs_f64(),
            downtime.as_secs_f64(),
            fleet.open_timeouts.load(Ordering::Relaxed) - timeouts_before,
            fleet.open_errors.load(Ordering::Relaxed) - errors_before,
        ),
        None => println!(
            "restart:   only {} of {} reconnected within {limit:?} ({})",
            fleet.connected.load(Ordering::Relaxed),
            args.agents,
            counters(&fleet)
        ),
    }
    coordinator.stop().await;
}

/// The strategy of the measured rollout: one long 10% stage and a critical error trigger over
/// the last second (a longer window would measure how long bad reports take to outweigh the
/// good ones before them, not the leader's reaction).
const ROLLOUT_STRATEGY: &str = r#"
[[stages]]
weight = 10
min_duration = "1h"

[[checks]]
name = "errors"
metric = "error_rate"
max = 0.05

[[triggers]]
name = "hard-down"
metric = "error_rate"
max = 0.1
window = "1s"
severity = "critical"
"#;

/// Seconds of CPU (user + system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The `q` quantile (0..=1) of `values`, by nearest rank.
fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts a rollout of `svc-0`, measures the leader while the fleet reports, then turns the
/// canaries hard-down and waits for every balancer to be sent 0% canary.
async fn rollout_phase(args: &Args, addr: SocketAddr, coordinator: &Coordinator, fleet: &Fleet) {
    let pid = coordinator.child.id().expect("the coordinator runs");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("an endpoint")
        .connect()
        .await
        .expect("connect the operator client");
    let mut control = ControlServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let started = control
        .start_rollout(StartRolloutRequest {
            service: "svc-0".into(),
            version: "v2".into(),
            strategy_toml: ROLLOUT_STRATEGY.into(),
            actor: "fleet_sim".into(),
            stable_version: "v1".into(),
        })
        .await
        .expect("start the rollout")
        .into_inner();
    let id = started.rollout.map(|r| r.id).unwrap_or_default();
    println!("rollout:   {id} of svc-0 at 10% with a critical error trigger");

    // Operator calls every 100 ms, timed, while the fleet reports.
    let (cpu_start, wall_start) = (cpu_seconds(pid), Instant::now());
    let mut calls = Vec::new();
    let mut lags = Vec::new();
    let mut rss = Vec::new();
    let mut last_sample = Instant::now();
    let mut cpu_mark = (cpu_start, Instant::now());
    while wall_start.elapsed() < args.duration {
        let t = Instant::now();
        control
            .get_rollout(GetRolloutRequest { id: id.clone() })
            .await
            .expect("get the rollout");
        calls.push(t.elapsed());
        if last_sample.elapsed() >= Duration::from_secs(5) {
            last_sample = Instant::now();
            let t = Instant::now();
            let agents = control
                .list_agents(ListAgentsRequest {})
                .await
                .expect("list the agents")
                .into_inner()
                .agents;
            let list_time = t.elapsed();
            let reported: Vec<i64> = agents
                .iter()
                .filter(|a| a.connected && a.last_report_ms > 0)
                .map(|a| a.last_report_ms)
                .collect();
            let lag = reported.iter().max().copied().unwrap_or(0)
                - reported.iter().min().copied().unwrap_or(0);
            lags.push(Duration::from_millis(lag.max(0) as u64));
            let cpu = cpu_seconds(pid);
            let core = (cpu - cpu_mark.0) / cpu_mark.1.elapsed().as_secs_f64() * 100.0;
            cpu_mark = (cpu, Instant::now());
            rss.push(coordinator.rss_mib());
            eprintln!(
                "  … {:>4.0} s: leader CPU {core:.0}% of a core, RSS {:.0} MiB, report lag {lag} ms over {} agents, ListAgents {:.0} ms",
                wall_start.elapsed().as_secs_f64(),
                coordinator.rss_mib(),
                reported.len(),
                ms(list_time),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let core = (cpu_seconds(pid) - cpu_start) / wall_start.elapsed().as_secs_f64() * 100.0;
    let max_rss = rss.iter().copied().fold(0.0, f64::max);
    println!(
        "leader:    CPU {core:.1}% of one core over {:.0} s; RSS first {:.0} MiB, last {:.0} MiB, max {max_rss:.0} MiB",
        wall_start.elapsed().as_secs_f64(),
        rss.first().copied().unwrap_or(0.0),
        rss.last().copied().unwrap_or(0.0),
    );
    println!(
        "lag:       report lag (newest minus oldest last report) median {:.0} ms, max {:.0} ms",
        ms(quantile(&mut lags, 0.5)),
        ms(quantile(&mut lags, 1.0)),
    );
    println!(
        "operator:  GetRollout over {} calls: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        calls.len(),
        ms(quantile(&mut calls, 0.5)),
        ms(quantile(&mut calls, 0.99)),
        ms(quantile(&mut calls, 1.0)),
    );

    // The canaries turn hard-down: every request an error.
    let _ = fleet.hard_down.set(Instant::now());
    let limit = Instant::now() + Duration::from_secs(60);
    while Instant::now() < limit {
        let done = fleet.reactions.lock().map_or(0, |r| r.len());
        if done >= args.balancers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut reactions = fleet
        .reactions
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let state = control
        .get_rollout(GetRolloutRequest { id: id.clone() })
        .await
        .ok()
        .and_then(|r| r.into_inner().rollout)
        .map(|r| r.state)
        .unwrap_or_default();
    println!(
        "reaction:  {} of {} balancers sent 0% canary after the first hard-down report: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (rollout {state})",
        reactions.len(),
        args.balancers,
        ms(quantile(&mut reactions, 0.5)),
        ms(quantile(&mut reactions, 0.99)),
        ms(quantile(&mut reactions, 1.0)),
    );
}
