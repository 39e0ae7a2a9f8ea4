//! The `hosts` model with the command driver, as a fleet (docs/deploy.md): four hosts, each in
//! its own network namespace with its own agent, whose one managed instance is a queue worker
//! (`serin demo-worker`, no HTTP traffic at all) that serin starts and replaces itself through
//! systemd-free command templates. The rollouts are judged on the worker's own counters
//! (`metrics.errors = "worker_jobs_failed_total"`).
//!
//! - a good version moves 25% → 50% → 100%: one host, then two (the first among them), then
//!   all four run it, and serin's placement is what the workers themselves answer;
//! - a bad version (half its jobs fail) is rolled back by its trigger at 25%, and the host
//!   that ran it runs the previous version again.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::netns::{Fleet, spawn_coordinator};
use common::{Proc, cli_at, describe, fresh_client, tail, wait_for};
use serde_json::Value;

/// The worker's port on every host.
const WORKER_PORT: u16 = 9100;
/// Hosts in each fleet.
const HOSTS: usize = 4;

struct Workers {
    fleet: Fleet,
    _coordinator: Proc,
    coordinator: SocketAddr,
    logs: std::path::PathBuf,
}

impl Workers {
    async fn start() -> Workers {
        let mut fleet = Fleet::new(HOSTS).unwrap_or_else(|e| panic!("{e:#}"));
        let (coordinator_proc, coordinator) = spawn_coordinator(&fleet, 3);
        let logs = fleet.dir().join("coordinator.log");
        for k in 1..=HOSTS {
            let host = fleet.host_mut(k);
            let addr = host.addr();
            let config = format!(
                r#"name = "{name}"
coordinators = ["http://{coordinator}"]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "worker-{name}"
service = "worker"
variant = "stable"
address = "{addr}:{WORKER_PORT}"
metrics_url = "http://{addr}:{WORKER_PORT}/metrics"
managed = true
metrics = {{ requests = "worker_jobs_processed_total", errors = "worker_jobs_failed_total", latency = "worker_job_duration_seconds" }}
"#,
                name = host.name(),
                data = host.dir().join("agent-data").display(),
            );
            let file = host.dir().join("agent.toml");
            std::fs::write(&file, config).expect("writing agent.toml");
            host.serin(
                "agent",
                &[
                    "agent".into(),
                    "run".into(),
                    "--config".into(),
                    file.display().to_string(),
                ],
            );
        }
        let workers = Workers {
            fleet,
            _coordinator: coordinator_proc,
            coordinator,
            logs,
        };
        workers
            .wait(
                Duration::from_secs(30),
                "every agent to connect",
                async || {
                    let out = cli_at(workers.coordinator, &["agent", "list", "--json"]).await;
                    serde_json::from_slice::<Value>(&out.stdout)
                        .ok()
                        .and_then(|v| v.as_array().cloned())
                        .is_some_and(|a| {
                            a.iter().filter(|a| a["connected"] == true).count() == HOSTS
                        })
                },
            )
            .await;
        workers
    }

    fn diagnostics(&self) -> String {
        format!(
            "{}--- coordinator\n{}",
            self.fleet.diagnostics(),
            tail(&self.logs, 40)
        )
    }

    async fn wait(&self, timeout: Duration, what: &str, cond: impl AsyncFnMut() -> bool) {
        wait_for(timeout, what, cond, || self.diagnostics()).await;
    }

    /// The strategy: the hosts model, the worker started in the background by `start` and
    /// killed by `stop`, its failure rate read from `fail-{version}` in the fleet's directory.
    fn strategy(&self) -> String {
        let dir = self.fleet.dir().display();
        let serin = common::SERIN;
        format!(
            r#"
[[stages]]
weight = 25
min_duration = "3s"

[[stages]]
weight = 50
min_duration = "3s"

[[stages]]
weight = 100
min_duration = "2s"

[[triggers]]
name = "job-failures"
metric = "error_rate"
max = 0.1
min_requests = 20
window = "3s"

[deploy]
model = "hosts"
health_path = "/healthz"
health_timeout = "10s"

[deploy.command]
start = "setsid {serin} demo-worker --host {{host}} --port {{port}} --version {{version}} --rate 100 --fail-rate $(cat {dir}/fail-{{version}} 2>/dev/null || echo 0) > {dir}/{{instance}}-{{version}}.log 2>&1 < /dev/null & echo $! > {dir}/{{instance}}.pid"
stop = "pid=$(cat {dir}/{{instance}}.pid) && kill $pid && while kill -0 $pid 2>/dev/null; do sleep 0.05; done; rm -f {dir}/{{instance}}.pid"
timeout = "10s"
"#
        )
    }

    async fn start_rollout(&self, version: &str) -> String {
        let file = self.fleet.dir().join(format!("strategy-{version}.toml"));
        std::fs::write(&file, self.strategy()).expect("writing the strategy");
        let out = cli_at(
            self.coordinator,
            &[
                "rollout",
                "start",
                "worker",
                "--version",
                version,
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

    async fn status(&self, id: &str) -> Option<Value> {
        let out = cli_at(self.coordinator, &["rollout", "status", id, "--json"]).await;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits (up to 60 s) until the rollout finished; its last status.
    async fn wait_terminal(&self, id: &str) -> Value {
        let mut status = None;
        self.wait(
            Duration::from_secs(60),
            "the rollout to finish",
            async || {
                status = self.status(id).await;
                status.as_ref().is_some_and(|s| s["terminal"] == true)
            },
        )
        .await;
        status.expect("a status")
    }

    /// What each host's worker answers on /healthz (`ok v2`), by host name; `None` for a host
    /// whose worker does not answer.
    async fn versions(&self) -> BTreeMap<String, Option<String>> {
        let client = fresh_client(Duration::from_millis(500));
        let mut out = BTreeMap::new();
        for host in self.fleet.hosts() {
            let url = format!("http://{}:{WORKER_PORT}/healthz", host.addr());
            let version = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| t.trim().strip_prefix("ok ").map(str::to_owned)),
                _ => None,
            };
            out.insert(host.name().to_owned(), version);
        }
        out
    }

    /// The hosts whose worker answers `version`.
    async fn running(&self, version: &str) -> Vec<String> {
        self.versions()
            .await
            .into_iter()
            .filter(|(_, v)| v.as_deref() == Some(version))
            .map(|(h, _)| h)
            .collect()
    }

    /// Waits until exactly `n` hosts run `version` and every other host runs `other`.
    async fn wait_split(&self, version: &str, n: usize, other: &str) -> Vec<String> {
        let mut hosts = Vec::new();
        self.wait(
            Duration::from_secs(40),
            &format!("{n} hosts on {version}, the rest on {other}"),
            async || {
                let versions = self.versions().await;
                hosts = versions
                    .iter()
                    .filter(|(_, v)| v.as_deref() == Some(version))
                    .map(|(h, _)| h.clone())
                    .collect();
                hosts.len() == n
                    && versions
                        .values()
                        .filter(|v| v.as_deref() == Some(other))
                        .count()
                        == HOSTS - n
            },
        )
        .await;
        hosts
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("writing a test file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_http_traffic_is_rolled_out_host_by_host_and_the_same_hosts_stay_canary() {
    let workers = Workers::start().await;
    let id = workers.start_rollout("v2").await;
    // 25% of 4 hosts: one runs v2 in place, the three others v1.
    let first = workers.wait_split("v2", 1, "v1").await;
    // 50%: two, the first among them.
    let second = workers.wait_split("v2", 2, "v1").await;
    assert!(
        second.contains(&first[0]),
        "the canary host of 25% ({first:?}) left the canary at 50% ({second:?})"
    );
    let status = workers.wait_terminal(&id).await;
    assert_eq!(
        status["state"],
        "promoted",
        "{status:#}\n{}",
        workers.diagnostics()
    );
    workers.wait_split("v2", HOSTS, "-").await;
    // The command driver's actions are in the rollout's events, with their exit codes.
    let actions = deploy_actions(&status);
    assert!(
        actions
            .iter()
            .any(|r| r.starts_with("start on worker-") && r.contains(" for v2 ok (exit 0")),
        "{actions:#?}"
    );
}

/// The reasons of a status's `deploy_action` events.
fn deploy_actions(status: &Value) -> Vec<String> {
    status["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "deploy_action")
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_version_failing_its_jobs_is_rolled_back_on_its_own_failure_counter() {
    let workers = Workers::start().await;
    write(workers.fleet.dir(), "fail-v3", "0.5");
    let id = workers.start_rollout("v3").await;
    let canary = workers.wait_split("v3", 1, "v1").await;
    let status = workers.wait_terminal(&id).await;
    assert_eq!(
        status["state"],
        "rolled_back",
        "{status:#}\n{}",
        workers.diagnostics()
    );
    let reason = status["last_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("job-failures"), "{reason}");
    // The canary host runs v1 again; nobody ran v3 beyond that one host.
    workers.wait_split("v1", HOSTS, "-").await;
    assert!(workers.running("v3").await.is_empty(), "{canary:?}");
    // The rollback's own actions (v3 stopped, v1 started again) reach the finished rollout's
    // events too.
    let restart = format!("start on worker-{} for v1 ok", canary[0]);
    workers
        .wait(
            Duration::from_secs(10),
            &format!("a `{restart}` event"),
            async || {
                workers
                    .status(&id)
                    .await
                    .is_some_and(|s| deploy_actions(&s).iter().any(|r| r.starts_with(&restart)))
            },
        )
        .await;
}
