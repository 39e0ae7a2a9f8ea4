//! A simulated fleet against a real coordinator process: how long N agents take to connect, and
//! to reconnect after the coordinator restarts.
//!
//! ```sh
//! cargo build --release --bin serin --example fleet_sim
//! ulimit -n 65536   # one TCP connection per simulated agent, on both sides
//! target/release/examples/fleet_sim --serin target/release/serin --agents 10000
//! ```
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
    AgentMessage, HostMetrics, InstanceWindow, Register, Report, Target, Variant,
    agent_message::Body, agent_service_client::AgentServiceClient, coordinator_message,
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
}

fn parse_args() -> Args {
    let mut args = Args {
        serin: PathBuf::from("target/release/serin"),
        agents: 1000,
        services: 10,
        restart: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--serin" => args.serin = value().into(),
            "--agents" => args.agents = value().parse().expect("--agents: a number"),
            "--services" => args.services = value().parse().expect("--services: a number"),
            "--no-restart" => args.restart = false,
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

fn register(i: usize, services: usize) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Register(Register {
            agent: format!("sim-{i:05}"),
            instance_id: format!("sim-instance-{i}"),
            targets: vec![Target {
                name: format!("app-{i}"),
                service: format!("svc-{}", i % services),
                variant: Variant::Stable as i32,
                address: format!("127.0.0.1:{}", 10_000 + i % 50_000),
                ..Target::default()
            }],
            ..Register::default()
        })),
    }
}

fn report(i: usize, seq: u64, services: usize) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Report(Report {
            seq,
            interval_ms: 1000,
            host: Some(HostMetrics {
                cpu_percent: 3.0,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 4 << 30,
            }),
            instances: vec![InstanceWindow {
                instance: format!("app-{i}"),
                service: format!("svc-{}", i % services),
                variant: Variant::Stable as i32,
                scrape_ok: true,
                requests: 20,
                errors: 0,
                ..InstanceWindow::default()
            }],
            workloads: Vec::new(),
        })),
    }
}

/// One simulated agent: connect, hold the session, reconnect when it ends.
async fn agent(i: usize, addr: SocketAddr, services: usize, fleet: Arc<Fleet>) {
    let mut backoff = Duration::from_millis(100);
    let mut seq = 0;
    loop {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            let mut client = AgentServiceClient::connect(format!("http://{addr}"))
                .await
                .ok()?;
            let (tx, rx) = mpsc::channel(4);
            tx.send(register(i, services)).await.ok()?;
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
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    if tx.send(report(i, seq, services)).await.is_err() {
                        break;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(_)) => {}
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
    for i in 0..args.agents {
        tokio::spawn(agent(i, addr, args.services, fleet.clone()));
    }
    let limit = Duration::from_secs(180);
    match wait_connected(&fleet, args.agents, limit).await {
        Some(t) => println!(
            "connect:   all {} connected in {:.2} s ({})",
            args.agents,
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
