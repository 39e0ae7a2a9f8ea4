//! The HAProxy traffic actuator: weights and membership through HAProxy's runtime API on
//! its admin socket, with no reload; a reload only when the structure changes.
//!
//! Layout:
//! - `settings`: [`HaproxySettings`] (the `[haproxy]` section), [`Algorithm`], validated at
//!   config load with field paths.
//! - `weights`: per-server weights in HAProxy's `0..=256` (pure; the error bound when the
//!   exact-share weights do not fit is written there).
//! - `plan`: slot assignment and the ordered `set server` commands (pure).
//! - `render`: the serin-owned config file (pure).
//! - `runtime_api`: the admin socket client and the parsing of its answers.
//! - `local`: [`LocalHaproxy`], a private master-worker HAProxy for tests and benchmarks.
//! - this file: [`HaproxyActuator`] (the I/O edge) and its [`TrafficActuator`] impl.
//!
//! **Membership: pre-provisioned slots, not `add server`/`del server`.** Each backend has
//! `slots` servers `slot0..slotN` rendered into the config; a server arriving takes a parked
//! slot (`set server B/slotI addr IP port P`, `weight W`, `state ready`), a server leaving
//! is parked (`state maint`: its established connections finish). Why not dynamic servers:
//! `del server` refuses a server that still has connections (it must be drained first, so a
//! removal becomes a wait-and-retry loop), dynamic servers are not written back to any file
//! (a restart loses them), and 2.6 restricts which keywords they take. Slots are plain
//! runtime state that `show servers state` reads back whole, so the actuator can always
//! compare what is live with what is wanted. When a service has more servers than slots the
//! backend grows by another `slots` (a structural change, one reload).
//!
//! **Weights** are set with `set server … weight N` only; HAProxy applies them at once
//! (measured: ~2 ms, 0 errors for keep-alive clients). The canary variant's share is exact
//! when the reduced weights fit in 256 and otherwise the closest achievable (`weights`).
//! Weight 0 is valid in HAProxy, so the side without traffic stays in its slots at weight 0.
//! Commands are ordered raises first, lowers after, removals last, so the backend never
//! drops to zero capacity between two commands.
//!
//! **Reloads** happen only for structural changes: the first apply after the agent starts
//! (it cannot know what the running HAProxy was started from), a new or changed service, a
//! listen or algorithm change, more servers than slots, override names that change, or a
//! running HAProxy that lacks a backend. The file is checked with `haproxy -c` before it replaces the live one (only for
//! these: `-c` takes ~100 ms, and a rewrite of server lines from parsed IPs and bounded
//! weights within a checked structure cannot break it), then
//! `reload` goes to the master CLI socket; the reload counts once a new worker (another
//! `Pid` in `show info`) answers the admin socket with every backend's slots. On any failure
//! the previous file is put back.
//!
//! **Restarts.** The file is rewritten (without a reload) on every change, so an
//! HAProxy restarted from it comes back with the current traffic. Whatever it comes back
//! with, every apply compares the live slots with the wanted ones and sends only the
//! difference, and the runtime's applier re-applies the last applied state every
//! `resync_interval` ([`TrafficActuator::resync_interval`]): an HAProxy restarted from an
//! older file, or weights changed by hand, are put back within one interval. A pid change
//! the actuator did not cause is logged as a restart.
//!
//! **Failures.** Refusals (a weight above 100, a sticky split, a variant with traffic and no
//! server, a server that is not `IP:port`, an override name outside
//! `serin_proto::overrides`' rules) happen before anything is touched, so the previous
//! traffic stays live. A runtime command HAProxy refuses halfway (it should not: every value
//! is checked first) leaves the slots partly changed and the file already rewritten; the
//! apply fails, and its retry (or the next resync) plans again from what is live.
//!
//! **Algorithms** that ignore runtime weights (`static-rr`, `first`, and the hash-based
//! `source`, `uri`, `url_param`, `hdr()`, `rdp-cookie()`, `hash`) are refused at config load
//! with the backend and the algorithm named, since serin renders the backends itself.
//!
//! **Sticky splits are refused** on HAProxy: a desired state with a `sticky_key` for a
//! carried service fails that service's apply with a clear error. nginx's `split_clients`
//! hashes a key into a percentage; the HAProxy equivalent (a `use_backend` rule on
//! `req.cook(uid),crc32,mod(100)` compared with the canary percentage) would need the
//! percentage in the config (a reload per stage) or in a map updated with `set map`, and a
//! backend per variant. The per-variant backends of the overrides below are that second
//! half; the hashing rule is not built yet.
//!
//! **Header and cookie overrides** ([`VariantOverride`], whose docs hold the rules and
//! `choose`, the reference the real-HAProxy tests compare every header × cookie value
//! against): a service whose desired state names an override header or cookie gets, beside
//! `serin_<svc>`, a backend per variant, `serin_<svc>_stable` and `serin_<svc>_canary`,
//! with as many slots as the main one, holding that variant's servers at weight 1 (an
//! override ignores the split: spread evenly within the variant) and the same
//! membership as the main backend (servers leaving are parked there too). The frontend
//! gets four rules before `default_backend`, header before cookie:
//! `use_backend serin_<svc>_canary if { req.fhdr(X-Serin-Variant) -m str -i canary }
//! { nbsrv(serin_<svc>_canary) gt 0 }`, the same for `stable`, then the same on
//! `req.cook(name)`. `nbsrv` counts only usable servers (not in maintenance, weight above
//! 0), so a variant whose servers all left falls through to the next rule and then the
//! split at run time: no rendering decision depends on membership, and membership changes
//! stay runtime commands (sent to every backend of the service). The override names are
//! structure: turning overrides on or off, or renaming them, is one checked reload (the
//! coordinator sends them for the whole active rollout, so about two reloads per rollout);
//! weight and membership changes with overrides active are not. A service whose own
//! backend name is another service's override backend (`web_canary` beside `web`) is
//! refused at config load. Metrics need nothing: the request reaches an instance of the
//! chosen variant, whose agent scrapes it.

mod local;
mod plan;
mod render;
mod runtime_api;
mod settings;
#[cfg(test)]
mod tests;
mod weights;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::actuator::{ActuatorFailure, ActuatorOutcome, TrafficActuator};
use crate::error::error_chain;
use crate::store::DesiredState;
use crate::traffic::{Route, Upstreams, Variant, VariantOverride};

pub use local::{LocalHaproxy, find_haproxy};
pub use plan::{SlotServer, assign, commands, slot_count, slot_name};
pub use render::{
    PARKED_ADDRESS, RenderError, RenderedService, backend_name, render_config, variant_backend_name,
};
pub use runtime_api::{LiveSlot, ProcessInfo, RuntimeApi, RuntimeApiError};
pub use settings::{Algorithm, HaproxyService, HaproxySettings};
pub use weights::{MAX_SHARE_ERROR, MAX_WEIGHT, canary_share, haproxy_weights};

/// How often `show info` is polled while a reload is confirmed.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound on one `haproxy -v` or `haproxy -c`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the HAProxy actuator; each names the path, command or service involved.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error(
        "haproxy binary '{}' not found (install Debian's haproxy package or set haproxy.binary)",
        binary.display()
    )]
    BinaryNotFound { binary: PathBuf },
    #[error("haproxy binary '{}' cannot be used: {reason}", binary.display())]
    BinaryUnusable { binary: PathBuf, reason: String },
    #[error("invalid haproxy settings: {}", problems.iter().map(|(f, r)| format!("{f}: {r}")).collect::<Vec<_>>().join("; "))]
    InvalidSettings { problems: Vec<(String, String)> },
    #[error("cannot render the HAProxy config: {0}")]
    Render(#[from] RenderError),
    #[error("`{command}` rejected the rendered config (live config unchanged): {stderr}")]
    ConfigCheck { command: String, stderr: String },
    #[error(transparent)]
    RuntimeApi(#[from] RuntimeApiError),
    #[error(
        "HAProxy did not serve the reloaded config within {timeout:?}: {last_seen} (previous \
         config file restored; look at HAProxy's log for the reason)"
    )]
    NotConfirmed {
        timeout: Duration,
        last_seen: String,
    },
    #[error(
        "HAProxy's slots of backend '{backend}' still differ from the applied state after the \
         commands: {remaining:?}"
    )]
    NotApplied {
        backend: String,
        remaining: Vec<String>,
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
    #[error("local haproxy in '{}' did not start: {reason}", dir.display())]
    LocalStart { dir: PathBuf, reason: String },
}

impl HaproxyError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        HaproxyError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Outcome of a successful [`HaproxyActuator::apply_services`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// HAProxy's live slots already were the wanted ones.
    Unchanged,
    /// Runtime API commands changed the slots; no reload.
    Runtime { commands: usize, elapsed: Duration },
    /// The structure changed: the config was reloaded.
    Reloaded { elapsed: Duration },
}

/// A carried service, ready to apply: its frontend and the servers its slots must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub service: String,
    pub listen: String,
    pub algorithm: Algorithm,
    /// Every server of both variants, with its HAProxy weight.
    pub servers: Vec<SlotServer>,
    /// The header and cookie that pick a variant (none: no override backends).
    pub overrides: VariantOverride,
    /// The stable servers at weight 1: the slots of `serin_<svc>_stable` (used only with
    /// overrides).
    pub stable: Vec<SlotServer>,
    /// The canary servers at weight 1: the slots of `serin_<svc>_canary` (used only with
    /// overrides).
    pub canary: Vec<SlotServer>,
}

impl ServicePlan {
    /// The backends this plan fills, each with the servers its slots must hold: the main
    /// one, then with overrides the stable and the canary one.
    fn backends(&self) -> Vec<(String, &[SlotServer])> {
        let mut backends = vec![(backend_name(&self.service), self.servers.as_slice())];
        if !self.overrides.is_none() {
            backends.push((
                variant_backend_name(&self.service, Variant::Stable),
                self.stable.as_slice(),
            ));
            backends.push((
                variant_backend_name(&self.service, Variant::Canary),
                self.canary.as_slice(),
            ));
        }
        backends
    }
}

/// What a reload made live for one service: anything else differing is structural. The
/// override names are structure (they add backends and frontend rules); which servers the
/// override backends hold is not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceStructure {
    service: String,
    listen: String,
    algorithm: Algorithm,
    /// Slots of every backend of the service.
    slots: usize,
    overrides: VariantOverride,
}

/// The structure of the live config: one entry per carried service.
type Structure = Vec<ServiceStructure>;

/// Drives one HAProxy through its admin and master sockets.
#[derive(Debug)]
pub struct HaproxyActuator {
    settings: HaproxySettings,
    version: String,
    api: RuntimeApi,
    /// The structure the last reload made live; `None` until the first one.
    structure: Option<Structure>,
    /// The worker pid last seen on the admin socket.
    last_pid: Option<u32>,
}

impl HaproxyActuator {
    /// Checks the settings and that the binary runs (`haproxy -v`) and the config's
    /// directory exists. Nothing is written and HAProxy is not contacted.
    pub async fn new(settings: HaproxySettings) -> Result<Self, HaproxyError> {
        let problems = settings.problems();
        if !problems.is_empty() {
            return Err(HaproxyError::InvalidSettings { problems });
        }
        let output = run(&settings.binary, &["-v".as_ref()])
            .await
            .map_err(|e| match e {
                HaproxyError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    HaproxyError::BinaryNotFound {
                        binary: settings.binary.clone(),
                    }
                }
                other => HaproxyError::BinaryUnusable {
                    binary: settings.binary.clone(),
                    reason: error_chain(&other),
                },
            })?;
        if !output.status.success() {
            return Err(HaproxyError::BinaryUnusable {
                binary: settings.binary.clone(),
                reason: stderr_text(&output),
            });
        }
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let dir = parent_dir(&settings.config);
        if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
            return Err(HaproxyError::InvalidSettings {
                problems: vec![(
                    "haproxy.config".into(),
                    format!("directory '{}' does not exist", dir.display()),
                )],
            });
        }
        Ok(HaproxyActuator {
            api: RuntimeApi::new(&settings.socket),
            settings,
            version,
            structure: None,
            last_pid: None,
        })
    }

    pub fn settings(&self) -> &HaproxySettings {
        &self.settings
    }

    /// The first line of `haproxy -v`, e.g. "HAProxy version 2.6.12-1+deb12u4 …".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The runtime API client of this HAProxy's admin socket.
    pub fn runtime_api(&self) -> &RuntimeApi {
        &self.api
    }

    /// The plans of the carried services for `desired` (pure): one per `[haproxy]` service,
    /// with weights from [`haproxy_weights`]. Refused per service (each error names it): a
    /// canary weight above 100, a sticky split, a variant with traffic but no server, a
    /// server whose address is not `IP:port`.
    pub fn plans(
        &self,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> Result<Vec<ServicePlan>, Vec<(String, String)>> {
        let mut plans = Vec::new();
        let mut refusals = Vec::new();
        for (i, balanced) in self.settings.services.iter().enumerate() {
            let route = Route::for_service(&balanced.service, &balanced.listen, desired, upstreams);
            match plan_service(&route, self.settings.algorithm(i)) {
                Ok(plan) => plans.push(plan),
                Err(error) => refusals.push((balanced.service.clone(), error)),
            }
        }
        if refusals.is_empty() {
            Ok(plans)
        } else {
            Err(refusals)
        }
    }

    /// Makes `plans` live: runtime commands when the structure is unchanged, else a checked
    /// config and a reload. The config file is rewritten whenever it differs from the wanted
    /// slots (checked with `haproxy -c` when the structure changed; a rewrite of server lines
    /// only is not, see the module doc).
    pub async fn apply_services(&mut self, plans: &[ServicePlan]) -> Result<Applied, HaproxyError> {
        let started = Instant::now();
        let info = self.api.process().await?;
        if let Some(previous) = self.last_pid
            && previous != info.pid
        {
            tracing::warn!(
                previous,
                pid = info.pid,
                uptime_sec = info.uptime_sec,
                "HAProxy restarted (another worker pid on the admin socket); putting the applied state back"
            );
        }
        self.last_pid = Some(info.pid);

        // Per plan, per backend (see `ServicePlan::backends`): the live slots.
        let mut live: Vec<Vec<Vec<LiveSlot>>> = Vec::with_capacity(plans.len());
        let mut missing_backend = false;
        for plan in plans {
            let mut per_backend = Vec::new();
            for (backend, _) in plan.backends() {
                match self.api.servers_state(&backend).await {
                    Ok(slots) => per_backend.push(slots),
                    Err(RuntimeApiError::NoBackend { .. }) => {
                        missing_backend = true;
                        per_backend.push(Vec::new());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            live.push(per_backend);
        }
        let structure: Structure = plans
            .iter()
            .map(|p| ServiceStructure {
                service: p.service.clone(),
                listen: p.listen.clone(),
                algorithm: p.algorithm,
                slots: slot_count(p.servers.len(), self.settings.slots),
                overrides: p.overrides.clone(),
            })
            .collect();
        let counts_match = live
            .iter()
            .zip(&structure)
            .all(|(backends, s)| backends.iter().all(|slots| slots.len() == s.slots));
        let rendered: Vec<RenderedService> = plans
            .iter()
            .zip(&live)
            .zip(&structure)
            .map(|((plan, backends), s)| {
                let mut assigned = plan
                    .backends()
                    .into_iter()
                    .zip(backends)
                    .map(|((_, servers), slots)| assign(slots, servers, s.slots));
                let slots = assigned.next().unwrap_or_default();
                RenderedService {
                    service: plan.service.clone(),
                    listen: plan.listen.clone(),
                    algorithm: plan.algorithm,
                    slots,
                    overrides: plan.overrides.clone(),
                    stable_slots: assigned.next().unwrap_or_default(),
                    canary_slots: assigned.next().unwrap_or_default(),
                }
            })
            .collect();
        let text = render_config(&self.settings.socket, &rendered)?;

        if missing_backend || !counts_match || self.structure.as_ref() != Some(&structure) {
            let previous = read_optional(&self.settings.config).await?;
            self.write_checked(&text).await?;
            if let Err(e) = self.reload(info.pid, &rendered).await {
                self.restore(previous.as_deref()).await;
                return Err(e);
            }
            self.structure = Some(structure);
            // A config rendered from the live slots needs no commands; send any difference.
            self.run_commands(&rendered).await?;
            return Ok(Applied::Reloaded {
                elapsed: started.elapsed(),
            });
        }

        let planned: usize = rendered
            .iter()
            .zip(&live)
            .flat_map(|(r, backends)| r.backends().into_iter().zip(backends))
            .map(|((backend, wanted), slots)| commands(&backend, slots, wanted).len())
            .sum();
        let on_disk = read_optional(&self.settings.config).await?;
        if on_disk.as_deref() != Some(text.as_bytes()) {
            // Only server lines differ from the structure checked at the last reload, and
            // they are rendered from parsed IPs and bounded weights: no `haproxy -c` (it
            // costs ~100 ms, most of a weight change).
            self.write_unchecked(&text).await?;
        }
        if planned == 0 {
            return Ok(Applied::Unchanged);
        }
        let sent = self.run_commands(&rendered).await?;
        Ok(Applied::Runtime {
            commands: sent,
            elapsed: started.elapsed(),
        })
    }

    /// Sends each backend's commands from its live slots to `rendered`, then checks that
    /// nothing is left to do. Returns how many commands were sent.
    async fn run_commands(&self, rendered: &[RenderedService]) -> Result<usize, HaproxyError> {
        let mut sent = 0;
        for (backend, wanted) in rendered.iter().flat_map(RenderedService::backends) {
            let live = self.api.servers_state(&backend).await?;
            for command in commands(&backend, &live, wanted) {
                self.api.set(&command).await?;
                sent += 1;
            }
            let live = self.api.servers_state(&backend).await?;
            let remaining = commands(&backend, &live, wanted);
            if !remaining.is_empty() {
                return Err(HaproxyError::NotApplied { backend, remaining });
            }
        }
        Ok(sent)
    }

    /// `haproxy -c` on a temporary file beside the config, then renames it over the config.
    async fn write_checked(&self, text: &str) -> Result<(), HaproxyError> {
        let config = &self.settings.config;
        let tmp = temp_path(config);
        write_synced(&tmp, text.as_bytes()).await?;
        let args = ["-c".as_ref(), "-q".as_ref(), "-f".as_ref(), tmp.as_os_str()];
        let checked = run(&self.settings.binary, &args).await;
        let result = match checked {
            Ok(output) if output.status.success() => tokio::fs::rename(&tmp, config)
                .await
                .map_err(|e| HaproxyError::io("rename a temporary file over", config, e)),
            Ok(output) => Err(HaproxyError::ConfigCheck {
                command: format!(
                    "{} -c -q -f {}",
                    self.settings.binary.display(),
                    tmp.display()
                ),
                stderr: stderr_text(&output),
            }),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Writes a temporary file beside the config and renames it over the config.
    async fn write_unchecked(&self, text: &str) -> Result<(), HaproxyError> {
        let config = &self.settings.config;
        let tmp = temp_path(config);
        write_synced(&tmp, text.as_bytes()).await?;
        let renamed = tokio::fs::rename(&tmp, config)
            .await
            .map_err(|e| HaproxyError::io("rename a temporary file over", config, e));
        if renamed.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        renamed
    }

    async fn restore(&self, previous: Option<&[u8]>) {
        let config = &self.settings.config;
        let result = match previous {
            Some(bytes) => write_synced(config, bytes).await,
            None => tokio::fs::remove_file(config)
                .await
                .map_err(|e| HaproxyError::io("remove", config, e)),
        };
        if let Err(e) = result {
            tracing::error!(config = %config.display(), error = %error_chain(&e), "could not restore the previous HAProxy config");
        }
    }

    /// `reload` on the master socket, then waits until a worker other than `old_pid`
    /// answers with every backend's slot count.
    async fn reload(
        &mut self,
        old_pid: u32,
        rendered: &[RenderedService],
    ) -> Result<(), HaproxyError> {
        let master = RuntimeApi::new(&self.settings.master_socket);
        master.command("reload").await?;
        let timeout = self.settings.confirm_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let last_seen = match self.confirmed(old_pid, rendered).await {
                Ok(Some(pid)) => {
                    tracing::info!(old_pid, pid, "HAProxy reloaded");
                    self.last_pid = Some(pid);
                    return Ok(());
                }
                Ok(None) => format!("worker {old_pid} still answers"),
                Err(e) => error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(HaproxyError::NotConfirmed { timeout, last_seen });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The new worker's pid once it answers with every backend (override ones included) and
    /// its slots.
    async fn confirmed(
        &self,
        old_pid: u32,
        rendered: &[RenderedService],
    ) -> Result<Option<u32>, HaproxyError> {
        let info = self.api.process().await?;
        if info.pid == old_pid {
            return Ok(None);
        }
        for (backend, wanted) in rendered.iter().flat_map(RenderedService::backends) {
            let slots = self.api.servers_state(&backend).await?;
            if slots.len() != wanted.len() {
                return Ok(None);
            }
        }
        Ok(Some(info.pid))
    }
}

impl TrafficActuator for HaproxyActuator {
    fn services(&self) -> Vec<String> {
        self.settings
            .services
            .iter()
            .map(|s| s.service.clone())
            .collect()
    }

    fn resync_interval(&self) -> Option<Duration> {
        Some(self.settings.resync_interval)
    }

    /// Refusals of single services name only those; a failure talking to HAProxy is
    /// attributed with [`ActuatorFailure::attributed`].
    async fn apply(
        &mut self,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> Result<ActuatorOutcome, ActuatorFailure> {
        let plans = match self.plans(desired, upstreams) {
            Ok(plans) => plans,
            Err(refusals) => {
                return Err(ActuatorFailure {
                    services: refusals.iter().map(|(s, _)| s.clone()).collect(),
                    error: refusals
                        .into_iter()
                        .map(|(_, e)| e)
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
        };
        match self.apply_services(&plans).await {
            Ok(Applied::Unchanged) => Ok(ActuatorOutcome::Unchanged),
            Ok(Applied::Runtime { commands, elapsed }) => {
                tracing::info!(
                    commands,
                    ?elapsed,
                    "HAProxy slots changed through the runtime API"
                );
                Ok(ActuatorOutcome::Changed { elapsed })
            }
            Ok(Applied::Reloaded { elapsed }) => Ok(ActuatorOutcome::Changed { elapsed }),
            Err(e) => Err(ActuatorFailure::attributed(
                &self.services(),
                desired,
                error_chain(&e),
            )),
        }
    }
}

/// The plan of one route (pure): weights per variant, servers as `IP:port`.
fn plan_service(route: &Route, algorithm: Algorithm) -> Result<ServicePlan, String> {
    let service = &route.service;
    let w = route.canary_weight;
    if w > 100 {
        return Err(format!(
            "service '{service}': canary_weight {w} is out of range (0..=100)"
        ));
    }
    if route.sticky_key.is_some() {
        return Err(format!(
            "service '{service}': the strategy asks for a sticky split (sticky_key), which the \
             HAProxy balancer does not support yet; use a weighted strategy, or nginx for \
             sticky splits"
        ));
    }
    route
        .overrides
        .check()
        .map_err(|reason| format!("service '{service}': {reason}"))?;
    let n_stable = route.servers_of(Variant::Stable).count();
    let n_canary = route.servers_of(Variant::Canary).count();
    let waiting = route.servers.is_empty() && w == 0;
    if w < 100 && n_stable == 0 && !waiting {
        return Err(format!(
            "service '{service}': canary_weight is {w} so stable still gets traffic, but there \
             is no stable server"
        ));
    }
    if w > 0 && n_canary == 0 {
        return Err(format!(
            "service '{service}': canary_weight is {w} but there is no canary server"
        ));
    }
    let (stable_weight, canary_weight) = haproxy_weights(w, n_stable, n_canary);
    let mut servers = Vec::with_capacity(route.servers.len());
    let (mut stable, mut canary) = (Vec::new(), Vec::new());
    for server in &route.servers {
        let address: SocketAddr = server.address.parse().map_err(|_| {
            format!(
                "service '{service}': server '{}' has address {:?}; HAProxy's slots need an \
                 IP:port address (the runtime API sets IPs, not host names)",
                server.name, server.address
            )
        })?;
        let slot_server = SlotServer {
            name: server.name.clone(),
            ip: address.ip(),
            port: address.port(),
            weight: match server.variant {
                Variant::Stable => stable_weight,
                Variant::Canary => canary_weight,
            },
        };
        // In an override backend every server of the variant takes an equal share.
        let equal = SlotServer {
            weight: 1,
            ..slot_server.clone()
        };
        match server.variant {
            Variant::Stable => stable.push(equal),
            Variant::Canary => canary.push(equal),
        }
        servers.push(slot_server);
    }
    Ok(ServicePlan {
        service: service.clone(),
        listen: route.listen.clone(),
        algorithm,
        servers,
        overrides: route.overrides.clone(),
        stable,
        canary,
    })
}

async fn run(
    binary: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<std::process::Output, HaproxyError> {
    let display = || {
        let mut s = binary.display().to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    };
    let child = Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(source)) => Err(HaproxyError::Spawn {
            command: display(),
            source,
        }),
        Err(_) => Err(HaproxyError::Spawn {
            command: display(),
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no exit within {COMMAND_TIMEOUT:?}"),
            ),
        }),
    }
}

fn stderr_text(output: &std::process::Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    if text.is_empty() {
        format!("{} with no output", output.status)
    } else {
        text
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "haproxy.cfg".into());
    parent_dir(path).join(format!(".{name}.serin-{}.tmp", std::process::id()))
}

async fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, HaproxyError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HaproxyError::io("read", path, e)),
    }
}

async fn write_synced(path: &Path, content: &[u8]) -> Result<(), HaproxyError> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| HaproxyError::io("create", path, e))?;
    file.write_all(content)
        .await
        .map_err(|e| HaproxyError::io("write", path, e))?;
    file.sync_all()
        .await
        .map_err(|e| HaproxyError::io("sync", path, e))
}
