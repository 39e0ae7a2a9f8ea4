//! The agent's configuration file: parsed from TOML, then validated into [`AgentConfig`].
//!
//! Parsing rejects unknown fields (a typo is an error, not a silently ignored setting).
//! Validation then checks every field and reports all problems at once, each named by its
//! path in the file (`instances[1].variant: must be "stable" or "canary", got "canry"`).
//!
//! ```toml
//! name = "web-1"
//! coordinators = ["http://10.0.0.1:7000", "http://10.0.0.2:7000"]
//! interval = "1s"              # default 1s, between 100ms and 60s
//! scrape_timeout = "800ms"     # default 80% of interval
//! data_dir = "/var/lib/serin"
//! labels = { zone = "eu-1" }
//!
//! [[instances]]
//! name = "api-stable"
//! service = "api"
//! variant = "stable"           # or "canary"
//! address = "127.0.0.1:8081"   # where the balancer sends traffic
//! metrics_url = "http://127.0.0.1:8081/metrics"
//! # metrics = { requests = "http_requests_total", status_label = "code",
//! #             latency = "http_request_duration_seconds" }
//! # A service without HTTP traffic counts its failures itself (errors: that counter's increase):
//! # metrics = { requests = "worker_jobs_processed_total", errors = "worker_jobs_failed_total",
//! #             latency = "worker_job_duration_seconds" }
//!
//! # A balancer-only agent needs no [[instances]]: the coordinator sends the servers.
//! [nginx]                      # optional: this host's nginx carries these services
//! config = "/etc/nginx/nginx.conf"
//! site = "/etc/nginx/conf.d/serin.conf"
//! services = [{ service = "api", listen = "0.0.0.0:80" }]
//!
//! # Or HAProxy instead (at most one balancer section), driven over its runtime API:
//! # [haproxy]
//! # config = "/etc/haproxy/serin.cfg"          # rendered and owned by serin
//! # socket = "/run/haproxy/serin-admin.sock"   # admin socket, rendered into the config
//! # master_socket = "/run/haproxy/master.sock" # haproxy -W -S <this> -f <config>
//! # services = [{ service = "api", listen = "0.0.0.0:80" }]   # algorithm = "roundrobin"
//!
//! # What this agent does when no leader is reachable for a while during a canary
//! # (docs/agent.md, `crate::lease`):
//! [canary_lease]
//! after = "5m"                 # default 5m, at least 1s
//! on_expiry = "revert"         # default; or "hold"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::collect::MetricNames;
use crate::haproxy::HaproxySettings;
use crate::nginx::NginxSettings;
use crate::traffic::{Server, Upstreams, Variant};

/// Report interval when the file sets none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest allowed report interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest allowed report interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The agent's name, unique in the fleet: `[A-Za-z0-9._-]+`.
    pub name: String,
    /// Coordinator gRPC addresses (`http://host:port`), tried in turn. Never empty.
    pub coordinators: Vec<String>,
    /// How often the agent scrapes its instances and reports.
    pub interval: Duration,
    /// Upper bound on one scrape; at most `interval`.
    pub scrape_timeout: Duration,
    /// Directory of the local store (`<data_dir>/agent.sled`).
    pub data_dir: PathBuf,
    /// Free-form labels sent to the coordinator at registration.
    pub labels: BTreeMap<String, String>,
    /// The local app instances this agent watches (names unique).
    pub instances: Vec<InstanceConfig>,
    /// The local nginx, when this host balances traffic with nginx.
    pub nginx: Option<NginxSettings>,
    /// The local HAProxy, when this host balances traffic with HAProxy (never both).
    pub haproxy: Option<HaproxySettings>,
    /// What the agent does when no leader is reachable for a while during a canary.
    pub canary_lease: CanaryLease,
}

/// Default [`CanaryLease::after`].
pub const DEFAULT_LEASE_AFTER: Duration = Duration::from_secs(5 * 60);
/// Shortest allowed [`CanaryLease::after`].
pub const MIN_LEASE_AFTER: Duration = Duration::from_secs(1);

/// The `[canary_lease]` section: how long a canary may run on this host without a leader,
/// and what happens then (see [`crate::lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryLease {
    /// How long without a registered leader session before the lease expires.
    pub after: Duration,
    /// What the agent does when it expires during a canary.
    pub on_expiry: LeaseAction,
}

impl Default for CanaryLease {
    fn default() -> Self {
        CanaryLease {
            after: DEFAULT_LEASE_AFTER,
            on_expiry: LeaseAction::Revert,
        }
    }
}

/// What an expired canary lease does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Keep the last desired state as it is.
    Hold,
    /// Make the stable side carry everything on this host.
    Revert,
}

impl LeaseAction {
    /// The word used in the config file, the logs and the coordinator's event.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseAction::Hold => "hold",
            LeaseAction::Revert => "revert",
        }
    }
}

impl fmt::Display for LeaseAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One local app instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceConfig {
    /// Unique among this agent's instances.
    pub name: String,
    /// The service it belongs to.
    pub service: String,
    /// Which side of a rollout it serves.
    pub variant: Variant,
    /// `host:port` the load balancer forwards to.
    pub address: String,
    /// Its Prometheus metrics page (`http://…`).
    pub metrics_url: String,
    /// Which series mean requests, errors and latency.
    pub metrics: MetricNames,
    /// The version it runs, if declared (`version = "v1.2.0"`): sent to the coordinator so
    /// `serin rollout undo` can route to the instances that run an earlier revision.
    pub version: Option<String>,
    /// True when serin runs the version behind it (`managed = true`, docs/deploy.md): the
    /// coordinator says which version and variant, the service's `[deploy]` how.
    pub managed: bool,
}

/// Values that replace the file's, applied before validation (the binary's
/// `--coordinator` flag and environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOverrides {
    /// Replaces `coordinators` when `Some`.
    pub coordinators: Option<Vec<String>>,
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field in the file, e.g. `instances[1].variant`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read agent config '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, has an unknown field, or a value of the wrong type.
    #[error("{}{message}", in_file(path))]
    Parse {
        path: Option<PathBuf>,
        message: String,
    },
    /// The TOML parsed but some fields are invalid; every problem is listed, one per line.
    #[error("{}{}", in_file(path), join_lines(errors))]
    Invalid {
        path: Option<PathBuf>,
        errors: Vec<FieldError>,
    },
}

impl ConfigError {
    /// The field problems, if this is a validation error.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }

    fn with_path(self, path: &Path) -> Self {
        match self {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(path.to_owned()),
                message,
            },
            ConfigError::Invalid { errors, .. } => ConfigError::Invalid {
                path: Some(path.to_owned()),
                errors,
            },
            other => other,
        }
    }
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("invalid agent config '{}':\n", p.display()))
        .unwrap_or_default()
}

fn join_lines(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file as written; every field optional so that validation can name missing ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<String>,
    #[serde(default)]
    coordinators: Vec<String>,
    #[serde(default, with = "humantime_serde::option")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    scrape_timeout: Option<Duration>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    instances: Vec<RawInstance>,
    nginx: Option<NginxSettings>,
    haproxy: Option<HaproxySettings>,
    canary_lease: Option<RawCanaryLease>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanaryLease {
    #[serde(default, with = "humantime_serde::option")]
    after: Option<Duration>,
    on_expiry: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Option<String>,
    service: Option<String>,
    variant: Option<String>,
    address: Option<String>,
    metrics_url: Option<String>,
    metrics: Option<MetricNames>,
    version: Option<String>,
    managed: Option<bool>,
}

impl AgentConfig {
    /// Parses and validates a configuration file's text.
    pub fn from_toml(text: &str) -> Result<AgentConfig, ConfigError> {
        Self::from_toml_with(text, &ConfigOverrides::default())
    }

    /// Like [`from_toml`](Self::from_toml), with `overrides` applied before validation.
    pub fn from_toml_with(
        text: &str,
        overrides: &ConfigOverrides,
    ) -> Result<AgentConfig, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            message: e.to_string().trim_end().to_owned(),
        })?;
        if let Some(coordinators) = &overrides.coordinators {
            raw.coordinators.clone_from(coordinators);
        }
        validate(raw)
    }

    /// Reads, parses and validates the file at `path`; errors name the path.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        Self::load_with(path, &ConfigOverrides::default())
    }

    /// Like [`load`](Self::load), with `overrides` applied before validation.
    pub fn load_with(path: &Path, overrides: &ConfigOverrides) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_with(&text, overrides).map_err(|e| e.with_path(path))
    }

    /// Whether this agent has nothing to do: no instances to report on and no balancer to
    /// steer. Valid (a host being set up), but worth a warning at start.
    pub fn does_nothing(&self) -> bool {
        self.instances.is_empty() && self.nginx.is_none() && self.haproxy.is_none()
    }

    /// The services this agent's balancer (nginx or HAProxy) carries (empty without one).
    pub fn balancer_services(&self) -> Vec<String> {
        let nginx = self
            .nginx
            .iter()
            .flat_map(|n| n.services.iter().map(|s| s.service.clone()));
        let haproxy = self
            .haproxy
            .iter()
            .flat_map(|h| h.services.iter().map(|s| s.service.clone()));
        nginx.chain(haproxy).collect()
    }

    /// The upstream servers of each service, from this agent's own `[[instances]]` in file
    /// order: what its balancer routes to until the coordinator's inventory provides them.
    pub fn local_upstreams(&self) -> Upstreams {
        self.instances
            .iter()
            .map(|i| (i.service.clone(), i.server()))
            .collect()
    }
}

impl InstanceConfig {
    /// This instance as an upstream server of its service.
    pub fn server(&self) -> Server {
        Server {
            name: self.name.clone(),
            address: self.address.clone(),
            variant: self.variant,
        }
    }
}

/// Collects field errors in file order.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// The value of a required field, or a "required" problem.
    fn required<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.add(field, "required");
        }
        value
    }

    /// Checks a required identifier against `[A-Za-z0-9._-]+`.
    fn identifier(&mut self, field: &str, value: Option<String>) -> Option<String> {
        let value = self.required(field, value)?;
        if is_identifier(&value) {
            Some(value)
        } else {
            self.add(field, format!("must match [A-Za-z0-9._-]+, got {value:?}"));
            None
        }
    }
}

/// A version as the coordinator accepts it: letters, digits, `.`, `_`, `-`, `+`, 1 to 64.
fn is_version(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A Prometheus metric name the collector can read: `[A-Za-z_][A-Za-z0-9_]*` (names with `:`
/// are recording rules, which the parser skips).
fn check_metric_name(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "must be a metric name ([A-Za-z_][A-Za-z0-9_]*, e.g. \"worker_jobs_failed_total\"), got {value:?}"
        ))
    }
}

/// `host:port` with a non-empty host of plain characters and a port in 1..=65535.
fn check_address(value: &str) -> Result<(), String> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("must be host:port, got {value:?}"));
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!("must be host:port, got {value:?}"))
    }
}

/// An `http://host[:port]` URL; `with_path` allows a path and query (metrics pages).
fn check_http_url(value: &str, with_path: bool) -> Result<(), String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("invalid URL {value:?}: {e}"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "{value:?}: https is not supported yet; use an http:// URL"
            ));
        }
        other => return Err(format!("{value:?}: scheme must be http, got {other:?}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{value:?} has no host"));
    }
    if !with_path && (url.path() != "/" || url.query().is_some()) {
        return Err(format!(
            "{value:?} must be just http://host:port, without a path"
        ));
    }
    Ok(())
}

/// The `[canary_lease]` section, defaults filled in; problems go to `p`.
fn canary_lease(p: &mut Problems, raw: Option<RawCanaryLease>) -> CanaryLease {
    let mut lease = CanaryLease::default();
    let Some(raw) = raw else {
        return lease;
    };
    if let Some(after) = raw.after {
        if after < MIN_LEASE_AFTER {
            p.add(
                "canary_lease.after",
                format!("must be at least 1s, got {after:?}"),
            );
        }
        lease.after = after;
    }
    match raw.on_expiry.as_deref() {
        None | Some("revert") => {}
        Some("hold") => lease.on_expiry = LeaseAction::Hold,
        Some(other) => p.add(
            "canary_lease.on_expiry",
            format!("expected \"hold\" or \"revert\", got {other:?}"),
        ),
    }
    lease
}

fn validate(raw: RawConfig) -> Result<AgentConfig, ConfigError> {
    let mut p = Problems::default();

    let name = p.identifier("name", raw.name);

    if raw.coordinators.is_empty() {
        p.add(
            "coordinators",
            "at least one coordinator address is required, e.g. \"http://127.0.0.1:7000\"",
        );
    }
    for (i, c) in raw.coordinators.iter().enumerate() {
        if let Err(reason) = check_http_url(c, false) {
            p.add(format!("coordinators[{i}]"), reason);
        }
    }

    let interval = raw.interval.unwrap_or(DEFAULT_INTERVAL);
    let interval_ok = (MIN_INTERVAL..=MAX_INTERVAL).contains(&interval);
    if !interval_ok {
        p.add(
            "interval",
            format!("must be between 100ms and 60s, got {interval:?}"),
        );
    }
    let scrape_timeout = raw.scrape_timeout.unwrap_or(interval * 4 / 5);
    if scrape_timeout.is_zero() {
        p.add("scrape_timeout", "must be greater than zero");
    } else if interval_ok && scrape_timeout > interval {
        p.add(
            "scrape_timeout",
            format!("must not exceed interval ({interval:?}), got {scrape_timeout:?}"),
        );
    }

    let data_dir = p.required("data_dir", raw.data_dir);
    if data_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        p.add("data_dir", "must not be empty");
    }

    for key in raw.labels.keys() {
        if key.is_empty() {
            p.add("labels", "label names must not be empty");
        }
    }

    let canary_lease = canary_lease(&mut p, raw.canary_lease);

    let problems_before_instances = p.0.len();
    let mut instances = Vec::with_capacity(raw.instances.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, inst) in raw.instances.into_iter().enumerate() {
        let at = |f: &str| format!("instances[{i}].{f}");
        let name = p.identifier(&at("name"), inst.name);
        if let Some(name) = &name {
            if let Some(first) = seen.get(name) {
                p.add(
                    at("name"),
                    format!("{name:?} is already used by instances[{first}]"),
                );
            } else {
                seen.insert(name.clone(), i);
            }
        }
        let service = p.identifier(&at("service"), inst.service);
        let variant = match p.required(&at("variant"), inst.variant).as_deref() {
            Some("stable") => Some(Variant::Stable),
            Some("canary") => Some(Variant::Canary),
            Some(other) => {
                p.add(
                    at("variant"),
                    format!("must be \"stable\" or \"canary\", got {other:?}"),
                );
                None
            }
            None => None,
        };
        let address = p.required(&at("address"), inst.address);
        if let Some(Err(reason)) = address.as_deref().map(check_address) {
            p.add(at("address"), reason);
        }
        let metrics_url = p.required(&at("metrics_url"), inst.metrics_url);
        if let Some(Err(reason)) = metrics_url.as_deref().map(|u| check_http_url(u, true)) {
            p.add(at("metrics_url"), reason);
        }
        let version = inst.version;
        if let Some(v) = &version
            && !is_version(v)
        {
            p.add(
                at("version"),
                format!(
                    "must be 1 to 64 letters, digits, '.', '_', '-', '+' (e.g. \"v1.2.0\"), got {v:?}"
                ),
            );
        }
        let managed = inst.managed.unwrap_or(false);
        if managed && version.is_some() {
            p.add(
                at("version"),
                "must not be set on a managed instance: serin decides the version it runs",
            );
        }
        let metrics = inst.metrics.unwrap_or_default();
        for (field, value) in [
            ("requests", &metrics.requests),
            ("status_label", &metrics.status_label),
            ("latency", &metrics.latency),
        ] {
            if value.is_empty() {
                p.add(at(&format!("metrics.{field}")), "must not be empty");
            }
        }
        if let Some(errors) = &metrics.errors {
            if let Err(reason) = check_metric_name(errors) {
                p.add(at("metrics.errors"), reason);
            } else if *errors == metrics.requests {
                p.add(
                    at("metrics.errors"),
                    format!(
                        "must differ from metrics.requests ({errors:?}): errors are a counter of \
                         their own, such as \"worker_jobs_failed_total\""
                    ),
                );
            }
        }
        if let (Some(name), Some(service), Some(variant), Some(address), Some(metrics_url)) =
            (name, service, variant, address, metrics_url)
        {
            instances.push(InstanceConfig {
                name,
                service,
                variant,
                address,
                metrics_url,
                metrics,
                version,
                managed,
            });
        }
    }

    let instances_ok = p.0.len() == problems_before_instances;
    if raw.nginx.is_some() && raw.haproxy.is_some() {
        p.add(
            "haproxy",
            "an agent drives one balancer: keep either [nginx] or [haproxy], not both",
        );
    }
    if let Some(haproxy) = &raw.haproxy {
        for (field, reason) in haproxy.problems() {
            p.add(field, reason);
        }
    }
    let balanced: Vec<(String, &str, &str)> = raw
        .nginx
        .iter()
        .flat_map(|n| {
            n.services.iter().enumerate().map(|(i, s)| {
                (
                    format!("nginx.services[{i}].service"),
                    s.service.as_str(),
                    "nginx",
                )
            })
        })
        .chain(raw.haproxy.iter().flat_map(|h| {
            h.services.iter().enumerate().map(|(i, s)| {
                (
                    format!("haproxy.services[{i}].service"),
                    s.service.as_str(),
                    "HAProxy",
                )
            })
        }))
        .collect();
    for (field, service, balancer) in balanced {
        // No local instance is fine: the coordinator's inventory sends the servers (the
        // balancer answers 503 until it does). Local ones must include a stable one.
        let mut local = instances.iter().filter(|inst| inst.service == service);
        let all_canary =
            local.clone().next().is_some() && local.all(|inst| inst.variant == Variant::Canary);
        // Only meaningful once every instance is valid; otherwise the cause is reported above.
        if all_canary && instances_ok {
            p.add(
                field,
                format!(
                    "the [[instances]] of service {service:?} are all canary; {balancer} needs a \
                     stable one to send traffic to (or declare none, and the coordinator sends \
                     the servers)"
                ),
            );
        }
    }

    match (name, data_dir) {
        (Some(name), Some(data_dir)) if p.0.is_empty() => Ok(AgentConfig {
            name,
            coordinators: raw.coordinators,
            interval,
            scrape_timeout,
            data_dir,
            labels: raw.labels,
            instances,
            nginx: raw.nginx,
            haproxy: raw.haproxy,
            canary_lease,
        }),
        _ => Err(ConfigError::Invalid {
            path: None,
            errors: p.0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        name = "web-1"
        coordinators = ["http://127.0.0.1:7000", "http://10.0.0.2:7000"]
        interval = "500ms"
        scrape_timeout = "300ms"
        data_dir = "/var/lib/serin"
        labels = { zone = "eu-1", rack = "r7" }

        [[instances]]
        name = "api-stable"
        service = "api"
        variant = "stable"
        address = "127.0.0.1:8081"
        metrics_url = "http://127.0.0.1:8081/metrics"

        [[instances]]
        name = "api-canary"
        service = "api"
        variant = "canary"
        address = "127.0.0.1:8082"
        metrics_url = "http://127.0.0.1:8082/metrics?format=text"
        metrics = { requests = "app_requests_total", status_label = "status" }

        [nginx]
        binary = "/usr/sbin/nginx"
        config = "/etc/nginx/nginx.conf"
        site = "/etc/nginx/conf.d/serin.conf"
        services = [{ service = "api", listen = "0.0.0.0:80" }]
    "#;

    /// A minimal valid file, to which each test adds one bad line.
    const MINIMAL: &str = r#"
        name = "a"
        coordinators = ["http://127.0.0.1:7000"]
        data_dir = "/tmp/serin"
    "#;

    const STABLE_INSTANCE: &str = r#"
        [[instances]]
        name = "web-1"
        service = "web"
        variant = "stable"
        address = "127.0.0.1:8081"
        metrics_url = "http://127.0.0.1:8081/metrics"
    "#;

    fn errors_of(text: &str) -> Vec<String> {
        match AgentConfig::from_toml(text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => {
                assert!(
                    matches!(e, ConfigError::Invalid { .. }),
                    "expected a validation error, got {e}"
                );
                e.field_errors().iter().map(ToString::to_string).collect()
            }
        }
    }

    #[track_caller]
    fn assert_single_error(text: &str, expected: &str) {
        assert_eq!(errors_of(text), vec![expected.to_owned()], "for:\n{text}");
    }

    #[test]
    fn full_example_parses() {
        let c = AgentConfig::from_toml(FULL).unwrap();
        assert_eq!(c.name, "web-1");
        assert_eq!(
            c.coordinators,
            ["http://127.0.0.1:7000", "http://10.0.0.2:7000"]
        );
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.scrape_timeout, Duration::from_millis(300));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/serin"));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("eu-1"));
        assert_eq!(c.instances.len(), 2);
        assert_eq!(
            c.instances[0],
            InstanceConfig {
                name: "api-stable".into(),
                service: "api".into(),
                variant: Variant::Stable,
                address: "127.0.0.1:8081".into(),
                metrics_url: "http://127.0.0.1:8081/metrics".into(),
                metrics: MetricNames::default(),
                version: None,
                managed: false,
            }
        );
        assert_eq!(c.instances[1].variant, Variant::Canary);
        assert_eq!(c.instances[1].metrics.requests, "app_requests_total");
        assert_eq!(c.instances[1].metrics.status_label, "status");
        assert_eq!(
            c.instances[1].metrics.latency,
            MetricNames::default().latency
        );
        let nginx = c.nginx.as_ref().unwrap();
        assert_eq!(nginx.binary, PathBuf::from("/usr/sbin/nginx"));
        assert_eq!(c.balancer_services(), ["api"]);
    }

    #[test]
    fn local_upstreams_are_the_instances_of_each_service_in_file_order() {
        let c = AgentConfig::from_toml(FULL).unwrap();
        let upstreams = c.local_upstreams();
        assert_eq!(
            upstreams.of("api"),
            [
                Server {
                    name: "api-stable".into(),
                    address: "127.0.0.1:8081".into(),
                    variant: Variant::Stable,
                },
                Server {
                    name: "api-canary".into(),
                    address: "127.0.0.1:8082".into(),
                    variant: Variant::Canary,
                },
            ]
        );
        assert!(upstreams.of("web").is_empty());
        assert_eq!(
            AgentConfig::from_toml(MINIMAL).unwrap().local_upstreams(),
            Upstreams::default()
        );
    }

    #[test]
    fn defaults_apply() {
        let c = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.scrape_timeout, Duration::from_millis(800));
        assert!(c.labels.is_empty());
        assert!(c.instances.is_empty());
        assert!(c.nginx.is_none());
        assert!(c.balancer_services().is_empty());

        let c = AgentConfig::from_toml(&format!("interval = \"200ms\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.scrape_timeout, Duration::from_millis(160));
    }

    #[test]
    fn an_agent_without_instances_or_nginx_does_nothing() {
        assert!(AgentConfig::from_toml(MINIMAL).unwrap().does_nothing());
        let full = AgentConfig::from_toml(FULL).unwrap();
        assert!(!full.does_nothing());
        let mut instances_only = full.clone();
        instances_only.nginx = None;
        assert!(!instances_only.does_nothing());
        let mut nginx_only = full;
        nginx_only.instances.clear();
        assert!(!nginx_only.does_nothing());
    }

    #[test]
    fn bad_name() {
        assert_single_error(
            r#"name = "web 1"
               coordinators = ["http://127.0.0.1:7000"]
               data_dir = "/d""#,
            r#"name: must match [A-Za-z0-9._-]+, got "web 1""#,
        );
        assert_single_error(
            r#"coordinators = ["http://127.0.0.1:7000"]
               data_dir = "/d""#,
            "name: required",
        );
    }

    #[test]
    fn bad_coordinators() {
        assert_single_error(
            r#"name = "a"
               data_dir = "/d""#,
            "coordinators: at least one coordinator address is required, e.g. \
             \"http://127.0.0.1:7000\"",
        );
        let errors = errors_of(
            r#"name = "a"
               data_dir = "/d"
               coordinators = ["127.0.0.1:7000", "https://c:7000", "http://c:7000/x", "http://ok:1"]"#,
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].starts_with("coordinators[0]: "), "{errors:#?}");
        assert!(
            errors[1].starts_with("coordinators[1]: ") && errors[1].contains("https"),
            "{errors:#?}"
        );
        assert!(
            errors[2].starts_with("coordinators[2]: ") && errors[2].contains("without a path"),
            "{errors:#?}"
        );
    }

    #[test]
    fn overrides_replace_coordinators_before_validation() {
        let text = r#"name = "a"
                      data_dir = "/d""#;
        let c = AgentConfig::from_toml_with(
            text,
            &ConfigOverrides {
                coordinators: Some(vec!["http://127.0.0.1:9000".into()]),
            },
        )
        .unwrap();
        assert_eq!(c.coordinators, ["http://127.0.0.1:9000"]);
        let err = AgentConfig::from_toml_with(
            MINIMAL,
            &ConfigOverrides {
                coordinators: Some(vec!["nope".into()]),
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("coordinators[0]: "), "{err}");
    }

    #[test]
    fn bad_interval_and_scrape_timeout() {
        assert_single_error(
            &format!("interval = \"50ms\"\n{MINIMAL}"),
            "interval: must be between 100ms and 60s, got 50ms",
        );
        assert_single_error(
            &format!("interval = \"2m\"\n{MINIMAL}"),
            "interval: must be between 100ms and 60s, got 120s",
        );
        assert_single_error(
            &format!("scrape_timeout = \"2s\"\n{MINIMAL}"),
            "scrape_timeout: must not exceed interval (1s), got 2s",
        );
        assert_single_error(
            &format!("scrape_timeout = \"0s\"\n{MINIMAL}"),
            "scrape_timeout: must be greater than zero",
        );
        // Not a duration at all: a parse error naming the key.
        let err = AgentConfig::from_toml(&format!("interval = \"soon\"\n{MINIMAL}")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("interval"), "{err}");
    }

    #[test]
    fn the_canary_lease_defaults_to_revert_after_five_minutes() {
        let c = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(
            c.canary_lease,
            CanaryLease {
                after: Duration::from_secs(300),
                on_expiry: LeaseAction::Revert,
            }
        );
        let c = AgentConfig::from_toml(&format!("{MINIMAL}\n[canary_lease]\n")).unwrap();
        assert_eq!(c.canary_lease, CanaryLease::default());
    }

    #[test]
    fn the_canary_lease_is_read() {
        let c = AgentConfig::from_toml(&format!(
            "{MINIMAL}\n[canary_lease]\nafter = \"3s\"\non_expiry = \"hold\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.canary_lease,
            CanaryLease {
                after: Duration::from_secs(3),
                on_expiry: LeaseAction::Hold,
            }
        );
        let c = AgentConfig::from_toml(&format!(
            "{MINIMAL}\n[canary_lease]\nafter = \"1s\"\non_expiry = \"revert\"\n"
        ))
        .unwrap();
        assert_eq!(c.canary_lease.after, Duration::from_secs(1));
        assert_eq!(c.canary_lease.on_expiry, LeaseAction::Revert);
    }

    #[test]
    fn bad_canary_lease_values_are_named() {
        assert_single_error(
            &format!("{MINIMAL}\n[canary_lease]\non_expiry = \"x\"\n"),
            "canary_lease.on_expiry: expected \"hold\" or \"revert\", got \"x\"",
        );
        assert_single_error(
            &format!("{MINIMAL}\n[canary_lease]\nafter = \"500ms\"\n"),
            "canary_lease.after: must be at least 1s, got 500ms",
        );
        assert_single_error(
            &format!("{MINIMAL}\n[canary_lease]\nafter = \"0s\"\n"),
            "canary_lease.after: must be at least 1s, got 0ns",
        );
        let err = AgentConfig::from_toml(&format!("{MINIMAL}\n[canary_lease]\nafter = \"soon\"\n"))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("after"), "{err}");
        let err = AgentConfig::from_toml(&format!("{MINIMAL}\n[canary_lease]\nexpire = \"1m\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("expire"), "{err}");
    }

    #[test]
    fn bad_data_dir() {
        assert_single_error(
            r#"name = "a"
               coordinators = ["http://127.0.0.1:7000"]"#,
            "data_dir: required",
        );
    }

    #[test]
    fn bad_instance_fields() {
        let text = format!(
            r#"{MINIMAL}
            {STABLE_INSTANCE}
            [[instances]]
            name = "web-2"
            service = "web"
            variant = "canry"
            address = "127.0.0.1"
            metrics_url = "ftp://127.0.0.1:8082/metrics"
            metrics = {{ requests = "" }}

            [[instances]]
            name = "web-1"
            service = "we b"
            variant = "canary"
            address = "127.0.0.1:99999"
            "#
        );
        assert_eq!(
            errors_of(&text),
            vec![
                r#"instances[1].variant: must be "stable" or "canary", got "canry""#,
                r#"instances[1].address: must be host:port, got "127.0.0.1""#,
                r#"instances[1].metrics_url: "ftp://127.0.0.1:8082/metrics": scheme must be http, got "ftp""#,
                "instances[1].metrics.requests: must not be empty",
                r#"instances[2].name: "web-1" is already used by instances[0]"#,
                r#"instances[2].service: must match [A-Za-z0-9._-]+, got "we b""#,
                r#"instances[2].address: must be host:port, got "127.0.0.1:99999""#,
                "instances[2].metrics_url: required",
            ]
        );
    }

    #[test]
    fn a_managed_instance_is_read_and_may_not_declare_a_version() {
        let managed = format!("{MINIMAL}\n{STABLE_INSTANCE}\nmanaged = true\n");
        assert!(AgentConfig::from_toml(&managed).unwrap().instances[0].managed);
        assert!(
            !AgentConfig::from_toml(&format!("{MINIMAL}\n{STABLE_INSTANCE}\n"))
                .unwrap()
                .instances[0]
                .managed
        );
        assert_single_error(
            &format!("{MINIMAL}\n{STABLE_INSTANCE}\nmanaged = true\nversion = \"v1\"\n"),
            "instances[0].version: must not be set on a managed instance: serin decides the version it runs",
        );
    }

    #[test]
    fn an_instance_may_declare_the_version_it_runs_and_a_bad_one_is_named() {
        let declared = format!("{MINIMAL}\n{STABLE_INSTANCE}\nversion = \"v1.2.0+build.7\"\n");
        let c = AgentConfig::from_toml(&declared).unwrap();
        assert_eq!(c.instances[0].version.as_deref(), Some("v1.2.0+build.7"));
        let undeclared = format!("{MINIMAL}\n{STABLE_INSTANCE}");
        assert_eq!(
            AgentConfig::from_toml(&undeclared).unwrap().instances[0].version,
            None
        );
        for bad in ["", "v 1", "v1/2", &"9".repeat(65)] {
            let text = format!("{MINIMAL}\n{STABLE_INSTANCE}\nversion = {bad:?}\n");
            assert_single_error(
                &text,
                &format!(
                    "instances[0].version: must be 1 to 64 letters, digits, '.', '_', '-', '+' (e.g. \"v1.2.0\"), got {bad:?}"
                ),
            );
        }
    }

    const CANARY_INSTANCE: &str = r#"
        [[instances]]
        name = "api-c"
        service = "api"
        variant = "canary"
        address = "127.0.0.1:8082"
        metrics_url = "http://127.0.0.1:8082/metrics"
    "#;

    const NGINX_WEB_AND_API: &str = r#"
        [nginx]
        config = "/etc/nginx/nginx.conf"
        site = "/etc/nginx/conf.d/serin.conf"
        services = [
            { service = "web", listen = "0.0.0.0:80" },
            { service = "api", listen = "0.0.0.0:81" },
        ]
    "#;

    #[test]
    fn nginx_services_with_local_instances_need_a_stable_one() {
        assert_single_error(
            &format!("{MINIMAL}\n{STABLE_INSTANCE}\n{CANARY_INSTANCE}\n{NGINX_WEB_AND_API}"),
            "nginx.services[1].service: the [[instances]] of service \"api\" are all canary; \
             nginx needs a stable one to send traffic to (or declare none, and the coordinator \
             sends the servers)",
        );
    }

    #[test]
    fn a_balancer_without_instances_is_valid_its_servers_come_from_the_coordinator() {
        let c = AgentConfig::from_toml(&format!("{MINIMAL}\n{NGINX_WEB_AND_API}")).unwrap();
        assert!(c.instances.is_empty());
        assert!(!c.does_nothing());
        assert_eq!(c.balancer_services(), ["web", "api"]);
        assert_eq!(c.local_upstreams(), Upstreams::default());
        // Some services local, others not: valid too.
        AgentConfig::from_toml(&format!(
            "{MINIMAL}\n{STABLE_INSTANCE}\n{NGINX_WEB_AND_API}"
        ))
        .unwrap();
    }

    const HAPROXY_WEB: &str = r#"
        [haproxy]
        config = "/etc/haproxy/serin.cfg"
        socket = "/run/haproxy/serin.sock"
        master_socket = "/run/haproxy/master.sock"
        services = [{ service = "web", listen = "0.0.0.0:80" }]
    "#;

    #[test]
    fn an_haproxy_balancer_carries_its_services() {
        let c = AgentConfig::from_toml(&format!("{MINIMAL}\n{HAPROXY_WEB}")).unwrap();
        assert!(c.nginx.is_none());
        let haproxy = c.haproxy.as_ref().expect("[haproxy]");
        assert_eq!(haproxy.slots, 8);
        assert_eq!(c.balancer_services(), ["web"]);
        assert!(!c.does_nothing());
    }

    #[test]
    fn the_deploy_example_is_valid_with_nginx_and_with_its_haproxy_block_instead() {
        let example = include_str!("../../deploy/agent.toml");
        let c = AgentConfig::from_toml(example).expect("deploy/agent.toml as shipped");
        assert!(c.nginx.is_some() && c.haproxy.is_none());
        let (head, _) = example.split_once("\n[nginx]").expect("an [nginx] section");
        let (_, haproxy) = example
            .split_once("\n# [haproxy]")
            .expect("a commented [haproxy] section");
        let uncommented: String = format!("# [haproxy]{haproxy}")
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = AgentConfig::from_toml(&format!("{head}\n{uncommented}"))
            .expect("deploy/agent.toml with [haproxy] instead of [nginx]");
        assert!(c.nginx.is_none());
        assert_eq!(c.balancer_services(), ["api"]);
    }

    #[test]
    fn nginx_and_haproxy_together_are_refused() {
        assert_single_error(
            &format!("{MINIMAL}\n{NGINX_WEB_AND_API}\n{HAPROXY_WEB}"),
            "haproxy: an agent drives one balancer: keep either [nginx] or [haproxy], not both",
        );
    }

    #[test]
    fn haproxy_problems_are_named_by_their_field_paths() {
        let text = format!(
            "{MINIMAL}\n{STABLE_INSTANCE}\n{CANARY_INSTANCE}\n[haproxy]\nconfig = \"serin.cfg\"\n\
             socket = \"/s\"\nmaster_socket = \"/m\"\nservices = [\n\
             {{ service = \"web\", listen = \"0.0.0.0:80\", algorithm = \"source\" }},\n\
             {{ service = \"api\", listen = \"0.0.0.0:81\" }},\n]\n"
        );
        assert_eq!(
            errors_of(&text),
            vec![
                "haproxy.config: must be an absolute path, got 'serin.cfg'".to_owned(),
                "haproxy.services[0].algorithm: backend serin_web: \"source\" is hash-based: it \
                 pins clients to servers by hash and ignores runtime weight changes, so a canary \
                 share cannot be set; use roundrobin, leastconn or random"
                    .to_owned(),
                "haproxy.services[1].service: the [[instances]] of service \"api\" are all \
                 canary; HAProxy needs a stable one to send traffic to (or declare none, and the \
                 coordinator sends the servers)"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn all_problems_are_reported_one_per_line() {
        let err = AgentConfig::from_toml("name = \"\"\ninterval = \"1ms\"").unwrap_err();
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "name: must match [A-Za-z0-9._-]+, got \"\"",
                "coordinators: at least one coordinator address is required, e.g. \
                 \"http://127.0.0.1:7000\"",
                "interval: must be between 100ms and 60s, got 1ms",
                "data_dir: required",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        for text in [
            format!("{MINIMAL}\nintervall = \"1s\""),
            format!("{MINIMAL}\n{STABLE_INSTANCE}\nweight = 5"),
            format!(
                "{MINIMAL}\n{STABLE_INSTANCE}\nmetrics = {{ requests = \"r\", error = \"e\" }}"
            ),
            format!(
                "{MINIMAL}\n{STABLE_INSTANCE}\n[nginx]\nconfig = \"/c\"\nsite = \"/s\"\n\
                 services = []\nreload = \"always\""
            ),
        ] {
            let err = AgentConfig::from_toml(&text).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
    }

    #[test]
    fn an_errors_counter_is_read_and_defaults_to_none() {
        let plain = AgentConfig::from_toml(&format!("{MINIMAL}\n{STABLE_INSTANCE}")).unwrap();
        assert_eq!(plain.instances[0].metrics.errors, None);
        let worker = format!(
            "{MINIMAL}\n{STABLE_INSTANCE}\nmetrics = {{ requests = \"worker_jobs_processed_total\", \
             errors = \"worker_jobs_failed_total\", latency = \"worker_job_duration_seconds\" }}"
        );
        let c = AgentConfig::from_toml(&worker).unwrap();
        assert_eq!(
            c.instances[0].metrics,
            MetricNames {
                requests: "worker_jobs_processed_total".into(),
                errors: Some("worker_jobs_failed_total".into()),
                latency: "worker_job_duration_seconds".into(),
                ..MetricNames::default()
            }
        );
    }

    #[test]
    fn a_bad_errors_counter_is_named_by_its_field() {
        for (metrics, reason) in [
            (
                r#"{ errors = "http_requests_total" }"#,
                "must differ from metrics.requests (\"http_requests_total\"): errors are a \
                 counter of their own, such as \"worker_jobs_failed_total\"",
            ),
            (
                r#"{ requests = "jobs_total", errors = "jobs_total" }"#,
                "must differ from metrics.requests (\"jobs_total\"): errors are a counter of \
                 their own, such as \"worker_jobs_failed_total\"",
            ),
            (
                r#"{ errors = "" }"#,
                "must be a metric name ([A-Za-z_][A-Za-z0-9_]*, e.g. \"worker_jobs_failed_total\"), got \"\"",
            ),
            (
                r#"{ errors = "job:failed:rate5m" }"#,
                "must be a metric name ([A-Za-z_][A-Za-z0-9_]*, e.g. \"worker_jobs_failed_total\"), got \"job:failed:rate5m\"",
            ),
            (
                r#"{ errors = "9failed" }"#,
                "must be a metric name ([A-Za-z_][A-Za-z0-9_]*, e.g. \"worker_jobs_failed_total\"), got \"9failed\"",
            ),
            (
                r#"{ errors = "failed total" }"#,
                "must be a metric name ([A-Za-z_][A-Za-z0-9_]*, e.g. \"worker_jobs_failed_total\"), got \"failed total\"",
            ),
        ] {
            assert_single_error(
                &format!("{MINIMAL}\n{STABLE_INSTANCE}\nmetrics = {metrics}"),
                &format!("instances[0].metrics.errors: {reason}"),
            );
        }
        // Not a string: a parse error naming the key.
        let err = AgentConfig::from_toml(&format!(
            "{MINIMAL}\n{STABLE_INSTANCE}\nmetrics = {{ errors = 5 }}"
        ))
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("errors"), "{err}");
    }

    #[test]
    fn load_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("agent.toml");
        let err = AgentConfig::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        std::fs::write(
            &missing,
            "name = \"a b\"\ncoordinators = [\"http://c:1\"]\ndata_dir = \"/d\"",
        )
        .unwrap();
        let err = AgentConfig::load(&missing).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&missing.display().to_string()), "{text}");
        assert!(text.contains("name: must match"), "{text}");

        std::fs::write(&missing, MINIMAL).unwrap();
        assert_eq!(AgentConfig::load(&missing).unwrap().name, "a");
    }
}
