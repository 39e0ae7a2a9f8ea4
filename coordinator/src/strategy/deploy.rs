//! `[deploy]` of a strategy: how serin runs the versions behind an agent's *managed* instances
//! (a container per instance, or templated commands), parsed then validated like the rest of
//! the file (every problem at once, each naming its field, e.g. `deploy.docker.port`).
//!
//! Why in the strategy and not in a service file: the deployment is part of how *this* rollout
//! moves (which model, which health gate, how long a start may take), it is replicated with the
//! rollout in the log, and a rollback needs the same description that started the canary. A
//! later rollout can change the image or the command without a second file to keep in step.
//!
//! What the coordinator does with it (which instance runs which version) is
//! [`crate::deploy`]; this module only says what a valid `[deploy]` is. Templates (image, args,
//! commands, env values) follow [`serin_proto::templates`], the rule the agents render with.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, too_long};
use crate::limits::{
    MAX_DEPLOY_ARGS, MAX_DEPLOY_COMMAND, MAX_DEPLOY_ENV, MAX_DEPLOY_ENV_NAME, MAX_DEPLOY_ENV_VALUE,
    MAX_DEPLOY_HEALTH_PATH, MAX_DEPLOY_IMAGE, check_len,
};

/// Default time an instance has to become healthy after its start.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest `health_timeout`.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `health_timeout`: a stage should not wait longer than this for one instance.
pub const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time docker gives a container between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `stop_timeout`.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time one command of `[deploy.command]` may run.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest command `timeout`.
pub const MIN_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest command `timeout`.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// Most shards of a `[deploy.shards]` service (the demo bot's and Discord's practical bound).
pub const MAX_SHARDS: u32 = 4096;
/// Default least time between two session starts in one bucket (Discord's 5 s).
pub const DEFAULT_SHARD_START_INTERVAL: Duration = Duration::from_secs(5);
/// Longest `start_interval` of `[deploy.shards]`.
pub const MAX_SHARD_START_INTERVAL: Duration = Duration::from_secs(60);
/// Prefix of the environment names serin sets itself (`SERIN_VARIANT`, …).
pub const RESERVED_ENV_PREFIX: &str = "SERIN_";

/// A validated `[deploy]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    /// How a stage's weight becomes running versions.
    pub model: DeployModel,
    /// What starts and stops a version.
    pub driver: DeployDriver,
    /// HTTP path probed on the instance's address; `None`: the driver's own health (the
    /// container's health check, the `health` command) or "running" alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// An instance not healthy this long after its start fails the stage.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    /// Extra environment of every instance; values are templates.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `[deploy.shards]`: set exactly when the model is [`DeployModel::Shards`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardSpec>,
}

/// `[deploy.shards]`: the partition of a sharded service and its session start limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Shards `0..count`.
    pub count: u32,
    /// Session start buckets (`shard % max_concurrency`), one start per bucket per
    /// `start_interval`; `None`: starts are not paced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Least time between two starts in one bucket.
    #[serde(with = "humantime_serde")]
    pub start_interval: Duration,
}

/// How a stage's weight becomes running versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployModel {
    /// Managed canary instances run the canary beside the stable ones; the balancer splits by
    /// weight. At promotion the stable instances are replaced, then traffic settles back on them.
    Weighted,
    /// A stage's share of the managed instances runs the canary in place (at least one).
    Hosts,
    /// A stage's share of the service's shards is served by the managed canary instances, the
    /// rest by the stable ones; shards move with a release confirmed before the grant.
    Shards,
}

impl DeployModel {
    /// Every model with its TOML name.
    pub const ALL: [(&'static str, DeployModel); 3] = [
        ("weighted", DeployModel::Weighted),
        ("hosts", DeployModel::Hosts),
        ("shards", DeployModel::Shards),
    ];

    /// The TOML name.
    pub fn name(self) -> &'static str {
        match self {
            DeployModel::Weighted => "weighted",
            DeployModel::Hosts => "hosts",
            DeployModel::Shards => "shards",
        }
    }
}

impl fmt::Display for DeployModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What starts and stops a version: exactly one of `[deploy.docker]` and `[deploy.command]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployDriver {
    /// One container per instance, through the Docker Engine API.
    Docker(DockerDeploy),
    /// Templated commands per action, for hosts without docker.
    Command(CommandDeploy),
}

/// `[deploy.docker]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerDeploy {
    /// Image reference, a template (e.g. `serin-demo:{version}`); built locally, never pulled
    /// from a registry serin does not know.
    pub image: String,
    /// The port the container listens on, published on the instance's address port; required
    /// with the weighted model and with `health_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The container's command line, each a template; empty: the image's own.
    #[serde(default)]
    pub args: Vec<String>,
    /// Time between SIGTERM and SIGKILL when a container is stopped.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
}

/// `[deploy.command]`: shell commands, each a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandDeploy {
    /// Starts the instance's version.
    pub start: String,
    /// Stops whatever version the instance runs.
    pub stop: String,
    /// Runs before `start` when the version changes (fetch, unpack, migrate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    /// Exits 0 when the instance is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Time each command may run.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Checks that every `{name}` in `text` is a known placeholder: the rule the agents render
/// with ([`serin_proto::templates`]: `{{`/`}}` literal braces, `${…}` left to the shell).
pub fn check_template(text: &str) -> Result<(), String> {
    serin_proto::templates::check(text)
}

// ---------------------------------------------------------------------------------------------
// The file format.
// ---------------------------------------------------------------------------------------------

/// `[deploy]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeploy {
    model: Option<String>,
    health_path: Option<String>,
    health_timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    docker: Option<RawDocker>,
    command: Option<RawCommand>,
    shards: Option<RawShards>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShards {
    count: Option<i64>,
    max_concurrency: Option<i64>,
    start_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    image: Option<String>,
    port: Option<i64>,
    #[serde(default)]
    args: Vec<String>,
    stop_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    start: Option<String>,
    stop: Option<String>,
    deploy: Option<String>,
    health: Option<String>,
    timeout: Option<String>,
}

/// Validates `[deploy]`; `sticky` says whether `[traffic] sticky_key` is set (refused with the
/// hosts model: a share of hosts has no per-request split).
pub(super) fn validate_deploy(raw: &RawDeploy, sticky: bool, p: &mut Problems) -> Option<Deploy> {
    let before = p.0.len();
    let model = match raw.model.as_deref() {
        None | Some("weighted") => DeployModel::Weighted,
        Some("hosts") => DeployModel::Hosts,
        Some("shards") => DeployModel::Shards,
        Some(other) => {
            p.push(
                "deploy.model",
                format!("must be \"weighted\", \"hosts\" or \"shards\", got \"{other}\""),
            );
            DeployModel::Weighted
        }
    };
    if model != DeployModel::Weighted && sticky {
        p.push(
            "deploy.model",
            format!(
                "\"{model}\" cannot have a sticky split ([traffic] sticky_key): a share of the \
                 {} runs the canary, there is no per-request split to keep sticky",
                if model == DeployModel::Hosts {
                    "instances"
                } else {
                    "shards"
                }
            ),
        );
    }
    let shards = validate_shards(raw.shards.as_ref(), model, p);
    if let Some(path) = &raw.health_path {
        if let Err(e) = check_len("deploy.health_path", path, MAX_DEPLOY_HEALTH_PATH) {
            p.0.push(too_long(e));
        } else if !path.starts_with('/') {
            p.push(
                "deploy.health_path",
                format!("must start with '/', e.g. \"/healthz\", got \"{path}\""),
            );
        } else if !path.chars().all(|c| c.is_ascii_graphic()) {
            p.push(
                "deploy.health_path",
                "must be printable ASCII without spaces (percent-encode anything else)",
            );
        }
    }
    let health_timeout = bounded(
        p,
        "deploy.health_timeout",
        raw.health_timeout.as_deref(),
        DEFAULT_HEALTH_TIMEOUT,
        MIN_HEALTH_TIMEOUT,
        MAX_HEALTH_TIMEOUT,
    );
    if raw.env.len() > MAX_DEPLOY_ENV {
        p.push(
            "deploy.env",
            format!("at most {MAX_DEPLOY_ENV} entries, got {}", raw.env.len()),
        );
    }
    for (name, value) in &raw.env {
        let field = format!("deploy.env.{name}");
        if let Err(e) = check_len(&field, name, MAX_DEPLOY_ENV_NAME) {
            p.0.push(too_long(e));
        } else if let Err(reason) = validate_env_name(name) {
            p.push(&field, reason);
        }
        if let Err(e) = check_len(&field, value, MAX_DEPLOY_ENV_VALUE) {
            p.0.push(too_long(e));
        } else {
            text_template(p, &field, value, true);
        }
    }
    let driver = match (&raw.docker, &raw.command) {
        (Some(_), Some(_)) => {
            p.push(
                "deploy",
                "set either [deploy.docker] or [deploy.command], not both",
            );
            None
        }
        (None, None) => {
            p.push(
                "deploy",
                "needs one of [deploy.docker] (a container per instance) or [deploy.command] \
                 (commands that start and stop a version)",
            );
            None
        }
        (Some(docker), None) => {
            validate_docker(docker, model, raw.health_path.is_some(), p).map(DeployDriver::Docker)
        }
        (None, Some(command)) => validate_command(command, p).map(DeployDriver::Command),
    };
    if p.0.len() > before {
        return None;
    }
    Some(Deploy {
        model,
        driver: driver?,
        health_path: raw.health_path.clone(),
        health_timeout,
        env: raw.env.clone(),
        shards,
    })
}

/// `[deploy.shards]`: required with the shards model, refused without it.
fn validate_shards(
    raw: Option<&RawShards>,
    model: DeployModel,
    p: &mut Problems,
) -> Option<ShardSpec> {
    let raw = match (raw, model) {
        (None, DeployModel::Shards) => {
            p.push(
                "deploy.shards",
                "required with model \"shards\", e.g. [deploy.shards] count = 16",
            );
            return None;
        }
        (None, _) => return None,
        (Some(_), DeployModel::Weighted | DeployModel::Hosts) => {
            p.push(
                "deploy.shards",
                format!("only with model \"shards\" (the model is \"{model}\")"),
            );
            return None;
        }
        (Some(raw), DeployModel::Shards) => raw,
    };
    let count = match raw.count {
        None => {
            p.push("deploy.shards.count", "required, e.g. count = 16");
            None
        }
        Some(n) if (1..=i64::from(MAX_SHARDS)).contains(&n) => Some(n as u32),
        Some(n) => {
            p.push(
                "deploy.shards.count",
                format!("must be between 1 and {MAX_SHARDS}, got {n}"),
            );
            None
        }
    };
    let max_concurrency = match (raw.max_concurrency, count) {
        (None, _) => None,
        (Some(m), Some(count)) if (1..=i64::from(count)).contains(&m) => Some(m as u32),
        (Some(m), Some(count)) => {
            p.push(
                "deploy.shards.max_concurrency",
                format!("must be between 1 and the shard count {count}, got {m}"),
            );
            None
        }
        (Some(m), None) if m >= 1 => Some(m as u32),
        (Some(m), None) => {
            p.push(
                "deploy.shards.max_concurrency",
                format!("must be at least 1, got {m}"),
            );
            None
        }
    };
    let start_interval = bounded(
        p,
        "deploy.shards.start_interval",
        raw.start_interval.as_deref(),
        DEFAULT_SHARD_START_INTERVAL,
        Duration::ZERO,
        MAX_SHARD_START_INTERVAL,
    );
    Some(ShardSpec {
        count: count?,
        max_concurrency,
        start_interval,
    })
}

fn validate_docker(
    raw: &RawDocker,
    model: DeployModel,
    probed: bool,
    p: &mut Problems,
) -> Option<DockerDeploy> {
    let image = match &raw.image {
        None => {
            p.push(
                "deploy.docker.image",
                "required, e.g. image = \"api:{version}\"",
            );
            String::new()
        }
        Some(image) => {
            if let Err(e) = check_len("deploy.docker.image", image, MAX_DEPLOY_IMAGE) {
                p.0.push(too_long(e));
            } else if image.trim().is_empty() {
                p.push("deploy.docker.image", "must not be empty");
            } else if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push(
                    "deploy.docker.image",
                    format!("must not contain spaces or control characters, got \"{image}\""),
                );
            } else {
                text_template(p, "deploy.docker.image", image, false);
            }
            image.clone()
        }
    };
    let port = match raw.port {
        Some(port) if (1..=65535).contains(&port) => Some(port as u16),
        Some(port) => {
            p.push(
                "deploy.docker.port",
                format!("must be in 1..=65535, got {port}"),
            );
            None
        }
        None if model == DeployModel::Weighted => {
            p.push(
                "deploy.docker.port",
                "required with model \"weighted\": the balancer sends requests to it",
            );
            None
        }
        None if probed => {
            p.push(
                "deploy.docker.port",
                "required with deploy.health_path: the probe reaches the container on it",
            );
            None
        }
        None => None,
    };
    if raw.args.len() > MAX_DEPLOY_ARGS {
        p.push(
            "deploy.docker.args",
            format!("at most {MAX_DEPLOY_ARGS} entries, got {}", raw.args.len()),
        );
    }
    for (i, arg) in raw.args.iter().enumerate() {
        let field = format!("deploy.docker.args[{i}]");
        if let Err(e) = check_len(&field, arg, MAX_DEPLOY_COMMAND) {
            p.0.push(too_long(e));
        } else {
            text_template(p, &field, arg, true);
        }
    }
    let stop_timeout = bounded(
        p,
        "deploy.docker.stop_timeout",
        raw.stop_timeout.as_deref(),
        DEFAULT_STOP_TIMEOUT,
        Duration::ZERO,
        MAX_STOP_TIMEOUT,
    );
    Some(DockerDeploy {
        image,
        port,
        args: raw.args.clone(),
        stop_timeout,
    })
}

fn validate_command(raw: &RawCommand, p: &mut Problems) -> Option<CommandDeploy> {
    let mut command = |name: &str, text: &Option<String>, required: bool| -> Option<String> {
        let field = format!("deploy.command.{name}");
        match text {
            None if required => {
                p.push(&field, "required");
                None
            }
            None => None,
            Some(text) => {
                if let Err(e) = check_len(&field, text, MAX_DEPLOY_COMMAND) {
                    p.0.push(too_long(e));
                } else if text.trim().is_empty() {
                    p.push(&field, "must not be empty");
                } else {
                    text_template(p, &field, text, true);
                }
                Some(text.clone())
            }
        }
    };
    let start = command("start", &raw.start, true);
    let stop = command("stop", &raw.stop, true);
    let deploy = command("deploy", &raw.deploy, false);
    let health = command("health", &raw.health, false);
    let timeout = bounded(
        p,
        "deploy.command.timeout",
        raw.timeout.as_deref(),
        DEFAULT_COMMAND_TIMEOUT,
        MIN_COMMAND_TIMEOUT,
        MAX_COMMAND_TIMEOUT,
    );
    Some(CommandDeploy {
        start: start.unwrap_or_default(),
        stop: stop.unwrap_or_default(),
        deploy,
        health,
        timeout,
    })
}

/// A duration with a default and inclusive bounds, named by `field` when out of them.
fn bounded(
    p: &mut Problems,
    field: &str,
    text: Option<&str>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Duration {
    let value = p.duration(field, text).unwrap_or(default);
    if value < min || value > max {
        p.push(
            field,
            format!(
                "must be between {} and {}, got {}",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(value)
            ),
        );
    }
    value
}

/// Checks a template field; NUL never reaches a process, and line breaks only where allowed.
fn text_template(p: &mut Problems, field: &str, text: &str, line_breaks: bool) {
    if text.contains('\0') {
        p.push(field, "must not contain a NUL character");
    } else if !line_breaks && text.contains(['\n', '\r']) {
        p.push(field, "must be one line");
    } else if let Err(reason) = check_template(text) {
        p.push(field, reason);
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, not starting with [`RESERVED_ENV_PREFIX`].
fn validate_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "\"{name}\" is not an environment name: letters, digits and '_', not starting with a digit"
        ));
    }
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "\"{name}\": names starting with {RESERVED_ENV_PREFIX} are reserved for what serin sets itself"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
