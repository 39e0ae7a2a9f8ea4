//! Benchmark (docs/benchmarks.md §10): the time of a docker-based stage change on 4 hosts with
//! the `hosts` deploy model, containers replaced and healthy.
//!
//! A real coordinator and 4 agents, each its own process with its own name and data directory
//! (a "host"), each declaring one managed instance of the same service on its own loopback
//! port. A rollout of `serin-demo:v2` over `v1` walks 25 → 50 → 75 → 100%: one more host runs
//! v2 at every stage. Polling `serin rollout status --json` every 100 ms, it measures
//!
//! - the initial deployment: from the `started` event to the first status whose deploy
//!   `waiting` list is empty (4 containers created and healthy: 3 × v1, 1 × v2);
//! - each stage change: from its `stage_advanced` event to the first status whose `waiting`
//!   list is empty (one v1 container stopped and removed, its v2 successor created, started,
//!   healthy and reported).
//!
//! It runs the rollout 3 times (a fresh stack and service name each) and prints a table of
//! every run, the median and the max. It asserts the deployment's outcome (the number of v2
//! containers at every stage, the promotion), never a time. It is `#[ignore]`d: run it with
//!
//!     cargo test --release --test bench_docker_stages -- --ignored --nocapture

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Proc, SERIN, cli_at, describe, free_port, tail, wait_for};
use serde_json::Value;

/// Hosts (agents) of the fleet, one managed instance each.
const HOSTS: usize = 4;
/// Rollouts measured.
const RUNS: usize = 3;
/// The stages' weights: one more host per stage.
const WEIGHTS: [u32; 4] = [25, 50, 75, 100];
/// How often the rollout's status is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for one deployment step before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(90);
/// The demo images used: stable and canary.
const DEMO_TAGS: &[&str] = &["v1", "v2"];
/// The port `serin demo-app` listens on inside its container (deploy/docker/build-demo-image.sh).
const CONTAINER_PORT: u16 = 8080;

/// Builds the `serin-demo` images from the binary under test, under the same lock as
/// `tests/deploy_docker.rs` (the script skips tags that are up to date).
fn ensure_images() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/docker/build-demo-image.sh");
    let lock = std::env::temp_dir().join("serin-demo-image.lock");
    let out = std::process::Command::new("flock")
        .arg(&lock)
        .arg(&script)
        .arg(SERIN)
        .args(DEMO_TAGS)
        .output()
        .expect("running build-demo-image.sh");
    assert!(
        out.status.success(),
        "building the demo images failed (is the Docker Engine running?):\n{}",
        describe(&out)
    );
}

/// Wall-clock milliseconds since the epoch, the clock of the events' `at_ms`.
fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since.as_millis()).expect("milliseconds fit i64")
}

/// serin's containers of `service`: (name, version label).
fn containers(service: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=serin.managed=true",
            "--filter",
            &format!("label=serin.service={service}"),
            "--format",
            "{{.Names}} {{.Label \"serin.version\"}}",
        ])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps: {}", describe(&out));
    let mut list: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, version) = l.split_once(' ')?;
            Some((name.to_owned(), version.to_owned()))
        })
        .collect();
    list.sort();
    list
}

/// Removes serin's containers of `service` (and only those).
fn remove_containers(service: &str) {
    for (name, _) in containers(service) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &name])
            .output();
    }
}

/// A coordinator and [`HOSTS`] agents serving one service; on drop, the agents are killed and
/// the service's containers removed, whether the run passed or failed.
struct Fleet {
    agents: Vec<Proc>,
    _coordinator: Proc,
    coordinator: SocketAddr,
    service: String,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        // The agents first, so none of them starts a container again after the removal.
        self.agents.clear();
        std::thread::sleep(Duration::from_millis(300));
        remove_containers(&self.service);
    }
}

impl Fleet {
    async fn start(run: usize) -> Fleet {
        let tmp = tempfile::Builder::new()
            .prefix("serin-bench-stages-")
            .tempdir()
            .expect("temporary directory");
        let dir = tmp.path().to_owned();
        let service = format!("bench{run}-{}", std::process::id());
        let coordinator_port = free_port();
        let coordinator: SocketAddr = ([127, 0, 0, 1], coordinator_port).into();
        let coordinator_proc =
            common::spawn_coordinator(&dir, coordinator_port, &dir.join("coordinator"));
        let mut fleet = Fleet {
            agents: Vec::new(),
            _coordinator: coordinator_proc,
            coordinator,
            service,
            dir,
            _tmp: tmp,
        };
        for k in 1..=HOSTS {
            let host = format!("host{k}");
            let address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let config = format!(
                r#"name = "{host}"
coordinators = ["http://{coordinator}"]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "{host}"
service = "{service}"
variant = "stable"
address = "{address}"
metrics_url = "http://{address}/metrics"
managed = true
"#,
                service = fleet.service,
                data = fleet.dir.join(&host).display(),
            );
            let file = fleet.dir.join(format!("{host}.toml"));
            std::fs::write(&file, config).expect("writing an agent config");
            fleet.agents.push(Proc::spawn(
                &host,
                &fleet.dir,
                &[
                    "agent".into(),
                    "run".into(),
                    "--config".into(),
                    file.display().to_string(),
                ],
            ));
        }
        fleet
            .wait(
                Duration::from_secs(30),
                "every agent to connect",
                async || {
                    let out = cli_at(fleet.coordinator, &["agent", "list", "--json"]).await;
                    serde_json::from_slice::<Value>(&out.stdout)
                        .ok()
                        .and_then(|v| v.as_array().cloned())
                        .is_some_and(|a| {
                            a.iter().filter(|a| a["connected"] == true).count() == HOSTS
                        })
                },
            )
            .await;
        fleet
    }

    fn diagnostics(&self) -> String {
        let mut text = format!(
            "containers: {:?}\n--- coordinator.log\n{}\n",
            containers(&self.service),
            tail(&self.dir.join("coordinator.log"), 40)
        );
        for k in 1..=HOSTS {
            text.push_str(&format!(
                "--- host{k}.log\n{}\n",
                tail(&self.dir.join(format!("host{k}.log")), 20)
            ));
        }
        text
    }

    async fn wait(&self, timeout: Duration, what: &str, cond: impl AsyncFnMut() -> bool) {
        wait_for(timeout, what, cond, || self.diagnostics()).await;
    }

    async fn start_rollout(&self) -> String {
        let file = self.dir.join("strategy.toml");
        std::fs::write(&file, strategy()).expect("writing the strategy");
        let out = cli_at(
            self.coordinator,
            &[
                "rollout",
                "start",
                &self.service,
                "--version",
                "v2",
                "--stable-version",
                "v1",
                "--strategy",
                &file.display().to_string(),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(&out),
            self.diagnostics()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The rollout's status, or `None` when the CLI failed.
    async fn status(&self, id: &str) -> Option<Value> {
        let out = cli_at(self.coordinator, &["rollout", "status", id, "--json"]).await;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The timed lines of every agent's log: `workload action` (remove, create) and
    /// `workload healthy`, in time order per host.
    fn host_timelines(&self) -> Vec<Vec<LogLine>> {
        (1..=HOSTS)
            .map(|k| {
                let log = std::fs::read_to_string(self.dir.join(format!("host{k}.log")))
                    .unwrap_or_default();
                log.lines().filter_map(LogLine::parse).collect()
            })
            .collect()
    }
}

/// What an agent logged about its workload, and when.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LogKind {
    /// A container stopped and removed, in `took` ms.
    Removed { took: f64 },
    /// A container created and started, in `took` ms.
    Created { took: f64 },
    /// The workload's health probe passed.
    Healthy,
}

/// One timed line of an agent's log.
#[derive(Debug, Clone, Copy)]
struct LogLine {
    /// Wall-clock ms of the line's timestamp. The agent logs a deploy's actions (remove, then
    /// create) together once the whole deploy call returned, so both carry its end.
    at_ms: f64,
    kind: LogKind,
}

impl LogLine {
    fn parse(line: &str) -> Option<LogLine> {
        let (stamp, rest) = line.split_once(' ')?;
        let at = humantime::parse_rfc3339(stamp).ok()?;
        let at_ms = at.duration_since(UNIX_EPOCH).ok()?.as_secs_f64() * 1e3;
        let took = || {
            rest.split("took=")
                .nth(1)?
                .split_whitespace()
                .next()
                .and_then(debug_duration_ms)
        };
        let kind = if rest.contains("workload healthy") {
            LogKind::Healthy
        } else if rest.contains("workload action") && rest.contains("action=\"remove\"") {
            LogKind::Removed { took: took()? }
        } else if rest.contains("workload action") && rest.contains("action=\"create\"") {
            LogKind::Created { took: took()? }
        } else {
            return None;
        };
        Some(LogLine { at_ms, kind })
    }
}

/// Where the time of one stage change went, in ms, from the replaced host's log.
#[derive(Debug, Clone, Copy)]
struct Breakdown {
    /// From the stage's event to the agent starting to stop the old container: the commit,
    /// the desired state's push, the reconciler waking, the container's inspection.
    to_agent: f64,
    /// Stopping and removing the old container.
    stop_remove: f64,
    /// Creating and starting the new one.
    create_start: f64,
    /// From started to the first passing health probe.
    health: f64,
    /// From healthy to the poll that saw nothing waiting: the next report, the poll.
    report_poll: f64,
}

impl Breakdown {
    /// What each of [`Breakdown::parts`] is, for the printed summary.
    const LABELS: [&str; 5] = [
        "  event -> agent stops the old container",
        "  stop + remove (docker)",
        "  create + start (docker)",
        "  started -> health probe passes",
        "  healthy -> poll sees nothing waiting",
    ];

    /// The parts in time order; they add up to the stage change's time.
    fn parts(&self) -> [f64; 5] {
        [
            self.to_agent,
            self.stop_remove,
            self.create_start,
            self.health,
            self.report_poll,
        ]
    }
}

/// The breakdown of the stage change in `[opened_ms, done_ms]`: the one host that removed a
/// container then, its create and its healthy line after that. The deploy call's start is its
/// end (the lines' time) less both actions.
fn breakdown(timelines: &[Vec<LogLine>], opened_ms: f64, done_ms: f64) -> Option<Breakdown> {
    let within = |l: &LogLine| l.at_ms >= opened_ms && l.at_ms <= done_ms;
    timelines.iter().find_map(|lines| {
        let mut steps = lines.iter().filter(|l| within(l));
        let removed = steps.find(|l| matches!(l.kind, LogKind::Removed { .. }))?;
        let created = steps.find(|l| matches!(l.kind, LogKind::Created { .. }))?;
        let healthy = steps.find(|l| l.kind == LogKind::Healthy)?;
        let (LogKind::Removed { took: stop }, LogKind::Created { took: create }) =
            (removed.kind, created.kind)
        else {
            return None;
        };
        Some(Breakdown {
            to_agent: created.at_ms - create - stop - opened_ms,
            stop_remove: stop,
            create_start: create,
            health: healthy.at_ms - created.at_ms,
            report_poll: done_ms - healthy.at_ms,
        })
    })
}

/// Milliseconds of a `Duration`'s `Debug` text (`312.5ms`, `1.2s`, `950µs`).
fn debug_duration_ms(text: &str) -> Option<f64> {
    let units = [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)];
    units.iter().find_map(|(unit, scale)| {
        let number: f64 = text.strip_suffix(unit)?.parse().ok()?;
        Some(number * scale)
    })
}

fn strategy() -> String {
    let stages: String = WEIGHTS
        .iter()
        .map(|w| format!("[[stages]]\nweight = {w}\nmin_duration = \"3s\"\n\n"))
        .collect();
    format!(
        r#"{stages}[deploy]
model = "hosts"
health_path = "/healthz"
health_timeout = "30s"

[deploy.docker]
image = "serin-demo:{{version}}"
port = {CONTAINER_PORT}
args = ["--host", "0.0.0.0", "--port", "{CONTAINER_PORT}", "--version", "{{version}}", "--latency-ms", "1"]
"#
    )
}

/// The at_ms of the event opening stage `stage` (`started` for 0, else `stage_advanced`).
fn stage_event_ms(status: &Value, stage: usize) -> Option<i64> {
    let kind = if stage == 0 {
        "started"
    } else {
        "stage_advanced"
    };
    status["events"].as_array()?.iter().find_map(|e| {
        (e["kind"] == kind && e["stage_index"].as_u64() == Some(stage as u64))
            .then(|| e["at_ms"].as_i64())
            .flatten()
    })
}

/// The deploy `waiting` list of a status; `None` when the status has no deploy view.
fn waiting(status: &Value) -> Option<Vec<String>> {
    status["deploy"]["waiting"].as_array().map(|w| {
        w.iter()
            .map(|x| x.as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

/// What one rollout measured.
struct RunResult {
    /// Per stage: ms from the stage's event to the first poll with nothing waiting.
    stage_ms: Vec<i64>,
    /// Round trip of every `serin rollout status` poll, ms.
    poll_ms: Vec<f64>,
    /// Per stage change (stage 1 on): where its time went.
    breakdowns: Vec<Breakdown>,
    /// Create + start of each container of the initial deployment (4 at once), ms.
    initial_create_ms: Vec<f64>,
    /// From the `started` event to each host's first passing health probe, ms.
    initial_healthy_ms: Vec<f64>,
    /// From each host's container started (its deploy call returned) to its first passing
    /// health probe, ms.
    initial_health_wait_ms: Vec<f64>,
    /// From sending `serin rollout start` to its `started` event, ms.
    start_to_event_ms: f64,
}

/// Starts the rollout and polls it until it is promoted, timing each stage's deployment.
async fn measure(fleet: &Fleet) -> RunResult {
    let start_sent_ms = now_ms();
    let id = fleet.start_rollout().await;
    let mut stage_ms = Vec::new();
    let mut windows = Vec::new();
    let mut poll_ms = Vec::new();
    let mut stage = 0;
    let mut stage_since = Instant::now();
    let mut seen_waiting = false;
    loop {
        let sent = Instant::now();
        let status = fleet.status(&id).await;
        poll_ms.push(sent.elapsed().as_secs_f64() * 1e3);
        let answered_ms = now_ms();
        if let Some(status) = &status {
            assert!(
                status["state"] == "progressing" || status["state"] == "promoted",
                "the rollout should progress to its promotion: {status:#}\n{}",
                fleet.diagnostics()
            );
            if stage == WEIGHTS.len() {
                if status["state"] == "promoted" {
                    break;
                }
            } else if let (Some(opened), Some(waiting)) =
                (stage_event_ms(status, stage), waiting(status))
            {
                if !waiting.is_empty() {
                    seen_waiting = true;
                } else {
                    assert!(
                        seen_waiting,
                        "stage {stage}: nothing was ever waiting, so no container was replaced: \
                         {status:#}"
                    );
                    stage_ms.push(answered_ms - opened);
                    windows.push((opened as f64, answered_ms as f64));
                    let canaries = (HOSTS * WEIGHTS[stage] as usize).div_ceil(100);
                    let running = containers(&fleet.service);
                    assert_eq!(
                        (
                            running.len(),
                            running.iter().filter(|(_, v)| v == "v2").count()
                        ),
                        (HOSTS, canaries),
                        "stage {stage} ({}%): containers {running:?}",
                        WEIGHTS[stage]
                    );
                    stage += 1;
                    stage_since = Instant::now();
                    seen_waiting = false;
                }
            }
        }
        assert!(
            stage_since.elapsed() < STEP_TIMEOUT,
            "stage {stage} did not finish its deployment within {STEP_TIMEOUT:?}: {status:#?}\n{}",
            fleet.diagnostics()
        );
        tokio::time::sleep(POLL_EVERY.saturating_sub(sent.elapsed())).await;
    }
    let timelines = fleet.host_timelines();
    let breakdowns = windows[1..]
        .iter()
        .enumerate()
        .map(|(k, &(opened, done))| {
            breakdown(&timelines, opened, done).unwrap_or_else(|| {
                panic!(
                    "stage {}: no host logged a remove, create and healthy between its event \
                     and its end: {timelines:?}",
                    k + 1
                )
            })
        })
        .collect();
    let (opened, done) = windows[0];
    let initial_create_ms = timelines
        .iter()
        .flatten()
        .filter(|l| l.at_ms >= opened && l.at_ms <= done)
        .filter_map(|l| match l.kind {
            LogKind::Created { took } => Some(took),
            _ => None,
        })
        .collect();
    let initial_healthy_ms = timelines
        .iter()
        .filter_map(|lines| {
            lines
                .iter()
                .find(|l| l.kind == LogKind::Healthy && l.at_ms >= opened)
                .map(|l| l.at_ms - opened)
        })
        .collect();
    let initial_health_wait_ms = timelines
        .iter()
        .filter_map(|lines| {
            let mut steps = lines.iter().filter(|l| l.at_ms >= opened);
            let created = steps.find(|l| matches!(l.kind, LogKind::Created { .. }))?;
            let healthy = steps.find(|l| l.kind == LogKind::Healthy)?;
            Some(healthy.at_ms - created.at_ms)
        })
        .collect();
    RunResult {
        initial_healthy_ms,
        initial_health_wait_ms,
        start_to_event_ms: opened - start_sent_ms as f64,
        stage_ms,
        poll_ms,
        breakdowns,
        initial_create_ms,
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// `label: median m ms, max x ms (n = 3: a, b, c)` for a set of durations.
fn summary(label: &str, values: &[f64]) -> String {
    let list: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    format!(
        "{label}: median {:.0} ms, max {:.0} ms (n = {}: {})",
        median(values),
        max(values),
        values.len(),
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo test --release --test bench_docker_stages -- --ignored --nocapture"]
async fn docker_stage_change_on_four_hosts() {
    ensure_images();
    let mut results = Vec::new();
    for run in 1..=RUNS {
        let fleet = Fleet::start(run).await;
        let result = measure(&fleet).await;
        eprintln!(
            "run {run}: stages {:?} ms ({} polls)",
            result.stage_ms,
            result.poll_ms.len()
        );
        results.push(result);
    }
    let mut labels = vec![format!("start -> {HOSTS} healthy")];
    labels.extend(
        WEIGHTS
            .windows(2)
            .map(|w| format!("{}% -> {}%", w[0], w[1])),
    );
    let mut table = format!(
        "\n{:<22}{}{:>9}{:>9}\n",
        "ms",
        (1..=RUNS)
            .map(|r| format!("{:>9}", format!("run {r}")))
            .collect::<String>(),
        "median",
        "max"
    );
    let mut changes = Vec::new();
    for (stage, label) in labels.iter().enumerate() {
        let values: Vec<f64> = results.iter().map(|r| r.stage_ms[stage] as f64).collect();
        if stage > 0 {
            changes.extend_from_slice(&values);
        }
        table.push_str(&format!(
            "{label:<22}{}{:>9.0}{:>9.0}\n",
            values
                .iter()
                .map(|v| format!("{v:>9.0}"))
                .collect::<String>(),
            median(&values),
            max(&values)
        ));
    }
    let all = |pick: fn(&RunResult) -> &Vec<f64>| -> Vec<f64> {
        results
            .iter()
            .flat_map(|r| pick(r).iter().copied())
            .collect()
    };
    eprintln!("{table}");
    eprintln!("{}", summary("every stage change", &changes));
    eprintln!("where a stage change's time goes (the replaced host's log):");
    for (k, label) in Breakdown::LABELS.iter().enumerate() {
        let values: Vec<f64> = results
            .iter()
            .flat_map(|r| r.breakdowns.iter().map(|b| b.parts()[k]))
            .collect();
        eprintln!("{}", summary(label, &values));
    }
    eprintln!(
        "{}",
        summary(
            "initial deployment: create + start, 4 containers at once",
            &all(|r| &r.initial_create_ms)
        )
    );
    eprintln!(
        "{}",
        summary(
            "initial deployment: started event -> each host healthy",
            &all(|r| &r.initial_healthy_ms)
        )
    );
    eprintln!(
        "{}",
        summary(
            "initial deployment: container started -> health probe passes",
            &all(|r| &r.initial_health_wait_ms)
        )
    );
    let sent: Vec<f64> = results.iter().map(|r| r.start_to_event_ms).collect();
    eprintln!(
        "{}",
        summary("`serin rollout start` sent -> started event", &sent)
    );
    let polls = all(|r| &r.poll_ms);
    eprintln!(
        "poll round trip (`serin rollout status --json`): median {:.0} ms, max {:.0} ms over {} polls",
        median(&polls),
        max(&polls),
        polls.len()
    );
}
