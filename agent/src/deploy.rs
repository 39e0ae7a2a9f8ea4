//! Deploy drivers: the I/O edge that makes a managed instance run the version the coordinator
//! assigns it (docs/deploy.md).
//!
//! [`WorkloadDriver`] is the trait; [`DockerDriver`] (the Docker Engine API, through bollard)
//! and [`CommandDriver`] (templated shell commands, for hosts without docker) implement it, and
//! [`Drivers`] picks one by the spec. Every driver is idempotent (a deploy of what already runs
//! is no action, recognised by a hash of the rendered config kept with the workload) and never
//! touches a workload serin did not start.
//!
//! A workload's environment is serin's variables first (`SERIN_SERVICE`, `SERIN_INSTANCE`,
//! `SERIN_VERSION`, `SERIN_VARIANT`, `CANARY`, and for a sharded service `SHARD_COUNT` and an
//! empty `SHARD_IDS`: serin grants the shards live), then the spec's `env`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::traffic::Variant;

mod command;
mod docker;

pub use command::CommandDriver;
pub use docker::DockerDriver;

/// How often [`wait_healthy`] asks.
const HEALTH_POLL: Duration = Duration::from_millis(200);
/// Bound on one HTTP health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of a command's or container's output an [`ActionRecord`] keeps.
const OUTPUT_TAIL: usize = 2048;

/// A service's deployment, as the coordinator sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// How it is run.
    pub driver: DriverSpec,
    /// Extra environment for every instance (after serin's own variables).
    pub env: BTreeMap<String, String>,
    /// HTTP path probed on the instance's address (2xx = healthy). `None`: the driver's own
    /// health (docker: the image's HEALTHCHECK if it has one, else running; command: the
    /// `health` command if given, else `start` having succeeded).
    pub health_path: Option<String>,
    /// How long an instance may take to become healthy after a deploy.
    pub health_timeout: Duration,
    /// The service's shard count (shards model); 0: not sharded.
    pub shard_count: u32,
}

/// The driver and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverSpec {
    /// A container per instance.
    Docker(DockerSpec),
    /// Shell commands per action.
    Command(CommandSpec),
}

/// `[deploy.docker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSpec {
    /// Image reference template, e.g. `serin-demo:{version}`.
    pub image: String,
    /// Container port the instance address's port is published to; `None`: nothing is
    /// published (a worker without a port).
    pub port: Option<u16>,
    /// Command argument templates.
    pub args: Vec<String>,
    /// Grace before a stopped container is killed.
    pub stop_timeout: Duration,
}

/// `[deploy.command]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Starts the instance at a version; must return (daemonize, or `systemctl start`).
    pub start: String,
    /// Stops it.
    pub stop: String,
    /// Run before `start` when the version changes (fetch artefacts…).
    pub deploy: Option<String>,
    /// Exit 0 = healthy.
    pub health: Option<String>,
    /// Bound on each command.
    pub timeout: Duration,
}

/// Where and what one instance must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The service.
    pub service: String,
    /// The instance's name in the agent config.
    pub instance: String,
    /// `host:port` the balancer and the scraper reach it at.
    pub address: String,
    /// The version to run.
    pub version: String,
    /// The variant it runs as.
    pub variant: Variant,
}

impl Placement {
    /// The value of template placeholder `name` ([`serin_proto::templates`]).
    fn value(&self, spec: &WorkloadSpec, name: &str) -> String {
        let (host, port) = self
            .address
            .rsplit_once(':')
            .unwrap_or((self.address.as_str(), ""));
        match name {
            "version" => self.version.clone(),
            "service" => self.service.clone(),
            "instance" => self.instance.clone(),
            "variant" => variant_name(self.variant).to_owned(),
            "address" => self.address.clone(),
            "host" => host.trim_matches(['[', ']']).to_owned(),
            "port" => port.to_owned(),
            "shard_count" => spec.shard_count.to_string(),
            _ => String::new(),
        }
    }

    /// Renders `template` for this placement under `spec`; the error names the template.
    fn render(
        &self,
        spec: &WorkloadSpec,
        what: &str,
        template: &str,
    ) -> Result<String, DeployError> {
        serin_proto::templates::render(template, |p| self.value(spec, p)).map_err(|reason| {
            DeployError::Template {
                what: what.to_owned(),
                reason,
            }
        })
    }

    /// serin's variables, then the spec's.
    fn env(&self, spec: &WorkloadSpec) -> Vec<(String, String)> {
        let mut env = vec![
            ("SERIN_SERVICE".to_owned(), self.service.clone()),
            ("SERIN_INSTANCE".to_owned(), self.instance.clone()),
            ("SERIN_VERSION".to_owned(), self.version.clone()),
            (
                "SERIN_VARIANT".to_owned(),
                variant_name(self.variant).to_owned(),
            ),
            (
                "CANARY".to_owned(),
                if self.variant == Variant::Canary {
                    "1"
                } else {
                    "0"
                }
                .to_owned(),
            ),
        ];
        if spec.shard_count > 0 {
            env.push(("SHARD_COUNT".to_owned(), spec.shard_count.to_string()));
            env.push(("SHARD_IDS".to_owned(), String::new()));
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Stable => "stable",
        Variant::Canary => "canary",
    }
}

fn parse_variant(s: &str) -> Variant {
    if s == "canary" {
        Variant::Canary
    } else {
        Variant::Stable
    }
}

/// A stable fingerprint of what a workload runs (FNV-1a over the rendered pieces), kept with
/// it so an unchanged deploy is recognised after an agent restart.
fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// One command or API call a driver made, for the logs and the rollout's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRecord {
    /// `deploy`, `start`, `stop`, `health`, `create`, `remove`.
    pub action: &'static str,
    /// The command line or the container name.
    pub detail: String,
    /// A command's exit code.
    pub exit_code: Option<i32>,
    /// The tail of its output.
    pub output: String,
    /// How long it took.
    pub duration: Duration,
    /// Whether it succeeded.
    pub ok: bool,
}

/// The health of what runs for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Passes its check.
    Healthy,
    /// Not yet: why.
    Starting(String),
    /// Failed for good (a container exited, its HEALTHCHECK says unhealthy): why.
    Unhealthy(String),
}

/// What serin runs for an instance now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Its version.
    pub version: String,
    /// Its variant.
    pub variant: Variant,
}

/// Why a driver could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The Docker Engine does not answer.
    #[error("the docker daemon at {socket} is unreachable: {reason}")]
    DaemonUnreachable {
        /// Its socket.
        socket: String,
        /// What failed.
        reason: String,
    },
    /// The image is not on this host.
    #[error("image {image} is not on this host (serin never pulls: build or load it here)")]
    ImageMissing {
        /// The image reference.
        image: String,
    },
    /// A container of that name exists and serin did not start it.
    #[error(
        "container {name} exists and is not managed by serin (no serin.managed label); not touching it"
    )]
    Foreign {
        /// Its name.
        name: String,
    },
    /// A Docker Engine call failed.
    #[error("docker {call} {name}: {reason}")]
    Docker {
        /// The call.
        call: &'static str,
        /// The container or image.
        name: String,
        /// The engine's answer.
        reason: String,
    },
    /// A command exited non-zero.
    #[error("{action} command `{command}` exited with {code} after {took:?}: {output}")]
    CommandFailed {
        /// Which action.
        action: &'static str,
        /// The command line.
        command: String,
        /// Its exit code (-1: killed by a signal).
        code: i32,
        /// How long it ran.
        took: Duration,
        /// The tail of its output.
        output: String,
    },
    /// A command ran past its timeout and was killed.
    #[error("{action} command `{command}` timed out after {timeout:?} and was killed")]
    CommandTimedOut {
        /// Which action.
        action: &'static str,
        /// The command line.
        command: String,
        /// The timeout.
        timeout: Duration,
    },
    /// A template could not be rendered.
    #[error("{what}: {reason}")]
    Template {
        /// Which template.
        what: String,
        /// Why.
        reason: String,
    },
    /// The instance did not become healthy in time.
    #[error("{instance} not healthy after {timeout:?}: {last}")]
    NotHealthy {
        /// The instance.
        instance: String,
        /// The health timeout.
        timeout: Duration,
        /// The last health detail.
        last: String,
    },
    /// Local I/O (the command driver's state files, spawning a shell).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The edge that runs workloads on this host.
pub trait WorkloadDriver: Send + Sync {
    /// Makes the instance run `placement` per `spec`: no action when exactly that already
    /// runs, else replaces what runs. Returns once started, not necessarily healthy.
    fn deploy(
        &self,
        placement: &Placement,
        spec: &WorkloadSpec,
    ) -> impl Future<Output = Result<Vec<ActionRecord>, DeployError>> + Send;

    /// The health of what runs for the instance now (bounded: a few seconds at most).
    fn health(
        &self,
        placement: &Placement,
        spec: &WorkloadSpec,
    ) -> impl Future<Output = Health> + Send;

    /// Stops and removes what serin runs for the instance; no action when nothing runs.
    fn remove(
        &self,
        service: &str,
        instance: &str,
        spec: &WorkloadSpec,
    ) -> impl Future<Output = Result<Vec<ActionRecord>, DeployError>> + Send;

    /// What serin runs for the instance, if anything (survives an agent restart).
    fn running(
        &self,
        service: &str,
        instance: &str,
    ) -> impl Future<Output = Result<Option<Running>, DeployError>> + Send;
}

/// The drivers of this host, chosen per spec. The docker connection is made on first use, so
/// an agent that only runs commands never needs a daemon.
pub struct Drivers {
    command: CommandDriver,
    docker: OnceCell<DockerDriver>,
    docker_socket: String,
}

impl Drivers {
    /// Drivers keeping the command driver's state under `state_dir`, docker at its default
    /// socket.
    pub fn new(state_dir: PathBuf) -> Self {
        Self::with_docker_socket(state_dir, docker::DEFAULT_SOCKET.to_owned())
    }

    /// Like [`Drivers::new`], with the Docker Engine at `socket`.
    pub fn with_docker_socket(state_dir: PathBuf, socket: String) -> Self {
        Drivers {
            command: CommandDriver::new(state_dir),
            docker: OnceCell::new(),
            docker_socket: socket,
        }
    }

    async fn docker(&self) -> Result<&DockerDriver, DeployError> {
        self.docker
            .get_or_try_init(|| DockerDriver::connect(&self.docker_socket))
            .await
    }
}

impl WorkloadDriver for Drivers {
    async fn deploy(
        &self,
        placement: &Placement,
        spec: &WorkloadSpec,
    ) -> Result<Vec<ActionRecord>, DeployError> {
        match &spec.driver {
            DriverSpec::Docker(_) => self.docker().await?.deploy(placement, spec).await,
            DriverSpec::Command(_) => self.command.deploy(placement, spec).await,
        }
    }

    async fn health(&self, placement: &Placement, spec: &WorkloadSpec) -> Health {
        match &spec.driver {
            DriverSpec::Docker(_) => match self.docker().await {
                Ok(d) => d.health(placement, spec).await,
                Err(e) => Health::Unhealthy(e.to_string()),
            },
            DriverSpec::Command(_) => self.command.health(placement, spec).await,
        }
    }

    async fn remove(
        &self,
        service: &str,
        instance: &str,
        spec: &WorkloadSpec,
    ) -> Result<Vec<ActionRecord>, DeployError> {
        match &spec.driver {
            DriverSpec::Docker(_) => self.docker().await?.remove(service, instance, spec).await,
            DriverSpec::Command(_) => self.command.remove(service, instance, spec).await,
        }
    }

    async fn running(&self, service: &str, instance: &str) -> Result<Option<Running>, DeployError> {
        if let Some(r) = self.command.running(service, instance).await? {
            return Ok(Some(r));
        }
        match self.docker.get() {
            Some(d) => d.running(service, instance).await,
            None => Ok(None),
        }
    }
}

/// Polls `driver`'s health of `placement` until it is healthy (`Ok(true)`), `cancel`
/// completes (`Ok(false)`: a newer target arrived), or it failed for good or stayed unhealthy
/// past the spec's health timeout (the error names the last health detail).
pub async fn wait_healthy<D: WorkloadDriver>(
    driver: &D,
    placement: &Placement,
    spec: &WorkloadSpec,
    cancel: impl Future<Output = ()>,
) -> Result<bool, DeployError> {
    let deadline = Instant::now() + spec.health_timeout;
    let mut cancel = std::pin::pin!(cancel);
    loop {
        let last = match driver.health(placement, spec).await {
            Health::Healthy => return Ok(true),
            Health::Unhealthy(detail) => {
                return Err(DeployError::NotHealthy {
                    instance: describe(placement),
                    timeout: spec.health_timeout,
                    last: detail,
                });
            }
            Health::Starting(detail) => detail,
        };
        if Instant::now() >= deadline {
            return Err(DeployError::NotHealthy {
                instance: describe(placement),
                timeout: spec.health_timeout,
                last,
            });
        }
        tokio::select! {
            () = &mut cancel => return Ok(false),
            () = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
}

fn describe(p: &Placement) -> String {
    format!(
        "{} instance {} ({} {})",
        variant_name(p.variant),
        p.instance,
        p.service,
        p.version
    )
}

/// An HTTP probe of `http://{address}{path}`: 2xx is healthy, anything else is not yet.
async fn probe(address: &str, path: &str) -> Health {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .no_proxy()
            .build()
            .unwrap_or_default()
    });
    let url = format!("http://{address}{path}");
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => Health::Healthy,
        Ok(r) => Health::Starting(format!("GET {url} answered {}", r.status())),
        Err(e) => Health::Starting(format!(
            "GET {url} failed: {}",
            crate::error::error_chain(&e)
        )),
    }
}

/// The last [`OUTPUT_TAIL`] bytes of `text`, cut at a character boundary.
fn tail(text: &str) -> String {
    let text = text.trim_end();
    let mut start = text.len().saturating_sub(OUTPUT_TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement {
            service: "api".into(),
            instance: "api-1".into(),
            address: "10.0.0.5:8080".into(),
            version: "v2".into(),
            variant: Variant::Canary,
        }
    }

    fn spec(shard_count: u32) -> WorkloadSpec {
        WorkloadSpec {
            driver: DriverSpec::Command(CommandSpec {
                start: "true".into(),
                stop: "true".into(),
                deploy: None,
                health: None,
                timeout: Duration::from_secs(1),
            }),
            env: BTreeMap::from([("LOG".to_owned(), "debug".to_owned())]),
            health_path: None,
            health_timeout: Duration::from_secs(1),
            shard_count,
        }
    }

    #[test]
    fn placeholders_take_the_placement_values() {
        let p = placement();
        assert_eq!(
            p.render(
                &spec(0),
                "start",
                "run {service}/{instance} {version} {variant} on {host} port {port} ({address})"
            )
            .unwrap(),
            "run api/api-1 v2 canary on 10.0.0.5 port 8080 (10.0.0.5:8080)"
        );
        assert_eq!(
            p.render(&spec(12), "start", "bot --shard-count {shard_count}")
                .unwrap(),
            "bot --shard-count 12"
        );
        assert_eq!(
            p.render(&spec(0), "start", "bot --shard-count {shard_count}")
                .unwrap(),
            "bot --shard-count 0"
        );
        let e = p
            .render(&spec(0), "deploy.command.start", "run {nope}")
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("deploy.command.start: unknown placeholder {nope}"),
            "{e}"
        );
    }

    fn names(env: &[(String, String)]) -> Vec<&str> {
        env.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn serin_variables_come_first_then_the_spec_env() {
        let env = placement().env(&spec(0));
        assert_eq!(
            names(&env),
            [
                "SERIN_SERVICE",
                "SERIN_INSTANCE",
                "SERIN_VERSION",
                "SERIN_VARIANT",
                "CANARY",
                "LOG"
            ]
        );
        assert!(env.contains(&("CANARY".into(), "1".into())));
    }

    #[test]
    fn a_sharded_service_gets_its_shard_count_and_an_empty_initial_shard_set() {
        let env = placement().env(&spec(8));
        assert_eq!(
            names(&env),
            [
                "SERIN_SERVICE",
                "SERIN_INSTANCE",
                "SERIN_VERSION",
                "SERIN_VARIANT",
                "CANARY",
                "SHARD_COUNT",
                "SHARD_IDS",
                "LOG"
            ]
        );
        assert!(env.contains(&("SHARD_COUNT".into(), "8".into())));
        assert!(env.contains(&("SHARD_IDS".into(), String::new())));
    }

    #[test]
    fn the_fingerprint_changes_with_any_part_and_not_by_concatenation() {
        assert_eq!(fingerprint(["a", "b"]), fingerprint(["a", "b"]));
        assert_ne!(fingerprint(["a", "b"]), fingerprint(["ab", ""]));
        assert_ne!(fingerprint(["a", "b"]), fingerprint(["a", "c"]));
    }

    #[test]
    fn the_output_tail_keeps_the_end_at_a_character_boundary() {
        let long = format!(
            "{}é{}",
            "x".repeat(OUTPUT_TAIL),
            "y".repeat(OUTPUT_TAIL - 1)
        );
        let t = tail(&long);
        assert!(t.len() <= OUTPUT_TAIL && t.ends_with('y'));
    }
}
