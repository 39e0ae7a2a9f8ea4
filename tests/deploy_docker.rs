//! serin deploys the versions with the Docker Engine (docs/deploy.md), end to end: a real
//! coordinator, a real agent whose two `[[instances]]` are managed (a stable and a canary slot
//! on loopback), a private real nginx in front, and containers of the locally built
//! `serin-demo` images (`deploy/docker/build-demo-image.sh`; no registry).
//!
//! - a good canary: serin starts the stable and the canary containers, moves through the
//!   stages, promotes, replaces the stable container with the new version, and leaves only it
//!   running, serving the new version through nginx;
//! - a canary that never becomes healthy: the stage fails with that reason and the canary
//!   container is removed;
//! - a canary answering errors: rolled back by its trigger, the canary container removed, the
//!   stable container the very one that ran before.
//!
//! Each test uses its own service name, so containers of parallel tests never share a name.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Proc, SERIN, cli_at, describe, free_port, fresh_client, get_version, tail, wait_for};
use serde_json::Value;
use serin_agent::nginx::{BalancedService, LocalNginx, find_nginx};

/// The images every test needs; built once per machine (the script skips existing tags unless
/// the binary changed, and `.ci/run` builds them before the tests).
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

/// `serin-demo` tags: `v3` never becomes healthy, `v4` answers half its requests with 500.
const DEMO_TAGS: &[&str] = &["v1", "v2", "v3:--unhealthy", "v4:--error-rate=0.5"];

/// Containers serin manages for `service`: (name, version label, id).
fn containers(service: &str) -> Vec<(String, String, String)> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=serin.service={service}"),
            "--format",
            "{{.Names}} {{.Label \"serin.version\"}} {{.ID}}",
        ])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps: {}", describe(&out));
    let mut list: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((
                parts.next()?.to_owned(),
                parts.next()?.to_owned(),
                parts.next()?.to_owned(),
            ))
        })
        .collect();
    list.sort();
    list
}

/// A coordinator, an agent with two managed instances of `service` and nginx in front.
struct DeployStack {
    _agent: Proc,
    _nginx: LocalNginx,
    _coordinator: Proc,
    coordinator_addr: SocketAddr,
    service: String,
    url: String,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for DeployStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        // Containers of this test's service only: never anything else.
        for (name, _, _) in containers(&self.service) {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", &name])
                .output();
        }
    }
}

impl DeployStack {
    async fn start(tag: &str) -> DeployStack {
        ensure_images();
        let nginx_binary = find_nginx().expect("these tests need Debian's nginx");
        let tmp = tempfile::Builder::new()
            .prefix("serin-deploy-")
            .tempdir()
            .expect("temporary directory");
        let dir = tmp.path().to_owned();
        let service = format!("{tag}-{}", std::process::id());
        let coordinator_port = free_port();
        let coordinator_addr: SocketAddr = ([127, 0, 0, 1], coordinator_port).into();
        let stable: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let canary: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let coordinator =
            common::spawn_coordinator(&dir, coordinator_port, &dir.join("coordinator"));
        let nginx = LocalNginx::start(&dir.join("nginx"), &nginx_binary)
            .await
            .unwrap_or_else(|e| panic!("starting nginx: {e}"));
        let settings = nginx.settings(vec![BalancedService {
            service: service.clone(),
            listen: listen.to_string(),
        }]);
        let agent_toml = format!(
            r#"name = "docker-host"
coordinators = ["http://{coordinator_addr}"]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "stable"
service = "{service}"
variant = "stable"
address = "{stable}"
metrics_url = "http://{stable}/metrics"
managed = true

[[instances]]
name = "canary"
service = "{service}"
variant = "canary"
address = "{canary}"
metrics_url = "http://{canary}/metrics"
managed = true

[nginx]
binary = "{binary}"
config = "{config}"
prefix = "{prefix}"
site = "{site}"

[[nginx.services]]
service = "{service}"
listen = "{listen}"
"#,
            data = dir.join("agent").display(),
            binary = settings.binary.display(),
            config = settings.config.display(),
            prefix = settings.prefix.as_deref().expect("a prefix").display(),
            site = settings.site.display(),
        );
        let config = dir.join("agent.toml");
        std::fs::write(&config, agent_toml).expect("writing agent.toml");
        let agent = Proc::spawn(
            "agent",
            &dir,
            &[
                "agent".into(),
                "run".into(),
                "--config".into(),
                config.display().to_string(),
            ],
        );
        let stack = DeployStack {
            _agent: agent,
            _nginx: nginx,
            _coordinator: coordinator,
            coordinator_addr,
            service,
            url: format!("http://{listen}/"),
            dir,
            _tmp: tmp,
        };
        stack
            .wait(
                Duration::from_secs(30),
                "the agent to connect",
                async || {
                    let out = cli_at(stack.coordinator_addr, &["agent", "list", "--json"]).await;
                    out.status.success()
                        && String::from_utf8_lossy(&out.stdout).contains("docker-host")
                },
            )
            .await;
        stack
    }

    fn diagnostics(&self) -> String {
        format!(
            "containers: {:?}\n--- coordinator.log\n{}\n--- agent.log\n{}",
            containers(&self.service),
            tail(&self.dir.join("coordinator.log"), 40),
            tail(&self.dir.join("agent.log"), 60),
        )
    }

    async fn start_rollout(&self, version: &str, strategy: &str) -> String {
        let file = self.dir.join(format!("strategy-{version}.toml"));
        std::fs::write(&file, strategy).expect("writing the strategy");
        let out = cli_at(
            self.coordinator_addr,
            &[
                "rollout",
                "start",
                &self.service,
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
        let out = cli_at(self.coordinator_addr, &["rollout", "status", id, "--json"]).await;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    async fn wait(&self, timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
        wait_for(timeout, what, async || cond().await, || self.diagnostics()).await;
    }

    async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        let mut last = None;
        self.wait(timeout, "the rollout to finish", async || {
            last = self.status(id).await;
            last.as_ref().is_some_and(|s| s["terminal"] == true)
        })
        .await;
        last.expect("a status")
    }

    /// Waits until the managed containers are exactly `expected` (name suffix, version).
    async fn wait_containers(&self, expected: &[(&str, &str)]) -> Vec<(String, String, String)> {
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(instance, version)| {
                (
                    format!("serin-{}-{instance}", self.service),
                    (*version).to_owned(),
                )
            })
            .collect();
        let mut found = Vec::new();
        self.wait(
            Duration::from_secs(60),
            &format!("the containers to be {want:?}"),
            async || {
                found = containers(&self.service);
                found
                    .iter()
                    .map(|(n, v, _)| (n.clone(), v.clone()))
                    .collect::<Vec<_>>()
                    == want
            },
        )
        .await;
        found
    }

    /// Waits until nginx answers `version` to 20 requests in a row.
    async fn wait_serving(&self, version: &str) {
        let client = fresh_client(Duration::from_secs(2));
        self.wait(
            Duration::from_secs(30),
            &format!("nginx to serve only {version}"),
            async || {
                for _ in 0..20 {
                    match get_version(&client, &self.url).await {
                        Ok((200, v)) if v == version => {}
                        _ => return false,
                    }
                }
                true
            },
        )
        .await;
    }
}

fn strategy(stages: &str, extra: &str) -> String {
    format!(
        r#"{stages}

[deploy]
health_path = "/healthz"
health_timeout = "8s"

[deploy.docker]
image = "serin-demo:{{version}}"
port = 8080
args = ["--host", "0.0.0.0", "--port", "8080", "--version", "{{version}}", "--latency-ms", "1"]
stop_timeout = "2s"
{extra}
"#
    )
}

const TWO_STAGES: &str = r#"
[[stages]]
weight = 50
min_duration = "2s"

[[stages]]
weight = 100
min_duration = "1s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_canary_container_is_promoted_and_only_the_new_version_is_left_running() {
    let stack = DeployStack::start("good").await;
    let id = stack.start_rollout("v2", &strategy(TWO_STAGES, "")).await;
    // Both slots run: stable v1 and the canary v2.
    stack
        .wait_containers(&[("canary", "v2"), ("stable", "v1")])
        .await;
    let status = stack.wait_terminal(&id, Duration::from_secs(90)).await;
    assert_eq!(
        status["state"],
        "promoted",
        "{status:#}\n{}",
        stack.diagnostics()
    );
    let promoted = std::time::Instant::now();
    // The stable slot is replaced with v2, then the canary slot is removed.
    stack.wait_containers(&[("stable", "v2")]).await;
    // Printed for docs/benchmarks.md §9, not asserted (the machine is shared).
    eprintln!(
        "measure: promotion seen -> stable container replaced and the canary removed: {} ms",
        promoted.elapsed().as_millis()
    );
    stack.wait_serving("v2").await;
    stack
        .wait(
            Duration::from_secs(10),
            "the rollout to be settled",
            async || {
                stack
                    .status(&id)
                    .await
                    .is_some_and(|s| s["detail"]["deploy_settled"] == true)
            },
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_container_that_never_becomes_healthy_fails_the_stage_with_that_reason() {
    let stack = DeployStack::start("unhealthy").await;
    let id = stack.start_rollout("v3", &strategy(TWO_STAGES, "")).await;
    let status = stack.wait_terminal(&id, Duration::from_secs(90)).await;
    assert_eq!(
        status["state"],
        "rolled_back",
        "{status:#}\n{}",
        stack.diagnostics()
    );
    let reason = status["last_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("canary") && reason.contains("healthy"),
        "the reason should name the canary instance and its health: {reason}"
    );
    // The canary is removed; stable keeps v1 and serves.
    stack.wait_containers(&[("stable", "v1")]).await;
    stack.wait_serving("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_container_answering_errors_is_rolled_back_and_the_stable_container_is_untouched()
{
    let stack = DeployStack::start("errors").await;
    let stages = r#"
[[stages]]
weight = 50
min_duration = "60s"

[[stages]]
weight = 100
min_duration = "1s"
"#;
    let trigger = r#"
[[triggers]]
name = "errors"
metric = "error_rate"
max = 0.2
min_requests = 20
window = "5s"
severity = "critical"
"#;
    let id = stack.start_rollout("v4", &strategy(stages, trigger)).await;
    let before = stack
        .wait_containers(&[("canary", "v4"), ("stable", "v1")])
        .await;
    let stable_id = before
        .iter()
        .find(|(n, _, _)| n.ends_with("-stable"))
        .map(|(_, _, id)| id.clone())
        .expect("the stable container");
    // Load through nginx, so the canary's errors are seen.
    let client = fresh_client(Duration::from_secs(2));
    let mut status = None;
    for _ in 0..600 {
        for _ in 0..10 {
            let _ = get_version(&client, &stack.url).await;
        }
        status = stack.status(&id).await;
        if status.as_ref().is_some_and(|s| s["terminal"] == true) {
            break;
        }
    }
    let status = status.expect("a status");
    assert_eq!(
        status["state"],
        "rolled_back",
        "{status:#}\n{}",
        stack.diagnostics()
    );
    assert!(
        status["last_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("errors"),
        "{status:#}"
    );
    let after = stack.wait_containers(&[("stable", "v1")]).await;
    assert_eq!(
        after[0].2, stable_id,
        "the stable container was replaced: {after:?}"
    );
    stack.wait_serving("v1").await;
}
