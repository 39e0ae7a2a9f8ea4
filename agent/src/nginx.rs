//! The nginx traffic actuator: renders the serin-owned site file, validates it with
//! `nginx -t`, reloads nginx and confirms the reload by polling a generation marker.
//!
//! Layout:
//! - `render`: pure rendering of [`Route`]s (from [`crate::traffic`]) into the site file,
//!   and [`RenderError`].
//! - this file: [`NginxSettings`] (agent config), [`NginxActuator`] (the I/O edge),
//!   [`NginxError`].
//! - `actuator_impl`: [`NginxActuator`] as a [`crate::actuator::TrafficActuator`]: a desired
//!   state becomes one [`Route`] per carried service (pure), then one
//!   [`NginxActuator::apply_routes`]; a failure is attributed to the desired services nginx
//!   carries.
//! - `local`: [`LocalNginx`], a private nginx instance for `serin demo` and the tests.
//!
//! Why the marker: `nginx -s reload` exits 0 even when the master fails to apply the new
//! config (for example a listen port already bound); the old config stays live and the only
//! trace is an `emerg` line in error.log. Every rendered server block therefore answers
//! `GET /__serin/generation` with the generation it was rendered for, and
//! [`NginxActuator::apply_routes`] polls that until the new generation answers, or restores the previous file.
//!
//! Why the settle window: after a reload the nginx master starts the new workers, sleeps
//! 100 ms ("allow new processes to start", `ngx_process_cycle.c`), and only then asks the
//! old workers to stop accepting. For that window a fresh connection can land on either
//! generation. `apply_routes` returns once the new generation has answered every probe for
//! [`RELOAD_SETTLE`], so that traffic after `Ok` follows the new routes.
//!
//! Why at most one reload per second ([`MIN_RELOAD_INTERVAL`], answered as
//! [`crate::actuator::TrafficActuator::min_change_interval`]): every reload resets the idle
//! keep-alive connections of the old workers, about 2 failed keep-alive requests per reload
//! (docs/benchmarks.md §8), and an apply takes ~0.3 s, so a burst of desired states would
//! otherwise reload ~3 times a second. The runtime's applier holds the states of a burst
//! and applies the newest one a second after the previous reload; a change that takes
//! traffic away (a rollback) is not held (`runtime/pacing.rs`).

mod actuator_impl;
mod local;
mod render;
#[cfg(test)]
pub(crate) mod tests;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;
use tokio::time::Instant;

use crate::traffic::Route;

pub use local::{LocalNginx, find_nginx};
pub(crate) use render::is_address;
pub use render::{GENERATION_PATH, RenderError, identifier, render_site};

/// How often the generation marker is polled after a reload.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long the new generation must answer every probe, with no old answer in between,
/// before a reload counts as live (nginx keeps old workers accepting for ~100 ms).
/// Measured with nginx 1.22: old-generation answers appear up to ~100 ms after the first
/// new one (130 ms after the reload command at worst over 30 reloads).
pub const RELOAD_SETTLE: Duration = Duration::from_millis(200);
/// The shortest time between two reloads of the same nginx: the applier holds the desired
/// states of a burst and applies only the newest one this long after the previous reload
/// (a change that takes traffic away goes at once). One second, the figure of the notes
/// measured before serin started (keep-alive clients lose 2-4 requests per reload).
pub const MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Upper bound on any single `nginx` command (`-v`, `-t`, `-s reload`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Placeholder generation used to compare renderings while ignoring the marker.
const FINGERPRINT_GENERATION: &str = "0";

fn default_binary() -> PathBuf {
    PathBuf::from("nginx")
}

fn default_confirm_timeout() -> Duration {
    Duration::from_secs(5)
}

/// The `[nginx]` section of the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxSettings {
    /// The nginx binary; a bare name is resolved via `PATH`.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// Main nginx.conf, used for `nginx -t -c` and `nginx -s reload -c`.
    pub config: PathBuf,
    /// Passed as `-p` when set.
    #[serde(default)]
    pub prefix: Option<PathBuf>,
    /// The file serin renders and owns; the main config's `http` block must include it.
    pub site: PathBuf,
    /// How long to wait for a reload to serve the new generation.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// The services this host balances and the address each listens on.
    pub services: Vec<BalancedService>,
}

/// One service balanced by the local nginx.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancedService {
    pub service: String,
    /// `host:port` nginx listens on for this service.
    pub listen: String,
}

/// Outcome of a successful [`NginxActuator::apply_routes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The rendering (ignoring the generation marker) equals what is live; nothing was
    /// reloaded and nginx still answers the previous generation.
    Unchanged,
    /// nginx was reloaded; `elapsed` runs from `nginx -s reload` until the new generation
    /// answered on every listen address and settled (see [`RELOAD_SETTLE`]).
    Reloaded { elapsed: Duration },
}

/// Errors of the nginx actuator. Each message names the path, command or address involved.
#[derive(Debug, thiserror::Error)]
pub enum NginxError {
    #[error(
        "nginx binary '{}' not found (install Debian's nginx package or set nginx.binary)",
        binary.display()
    )]
    BinaryNotFound { binary: PathBuf },
    #[error("nginx binary '{}' cannot be used: {reason}", binary.display())]
    BinaryUnusable { binary: PathBuf, reason: String },
    #[error(
        "nginx main config '{}' {reason} (set nginx.config to the nginx.conf whose http block \
         includes the serin site file)",
        path.display()
    )]
    ConfigMissing { path: PathBuf, reason: String },
    #[error("invalid nginx settings: {field}: {reason}")]
    InvalidSettings { field: String, reason: String },
    #[error("cannot render the nginx site file: {0}")]
    Render(#[from] RenderError),
    #[error("`{command}` rejected the rendered site file (previous file restored): {stderr}")]
    ConfigTest { command: String, stderr: String },
    #[error("`{command}` failed (previous file restored): {stderr}")]
    Reload { command: String, stderr: String },
    #[error(
        "nginx did not serve generation {generation} at http://{address}{GENERATION_PATH} \
         within {timeout:?}; last seen: {last_seen} (previous file restored; look for an \
         [emerg] line in nginx's error log, e.g. a listen port already in use)"
    )]
    NotConfirmed {
        generation: String,
        address: String,
        timeout: Duration,
        last_seen: String,
    },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not {action} '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{original}; restoring the previous site file also failed, so nginx's live config is \
         unknown: {rollback}"
    )]
    RollbackFailed {
        original: Box<NginxError>,
        rollback: Box<NginxError>,
    },
    #[error("local nginx in '{}' did not start: {reason}", dir.display())]
    LocalStart { dir: PathBuf, reason: String },
}

impl NginxError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        NginxError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// An `nginx` invocation that can be displayed in errors.
struct NginxCommand {
    binary: PathBuf,
    args: Vec<OsString>,
}

impl NginxCommand {
    fn new(binary: &Path) -> Self {
        NginxCommand {
            binary: binary.to_owned(),
            args: Vec::new(),
        }
    }

    fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    fn display(&self) -> String {
        let mut s = self.binary.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    async fn output(&self) -> Result<Output, io::Error> {
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no exit within {COMMAND_TIMEOUT:?}"),
            )),
        }
    }

    async fn run(&self) -> Result<Output, NginxError> {
        self.output().await.map_err(|source| NginxError::Spawn {
            command: self.display(),
            source,
        })
    }
}

fn stderr_text(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if text.is_empty() {
        format!("{} with no output", output.status)
    } else {
        text
    }
}

/// The address to probe for a `listen` value: wildcard hosts are probed on loopback.
fn probe_address(listen: &str) -> String {
    if listen.bytes().all(|b| b.is_ascii_digit()) {
        return format!("127.0.0.1:{listen}");
    }
    for wildcard in ["*:", "0.0.0.0:"] {
        if let Some(port) = listen.strip_prefix(wildcard) {
            return format!("127.0.0.1:{port}");
        }
    }
    if let Some(port) = listen.strip_prefix("[::]:") {
        return format!("[::1]:{port}");
    }
    listen.to_owned()
}

/// Error text with its chain of causes (reqwest hides the interesting part in `source`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// What this actuator last made live.
#[derive(Debug)]
struct AppliedState {
    /// Rendering with the generation marker replaced by a placeholder.
    fingerprint: String,
    /// Exact bytes written to the site file.
    written: String,
}

/// Drives one local nginx: one site file, reloads serialised by `&mut self`.
#[derive(Debug)]
pub struct NginxActuator {
    settings: NginxSettings,
    version: String,
    client: reqwest::Client,
    applied: Option<AppliedState>,
}

impl NginxActuator {
    /// Checks up front that the binary runs (`<binary> -v`), the main config exists and the
    /// settings are consistent. Nothing is written and nginx is not signalled.
    pub async fn new(settings: NginxSettings) -> Result<Self, NginxError> {
        validate_settings(&settings)?;

        let version_cmd = NginxCommand::new(&settings.binary).arg("-v");
        let output = match version_cmd.output().await {
            Ok(output) => output,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NginxError::BinaryNotFound {
                    binary: settings.binary.clone(),
                });
            }
            Err(e) => {
                return Err(NginxError::BinaryUnusable {
                    binary: settings.binary.clone(),
                    reason: format!("`{}`: {e}", version_cmd.display()),
                });
            }
        };
        if !output.status.success() {
            return Err(NginxError::BinaryUnusable {
                binary: settings.binary.clone(),
                reason: format!("`{}`: {}", version_cmd.display(), stderr_text(&output)),
            });
        }
        // nginx prints its version on stderr.
        let version = String::from_utf8_lossy(&output.stderr).trim().to_owned();

        let config = match (&settings.prefix, settings.config.is_relative()) {
            (Some(prefix), true) => prefix.join(&settings.config),
            _ => settings.config.clone(),
        };
        match tokio::fs::metadata(&config).await {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(NginxError::ConfigMissing {
                    path: config,
                    reason: "is not a regular file".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NginxError::ConfigMissing {
                    path: config,
                    reason: "does not exist".into(),
                });
            }
            Err(e) => {
                return Err(NginxError::ConfigMissing {
                    path: config,
                    reason: format!("cannot be read: {e}"),
                });
            }
        }
        let site_dir = site_dir(&settings.site);
        if !tokio::fs::metadata(&site_dir)
            .await
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            return Err(NginxError::InvalidSettings {
                field: "nginx.site".into(),
                reason: format!(
                    "directory '{}' of '{}' does not exist",
                    site_dir.display(),
                    settings.site.display()
                ),
            });
        }

        let client = reqwest::Client::builder()
            .no_proxy()
            // A fresh connection per probe: a kept-alive one would stay on an old worker.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| NginxError::BinaryUnusable {
                binary: settings.binary.clone(),
                reason: format!(
                    "cannot build the HTTP client for probes: {}",
                    error_chain(&e)
                ),
            })?;

        Ok(NginxActuator {
            settings,
            version,
            client,
            applied: None,
        })
    }

    pub fn settings(&self) -> &NginxSettings {
        &self.settings
    }

    /// What `nginx -v` printed, e.g. "nginx version: nginx/1.22.1".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Render, write atomically, `nginx -t`, `nginx -s reload`, then poll every listen
    /// address until it serves `generation`. On any failure the previous site file is
    /// restored (or removed if there was none) and, if a reload was sent, nginx is reloaded
    /// again. Re-applying routes equal to the live ones (ignoring the generation) while the
    /// site file is still the one written here returns [`Applied::Unchanged`] without a
    /// reload.
    pub async fn apply_routes(
        &mut self,
        routes: &[Route],
        generation: &str,
    ) -> Result<Applied, NginxError> {
        let content = render_site(routes, generation)?;
        let fingerprint = render_site(routes, FINGERPRINT_GENERATION)?;
        let site = self.settings.site.clone();

        let current = read_optional(&site).await?;
        if let Some(applied) = &self.applied
            && applied.fingerprint == fingerprint
            && current.as_deref() == Some(applied.written.as_bytes())
        {
            tracing::debug!(generation, site = %site.display(), "nginx routes unchanged; no reload");
            return Ok(Applied::Unchanged);
        }

        write_atomic(&site, content.as_bytes()).await?;
        let mut reloaded = false;
        match self.activate(routes, generation, &mut reloaded).await {
            Ok(elapsed) => {
                tracing::info!(generation, ?elapsed, site = %site.display(), "nginx reloaded");
                self.applied = Some(AppliedState {
                    fingerprint,
                    written: content,
                });
                Ok(Applied::Reloaded { elapsed })
            }
            Err(original) => {
                tracing::warn!(generation, error = %original, "nginx apply failed; restoring the previous site file");
                match self.rollback(current.as_deref(), reloaded).await {
                    Ok(()) => Err(original),
                    Err(rollback) => {
                        self.applied = None;
                        Err(NginxError::RollbackFailed {
                            original: Box::new(original),
                            rollback: Box::new(rollback),
                        })
                    }
                }
            }
        }
    }

    fn command(&self) -> NginxCommand {
        NginxCommand::new(&self.settings.binary)
    }

    fn with_config(&self, mut cmd: NginxCommand) -> NginxCommand {
        cmd = cmd.arg("-c").arg(&self.settings.config);
        if let Some(prefix) = &self.settings.prefix {
            cmd = cmd.arg("-p").arg(prefix);
        }
        cmd
    }

    async fn test_config(&self) -> Result<(), NginxError> {
        let cmd = self.with_config(self.command().arg("-t")).arg("-q");
        let output = cmd.run().await?;
        if output.status.success() {
            Ok(())
        } else {
            Err(NginxError::ConfigTest {
                command: cmd.display(),
                stderr: stderr_text(&output),
            })
        }
    }

    async fn reload(&self) -> Result<(), NginxError> {
        let cmd = self.with_config(self.command().arg("-s").arg("reload"));
        let output = cmd.run().await?;
        if output.status.success() {
            Ok(())
        } else {
            Err(NginxError::Reload {
                command: cmd.display(),
                stderr: stderr_text(&output),
            })
        }
    }

    /// `nginx -t`, reload, confirm. Sets `reloaded` once nginx accepted the reload signal.
    async fn activate(
        &self,
        routes: &[Route],
        generation: &str,
        reloaded: &mut bool,
    ) -> Result<Duration, NginxError> {
        self.test_config().await?;
        let started = Instant::now();
        self.reload().await?;
        *reloaded = true;
        let mut addresses: Vec<String> = routes.iter().map(|r| probe_address(&r.listen)).collect();
        addresses.sort_unstable();
        addresses.dedup();
        self.confirm(&addresses, generation, started).await?;
        Ok(started.elapsed())
    }

    /// Polls until every address serves `generation`, then until it has done so without
    /// interruption for [`RELOAD_SETTLE`].
    async fn confirm(
        &self,
        addresses: &[String],
        generation: &str,
        started: Instant,
    ) -> Result<(), NginxError> {
        let timeout = self.settings.confirm_timeout;
        let not_confirmed = |address: &str, last_seen: String| NginxError::NotConfirmed {
            generation: generation.to_owned(),
            address: address.to_owned(),
            timeout,
            last_seen,
        };

        let deadline = started + timeout;
        for address in addresses {
            loop {
                let seen = self.probe(address, deadline).await;
                if seen.as_deref() == Ok(generation) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(not_confirmed(address, describe(seen)));
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        tracing::debug!(generation, after = ?started.elapsed(), "nginx serves the new generation");

        let settle_started = Instant::now();
        let deadline = settle_started + timeout;
        let mut window = settle_started;
        while window.elapsed() < RELOAD_SETTLE {
            tokio::time::sleep(POLL_INTERVAL).await;
            for address in addresses {
                let seen = self.probe(address, deadline).await;
                if seen.as_deref() != Ok(generation) {
                    tracing::debug!(address, seen = %describe(seen.clone()), "stale answer while settling");
                    if Instant::now() >= deadline {
                        return Err(not_confirmed(address, describe(seen)));
                    }
                    window = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// One GET of the generation marker on a fresh connection: the trimmed body, or a
    /// description of what went wrong.
    async fn probe(&self, address: &str, deadline: Instant) -> Result<String, String> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let per_request = remaining.clamp(POLL_INTERVAL, Duration::from_secs(1));
        let url = format!("http://{address}{GENERATION_PATH}");
        let response = self
            .client
            .get(&url)
            .timeout(per_request)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| error_chain(&e))?;
        if status.is_success() {
            Ok(body.trim_end().to_owned())
        } else {
            Err(format!("HTTP {status}: {:?}", truncate(&body, 200)))
        }
    }

    async fn rollback(&self, previous: Option<&[u8]>, reloaded: bool) -> Result<(), NginxError> {
        let site = &self.settings.site;
        match previous {
            Some(bytes) => write_atomic(site, bytes).await?,
            None => match tokio::fs::remove_file(site).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(NginxError::io("remove", site, e)),
            },
        }
        if reloaded {
            self.reload().await?;
        }
        Ok(())
    }
}

fn describe(seen: Result<String, String>) -> String {
    match seen {
        Ok(generation) => format!("generation {generation:?}"),
        Err(e) => e,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn validate_settings(settings: &NginxSettings) -> Result<(), NginxError> {
    let invalid = |field: String, reason: String| NginxError::InvalidSettings { field, reason };
    if settings.confirm_timeout.is_zero() {
        return Err(invalid(
            "nginx.confirm_timeout".into(),
            "must be greater than zero".into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    let mut listens = std::collections::HashSet::new();
    for (i, svc) in settings.services.iter().enumerate() {
        if svc.service.is_empty() {
            return Err(invalid(
                format!("nginx.services[{i}].service"),
                "must not be empty".into(),
            ));
        }
        if !names.insert(svc.service.as_str()) {
            return Err(invalid(
                format!("nginx.services[{i}].service"),
                format!("'{}' is listed twice", svc.service),
            ));
        }
        if !render::is_address(&svc.listen) {
            return Err(invalid(
                format!("nginx.services[{i}].listen"),
                format!("'{}' is not a host:port address", svc.listen),
            ));
        }
        if !listens.insert(svc.listen.as_str()) {
            return Err(invalid(
                format!("nginx.services[{i}].listen"),
                format!("'{}' is used by another service", svc.listen),
            ));
        }
    }
    Ok(())
}

fn site_dir(site: &Path) -> PathBuf {
    match site.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

async fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, NginxError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NginxError::io("read", path, e)),
    }
}

/// Writes `content` to a temporary file next to `path`, syncs it and renames it over `path`,
/// so nginx never reads a half-written file.
async fn write_atomic(path: &Path, content: &[u8]) -> Result<(), NginxError> {
    use tokio::io::AsyncWriteExt;

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "site".into());
    let tmp = site_dir(path).join(format!(".{name}.serin-{}.tmp", std::process::id()));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| NginxError::io("create", &tmp, e))?;
        file.write_all(content)
            .await
            .map_err(|e| NginxError::io("write", &tmp, e))?;
        file.sync_all()
            .await
            .map_err(|e| NginxError::io("sync", &tmp, e))?;
        drop(file);
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(|e| NginxError::io("rename a temporary file over", path, e))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_reject_unknown_fields() {
        let s: NginxSettings = toml::from_str(
            r#"
            config = "/etc/nginx/nginx.conf"
            site = "/etc/nginx/conf.d/serin.conf"
            services = [{ service = "web", listen = "0.0.0.0:80" }]
            "#,
        )
        .unwrap();
        assert_eq!(s.binary, PathBuf::from("nginx"));
        assert_eq!(s.confirm_timeout, Duration::from_secs(5));
        assert_eq!(s.prefix, None);

        let s: NginxSettings = toml::from_str(
            r#"
            binary = "/usr/sbin/nginx"
            config = "/c"
            prefix = "/p"
            site = "/s"
            confirm_timeout = "750ms"
            services = []
            "#,
        )
        .unwrap();
        assert_eq!(s.confirm_timeout, Duration::from_millis(750));

        let err = toml::from_str::<NginxSettings>(
            r#"
            config = "/c"
            site = "/s"
            services = []
            reload = "always"
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("reload"), "{err}");
    }

    #[test]
    fn probe_address_maps_wildcards_to_loopback() {
        assert_eq!(probe_address("8080"), "127.0.0.1:8080");
        assert_eq!(probe_address("*:80"), "127.0.0.1:80");
        assert_eq!(probe_address("0.0.0.0:80"), "127.0.0.1:80");
        assert_eq!(probe_address("[::]:80"), "[::1]:80");
        assert_eq!(probe_address("10.0.0.5:80"), "10.0.0.5:80");
    }
}
