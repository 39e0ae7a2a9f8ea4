//! The workload reconciler: makes this host's managed instances run what the coordinator
//! assigns them (docs/deploy.md), through the deploy drivers ([`crate::deploy`]).
//!
//! One task per managed instance, each fed the instance's newest target through a watch
//! channel, so that a slow deploy or a long health wait on one instance never delays another,
//! and a newer target (a rollback) interrupts a health wait at once instead of waiting out
//! the timeout. A deploy or remove call itself runs to its end (interrupting `docker create`
//! or a start command halfway would leave something half made).
//!
//! What each instance runs is published on the [`WorkloadBoard`]: the collector reports it
//! (`Report.workloads`, which the coordinator gates stages and settles promotions on) and
//! labels the instance's metrics with the variant it runs now (a hosts-model canary runs in
//! an instance declared stable).
//!
//! An instance of a sharded service (`DeploySpec.shard_count > 0`) also has a shard task
//! ([`super::shards`]): the reconciler tells it the granted shards and how far the process is,
//! and it pushes the due shards to the process and publishes what it holds on the board. A
//! change of the grants alone never redeploys nor interrupts the health watch.
//!
//! A service whose desired state has no deploy spec is never touched: serin deploys nothing
//! there. A failure is published as `FAILED` with its reason (the coordinator rolls back on
//! it during a rollout) and retried after [`RETRY_AFTER`], since a failing stable replacement
//! after a promotion must not stay failed until the next decision.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serin_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::shards::{Phase, ShardTarget, sync_shards};
use crate::config::InstanceConfig;
use crate::deploy::{
    CommandSpec, DeployError, DockerSpec, DriverSpec, Drivers, Health, Placement, WorkloadDriver,
    WorkloadSpec, wait_healthy,
};
use crate::traffic::Variant;

/// How long a failed deploy, remove or health wait waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often a healthy workload's health is checked again.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// What one managed instance must run, from the newest desired state.
#[derive(Debug, Clone)]
struct Target {
    /// The wire form, to tell a changed spec from an unchanged one.
    wire: pb::DeploySpec,
    spec: Result<Arc<WorkloadSpec>, String>,
    /// `None`: run nothing.
    version: Option<String>,
    variant: Variant,
    /// Shards model: the shards granted to the instance, with their start delays.
    grants: BTreeMap<u32, Duration>,
    /// The rollout of the desired state this target came with (its driver actions are
    /// recorded in that rollout's events).
    rollout_id: String,
}

impl Target {
    /// Whether `other` deploys the same thing (it may grant other shards).
    fn same_deployment(&self, other: &Self) -> bool {
        self.wire == other.wire && self.version == other.version && self.variant == other.variant
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.same_deployment(other) && self.grants == other.grants
    }
}

/// What runs behind each managed instance, as the collector reports it.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkloadBoard {
    inner: Arc<Mutex<HashMap<String, BoardEntry>>>,
}

#[derive(Debug, Clone)]
struct BoardEntry {
    service: String,
    version: String,
    variant: Variant,
    state: pb::WorkloadState,
    detail: String,
    target_version: String,
    since: Instant,
    /// Shards model: the shards the instance holds, by its last answer.
    shards: Vec<u32>,
    /// The latest driver actions, oldest first, at most [`REPORTED_ACTIONS`].
    actions: VecDeque<pb::WorkloadAction>,
}

/// Driver actions kept per instance for the reports (the coordinator records them once each).
pub(crate) const REPORTED_ACTIONS: usize = 8;
/// Longest action output reported (its tail).
pub(crate) const REPORTED_ACTION_OUTPUT: usize = 512;
/// Longest action detail reported (a command line, a container name).
pub(crate) const REPORTED_ACTION_DETAIL: usize = 1024;

/// The next action sequence number: strictly increasing in this process, and starting at the
/// process's start time in microseconds, so a restarted agent's numbers are higher still.
fn next_action_seq() -> u64 {
    static NEXT: std::sync::LazyLock<std::sync::atomic::AtomicU64> =
        std::sync::LazyLock::new(|| {
            let micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            std::sync::atomic::AtomicU64::new(micros)
        });
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The last `max` bytes of `text`, on a character boundary.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// The first `max` bytes of `text`, on a character boundary.
fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl WorkloadBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BoardEntry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The variant the instance runs as now, when serin runs something there.
    pub(crate) fn variant_of(&self, instance: &str) -> Option<Variant> {
        self.lock()
            .get(instance)
            .filter(|e| !e.version.is_empty())
            .map(|e| e.variant)
    }

    /// Every managed instance's status, for a report.
    pub(crate) fn report(&self, now: Instant) -> Vec<pb::WorkloadStatus> {
        let mut statuses: Vec<_> = self
            .lock()
            .iter()
            .map(|(instance, e)| pb::WorkloadStatus {
                service: e.service.clone(),
                instance: instance.clone(),
                version: e.version.clone(),
                variant: proto_variant(e.variant) as i32,
                state: e.state as i32,
                detail: e.detail.clone(),
                target_version: e.target_version.clone(),
                for_ms: u64::try_from(now.duration_since(e.since).as_millis()).unwrap_or(u64::MAX),
                shards: e.shards.clone(),
                actions: e.actions.iter().cloned().collect(),
            })
            .collect();
        statuses.sort_by(|a, b| a.instance.cmp(&b.instance));
        statuses
    }

    /// Records a state; the `since` clock restarts only when the state or target changes.
    fn set(&self, instance: &InstanceConfig, update: Update) {
        let mut board = self.lock();
        let now = Instant::now();
        let entry = board
            .entry(instance.name.clone())
            .or_insert_with(|| BoardEntry {
                service: instance.service.clone(),
                version: String::new(),
                variant: instance.variant,
                state: pb::WorkloadState::Absent,
                detail: String::new(),
                target_version: String::new(),
                since: now,
                shards: Vec::new(),
                actions: VecDeque::new(),
            });
        if entry.state != update.state || entry.target_version != update.target_version {
            entry.since = now;
        }
        if let Some((version, variant)) = update.running {
            if version.is_empty() {
                entry.shards.clear();
            }
            entry.version = version;
            entry.variant = variant;
        }
        entry.state = update.state;
        entry.detail = update.detail;
        entry.target_version = update.target_version;
    }

    /// Records driver actions taken for `target` (the newest [`REPORTED_ACTIONS`] are kept).
    fn record_actions(
        &self,
        instance: &InstanceConfig,
        target: &Target,
        actions: impl IntoIterator<Item = pb::WorkloadAction>,
    ) {
        let mut board = self.lock();
        let Some(entry) = board.get_mut(&instance.name) else {
            return;
        };
        for mut action in actions {
            action.version = target.version.clone().unwrap_or_default();
            action.rollout_id.clone_from(&target.rollout_id);
            if entry.actions.len() == REPORTED_ACTIONS {
                entry.actions.pop_front();
            }
            entry.actions.push_back(action);
        }
    }

    /// Records the shards the instance holds (an instance with no entry yet has no report).
    fn set_shards(&self, instance: &str, held: &[u32]) {
        if let Some(entry) = self.lock().get_mut(instance)
            && entry.shards != held
        {
            entry.shards = held.to_vec();
        }
    }
}

/// One change of an instance's board entry.
struct Update {
    state: pb::WorkloadState,
    detail: String,
    target_version: String,
    /// What runs now, when that changed (`Some((String::new(), _))`: nothing runs).
    running: Option<(String, Variant)>,
}

impl Update {
    fn new(state: pb::WorkloadState, target: &Target, detail: impl Into<String>) -> Self {
        Update {
            state,
            detail: detail.into(),
            target_version: target.version.clone().unwrap_or_default(),
            running: None,
        }
    }

    fn running(mut self, version: String, variant: Variant) -> Self {
        self.running = Some((version, variant));
        self
    }
}

fn proto_variant(v: Variant) -> pb::Variant {
    match v {
        Variant::Stable => pb::Variant::Stable,
        Variant::Canary => pb::Variant::Canary,
    }
}

/// Reads the wire deploy spec; the error names the field.
pub(crate) fn spec_from_proto(s: &pb::DeploySpec) -> Result<WorkloadSpec, String> {
    let driver = match &s.driver {
        Some(pb::deploy_spec::Driver::Docker(d)) => DriverSpec::Docker(DockerSpec {
            image: d.image.clone(),
            port: match d.port {
                0 => None,
                p => Some(
                    u16::try_from(p)
                        .map_err(|_| format!("deploy.docker.port {p} is not a port"))?,
                ),
            },
            args: d.args.clone(),
            stop_timeout: Duration::from_millis(d.stop_timeout_ms),
        }),
        Some(pb::deploy_spec::Driver::Command(c)) => DriverSpec::Command(CommandSpec {
            start: c.start.clone(),
            stop: c.stop.clone(),
            deploy: Some(c.deploy.clone()).filter(|d| !d.is_empty()),
            health: Some(c.health.clone()).filter(|h| !h.is_empty()),
            timeout: Duration::from_millis(c.timeout_ms.max(1)),
        }),
        None => return Err("the deploy spec names no driver (docker or command)".into()),
    };
    Ok(WorkloadSpec {
        driver,
        env: s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        health_path: Some(s.health_path.clone()).filter(|p| !p.is_empty()),
        health_timeout: Duration::from_millis(s.health_timeout_ms.max(1)),
        shard_count: s.shard_count,
    })
}

/// The target of each of `instances` in `desired`; an instance the desired state does not
/// mention (its service has no deploy spec, or the coordinator does not know it yet) has none.
fn targets(
    instances: &[InstanceConfig],
    desired: &pb::DesiredState,
) -> HashMap<String, Option<Target>> {
    let mut out: HashMap<String, Option<Target>> =
        instances.iter().map(|i| (i.name.clone(), None)).collect();
    for service in &desired.services {
        let Some(wire) = &service.deploy else {
            continue;
        };
        let spec = spec_from_proto(wire).map(Arc::new);
        for workload in &service.workloads {
            let Some(instance) = instances
                .iter()
                .find(|i| i.name == workload.instance && i.service == service.service)
            else {
                continue;
            };
            let variant = if workload.variant == pb::Variant::Canary as i32 {
                Variant::Canary
            } else {
                Variant::Stable
            };
            out.insert(
                instance.name.clone(),
                Some(Target {
                    wire: wire.clone(),
                    spec: spec.clone(),
                    version: Some(workload.version.clone()).filter(|v| !v.is_empty()),
                    variant,
                    grants: workload
                        .shards
                        .iter()
                        .map(|g| (g.shard, Duration::from_millis(g.start_after_ms)))
                        .collect(),
                    rollout_id: service.rollout_id.clone(),
                }),
            );
        }
    }
    out
}

/// The workload reconciler task.
pub(super) struct Workloads {
    /// The managed instances, in config order.
    pub(super) instances: Vec<InstanceConfig>,
    pub(super) drivers: Arc<Drivers>,
    pub(super) board: WorkloadBoard,
    pub(super) desired: watch::Receiver<Option<pb::DesiredState>>,
}

impl Workloads {
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut set = JoinSet::new();
        let mut senders = HashMap::new();
        for instance in &self.instances {
            let (tx, rx) = watch::channel(None);
            senders.insert(instance.name.clone(), tx);
            let (shards_tx, shards_rx) = watch::channel(ShardTarget::default());
            set.spawn(run_instance(
                instance.clone(),
                Arc::clone(&self.drivers),
                self.board.clone(),
                rx,
                shards_tx,
                shutdown.clone(),
            ));
            let (board, name, address) = (
                self.board.clone(),
                instance.name.clone(),
                instance.address.clone(),
            );
            let shutdown = shutdown.clone();
            set.spawn(async move {
                let publish = |held: &[u32]| board.set_shards(&name, held);
                sync_shards(&address, shards_rx, publish, shutdown).await;
            });
        }
        loop {
            let desired = self.desired.borrow_and_update().clone();
            if let Some(desired) = desired {
                for (name, target) in targets(&self.instances, &desired) {
                    if let Some(tx) = senders.get(&name) {
                        tx.send_if_modified(|current| {
                            let changed = *current != target;
                            *current = target;
                            changed
                        });
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = self.desired.changed() => if changed.is_err() { break },
            }
        }
        // The instance tasks finish the call they are in (a half-made container is worse
        // than a late stop) and end.
        while set.join_next().await.is_some() {}
    }
}

/// Keeps one instance at its newest target until shutdown.
async fn run_instance(
    instance: InstanceConfig,
    drivers: Arc<Drivers>,
    board: WorkloadBoard,
    mut targets: watch::Receiver<Option<Target>>,
    shards: watch::Sender<ShardTarget>,
    shutdown: CancellationToken,
) {
    loop {
        let target = targets.borrow_and_update().clone();
        let next = match target {
            None => Next::Idle,
            Some(target) => {
                grant_shards(&shards, &target);
                reconcile(
                    &instance,
                    &drivers,
                    &board,
                    &shards,
                    &target,
                    &mut targets,
                    &shutdown,
                )
                .await
            }
        };
        let retry = match next {
            Next::Changed => continue,
            Next::Idle => false,
            Next::Retry => true,
        };
        let wait = async {
            if retry {
                tokio::time::sleep(RETRY_AFTER).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = targets.changed() => if changed.is_err() { return },
            () = wait => {}
        }
    }
}

/// What [`run_instance`] does after a [`reconcile`].
enum Next {
    /// Wait for a newer target.
    Idle,
    /// It failed: try again after [`RETRY_AFTER`] unless a newer target comes first.
    Retry,
    /// A newer target arrived (already seen): take it now.
    Changed,
}

/// Makes `instance` run `target`. Returns early when a newer target arrives during a health
/// wait or while it watches a healthy workload.
async fn reconcile(
    instance: &InstanceConfig,
    drivers: &Drivers,
    board: &WorkloadBoard,
    shards: &watch::Sender<ShardTarget>,
    target: &Target,
    targets: &mut watch::Receiver<Option<Target>>,
    shutdown: &CancellationToken,
) -> Next {
    use pb::WorkloadState::{Absent, Failed, Healthy, Starting};
    let spec = match &target.spec {
        Ok(spec) => spec,
        Err(reason) => {
            board.set(instance, Update::new(Failed, target, reason.clone()));
            return Next::Idle;
        }
    };
    let Some(version) = &target.version else {
        board.set(instance, Update::new(Starting, target, "removing"));
        return match drivers
            .remove(&instance.service, &instance.name, spec)
            .await
        {
            Ok(actions) => {
                log_actions(board, instance, target, &actions);
                shards.send_if_modified(|s| set_phase(s, Phase::Stopped));
                board.set(
                    instance,
                    Update::new(Absent, target, "").running(String::new(), instance.variant),
                );
                Next::Idle
            }
            Err(e) => {
                report_failure(board, instance, target, "remove", &e);
                Next::Retry
            }
        };
    };
    let placement = Placement {
        service: instance.service.clone(),
        instance: instance.name.clone(),
        address: instance.address.clone(),
        version: version.clone(),
        variant: target.variant,
    };
    board.set(
        instance,
        Update::new(Starting, target, format!("deploying {version}")),
    );
    shards.send_if_modified(|s| set_phase(s, Phase::Starting));
    match drivers.deploy(&placement, spec).await {
        Ok(actions) => log_actions(board, instance, target, &actions),
        Err(e) => {
            report_failure(board, instance, target, "deploy", &e);
            return Next::Retry;
        }
    }
    board.set(
        instance,
        Update::new(
            Starting,
            target,
            format!("waiting for {version} to be healthy"),
        )
        .running(version.clone(), target.variant),
    );
    let newer = async {
        let _ = targets.changed().await;
    };
    let waited = tokio::select! {
        () = shutdown.cancelled() => return Next::Idle,
        waited = wait_healthy(drivers, &placement, spec, newer) => waited,
    };
    match waited {
        Ok(true) => {}
        // A newer target arrived: the caller takes it.
        Ok(false) => return Next::Changed,
        Err(e) => {
            report_failure(board, instance, target, "health", &e);
            return Next::Retry;
        }
    }
    board.set(instance, Update::new(Healthy, target, ""));
    shards.send_if_modified(|s| set_phase(s, Phase::Healthy));
    tracing::info!(instance = %instance.name, %version, variant = ?target.variant, "workload healthy");
    // Watch it until the target changes: a workload that stops being healthy is reported. New
    // grants alone go to the shard task.
    let mut next_health = Instant::now() + HEALTH_EVERY;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Next::Idle,
            _ = targets.changed() => {
                match &*targets.borrow_and_update() {
                    Some(newer) if newer.same_deployment(target) => grant_shards(shards, newer),
                    _ => return Next::Changed,
                }
                continue;
            }
            () = tokio::time::sleep_until(next_health) => {}
        }
        next_health = Instant::now() + HEALTH_EVERY;
        let state = match drivers.health(&placement, spec).await {
            Health::Healthy => Update::new(Healthy, target, ""),
            Health::Starting(detail) => Update::new(Starting, target, detail),
            Health::Unhealthy(detail) => Update::new(Failed, target, detail),
        };
        board.set(instance, state);
    }
}

/// Tells the shard task `target`'s version and grants (an unreadable spec changes nothing
/// that runs, so it keeps the shard count). A healthy instance becomes starting when the
/// version changes: what runs is not the new target yet, so nothing is pushed to it.
fn grant_shards(shards: &watch::Sender<ShardTarget>, target: &Target) {
    let version = target.version.clone().unwrap_or_default();
    shards.send_if_modified(|s| {
        let shard_count = target
            .spec
            .as_ref()
            .map_or(s.shard_count, |spec| spec.shard_count);
        let changed =
            s.shard_count != shard_count || s.version != version || s.grants != target.grants;
        if s.version != version && s.phase == Phase::Healthy {
            s.phase = Phase::Starting;
        }
        if changed {
            s.shard_count = shard_count;
            s.version = version;
            s.grants.clone_from(&target.grants);
        }
        changed
    });
}

fn set_phase(shards: &mut ShardTarget, phase: Phase) -> bool {
    let changed = shards.phase != phase;
    shards.phase = phase;
    changed
}

/// Publishes a failed `step` (`deploy`, `remove`, `health`) as FAILED and as an action.
fn report_failure(
    board: &WorkloadBoard,
    instance: &InstanceConfig,
    target: &Target,
    step: &'static str,
    e: &DeployError,
) {
    let detail = crate::error::error_chain(e);
    tracing::warn!(instance = %instance.name, error = %detail, "workload change failed");
    board.set(
        instance,
        Update::new(pb::WorkloadState::Failed, target, detail.clone()),
    );
    board.record_actions(
        instance,
        target,
        [pb::WorkloadAction {
            seq: next_action_seq(),
            action: step.into(),
            detail: instance.name.clone(),
            exit_code: None,
            output: tail(&detail, REPORTED_ACTION_OUTPUT),
            duration_ms: 0,
            ok: false,
            version: String::new(),
            rollout_id: String::new(),
        }],
    );
}

/// The wire form of a driver's action record (output and detail cut for the report).
fn action_to_wire(a: &crate::deploy::ActionRecord) -> pb::WorkloadAction {
    pb::WorkloadAction {
        seq: next_action_seq(),
        action: a.action.into(),
        detail: head(&a.detail, REPORTED_ACTION_DETAIL),
        exit_code: a.exit_code,
        output: tail(&a.output, REPORTED_ACTION_OUTPUT),
        duration_ms: u64::try_from(a.duration.as_millis()).unwrap_or(u64::MAX),
        ok: a.ok,
        version: String::new(),
        rollout_id: String::new(),
    }
}

/// Logs the driver's actions and publishes them for the reports.
fn log_actions(
    board: &WorkloadBoard,
    instance: &InstanceConfig,
    target: &Target,
    actions: &[crate::deploy::ActionRecord],
) {
    board.record_actions(instance, target, actions.iter().map(action_to_wire));
    for a in actions {
        tracing::info!(
            instance = %instance.name,
            action = a.action,
            detail = %a.detail,
            exit_code = ?a.exit_code,
            ok = a.ok,
            took = ?a.duration,
            "workload action"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing::http_server;
    use crate::test_support::instance;

    #[test]
    fn the_board_reports_the_newest_actions_with_increasing_numbers_and_their_rollout() {
        let board = WorkloadBoard::default();
        let bot = instance("bot-1", "bot", Variant::Stable, 1);
        let target = Target {
            wire: pb::DeploySpec::default(),
            spec: Err("unused".into()),
            version: Some("v2".into()),
            variant: Variant::Stable,
            grants: BTreeMap::new(),
            rollout_id: "bot-1a2b3c".into(),
        };
        board.set(&bot, Update::new(pb::WorkloadState::Starting, &target, ""));
        let record = |n: usize| crate::deploy::ActionRecord {
            action: "start",
            detail: format!("start {n}"),
            exit_code: Some(0),
            output: "x".repeat(REPORTED_ACTION_OUTPUT + n),
            duration: Duration::from_millis(3),
            ok: true,
        };
        let records: Vec<_> = (0..REPORTED_ACTIONS + 3).map(record).collect();
        log_actions(&board, &bot, &target, &records);
        let actions = &board.report(Instant::now())[0].actions;
        assert_eq!(actions.len(), REPORTED_ACTIONS);
        assert_eq!(actions[0].detail, "start 3", "the oldest go");
        assert!(actions.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(actions.iter().all(|a| a.rollout_id == "bot-1a2b3c"
            && a.version == "v2"
            && a.output.len() == REPORTED_ACTION_OUTPUT));
        report_failure(
            &board,
            &bot,
            &target,
            "health",
            &DeployError::ImageMissing {
                image: "bot:v2".into(),
            },
        );
        let last = board.report(Instant::now())[0]
            .actions
            .last()
            .cloned()
            .unwrap();
        assert!(!last.ok && last.action == "health" && last.output.contains("bot:v2"));
        assert!(last.seq > actions.last().unwrap().seq);
    }

    /// `bot`'s desired state: instance `bot-1` at v1 with `shards` granted (no delay), started
    /// by a command appending its shard environment to `starts`.
    fn desired(starts: &std::path::Path, shards: &[u32]) -> pb::DesiredState {
        let start = format!("echo \"$SHARD_COUNT/$SHARD_IDS.\" >> {}", starts.display());
        pb::DesiredState {
            services: vec![pb::ServiceTraffic {
                service: "bot".into(),
                deploy: Some(pb::DeploySpec {
                    driver: Some(pb::deploy_spec::Driver::Command(pb::CommandDeploy {
                        start,
                        stop: "true".into(),
                        timeout_ms: 5_000,
                        ..Default::default()
                    })),
                    health_timeout_ms: 5_000,
                    shard_count: 4,
                    ..Default::default()
                }),
                workloads: vec![pb::Workload {
                    instance: "bot-1".into(),
                    version: "v1".into(),
                    variant: pb::Variant::Stable as i32,
                    shards: shards
                        .iter()
                        .map(|&shard| pb::ShardGrant {
                            shard,
                            start_after_ms: 0,
                        })
                        .collect(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn new_grants_alone_neither_redeploy_nor_restart_the_healthy_clock_and_held_is_reported()
    {
        let dir = tempfile::tempdir().unwrap();
        let starts = dir.path().join("starts");
        // Every call, GET or PUT, answers that shard 2 is held.
        let bot = http_server(|_| r#"{"held":[2],"wanted":[2]}"#.to_owned()).await;
        let mut bot_1 = instance("bot-1", "bot", Variant::Stable, bot.addr.port());
        bot_1.managed = true;
        let board = WorkloadBoard::default();
        let (desired_tx, desired_rx) = watch::channel(Some(desired(&starts, &[2])));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            Workloads {
                instances: vec![bot_1],
                drivers: Arc::new(Drivers::new(dir.path().join("state"))),
                board: board.clone(),
                desired: desired_rx,
            }
            .run(shutdown.clone()),
        );
        let status = || board.report(Instant::now()).pop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !status()
            .is_some_and(|s| s.state == pb::WorkloadState::Healthy as i32 && s.shards == [2])
        {
            assert!(
                Instant::now() < deadline,
                "not healthy holding [2]: {:?}",
                status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        tokio::time::sleep(Duration::from_millis(300)).await;
        let healthy_for = status().unwrap().for_ms;

        desired_tx.send_replace(Some(desired(&starts, &[2, 3])));
        let wait = HEALTH_EVERY + Duration::from_millis(500);
        tokio::time::sleep(wait).await;
        let s = status().unwrap();
        assert_eq!(s.state, pb::WorkloadState::Healthy as i32, "{s:?}");
        assert!(
            s.for_ms >= healthy_for + wait.as_millis() as u64,
            "healthy since {healthy_for} ms before the new grants, never left: {s:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&starts).unwrap(),
            "4/.\n",
            "one start, with SHARD_COUNT and an empty SHARD_IDS"
        );

        shutdown.cancel();
        task.await.unwrap();
    }
}
