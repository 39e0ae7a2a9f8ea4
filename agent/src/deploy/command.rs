//! The command driver: `[deploy.command]` templates run with `sh -c` (e.g. `systemctl restart
//! api@{version}`), for hosts without docker.
//!
//! Each command runs in its own process group, bounded by the spec's timeout; on timeout the
//! whole group is killed (a shell's children with it). Output is read until the shell exits,
//! plus a short grace: a `start` that leaves a daemon behind holding the pipe must not keep the
//! call waiting for the daemon's end.
//!
//! What runs per instance (version, variant, fingerprint of the rendered templates) is kept
//! in `{state_dir}/{service}--{instance}.json`, written atomically (temporary file, rename),
//! so an agent restart knows what it started and `stop` is rendered with the values the
//! workload was started with.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::time::Instant;

use super::{
    ActionRecord, DeployError, DriverSpec, Health, Placement, Running, WorkloadDriver,
    WorkloadSpec, fingerprint, parse_variant, probe, tail, variant_name,
};

/// How long output is still read after the shell exited.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);
/// Bound on one health command, whatever the spec's timeout.
const HEALTH_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs workloads with shell commands.
#[derive(Debug, Clone)]
pub struct CommandDriver {
    state_dir: PathBuf,
}

/// What the driver started for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    version: String,
    variant: String,
    address: String,
    fingerprint: String,
}

impl CommandDriver {
    /// A driver keeping its state files under `state_dir` (created on first use).
    pub fn new(state_dir: PathBuf) -> Self {
        CommandDriver { state_dir }
    }

    fn state_path(&self, service: &str, instance: &str) -> PathBuf {
        self.state_dir.join(format!("{service}--{instance}.json"))
    }

    fn load(&self, service: &str, instance: &str) -> Result<Option<State>, DeployError> {
        let path = self.state_path(service, instance);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| DeployError::Io {
                    what: format!("reading {}", path.display()),
                    source: std::io::Error::other(e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DeployError::Io {
                what: format!("reading {}", path.display()),
                source: e,
            }),
        }
    }

    fn save(
        &self,
        service: &str,
        instance: &str,
        state: Option<&State>,
    ) -> Result<(), DeployError> {
        let path = self.state_path(service, instance);
        let io = |what: String| move |source| DeployError::Io { what, source };
        let Some(state) = state else {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io(format!("removing {}", path.display()))(e))
                }
                _ => Ok(()),
            };
        };
        std::fs::create_dir_all(&self.state_dir)
            .map_err(io(format!("creating {}", self.state_dir.display())))?;
        let tmp = path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec(state).map_err(|e| io(String::new())(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("renaming {}", tmp.display())))
    }
}

fn spec_of(spec: &WorkloadSpec) -> &super::CommandSpec {
    match &spec.driver {
        DriverSpec::Command(c) => c,
        DriverSpec::Docker(_) => {
            unreachable!("Drivers hands the command driver command specs only")
        }
    }
}

/// The placement a state file describes (for `stop`, rendered with what was started).
fn placement_of(service: &str, instance: &str, state: &State) -> Placement {
    Placement {
        service: service.to_owned(),
        instance: instance.to_owned(),
        address: state.address.clone(),
        version: state.version.clone(),
        variant: parse_variant(&state.variant),
    }
}

/// Runs `command` with `sh -c` and `env`, bounded by `timeout`.
async fn run(
    action: &'static str,
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<ActionRecord, DeployError> {
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DeployError::Io {
            what: format!("starting `sh -c {command}`"),
            source,
        })?;
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let output = Arc::clone(&output);
        readers.push(tokio::spawn(async move {
            let mut pipe = pipe;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut out) = output.lock() {
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }));
    }
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.map_err(|source| DeployError::Io {
            what: format!("waiting for `{command}`"),
            source,
        })?,
        Err(_) => {
            if let Some(pid) = child.id() {
                kill_group(pid);
            }
            let _ = child.wait().await;
            for r in readers {
                r.abort();
            }
            return Err(DeployError::CommandTimedOut {
                action,
                command: command.to_owned(),
                timeout,
            });
        }
    };
    let grace = tokio::time::sleep(OUTPUT_GRACE);
    tokio::pin!(grace);
    for r in &mut readers {
        tokio::select! {
            _ = &mut *r => {}
            () = &mut grace => break,
        }
    }
    for r in readers {
        r.abort();
    }
    let text = output
        .lock()
        .map(|o| String::from_utf8_lossy(&o).into_owned())
        .unwrap_or_default();
    let code = status.code().unwrap_or(-1);
    let record = ActionRecord {
        action,
        detail: command.to_owned(),
        exit_code: Some(code),
        output: tail(&text),
        duration: started.elapsed(),
        ok: status.success(),
    };
    if !status.success() {
        return Err(DeployError::CommandFailed {
            action,
            command: command.to_owned(),
            code,
            took: record.duration,
            output: record.output,
        });
    }
    Ok(record)
}

/// SIGKILL to the process group `pid` leads (commands run with `process_group(0)`).
fn kill_group(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl WorkloadDriver for CommandDriver {
    async fn deploy(
        &self,
        placement: &Placement,
        spec: &WorkloadSpec,
    ) -> Result<Vec<ActionRecord>, DeployError> {
        let c = spec_of(spec);
        let start = placement.render(spec, "deploy.command.start", &c.start)?;
        let stop = placement.render(spec, "deploy.command.stop", &c.stop)?;
        let deploy = c
            .deploy
            .as_deref()
            .map(|d| placement.render(spec, "deploy.command.deploy", d))
            .transpose()?;
        let env = placement.env(spec);
        let env_text: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let print = fingerprint(
            [
                start.as_str(),
                stop.as_str(),
                deploy.as_deref().unwrap_or(""),
            ]
            .into_iter()
            .chain(env_text.iter().map(String::as_str)),
        );
        let previous = self.load(&placement.service, &placement.instance)?;
        if previous.as_ref().is_some_and(|p| p.fingerprint == print) {
            return Ok(Vec::new());
        }
        let mut actions = Vec::new();
        if let Some(deploy) = &deploy
            && previous
                .as_ref()
                .is_none_or(|p| p.version != placement.version)
        {
            actions.push(run("deploy", deploy, &env, c.timeout).await?);
        }
        if let Some(previous) = &previous {
            let old = placement_of(&placement.service, &placement.instance, previous);
            let old_stop = old.render(spec, "deploy.command.stop", &c.stop)?;
            actions.push(run("stop", &old_stop, &old.env(spec), c.timeout).await?);
            self.save(&placement.service, &placement.instance, None)?;
        }
        actions.push(run("start", &start, &env, c.timeout).await?);
        self.save(
            &placement.service,
            &placement.instance,
            Some(&State {
                version: placement.version.clone(),
                variant: variant_name(placement.variant).to_owned(),
                address: placement.address.clone(),
                fingerprint: print,
            }),
        )?;
        Ok(actions)
    }

    async fn health(&self, placement: &Placement, spec: &WorkloadSpec) -> Health {
        let c = spec_of(spec);
        if let Some(path) = &spec.health_path {
            return probe(&placement.address, path).await;
        }
        let Some(health) = &c.health else {
            return Health::Healthy;
        };
        let command = match placement.render(spec, "deploy.command.health", health) {
            Ok(c) => c,
            Err(e) => return Health::Unhealthy(e.to_string()),
        };
        match run(
            "health",
            &command,
            &placement.env(spec),
            c.timeout.min(HEALTH_COMMAND_TIMEOUT),
        )
        .await
        {
            Ok(_) => Health::Healthy,
            Err(e) => Health::Starting(e.to_string()),
        }
    }

    async fn remove(
        &self,
        service: &str,
        instance: &str,
        spec: &WorkloadSpec,
    ) -> Result<Vec<ActionRecord>, DeployError> {
        let Some(previous) = self.load(service, instance)? else {
            return Ok(Vec::new());
        };
        let c = spec_of(spec);
        let old = placement_of(service, instance, &previous);
        let stop = old.render(spec, "deploy.command.stop", &c.stop)?;
        let record = run("stop", &stop, &old.env(spec), c.timeout).await?;
        self.save(service, instance, None)?;
        Ok(vec![record])
    }

    async fn running(&self, service: &str, instance: &str) -> Result<Option<Running>, DeployError> {
        Ok(self.load(service, instance)?.map(|s| Running {
            version: s.version,
            variant: parse_variant(&s.variant),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use std::path::Path;

    use super::*;
    use crate::deploy::{CommandSpec, wait_healthy};
    use crate::traffic::Variant;

    fn spec(dir: &Path, health: Option<&str>) -> WorkloadSpec {
        let d = dir.display();
        WorkloadSpec {
            driver: DriverSpec::Command(CommandSpec {
                // A "workload" is a file naming its version: start writes it, stop removes it.
                start: format!(
                    "echo {{version}} $SERIN_VARIANT $GREETING > {d}/{{instance}}.running"
                ),
                stop: format!(
                    "rm -f {d}/{{instance}}.running; echo stopped {{version}} >> {d}/stops"
                ),
                deploy: Some(format!("echo {{version}} >> {d}/deploys")),
                health: health.map(str::to_owned),
                timeout: Duration::from_secs(5),
            }),
            env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
            health_path: None,
            health_timeout: Duration::from_millis(600),
            shard_count: 0,
        }
    }

    fn placement(version: &str) -> Placement {
        Placement {
            service: "worker".into(),
            instance: "w1".into(),
            address: "127.0.0.1:9".into(),
            version: version.into(),
            variant: Variant::Canary,
        }
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[tokio::test]
    async fn deploy_runs_deploy_and_start_then_an_unchanged_deploy_does_nothing_and_a_new_version_stops_first()
     {
        let dir = tempfile::tempdir().unwrap();
        let driver = CommandDriver::new(dir.path().join("state"));
        let spec = spec(dir.path(), None);
        let actions = driver.deploy(&placement("v1"), &spec).await.unwrap();
        assert_eq!(
            actions.iter().map(|a| a.action).collect::<Vec<_>>(),
            ["deploy", "start"]
        );
        assert_eq!(read(dir.path().join("w1.running")), "v1 canary hi\n");
        assert_eq!(
            driver.running("worker", "w1").await.unwrap(),
            Some(Running {
                version: "v1".into(),
                variant: Variant::Canary
            })
        );
        assert!(
            driver
                .deploy(&placement("v1"), &spec)
                .await
                .unwrap()
                .is_empty()
        );
        let actions = driver.deploy(&placement("v2"), &spec).await.unwrap();
        assert_eq!(
            actions.iter().map(|a| a.action).collect::<Vec<_>>(),
            ["deploy", "stop", "start"]
        );
        // stop was rendered with the version that ran.
        assert_eq!(read(dir.path().join("stops")), "stopped v1\n");
        assert_eq!(read(dir.path().join("w1.running")), "v2 canary hi\n");
        // A restarted agent (a new driver on the same state) knows what runs.
        let again = CommandDriver::new(dir.path().join("state"));
        assert_eq!(
            again
                .running("worker", "w1")
                .await
                .unwrap()
                .map(|r| r.version),
            Some("v2".into())
        );
        let removed = again.remove("worker", "w1", &spec).await.unwrap();
        assert_eq!(removed.len(), 1);
        assert!(!dir.path().join("w1.running").exists());
        assert_eq!(again.running("worker", "w1").await.unwrap(), None);
        assert!(
            again
                .remove("worker", "w1", &spec)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_failing_command_names_its_exit_code_and_output_and_a_slow_one_is_killed() {
        let e = run(
            "start",
            "echo boom >&2; exit 3",
            &[],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("start command `echo boom >&2; exit 3` exited with 3 after"),
            "{e}"
        );
        assert!(e.ends_with(": boom"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let cmd = format!("sleep 30 & sleep 2; touch {}", marker.display());
        let started = Instant::now();
        let e = run("start", &cmd, &[], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, DeployError::CommandTimedOut { .. }), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not killed at the timeout"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the command's group was not killed");
    }

    #[tokio::test]
    async fn a_start_leaving_a_daemon_on_the_pipe_returns_when_the_shell_does() {
        let started = Instant::now();
        let record = run(
            "start",
            "sleep 5 & echo started",
            &[],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited for the daemon"
        );
        assert_eq!(record.output, "started");
    }

    #[tokio::test]
    async fn health_follows_the_health_command_and_wait_healthy_fails_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("healthy");
        let health = format!("test -e {}", flag.display());
        let driver = CommandDriver::new(dir.path().join("state"));
        let spec = spec(dir.path(), Some(&health));
        let p = placement("v1");
        assert!(matches!(
            driver.health(&p, &spec).await,
            Health::Starting(_)
        ));
        let e = wait_healthy(&driver, &p, &spec, std::future::pending())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not healthy after 600ms"), "{e}");
        std::fs::write(&flag, "").unwrap();
        assert!(
            wait_healthy(&driver, &p, &spec, std::future::pending())
                .await
                .unwrap()
        );
        std::fs::remove_file(&flag).unwrap();
        assert!(
            !wait_healthy(&driver, &p, &spec, async {}).await.unwrap(),
            "cancel wins"
        );
    }
}
