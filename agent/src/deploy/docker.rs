//! The docker driver: one container per managed instance, through the Docker Engine API
//! (bollard) on the local socket.
//!
//! Containers are named `serin-{service}-{instance}` and labelled `serin.managed=true`,
//! `serin.service`, `serin.instance`, `serin.version`, `serin.variant` and `serin.spec` (the
//! fingerprint of the rendered image, args, port and environment). A container without the
//! managed label is never stopped, replaced or removed: a name clash with one is an error that
//! names it. Images are never pulled (the project's hosts have no registry): a missing image is
//! an error saying so. The instance address's port is published, on the address's IP, to the
//! spec's container port.
//!
//! Replacing is stop (with the spec's grace) + remove + create + start under the same name:
//! the instance has one address, so old and new cannot run side by side. In the weighted model
//! the replaced stable instance carries no traffic then (docs/deploy.md).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HealthStatusEnum, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures::StreamExt;
use tokio::time::Instant;

use super::{
    ActionRecord, DeployError, DriverSpec, Health, Placement, Running, WorkloadDriver,
    WorkloadSpec, fingerprint, parse_variant, probe, tail, variant_name,
};

/// The Docker Engine's usual socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Bound on one Docker Engine API call, in seconds.
const API_TIMEOUT_SECS: u64 = 30;
/// Log lines of an exited container kept in its health detail.
const EXIT_LOG_LINES: &str = "5";

/// Runs workloads as containers.
#[derive(Debug, Clone)]
pub struct DockerDriver {
    docker: Docker,
    socket: String,
}

/// A Docker Engine error's status code, when the engine answered.
fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The container serin names for an instance.
pub fn container_name(service: &str, instance: &str) -> String {
    format!("serin-{service}-{instance}")
}

fn spec_of(spec: &WorkloadSpec) -> &super::DockerSpec {
    match &spec.driver {
        DriverSpec::Docker(d) => d,
        DriverSpec::Command(_) => unreachable!("Drivers hands the docker driver docker specs only"),
    }
}

/// A found container: its labels and state.
struct Found {
    managed: bool,
    labels: HashMap<String, String>,
    running: bool,
}

impl DockerDriver {
    /// Connects to the Docker Engine at `socket` and pings it; a daemon that does not answer is
    /// [`DeployError::DaemonUnreachable`].
    pub async fn connect(socket: &str) -> Result<DockerDriver, DeployError> {
        let unreachable = |reason: String| DeployError::DaemonUnreachable {
            socket: format!("unix://{socket}"),
            reason,
        };
        let docker =
            Docker::connect_with_unix(socket, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| unreachable(e.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|e| unreachable(crate::error::error_chain(&e)))?;
        Ok(DockerDriver {
            docker,
            socket: socket.to_owned(),
        })
    }

    fn api_error(&self, call: &'static str, name: &str, e: bollard::errors::Error) -> DeployError {
        if status_of(&e).is_none() {
            return DeployError::DaemonUnreachable {
                socket: format!("unix://{}", self.socket),
                reason: crate::error::error_chain(&e),
            };
        }
        DeployError::Docker {
            call,
            name: name.to_owned(),
            reason: crate::error::error_chain(&e),
        }
    }

    async fn find(&self, name: &str) -> Result<Option<Found>, DeployError> {
        match self.docker.inspect_container(name, None).await {
            Ok(c) => {
                let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
                Ok(Some(Found {
                    managed: labels.get("serin.managed").is_some_and(|v| v == "true"),
                    labels,
                    running: c.state.and_then(|s| s.running).unwrap_or(false),
                }))
            }
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.api_error("inspect", name, e)),
        }
    }

    /// Stops and removes the managed container `name`.
    async fn stop_and_remove(
        &self,
        name: &str,
        grace: Duration,
    ) -> Result<ActionRecord, DeployError> {
        let started = Instant::now();
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                name,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {}
            // 304: already stopped; 404: already gone.
            Err(e) if matches!(status_of(&e), Some(304 | 404)) => {}
            Err(e) => return Err(self.api_error("stop", name, e)),
        }
        match self
            .docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(self.api_error("remove", name, e)),
        }
        Ok(ActionRecord {
            action: "remove",
            detail: name.to_owned(),
            exit_code: None,
            output: String::new(),
            duration: started.elapsed(),
            ok: true,
        })
    }

    /// The last lines of a container's output.
    async fn last_logs(&self, name: &str) -> String {
        let mut logs = self.docker.logs(
            name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: EXIT_LOG_LINES.to_owned(),
                ..Default::default()
            }),
        );
        let mut text = String::new();
        while let Some(Ok(chunk)) = logs.next().await {
            text.push_str(&chunk.to_string());
        }
        tail(&text)
    }
}

impl WorkloadDriver for DockerDriver {
    async fn deploy(
        &self,
        placement: &Placement,
        spec: &WorkloadSpec,
    ) -> Result<Vec<ActionRecord>, DeployError> {
        let d = spec_of(spec);
        let name = container_name(&placement.service, &placement.instance);
        let image = placement.render(spec, "deploy.docker.image", &d.image)?;
        let args = d
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| placement.render(spec, &format!("deploy.docker.args[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let env: Vec<String> = placement
            .env(spec)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let port = d.port.map(|p| p.to_string()).unwrap_or_default();
        let print = fingerprint(
            [image.as_str(), port.as_str(), placement.address.as_str()]
                .into_iter()
                .chain(args.iter().map(String::as_str))
                .chain(["--env--"])
                .chain(env.iter().map(String::as_str)),
        );
        let mut actions = Vec::new();
        if let Some(found) = self.find(&name).await? {
            if !found.managed {
                return Err(DeployError::Foreign { name });
            }
            if found.running && found.labels.get("serin.spec") == Some(&print) {
                return Ok(actions);
            }
            actions.push(self.stop_and_remove(&name, d.stop_timeout).await?);
        }
        match self.docker.inspect_image(&image).await {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => {
                return Err(DeployError::ImageMissing { image });
            }
            Err(e) => return Err(self.api_error("inspect image", &image, e)),
        }
        let (host, host_port) = placement
            .address
            .rsplit_once(':')
            .map(|(h, p)| (h.trim_matches(['[', ']']).to_owned(), p.to_owned()))
            .unwrap_or_default();
        let published = d.port.map(|p| format!("{p}/tcp"));
        let labels = HashMap::from([
            ("serin.managed".to_owned(), "true".to_owned()),
            ("serin.service".to_owned(), placement.service.clone()),
            ("serin.instance".to_owned(), placement.instance.clone()),
            ("serin.version".to_owned(), placement.version.clone()),
            (
                "serin.variant".to_owned(),
                variant_name(placement.variant).to_owned(),
            ),
            ("serin.spec".to_owned(), print),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: (!args.is_empty()).then_some(args),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: published.clone().map(|p| vec![p]),
            host_config: Some(HostConfig {
                port_bindings: published.map(|p| {
                    HashMap::from([(
                        p,
                        Some(vec![PortBinding {
                            host_ip: Some(host),
                            host_port: Some(host_port),
                        }]),
                    )])
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let started = Instant::now();
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| self.api_error("create", &name, e))?;
        if let Err(e) = self.docker.start_container(&name, None).await {
            // A container that cannot start (its port taken) is not left behind half made.
            let _ = self.stop_and_remove(&name, Duration::ZERO).await;
            return Err(self.api_error("start", &name, e));
        }
        actions.push(ActionRecord {
            action: "create",
            detail: format!("{name} from {image}"),
            exit_code: None,
            output: String::new(),
            duration: started.elapsed(),
            ok: true,
        });
        Ok(actions)
    }

    async fn health(&self, placement: &Placement, spec: &WorkloadSpec) -> Health {
        let name = container_name(&placement.service, &placement.instance);
        let container = match self.docker.inspect_container(&name, None).await {
            Ok(c) => c,
            Err(e) => return Health::Unhealthy(self.api_error("inspect", &name, e).to_string()),
        };
        let state = container.state.unwrap_or_default();
        if !state.running.unwrap_or(false) {
            let code = state.exit_code.unwrap_or_default();
            let logs = self.last_logs(&name).await;
            return Health::Unhealthy(format!(
                "container {name} is not running (exit code {code}): {logs}"
            ));
        }
        if let Some(path) = &spec.health_path {
            return probe(&placement.address, path).await;
        }
        match state.health.and_then(|h| h.status) {
            Some(HealthStatusEnum::HEALTHY) | Some(HealthStatusEnum::NONE) | None => {
                Health::Healthy
            }
            Some(HealthStatusEnum::UNHEALTHY) => {
                Health::Unhealthy(format!("container {name}'s HEALTHCHECK says unhealthy"))
            }
            Some(other) => Health::Starting(format!("container {name}'s health is {other:?}")),
        }
    }

    async fn remove(
        &self,
        service: &str,
        instance: &str,
        spec: &WorkloadSpec,
    ) -> Result<Vec<ActionRecord>, DeployError> {
        let name = container_name(service, instance);
        match self.find(&name).await? {
            None => Ok(Vec::new()),
            Some(found) if !found.managed => Err(DeployError::Foreign { name }),
            Some(_) => Ok(vec![
                self.stop_and_remove(&name, spec_of(spec).stop_timeout)
                    .await?,
            ]),
        }
    }

    async fn running(&self, service: &str, instance: &str) -> Result<Option<Running>, DeployError> {
        let name = container_name(service, instance);
        Ok(self
            .find(&name)
            .await?
            .filter(|f| f.managed)
            .map(|f| Running {
                version: f.labels.get("serin.version").cloned().unwrap_or_default(),
                variant: parse_variant(f.labels.get("serin.variant").map_or("", String::as_str)),
            }))
    }
}
