//! Harness for serin's end-to-end tests: real processes on loopback.
//!
//! - [`Stack`]: in a temporary directory, a coordinator (`serin coordinator run`), two demo
//!   apps (`serin demo-app`, stable `v1` and canary `v2` of service `web`), a private real nginx
//!   ([`LocalNginx`]), an agent (`serin agent run --config agent.toml`, reporting every 500 ms)
//!   and a [`Load`] generator sending ~100 req/s through nginx, a new connection per request.
//! - [`Proc`]: one child process; stdout and stderr go to `<dir>/<name>.log`; killed on drop.
//! - [`cli_at`] / [`Stack::cli`]: the `serin` CLI with `SERIN_COORDINATOR` set.
//! - [`netns::Fleet`]: several hosts on one machine, one per network namespace, each with its
//!   own address, that a test can kill or cut off (needs root and iproute2).
//! - Waiting is always on a condition, polled every [`POLL`] ([`Stack::wait_until`],
//!   [`Stack::wait_status`]); a timeout panics with the last rollout status and the tails of
//!   every log. When a test panics while a [`Stack`] is alive, the stack's drop prints the same
//!   diagnostics and keeps the directory for inspection.
//!
//! Ports: every port is drawn at random from 20000..32000 and checked by binding it. That range
//! lies below Linux's ephemeral range (32768..61000 here), from which the load generators'
//! ~100 new connections per second take their source ports, so a port chosen here cannot be
//! taken by an outgoing connection between choosing it and the process binding it. A
//! process-wide set ensures two tests running in parallel never get the same port.
#![allow(dead_code)]

pub mod books;
pub mod group;
pub mod netns;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use serin_agent::nginx::{BalancedService, LocalNginx, find_nginx};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The binary under test.
pub const SERIN: &str = env!("CARGO_BIN_EXE_serin");
/// The service every stack serves.
pub const SERVICE: &str = "web";
/// Version of the stable demo app.
pub const STABLE: &str = "v1";
/// Version of the canary demo app.
pub const CANARY: &str = "v2";
/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(100);
/// How long nginx must answer only a new generation before it counts as live.
pub const SETTLE: Duration = Duration::from_millis(300);
/// Requests per second of the background load.
pub const LOAD_RPS: u32 = 100;

// ---------------------------------------------------------------------------------------------
// Ports, files, HTTP
// ---------------------------------------------------------------------------------------------

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback port no other test of this process was given (see the module docs).
pub fn free_port() -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port: u16 = rand::random_range(20_000..32_000);
        if handed.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    panic!("no free port found in 20000..32000");
}

/// The last `n` lines of a file (or a note that it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Exit status, stdout and stderr of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An HTTP client that opens a new connection for every request (no pooling, no proxy).
pub fn fresh_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()
        .expect("building an HTTP client")
}

/// What responses said, by the `x-serin-version` header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Requests sent.
    pub sent: u64,
    /// Requests that got no HTTP answer (connection refused, timeout, ...).
    pub transport_errors: u64,
    /// Answers with a 5xx status.
    pub server_errors: u64,
    /// Answers by `x-serin-version` (`?` when the header is missing).
    pub by_version: BTreeMap<String, u64>,
}

impl Counts {
    /// Answers from `version`.
    pub fn of(&self, version: &str) -> u64 {
        self.by_version.get(version).copied().unwrap_or(0)
    }

    /// All HTTP answers.
    pub fn answered(&self) -> u64 {
        self.by_version.values().sum()
    }

    fn record(&mut self, result: Result<(u16, String), String>) {
        self.sent += 1;
        match result {
            Ok((status, version)) => {
                if status >= 500 {
                    self.server_errors += 1;
                }
                *self.by_version.entry(version).or_default() += 1;
            }
            Err(_) => self.transport_errors += 1,
        }
    }
}

/// One GET: the status and the `x-serin-version` header.
pub async fn get_version(client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    let version = response
        .headers()
        .get("x-serin-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let status = response.status().as_u16();
    // Read the body so the exchange is complete.
    let _ = response.bytes().await;
    Ok((status, version))
}

/// Sends `n` requests to `url`, `concurrency` at a time, each on a new connection.
pub async fn burst(url: &str, n: usize, concurrency: usize) -> Counts {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let url = url.to_owned();
        workers.push(tokio::spawn(async move {
            let client = fresh_client(Duration::from_secs(5));
            let mut counts = Counts::default();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                counts.record(get_version(&client, &url).await);
            }
            counts
        }));
    }
    let mut total = Counts::default();
    for w in workers {
        let c = w.await.expect("burst worker panicked");
        total.sent += c.sent;
        total.transport_errors += c.transport_errors;
        total.server_errors += c.server_errors;
        for (v, k) in c.by_version {
            *total.by_version.entry(v).or_default() += k;
        }
    }
    total
}

/// POSTs `body` (JSON) to `url`; returns the status.
pub async fn post_json(url: &str, body: &str) -> u16 {
    fresh_client(Duration::from_secs(5))
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .status()
        .as_u16()
}

// ---------------------------------------------------------------------------------------------
// Processes and the CLI
// ---------------------------------------------------------------------------------------------

/// A `serin` child process whose stdout and stderr go to `log`; killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Spawns `serin ARGS` in `dir`, appending its output to `dir/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, args: &[String]) -> Proc {
        Proc::spawn_with_log(name, dir, args, None)
    }

    /// Like [`Proc::spawn`], with `SERIN_LOG` set to `filter` when given.
    pub fn spawn_with_log(name: &str, dir: &Path, args: &[String], filter: Option<&str>) -> Proc {
        let mut argv = vec![SERIN.to_owned()];
        argv.extend_from_slice(args);
        let shown = format!("serin {}", args.join(" "));
        Proc::spawn_argv(name, dir, &argv, &shown, filter)
    }

    /// Spawns `argv[0] argv[1..]` in `dir` with the conventions of [`Proc::spawn`] (output to
    /// `dir/<name>.log` under a `=== <shown>` header line, `NO_COLOR=1`, no inherited
    /// `SERIN_COORDINATOR`, `SERIN_LOG` only when `filter` is given, killed on drop).
    pub fn spawn_argv(
        name: &str,
        dir: &Path,
        argv: &[String],
        shown: &str,
        filter: Option<&str>,
    ) -> Proc {
        let (program, args) = argv.split_first().expect("spawn_argv: empty argv");
        let log = dir.join(format!("{name}.log"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        {
            use std::io::Write;
            let _ = writeln!(file, "=== {shown}");
        }
        let err = file.try_clone().expect("cloning a log file handle");
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .env_remove("SERIN_COORDINATOR")
            .env_remove("SERIN_LOG");
        if let Some(filter) = filter {
            command.env("SERIN_LOG", filter);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", argv.join(" ")));
        Proc {
            name: name.to_owned(),
            log,
            child,
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs `serin ARGS` against the coordinator at `coordinator` (`SERIN_COORDINATOR`), with a
/// 30 s limit.
pub async fn cli_at(coordinator: SocketAddr, args: &[&str]) -> Output {
    cli_with(&format!("http://{coordinator}"), args).await
}

/// Runs `serin ARGS` with `SERIN_COORDINATOR` set to `coordinators` (one address, or a group's
/// addresses comma-separated), with a 30 s limit.
pub async fn cli_with(coordinators: &str, args: &[&str]) -> Output {
    let child = Command::new(SERIN)
        .args(args)
        .env("SERIN_COORDINATOR", coordinators)
        .env("NO_COLOR", "1")
        .env("USER", "e2e")
        .env_remove("SERIN_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .unwrap_or_else(|_| panic!("`serin {}` did not finish within 30 s", args.join(" ")))
        .unwrap_or_else(|e| panic!("running serin {}: {e}", args.join(" ")))
}

/// `serin rollout start web --version v2 --stable-version v1 --strategy STRATEGY` against
/// `coordinator`; the new rollout's id (panics, with the CLI's output, when it fails).
pub async fn start_web_rollout(coordinator: SocketAddr, strategy: &Path) -> String {
    let out = cli_at(
        coordinator,
        &[
            "rollout",
            "start",
            "web",
            "--version",
            "v2",
            "--stable-version",
            "v1",
            "--strategy",
            &strategy.display().to_string(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `serin coordinator run` on `port` with its data in `data_dir`.
pub fn spawn_coordinator(dir: &Path, port: u16, data_dir: &Path) -> Proc {
    Proc::spawn(
        "coordinator",
        dir,
        &[
            "coordinator".into(),
            "run".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ],
    )
}

/// `serin demo-app` answering as `version` on `port`, 2 ms per request.
pub fn spawn_app(name: &str, dir: &Path, port: u16, version: &str) -> Proc {
    Proc::spawn(
        name,
        dir,
        &[
            "demo-app".into(),
            "--port".into(),
            port.to_string(),
            "--version".into(),
            version.into(),
            "--latency-ms".into(),
            "2".into(),
        ],
    )
}

/// Polls `cond` every [`POLL`] until it holds; panics after `timeout` with `what` and
/// `diagnostics()`.
pub async fn wait_for(
    timeout: Duration,
    what: &str,
    mut cond: impl AsyncFnMut() -> bool,
    diagnostics: impl Fn() -> String,
) {
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for: {what}\n{}",
                diagnostics()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// One stage of a strategy written by [`strategy`].
#[derive(Debug, Clone, Copy)]
pub struct StageSpec {
    pub weight: u32,
    pub min_duration: &'static str,
    pub manual_gate: bool,
}

/// A 2-second stage at `weight`%.
pub fn stage(weight: u32) -> StageSpec {
    StageSpec {
        weight,
        min_duration: "2s",
        manual_gate: false,
    }
}

/// The checks and the trigger every test strategy carries: error rate no worse than stable's
/// (x2, plus 1 point), p95 under 500 ms, each needing only 3 requests per variant so a 1% stage
/// at 100 req/s passes in about 3 s; and a critical trigger rolling back at once when more than
/// 20% of at least 10 canary requests in the last 3 s failed.
pub const CHECKS: &str = r#"
[[checks]]
name = "error-rate-vs-stable"
metric = "error_rate"
max_ratio = 2.0
slack = 0.01
min_requests = 3

[[checks]]
name = "p95-latency"
metric = "latency_p95"
max = 500
min_requests = 3

[[triggers]]
name = "canary-error-spike"
metric = "error_rate"
max = 0.2
window = "3s"
min_requests = 10
severity = "critical"
"#;

/// Strategy TOML: `stages`, then [`CHECKS`], then `extra`.
pub fn strategy(stages: &[StageSpec], extra: &str) -> String {
    let mut s = String::new();
    for st in stages {
        let _ = write!(
            s,
            "[[stages]]\nweight = {}\nmin_duration = \"{}\"\n",
            st.weight, st.min_duration
        );
        if st.manual_gate {
            s.push_str("manual_gate = true\n");
        }
        s.push('\n');
    }
    s.push_str(CHECKS);
    s.push_str(extra);
    s
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// A constant-rate load generator through nginx: [`LOAD_RPS`] requests per second from 4
/// workers, a new connection per request, counted by version.
pub struct Load {
    counts: Arc<Mutex<Counts>>,
    paused: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// A load generator that sends nothing.
    pub fn idle() -> Load {
        Load {
            counts: Arc::default(),
            paused: Arc::new(AtomicBool::new(true)),
            tasks: Vec::new(),
        }
    }

    /// Starts sending GET `url`.
    pub fn start(url: String) -> Load {
        const WORKERS: u32 = 4;
        let counts: Arc<Mutex<Counts>> = Arc::default();
        let paused = Arc::new(AtomicBool::new(false));
        let period = Duration::from_secs_f64(f64::from(WORKERS) / f64::from(LOAD_RPS));
        let tasks = (0..WORKERS)
            .map(|_| {
                let counts = counts.clone();
                let paused = paused.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let client = fresh_client(Duration::from_secs(3));
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    loop {
                        tick.tick().await;
                        if paused.load(Ordering::Relaxed) {
                            continue;
                        }
                        let result = get_version(&client, &url).await;
                        counts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(result);
                    }
                })
            })
            .collect();
        Load {
            counts,
            paused,
            tasks,
        }
    }

    /// Forgets what was counted so far.
    pub fn reset(&self) {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()) = Counts::default();
    }

    /// What was counted since the last reset.
    pub fn snapshot(&self) -> Counts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops (true) or restarts (false) sending.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stack
// ---------------------------------------------------------------------------------------------

/// Variations of a [`Stack`].
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// The canary instance's `metrics_url` (default: the canary app's `/metrics`).
    pub canary_metrics_url: Option<String>,
    /// `SERIN_LOG` of the agent (default: its own, `info`).
    pub agent_log: Option<String>,
    /// TOML appended to the agent's config (after its `[nginx]` section), e.g. a
    /// `[canary_lease]` section.
    pub agent_extra: Option<String>,
}

/// What coordinates a [`Stack`] ([`Stack::start_on`]); the agent and the CLI are given every
/// address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Coordinators {
    /// One coordinator, [`Stack::coordinator`].
    #[default]
    One,
    /// A raft group of this many members on loopback ([`Stack::group`]).
    Group(usize),
    /// A raft group of this many members, each in its own network namespace (needs root), so
    /// one can be cut off ([`group::Group::start_netns`]).
    GroupInNetns(usize),
}

/// A coordinator, two demo apps, nginx, an agent and load, all real processes on loopback.
///
/// Fields drop in declaration order: load, agent, nginx, apps, coordinator (or group), then the
/// directory.
pub struct Stack {
    pub load: Load,
    pub agent: Proc,
    pub nginx: Option<LocalNginx>,
    pub stable_app: Proc,
    pub canary_app: Proc,
    /// The single coordinator (`None` with a group, or while killed).
    pub coordinator: Option<Proc>,
    /// The coordinator group, when [`StackOptions::coordinators`] is more than 1.
    pub group: Option<group::Group>,
    /// What `SERIN_COORDINATOR` is set to for the CLI: one address or the group's.
    pub coordinators: String,
    /// `http://` base of the service through nginx.
    pub url: String,
    pub nginx_listen: SocketAddr,
    pub coordinator_addr: SocketAddr,
    pub stable_addr: SocketAddr,
    pub canary_addr: SocketAddr,
    pub site: PathBuf,
    pub nginx_error_log: PathBuf,
    pub path: PathBuf,
    last_status: Mutex<Option<Value>>,
    dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(StackOptions::default()).await
    }

    /// Starts everything and returns once nginx serves the stable app on [`Stack::url`] and
    /// the load runs.
    pub async fn start_with(options: StackOptions) -> Stack {
        Stack::start_on(Coordinators::One, options).await
    }

    /// Like [`Stack::start_with`], coordinated by `coordinators`.
    pub async fn start_on(coordinators: Coordinators, options: StackOptions) -> Stack {
        let nginx_binary = find_nginx().expect(
            "nginx is not installed: these tests need Debian's nginx (apt-get install -y nginx-light)",
        );
        let dir = tempfile::Builder::new()
            .prefix("serin-e2e-")
            .tempdir()
            .expect("creating a temporary directory");
        let path = dir.path().to_owned();
        let coordinator_port = free_port();
        let mut coordinator_addr: SocketAddr = ([127, 0, 0, 1], coordinator_port).into();
        let stable_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let canary_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let nginx_listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();

        let (coordinator, group) = match coordinators {
            Coordinators::One => (
                Some(spawn_coordinator(
                    &path,
                    coordinator_port,
                    &path.join("coordinator"),
                )),
                None,
            ),
            Coordinators::GroupInNetns(n) => (None, Some(group::Group::start_netns(&path, n))),
            Coordinators::Group(n) => (None, Some(group::Group::start_local(&path, n))),
        };
        if let Some(g) = &group {
            // A group stack has no single coordinator; its first member stands in.
            coordinator_addr = g.members[0].addr;
        }
        let coordinators = match &group {
            Some(g) => g.addresses(),
            None => format!("http://{coordinator_addr}"),
        };
        let agent_coordinators = coordinators
            .split(',')
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let stable_app = spawn_app("stable", &path, stable_addr.port(), STABLE);
        let canary_app = spawn_app("canary", &path, canary_addr.port(), CANARY);
        let nginx = LocalNginx::start(&path.join("nginx"), &nginx_binary)
            .await
            .unwrap_or_else(|e| panic!("starting nginx: {e}"));
        let settings = nginx.settings(vec![BalancedService {
            service: SERVICE.into(),
            listen: nginx_listen.to_string(),
        }]);
        let canary_metrics = options
            .canary_metrics_url
            .unwrap_or_else(|| format!("http://{canary_addr}/metrics"));
        let agent_toml = format!(
            r#"# Written by serin's end-to-end tests.
name = "e2e-host"
coordinators = [{agent_coordinators}]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "web-stable"
service = "{SERVICE}"
variant = "stable"
address = "{stable_addr}"
metrics_url = "http://{stable_addr}/metrics"

[[instances]]
name = "web-canary"
service = "{SERVICE}"
variant = "canary"
address = "{canary_addr}"
metrics_url = "{canary_metrics}"

[nginx]
binary = "{binary}"
config = "{config}"
prefix = "{prefix}"
site = "{site}"

[[nginx.services]]
service = "{SERVICE}"
listen = "{nginx_listen}"

{extra}
"#,
            extra = options.agent_extra.as_deref().unwrap_or_default(),
            data = path.join("agent").display(),
            binary = settings.binary.display(),
            config = settings.config.display(),
            prefix = settings
                .prefix
                .as_deref()
                .expect("LocalNginx sets a prefix")
                .display(),
            site = settings.site.display(),
        );
        let agent_config = path.join("agent.toml");
        std::fs::write(&agent_config, agent_toml).expect("writing agent.toml");
        let agent = Proc::spawn_with_log(
            "agent",
            &path,
            &[
                "agent".into(),
                "run".into(),
                "--config".into(),
                agent_config.display().to_string(),
            ],
            options.agent_log.as_deref(),
        );
        let url = format!("http://{nginx_listen}/");
        let stack = Stack {
            load: Load::idle(),
            agent,
            site: settings.site.clone(),
            nginx_error_log: nginx.error_log_path().to_owned(),
            nginx: Some(nginx),
            stable_app,
            canary_app,
            coordinator,
            group,
            coordinators,
            url: url.clone(),
            nginx_listen,
            coordinator_addr,
            stable_addr,
            canary_addr,
            path,
            last_status: Mutex::new(None),
            dir,
        };
        let client = fresh_client(Duration::from_secs(2));
        stack
            .wait_until(
                Duration::from_secs(30),
                "the agent to connect and configure nginx to serve the stable app",
                async || {
                    let generation = client
                        .get(format!("http://{nginx_listen}/__serin/generation"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    generation
                        && matches!(get_version(&client, &url).await,
                                    Ok((200, v)) if v == STABLE)
                },
            )
            .await;
        let mut stack = stack;
        stack.load = Load::start(url);
        stack
    }

    /// The directory holding every file of this stack.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// `serin ARGS` against this stack's coordinator.
    pub async fn cli(&self, args: &[&str]) -> Output {
        cli_with(&self.coordinators, args).await
    }

    /// `serin ARGS`, which must succeed; returns its stdout.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "`serin {}` failed: {}\n{}",
            args.join(" "),
            describe(&out),
            self.diagnostics()
        );
        stdout(&out)
    }

    /// Writes a strategy file into the stack's directory.
    pub fn write_strategy(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, toml).expect("writing a strategy file");
        path
    }

    /// `serin rollout start web --version v2 --stable-version v1 --strategy FILE`; returns the
    /// id it prints.
    pub async fn start_rollout(&self, strategy_toml: &str) -> String {
        let file = self.write_strategy("strategy.toml", strategy_toml);
        let out = self
            .cli_ok(&[
                "rollout",
                "start",
                SERVICE,
                "--version",
                CANARY,
                "--stable-version",
                STABLE,
                "--strategy",
                &file.display().to_string(),
            ])
            .await;
        let id = out.trim().to_owned();
        assert!(
            id.starts_with(&format!("{SERVICE}-")) && !id.contains(char::is_whitespace),
            "`rollout start` should print only the new id, printed {out:?}"
        );
        id
    }

    /// `serin rollout status ID --json`, parsed; `Err` with the CLI's output if it failed.
    pub async fn try_status(&self, id: &str) -> Result<Value, String> {
        let out = self.cli(&["rollout", "status", id, "--json"]).await;
        if !out.status.success() {
            return Err(describe(&out));
        }
        let value: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("status --json is not JSON ({e}): {}", describe(&out)))?;
        *self.last_status.lock().unwrap_or_else(|e| e.into_inner()) = Some(value.clone());
        Ok(value)
    }

    /// `serin rollout status ID --json`, which must succeed.
    pub async fn status_json(&self, id: &str) -> Value {
        match self.try_status(id).await {
            Ok(v) => v,
            Err(e) => panic!(
                "`rollout status {id} --json` failed: {e}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Polls the rollout's status until `done(status)`; statuses the CLI cannot get (the
    /// coordinator restarting) are skipped. Returns the status that satisfied `done`.
    pub async fn wait_status(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        self.wait_until(timeout, what, async || {
            if let Ok(s) = self.try_status(id).await
                && done(&s)
            {
                found = Some(s);
                return true;
            }
            false
        })
        .await;
        found.expect("wait_until returned without a status")
    }

    /// Waits until the rollout reaches a terminal state; `observe` sees every status polled.
    pub async fn wait_terminal(
        &self,
        id: &str,
        timeout: Duration,
        mut observe: impl FnMut(&Value),
    ) -> Value {
        self.wait_status(id, timeout, "the rollout to finish", |s| {
            observe(s);
            s["terminal"] == true
        })
        .await
    }

    /// Polls the rollout for `duration`, asserting `holds(status)` at every poll: for "this must
    /// not happen" properties, which only a bounded observation can show.
    pub async fn assert_holds(
        &self,
        id: &str,
        duration: Duration,
        what: &str,
        holds: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status_json(id).await;
            assert!(
                holds(&s),
                "expected {what} for {duration:?}, but after {:?}:\n{}",
                start.elapsed(),
                self.diagnostics()
            );
            if start.elapsed() >= duration {
                return s;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `cond` every [`POLL`] until it holds; after `timeout` panics naming `what`, with
    /// the last status and the logs.
    pub async fn wait_until(&self, timeout: Duration, what: &str, cond: impl AsyncFnMut() -> bool) {
        wait_for(timeout, what, cond, || self.diagnostics()).await;
    }

    /// The site file the agent renders.
    pub fn site_text(&self) -> String {
        std::fs::read_to_string(&self.site).unwrap_or_default()
    }

    /// Waits until the agent has rendered `weight`% for the canary and nginx serves only that
    /// rendering: the generation marker answers the generation written in the site file on
    /// every fresh connection for [`SETTLE`]. (After a reload nginx lets its old worker accept
    /// connections for ~100 ms more; the agent's actuator waits out the same window.)
    pub async fn wait_nginx_weight(&self, weight: u32) {
        let client = fresh_client(Duration::from_secs(2));
        let marker = format!("# service \"{SERVICE}\": canary {weight}% (");
        let generation_url = format!("http://{}/__serin/generation", self.nginx_listen);
        let mut settled_since: Option<Instant> = None;
        self.wait_until(
            Duration::from_secs(30),
            &format!("nginx to serve only the canary at {weight}%"),
            async || loop {
                let site = self.site_text();
                let written = site
                    .lines()
                    .next()
                    .and_then(|l| l.rsplit_once("generation "))
                    .map(|(_, g)| g.trim().to_owned());
                let serving = match (&written, site.contains(&marker)) {
                    (Some(written), true) => match client.get(&generation_url).send().await {
                        Ok(r) => r.text().await.is_ok_and(|t| t.trim() == written),
                        Err(_) => false,
                    },
                    _ => false,
                };
                if !serving {
                    settled_since = None;
                    return false;
                }
                let since = *settled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SETTLE {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            },
        )
        .await;
    }

    /// Sends `n` requests through nginx, 8 at a time, each on a new connection.
    pub async fn burst(&self, n: usize) -> Counts {
        burst(&self.url, n, 8).await
    }

    /// Waits until the background load has counted `n` answers since its last reset.
    pub async fn wait_load(&self, n: u64) -> Counts {
        self.wait_until(
            Duration::from_secs(30),
            &format!("{n} answers from the background load"),
            async || self.load.snapshot().answered() >= n,
        )
        .await;
        self.load.snapshot()
    }

    /// SIGKILLs the coordinator.
    pub async fn kill_coordinator(&mut self) {
        self.coordinator
            .as_mut()
            .expect("kill_coordinator: this stack runs a group; see Stack::group")
            .kill()
            .await;
    }

    /// Starts the coordinator again on the same port and data directory.
    pub fn restart_coordinator(&mut self) {
        assert!(
            !self
                .coordinator
                .as_mut()
                .expect("restart_coordinator: this stack runs a group; see Stack::group")
                .alive(),
            "restart_coordinator: the coordinator still runs"
        );
        self.coordinator = Some(spawn_coordinator(
            &self.path,
            self.coordinator_addr.port(),
            &self.path.join("coordinator"),
        ));
    }

    /// The group (panics for a one-coordinator stack).
    pub fn group(&self) -> &group::Group {
        self.group
            .as_ref()
            .expect("this stack has a single coordinator")
    }

    /// The group, mutably (panics for a one-coordinator stack).
    pub fn group_mut(&mut self) -> &mut group::Group {
        self.group
            .as_mut()
            .expect("this stack has a single coordinator")
    }

    /// The group's leader, waited for (at most 30 s).
    pub async fn leader(&self) -> u64 {
        self.group()
            .wait_leader(None, Duration::from_secs(30))
            .await
            .0
    }

    /// SIGKILLs the group's leader; returns its id.
    pub async fn kill_leader(&mut self) -> u64 {
        let leader = self.leader().await;
        self.group_mut().kill(leader).await;
        leader
    }

    /// True while the agent process runs.
    pub fn agent_alive(&mut self) -> bool {
        self.agent.alive()
    }

    /// The last status seen and the tail of every log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("=== files kept in {}\n", self.path.display());
        if let Some(s) = &*self.last_status.lock().unwrap_or_else(|e| e.into_inner()) {
            let mut s = s.clone();
            // The full record repeats the strategy and evidence; the summary is enough here.
            if let Some(o) = s.as_object_mut() {
                o.remove("detail");
            }
            let _ = writeln!(out, "=== last rollout status\n{s:#}");
        }
        if let Some(g) = &self.group {
            out.push_str(&g.diagnostics());
        }
        for p in [
            self.coordinator.as_ref(),
            Some(&self.agent),
            Some(&self.stable_app),
            Some(&self.canary_app),
        ]
        .into_iter()
        .flatten()
        {
            let _ = writeln!(
                out,
                "=== {} ({})\n{}",
                p.name,
                p.log.display(),
                tail(&p.log, 40)
            );
        }
        let _ = writeln!(
            out,
            "=== nginx error log\n{}\n=== site file\n{}",
            tail(&self.nginx_error_log, 20),
            self.site_text()
        );
        let _ = writeln!(out, "=== load since last reset: {:?}", self.load.snapshot());
        out
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("{}", self.diagnostics());
        }
    }
}
