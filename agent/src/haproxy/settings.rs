//! The `[haproxy]` section of the agent config: [`HaproxySettings`], checked at config load
//! by [`HaproxySettings::problems`] (every problem named by its field path).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::traffic::Variant;

fn default_binary() -> PathBuf {
    PathBuf::from("haproxy")
}

fn default_slots() -> usize {
    8
}

pub(super) fn default_confirm_timeout() -> Duration {
    Duration::from_secs(5)
}

pub(super) fn default_resync_interval() -> Duration {
    Duration::from_secs(1)
}

/// The largest `slots` setting: more pre-provisioned slots than this per step is a typo.
pub const MAX_SLOTS: usize = 1024;

/// The `[haproxy]` section of the agent configuration.
///
/// ```toml
/// [haproxy]
/// config = "/etc/haproxy/serin.cfg"         # rendered and owned by serin
/// socket = "/run/haproxy/serin-admin.sock"  # rendered as `stats socket … level admin`
/// master_socket = "/run/haproxy/master.sock" # haproxy -W -S <this> -f <config>
/// services = [{ service = "api", listen = "0.0.0.0:80" }]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxySettings {
    /// The haproxy binary (for `-v` and `-c`); a bare name is resolved via `PATH`.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// The config file serin renders and owns; HAProxy must run with `-f <config>`.
    pub config: PathBuf,
    /// The admin socket serin renders into the config and drives.
    pub socket: PathBuf,
    /// HAProxy's master CLI socket (`haproxy -W -S <master_socket>`): reloads go through it.
    pub master_socket: PathBuf,
    /// Server slots per backend, and the step they grow by when a service has more servers.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// How long to wait for a reload to be served by a new worker.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// How often the agent compares HAProxy's live slots with the applied state and puts
    /// them back (after an HAProxy restart, or a change by hand).
    #[serde(default = "default_resync_interval", with = "humantime_serde")]
    pub resync_interval: Duration,
    /// The services this host balances.
    pub services: Vec<HaproxyService>,
}

/// One service balanced by the local HAProxy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyService {
    pub service: String,
    /// `host:port` the frontend binds.
    pub listen: String,
    /// The backend's `balance` algorithm: `roundrobin` (default), `leastconn` or `random`.
    #[serde(default)]
    pub algorithm: Option<String>,
}

/// A balancing algorithm that honours runtime weight changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastConn,
    Random,
}

impl Algorithm {
    /// The `balance` keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "roundrobin",
            Algorithm::LeastConn => "leastconn",
            Algorithm::Random => "random",
        }
    }

    /// Parses a `balance` algorithm; algorithms that ignore runtime weights are refused with
    /// the reason.
    pub fn parse(value: &str) -> Result<Algorithm, String> {
        let name = value.split('(').next().unwrap_or(value).trim();
        match name {
            "roundrobin" => Ok(Algorithm::RoundRobin),
            "leastconn" => Ok(Algorithm::LeastConn),
            "random" => Ok(Algorithm::Random),
            "static-rr" => Err(format!(
                "{value:?} ignores runtime weight changes (static weights); use roundrobin, \
                 leastconn or random"
            )),
            "first" => Err(format!(
                "{value:?} ignores weights (fills servers in order); use roundrobin, leastconn \
                 or random"
            )),
            "source" | "uri" | "url_param" | "hdr" | "rdp-cookie" | "hash" => Err(format!(
                "{value:?} is hash-based: it pins clients to servers by hash and ignores runtime \
                 weight changes, so a canary share cannot be set; use roundrobin, leastconn or \
                 random"
            )),
            _ => Err(format!(
                "unknown balancing algorithm {value:?}; use roundrobin, leastconn or random"
            )),
        }
    }
}

impl HaproxySettings {
    /// Every problem with these settings as `(field path, reason)`, the path starting with
    /// `haproxy.`; empty when they are valid.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (field, path) in [
            ("haproxy.config", &self.config),
            ("haproxy.socket", &self.socket),
            ("haproxy.master_socket", &self.master_socket),
        ] {
            if path.as_os_str().is_empty() {
                p.push((field.into(), "must not be empty".into()));
            } else if path.is_relative() {
                p.push((
                    field.into(),
                    format!("must be an absolute path, got '{}'", path.display()),
                ));
            }
        }
        if self.socket.to_str().is_none_or(|s| {
            s.chars()
                .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '#' | '\\'))
        }) {
            p.push((
                "haproxy.socket".into(),
                "must not contain spaces, quotes, '#' or '\\' (it is written into haproxy.cfg)"
                    .into(),
            ));
        }
        if self.slots == 0 || self.slots > MAX_SLOTS {
            p.push((
                "haproxy.slots".into(),
                format!("must be between 1 and {MAX_SLOTS}, got {}", self.slots),
            ));
        }
        for (field, value) in [
            ("haproxy.confirm_timeout", self.confirm_timeout),
            ("haproxy.resync_interval", self.resync_interval),
        ] {
            if value.is_zero() {
                p.push((field.into(), "must be greater than zero".into()));
            }
        }
        if self.services.is_empty() {
            p.push((
                "haproxy.services".into(),
                "list at least one service, e.g. [{ service = \"api\", listen = \"0.0.0.0:80\" }]"
                    .into(),
            ));
        }
        let mut names = std::collections::HashMap::new();
        let mut listens = std::collections::HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = |f: &str| format!("haproxy.services[{i}].{f}");
            if svc.service.is_empty()
                || !svc
                    .service
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                p.push((
                    at("service"),
                    format!("must match [A-Za-z0-9._-]+, got {:?}", svc.service),
                ));
            } else if let Some(first) = names.insert(super::backend_name(&svc.service), i) {
                p.push((
                    at("service"),
                    format!(
                        "{:?} is already carried by haproxy.services[{first}] (same HAProxy \
                         backend name)",
                        svc.service
                    ),
                ));
            }
            if !crate::nginx::is_address(&svc.listen) || !svc.listen.contains(':') {
                p.push((
                    at("listen"),
                    format!("must be host:port, got {:?}", svc.listen),
                ));
            } else if let Some(first) = listens.insert(svc.listen.as_str(), i) {
                p.push((
                    at("listen"),
                    format!(
                        "{:?} is already used by haproxy.services[{first}]",
                        svc.listen
                    ),
                ));
            }
            if let Some(algorithm) = &svc.algorithm
                && let Err(reason) = Algorithm::parse(algorithm)
            {
                p.push((
                    at("algorithm"),
                    format!("backend {}: {reason}", super::backend_name(&svc.service)),
                ));
            }
        }
        // A strategy may turn overrides on at any stage, and they add the backends
        // `serin_<svc>_stable` / `_canary`: a service already named so is refused now.
        for (i, svc) in self.services.iter().enumerate() {
            for (j, other) in self.services.iter().enumerate() {
                let clash = [Variant::Stable, Variant::Canary].into_iter().find(|v| {
                    i != j
                        && super::backend_name(&svc.service)
                            == super::variant_backend_name(&other.service, *v)
                });
                if let Some(variant) = clash {
                    p.push((
                        format!("haproxy.services[{i}].service"),
                        format!(
                            "{:?} has the HAProxy backend name {}, which header and cookie \
                             overrides of haproxy.services[{j}] ({:?}) use for its {} servers; \
                             rename one of them",
                            svc.service,
                            super::backend_name(&svc.service),
                            other.service,
                            match variant {
                                Variant::Stable => "stable",
                                Variant::Canary => "canary",
                            },
                        ),
                    ));
                }
            }
        }
        p
    }

    /// The algorithm of `services[index]` (validated by [`problems`](Self::problems)).
    pub fn algorithm(&self, index: usize) -> Algorithm {
        self.services
            .get(index)
            .and_then(|s| s.algorithm.as_deref())
            .and_then(|a| Algorithm::parse(a).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(services: &str) -> HaproxySettings {
        toml::from_str(&format!(
            "config = \"/etc/haproxy/serin.cfg\"\nsocket = \"/run/s.sock\"\n\
             master_socket = \"/run/m.sock\"\nservices = {services}\n"
        ))
        .unwrap()
    }

    #[test]
    fn defaults_apply_and_unknown_fields_are_rejected() {
        let s = settings("[{ service = \"web\", listen = \"0.0.0.0:80\" }]");
        assert_eq!(s.binary, PathBuf::from("haproxy"));
        assert_eq!(s.slots, 8);
        assert_eq!(s.resync_interval, Duration::from_secs(1));
        assert_eq!(s.algorithm(0), Algorithm::RoundRobin);
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        let err = toml::from_str::<HaproxySettings>(
            "config = \"/c\"\nsocket = \"/s\"\nmaster_socket = \"/m\"\nservices = []\nreload = 1",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `reload`"), "{err}");
    }

    #[test]
    fn algorithms_that_ignore_runtime_weights_are_refused_naming_backend_and_algorithm() {
        let s = settings(
            "[{ service = \"web\", listen = \"0.0.0.0:80\", algorithm = \"source\" },\n\
              { service = \"api\", listen = \"0.0.0.0:81\", algorithm = \"static-rr\" },\n\
              { service = \"bot\", listen = \"0.0.0.0:82\", algorithm = \"hdr(User-Agent)\" },\n\
              { service = \"ok\", listen = \"0.0.0.0:83\", algorithm = \"leastconn\" }]",
        );
        let problems = s.problems();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!(problems[0].0, "haproxy.services[0].algorithm");
        assert!(
            problems[0]
                .1
                .starts_with("backend serin_web: \"source\" is hash-based"),
            "{problems:#?}"
        );
        assert_eq!(problems[1].0, "haproxy.services[1].algorithm");
        assert!(
            problems[1].1.contains("serin_api") && problems[1].1.contains("static-rr"),
            "{problems:#?}"
        );
        assert!(
            problems[2].1.contains("\"hdr(User-Agent)\" is hash-based"),
            "{problems:#?}"
        );
        assert_eq!(s.algorithm(3), Algorithm::LeastConn);
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut s = settings(
            "[{ service = \"we b\", listen = \"0.0.0.0:80\" },\n\
              { service = \"a.b\", listen = \"nowhere\" },\n\
              { service = \"a-b\", listen = \"0.0.0.0:80\" }]",
        );
        s.config = PathBuf::from("serin.cfg");
        s.socket = PathBuf::from("/run/my sock");
        s.slots = 0;
        s.resync_interval = Duration::ZERO;
        let fields: Vec<String> = s.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "haproxy.config",
                "haproxy.socket",
                "haproxy.slots",
                "haproxy.resync_interval",
                "haproxy.services[0].service",
                "haproxy.services[1].listen",
                "haproxy.services[2].service",
                "haproxy.services[2].listen",
            ]
        );
        let none = settings("[]");
        assert_eq!(none.problems()[0].0, "haproxy.services");
    }

    #[test]
    fn a_service_named_like_another_services_override_backend_is_refused() {
        let s = settings(
            "[{ service = \"web\", listen = \"0.0.0.0:80\" },\n\
              { service = \"web.canary\", listen = \"0.0.0.0:81\" },\n\
              { service = \"web-stabl\", listen = \"0.0.0.0:82\" }]",
        );
        let problems = s.problems();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].0, "haproxy.services[1].service");
        assert!(
            problems[0].1.contains("serin_web_canary")
                && problems[0].1.contains("haproxy.services[0] (\"web\")")
                && problems[0].1.contains("canary servers"),
            "{problems:#?}"
        );
    }
}
