//! Rollout hooks: HTTP webhooks the leader calls around a rollout's transitions, so smoke tests,
//! change tickets and chat notifications run as part of the rollout.
//!
//! # What each kind means
//!
//! - `pre_rollout` runs once the rollout is accepted (committed, in its first stage) and before
//!   any traffic moves: while one is pending the rollout is `progressing` at stage 1 but its
//!   canary weight is **0** ([`HookState::pre_rollout_pending`]). When every `pre_rollout` hook
//!   has passed, the canary gets the first stage's weight and the stage's observation starts.
//!   The first one that fails (after its retries) **aborts** the rollout, actor `hook:<name>`:
//!   the canary never got a request. An operator's pause in this phase holds at 0%: results
//!   arriving while paused are refused and the hooks run again after `serin rollout resume`.
//! - `pre_advance` runs each time a stage has passed its checks, before the next stage (or the
//!   promotion, or the wait at a manual gate) is committed. Hooks run one after the other in
//!   file order; when all pass, the stage's pass is committed. The first failure **holds** the
//!   stage: the rollout is paused at its current weight with actor `hook:<name>` and the hook's
//!   answer as the reason. Triggers keep running while it is held (a bad canary still rolls
//!   back). `serin rollout resume` releases it: the stage is observed again for its
//!   `min_duration`, and when it passes again the hooks run again. Nothing retries by itself:
//!   a smoke test that failed is a person's call.
//! - `post_promote` / `post_rollback` run after the promotion / the rollback or abort is
//!   committed. Their outcome is recorded and never changes the rollout.
//!
//! Every run (all attempts of one hook) is one [`Command::HookRan`], so it is an event of kind
//! `hook` in the replicated history, with the status code or error, the first
//! [`HOOK_BODY_EXCERPT_CHARS`] characters of the answer, the attempts and the time taken. The
//! command itself carries the consequence (abort, hold, traffic to the canary), applied by
//! `Registry::hook_ran`: one log entry per hook run, so a follower never sees a failed hook
//! without its effect, and no extra command kind for "hold because of a hook".
//!
//! # Who calls, and leader changes
//!
//! Only the leader's control loop calls hooks, each batch in its own task ([`HookTasks`]) so a
//! slow hook never delays the loop (nor another rollout's triggers). Which hooks are still due
//! is replicated ([`HookState`]); which are running is not. When the leader loses leadership
//! its running hook tasks are cancelled (an HTTP call in flight may still reach the receiver)
//! and a result it had not committed is lost; the next leader finds the same hooks due and
//! calls them again. Delivery is therefore **at least once**: receivers should treat the
//! payload's `(rollout, on, hook, stage_index)` as an idempotency key. A second report of a
//! hook that already passed is refused ([`Rejection::HookNotDue`]) and changes nothing.
//!
//! # Layout
//!
//! [`gate`] and [`post_due`] are pure: given a rollout (and the controller's decision), what to
//! propose or which hooks to run. [`HookRunner`] is the I/O edge ([`HttpHookRunner`], with
//! reqwest); [`HookTasks`] runs batches and proposes their results.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::control::now_millis;
use crate::limits::{HOOK_BODY_EXCERPT_CHARS, HOOK_BODY_READ_BYTES, MAX_EVENT_REASON, cut};
use crate::raft::{ProposeError, RaftHandle};
use crate::rollout::{
    Actor, Applied, Command, EventKind, Generation, Millis, Registry, Rejection, Rollout,
    RolloutId, RolloutState,
};
use crate::strategy::{Hook, HookOn, Strategy};

/// Pause between two attempts of a hook.
pub const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What one hook run (all its attempts) came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    /// The hook's name.
    pub name: String,
    /// When it ran.
    pub on: HookOn,
    /// Calls made (1 + retries used).
    pub attempts: u32,
    /// HTTP status of the last answer, if one came.
    pub status: Option<u16>,
    /// Why the last attempt got no answer (connection refused, timeout), if it got none.
    pub error: Option<String>,
    /// The start of the last answer's body (at most [`HOOK_BODY_EXCERPT_CHARS`] characters).
    pub body: String,
    /// Time from the first call to the last answer, in milliseconds.
    pub duration_ms: u64,
}

impl HookRun {
    /// A 2xx answer.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// `passed: HTTP 200 in 12ms (1 attempt): ok`, for reasons and logs.
    pub fn describe(&self) -> String {
        let verdict = if self.passed() { "passed" } else { "failed" };
        let answer = match (&self.error, self.status) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => format!("HTTP {s}"),
            (None, None) => "no answer".into(),
        };
        let attempts = match self.attempts {
            1 => "1 attempt".to_owned(),
            n => format!("{n} attempts"),
        };
        let mut text = format!(
            "{verdict}: {answer} in {} ({attempts})",
            humantime::format_duration(Duration::from_millis(self.duration_ms))
        );
        let body = self.body.trim();
        if !body.is_empty() {
            text.push_str(": ");
            text.push_str(body);
        }
        text
    }
}

/// Which hooks of a rollout are still due: replicated, so a new leader knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookState {
    /// `pre_rollout` hooks that have not passed yet, in file order. While any is, the canary's
    /// weight is 0.
    #[serde(default)]
    pub pre_rollout_pending: Vec<String>,
    /// `post_*` hooks of the terminal transition not yet run, in file order.
    #[serde(default)]
    pub post_pending: Vec<String>,
}

impl HookState {
    /// A new rollout's: every `pre_rollout` hook due.
    pub fn started(strategy: &Strategy) -> HookState {
        HookState {
            pre_rollout_pending: names(strategy, HookOn::PreRollout),
            post_pending: Vec::new(),
        }
    }

    /// The rollout reached `state` (terminal): its `post_promote` or `post_rollback` hooks are
    /// due, and nothing is awaited any more.
    pub(crate) fn finished(&mut self, strategy: &Strategy, state: RolloutState) {
        self.pre_rollout_pending.clear();
        let on = match state {
            RolloutState::Promoted => HookOn::PostPromote,
            RolloutState::RolledBack | RolloutState::Aborted => HookOn::PostRollback,
            _ => return,
        };
        self.post_pending = names(strategy, on);
    }
}

fn names(strategy: &Strategy, on: HookOn) -> Vec<String> {
    strategy.hooks_on(on).map(|h| h.name.clone()).collect()
}

/// The JSON body POSTed to a hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookPayload {
    /// Rollout id.
    pub rollout: String,
    /// Service.
    pub service: String,
    /// Canary version.
    pub version: String,
    /// Stable version.
    pub stable_version: String,
    /// When the hook runs.
    pub on: HookOn,
    /// The hook's name.
    pub hook: String,
    /// The rollout's stage, 0-based (for `pre_advance`: the stage that passed).
    pub stage_index: usize,
    /// Number of stages.
    pub stage_count: usize,
    /// The canary's weight now.
    pub canary_weight: u32,
    /// The weight the canary gets once the hook passed (`pre_*` only).
    pub next_weight: Option<u32>,
    /// The rollout's state (`promoted`, `rolled_back`, … for `post_*`).
    pub state: String,
    /// The reason of the rollout's last transition.
    pub reason: String,
}

/// The payload for `hook` of `rollout` now.
pub fn payload(rollout: &Rollout, hook: &Hook) -> HookPayload {
    let stages = rollout.strategy.stages.len();
    let next_weight = match hook.on {
        HookOn::PreRollout => Some(rollout.strategy.weight(rollout.stage_index)),
        HookOn::PreAdvance if rollout.stage_index + 1 >= stages => Some(100),
        HookOn::PreAdvance => Some(rollout.strategy.weight(rollout.stage_index + 1)),
        HookOn::PostPromote | HookOn::PostRollback => None,
    };
    HookPayload {
        rollout: rollout.id.0.clone(),
        service: rollout.service.clone(),
        version: rollout.version.clone(),
        stable_version: rollout.stable_version.clone(),
        on: hook.on,
        hook: hook.name.clone(),
        stage_index: rollout.stage_index,
        stage_count: stages,
        canary_weight: rollout.canary_weight(),
        next_weight,
        state: rollout.state.name().to_owned(),
        reason: rollout.last_reason().to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The replicated effect of a hook run.
// ---------------------------------------------------------------------------------------------

impl Registry {
    /// Applies [`Command::HookRan`]: records the run as a `hook` event and carries out what a
    /// failed `pre_*` hook means (see the module docs). A run that is no longer awaited is
    /// refused and changes nothing.
    pub(crate) fn hook_ran(
        &mut self,
        id: RolloutId,
        stage: usize,
        run: HookRun,
        at: Millis,
        generation: Generation,
    ) -> Result<Applied, Rejection> {
        let rollout = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| Rejection::UnknownRollout(id.clone()))?;
        let name = run.name.clone();
        let on = match rollout.strategy.hook(&name) {
            Some(hook) if hook.on == run.on => hook.on,
            _ => return Err(Rejection::UnknownHook { id, hook: name }),
        };
        let not_due = || Rejection::HookNotDue {
            id: id.clone(),
            hook: name.clone(),
            on,
        };
        match on {
            HookOn::PreRollout => {
                if !rollout.hooks.pre_rollout_pending.contains(&name) {
                    return Err(not_due());
                }
                // A pause during the pre_rollout phase holds at 0%: results that arrive
                // meanwhile do not count, and the hooks run again after the resume.
                if rollout.state != RolloutState::Progressing {
                    return Err(Rejection::InvalidTransition {
                        id: id.clone(),
                        state: rollout.state,
                        action: "record a pre_rollout hook of",
                    });
                }
            }
            HookOn::PreAdvance => {
                if rollout.state != RolloutState::Progressing
                    || !rollout.hooks.pre_rollout_pending.is_empty()
                {
                    return Err(Rejection::InvalidTransition {
                        id: id.clone(),
                        state: rollout.state,
                        action: "record a pre_advance hook of",
                    });
                }
                if stage != rollout.stage_index {
                    return Err(Rejection::StaleStage {
                        id: id.clone(),
                        current: rollout.stage_index,
                        proposed: stage,
                    });
                }
            }
            HookOn::PostPromote | HookOn::PostRollback => {
                if !rollout.state.is_terminal() || !rollout.hooks.post_pending.contains(&name) {
                    return Err(not_due());
                }
            }
        }
        let weight_before = rollout.canary_weight();
        let state_before = rollout.state;
        let passed = run.passed();
        let actor = Actor::Hook(name.clone());
        let mut reason = format!("{on} hook '{name}' {}", run.describe());
        match (on, passed) {
            (HookOn::PreRollout, true) => {
                rollout.hooks.pre_rollout_pending.retain(|n| n != &name);
                if rollout.hooks.pre_rollout_pending.is_empty() {
                    // The first stage's observation starts when its traffic does.
                    rollout.stage_started_at = at;
                    rollout.checkpoint = None;
                    reason.push_str(&format!(
                        "; every pre_rollout hook passed: the canary gets {}%",
                        rollout.canary_weight()
                    ));
                }
                rollout.record_with(at, EventKind::Hook, actor, reason, Some(run));
            }
            (HookOn::PreRollout, false) => {
                let why = cut(&run.describe(), MAX_EVENT_REASON / 2);
                rollout.record_with(at, EventKind::Hook, actor.clone(), reason, Some(run));
                rollout.state = RolloutState::Aborted;
                rollout
                    .hooks
                    .finished(&rollout.strategy, RolloutState::Aborted);
                rollout.record(
                    at,
                    EventKind::Aborted,
                    actor,
                    format!(
                        "pre_rollout hook '{name}' {why}; the canary never got traffic. \
                         Fix what it reports and start a new rollout"
                    ),
                );
            }
            (HookOn::PreAdvance, true) => {
                rollout.record_with(at, EventKind::Hook, actor, reason, Some(run));
            }
            (HookOn::PreAdvance, false) => {
                let why = cut(&run.describe(), MAX_EVENT_REASON / 2);
                let weight = rollout.canary_weight();
                rollout.record_with(at, EventKind::Hook, actor.clone(), reason, Some(run));
                rollout.state = RolloutState::Paused;
                rollout.record(
                    at,
                    EventKind::Paused,
                    actor,
                    format!(
                        "holding stage {} ({weight}%): pre_advance hook '{name}' {why}. \
                         `serin rollout resume` observes the stage again and reruns its hooks",
                        stage + 1
                    ),
                );
            }
            (HookOn::PostPromote | HookOn::PostRollback, _) => {
                rollout.hooks.post_pending.retain(|n| n != &name);
                rollout.record_with(at, EventKind::Hook, actor, reason, Some(run));
            }
        }
        let state = rollout.state;
        let traffic_changed = rollout.canary_weight() != weight_before || state != state_before;
        let service_name = rollout.service.clone();
        if let Some(service) = self.services.get_mut(&service_name) {
            if state.is_terminal() && service.active.as_ref() == Some(&id) {
                service.active = None;
            }
            if traffic_changed {
                service.generation = generation;
            }
        }
        Ok(Applied {
            id: Some(id),
            state: Some(state),
            traffic_changed,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The controller's decisions (pure).
// ---------------------------------------------------------------------------------------------

/// Identifies one batch of hook runs: a rollout, a kind and the stage observation it is for. A
/// batch whose key no longer describes the rollout ([`BatchKey::is_current`]) is obsolete.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Rollout.
    pub id: RolloutId,
    /// Kind of hooks.
    pub on: HookOn,
    /// The stage.
    pub stage: usize,
    /// That stage's observation start.
    pub stage_started_at: Millis,
}

impl BatchKey {
    fn of(rollout: &Rollout, on: HookOn) -> BatchKey {
        BatchKey {
            id: rollout.id.clone(),
            on,
            stage: rollout.stage_index,
            stage_started_at: rollout.stage_started_at,
        }
    }

    /// Whether the rollout is still where this batch was started, waiting for its hooks.
    pub fn is_current(&self, registry: &Registry) -> bool {
        let Some(r) = registry.rollouts.get(&self.id) else {
            return false;
        };
        let waiting = match self.on {
            HookOn::PreRollout => !r.hooks.pre_rollout_pending.is_empty(),
            HookOn::PreAdvance => !r.state.is_terminal(),
            HookOn::PostPromote | HookOn::PostRollback => !r.hooks.post_pending.is_empty(),
        };
        waiting && r.stage_index == self.stage && r.stage_started_at == self.stage_started_at
    }
}

/// Hooks to run one after the other, and what to propose when all passed.
#[derive(Debug, Clone, PartialEq)]
pub struct HookBatch {
    /// Which batch.
    pub key: BatchKey,
    /// Each hook with its payload, in file order.
    pub hooks: Vec<(Hook, HookPayload)>,
    /// Proposed once every hook passed (a `pre_advance` batch's `StagePassed`; its `at` is
    /// restamped when proposed).
    pub then: Option<Command>,
}

/// What the control loop should do for a live rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Propose this command.
    Propose(Command),
    /// Run these hooks (unless the batch already runs or ran).
    Run(HookBatch),
}

/// Puts the rollout's hooks between the controller's `decision` ([`crate::rollout::decide`])
/// and the log: while `pre_rollout` hooks are pending only a rollback goes through and the
/// hooks run (when progressing); a stage pass with `pre_advance` hooks becomes a batch of them
/// that proposes the pass when they all passed. Everything else is proposed as decided.
pub fn gate(rollout: &Rollout, decision: Option<Command>) -> Option<Step> {
    if rollout.state.is_terminal() {
        return decision.map(Step::Propose);
    }
    if !rollout.hooks.pre_rollout_pending.is_empty() {
        if let Some(rollback @ Command::RollBack { .. }) = decision {
            return Some(Step::Propose(rollback));
        }
        if rollout.state != RolloutState::Progressing {
            return None;
        }
        let hooks = rollout
            .hooks
            .pre_rollout_pending
            .iter()
            .filter_map(|name| rollout.strategy.hook(name))
            .map(|h| (h.clone(), payload(rollout, h)))
            .collect();
        return Some(Step::Run(HookBatch {
            key: BatchKey::of(rollout, HookOn::PreRollout),
            hooks,
            then: None,
        }));
    }
    match decision {
        Some(pass @ Command::StagePassed { .. })
            if rollout
                .strategy
                .hooks_on(HookOn::PreAdvance)
                .next()
                .is_some() =>
        {
            let hooks = rollout
                .strategy
                .hooks_on(HookOn::PreAdvance)
                .map(|h| (h.clone(), payload(rollout, h)))
                .collect();
            Some(Step::Run(HookBatch {
                key: BatchKey::of(rollout, HookOn::PreAdvance),
                hooks,
                then: Some(pass),
            }))
        }
        other => other.map(Step::Propose),
    }
}

/// The `post_*` hooks a finished rollout still owes, if any.
pub fn post_due(rollout: &Rollout) -> Option<HookBatch> {
    if !rollout.state.is_terminal() || rollout.hooks.post_pending.is_empty() {
        return None;
    }
    let hooks: Vec<_> = rollout
        .hooks
        .post_pending
        .iter()
        .filter_map(|name| rollout.strategy.hook(name))
        .map(|h| (h.clone(), payload(rollout, h)))
        .collect();
    let on = hooks.first().map(|(h, _)| h.on)?;
    Some(HookBatch {
        key: BatchKey::of(rollout, on),
        hooks,
        then: None,
    })
}

// ---------------------------------------------------------------------------------------------
// The I/O edge.
// ---------------------------------------------------------------------------------------------

/// Calls one hook, with its timeout and retries, and says what came of it. Never fails: every
/// error is an outcome.
pub trait HookRunner: Send + Sync + 'static {
    /// Runs `hook` with `payload` (all its attempts).
    fn call(&self, hook: &Hook, payload: &HookPayload) -> impl Future<Output = HookRun> + Send;
}

/// The real runner: `POST <url>` with the payload as JSON, success = 2xx, redirects not
/// followed (a 3xx is a failure: a hook URL should name the endpoint), every attempt bounded by
/// the hook's `timeout` (body included), at most [`HOOK_BODY_READ_BYTES`] of the body read.
/// Failed attempts (no answer or not 2xx) are retried after [`RETRY_PAUSE`].
#[derive(Debug, Clone)]
pub struct HttpHookRunner {
    client: reqwest::Client,
}

impl HttpHookRunner {
    /// A runner with its own connection pool; proxies from the environment apply, as for any
    /// HTTP client.
    pub fn new() -> Result<HttpHookRunner, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("serin-hooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpHookRunner { client })
    }

    /// A runner that ignores proxy settings (tests on loopback).
    pub fn without_proxy() -> Result<HttpHookRunner, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("serin-hooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpHookRunner { client })
    }

    async fn attempt(&self, hook: &Hook, body: &[u8]) -> (Option<u16>, Option<String>, String) {
        let mut request = self
            .client
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        for (name, value) in &hook.headers {
            request = request.header(name, value);
        }
        let exchange = async {
            let mut response = request.send().await.map_err(describe_error)?;
            let status = response.status().as_u16();
            let mut bytes = Vec::new();
            while bytes.len() < HOOK_BODY_READ_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                    Ok(None) => break,
                    // The status is what counts; a body cut short keeps what came.
                    Err(_) => break,
                }
            }
            Ok::<_, String>((status, bytes))
        };
        match tokio::time::timeout(hook.timeout, exchange).await {
            Ok(Ok((status, bytes))) => (Some(status), None, excerpt(&bytes)),
            Ok(Err(error)) => (None, Some(error), String::new()),
            Err(_) => (
                None,
                Some(format!(
                    "no answer within the timeout of {}",
                    humantime::format_duration(hook.timeout)
                )),
                String::new(),
            ),
        }
    }
}

impl HookRunner for HttpHookRunner {
    async fn call(&self, hook: &Hook, payload: &HookPayload) -> HookRun {
        let started = Instant::now();
        let body = serde_json::to_vec(payload).unwrap_or_default();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (status, error, body_excerpt) = self.attempt(hook, &body).await;
            let run = HookRun {
                name: hook.name.clone(),
                on: hook.on,
                attempts,
                status,
                error,
                body: body_excerpt,
                duration_ms: started.elapsed().as_millis() as u64,
            };
            if run.passed() || attempts > hook.retries {
                return run;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// reqwest's error with its causes (`error sending request: … Connection refused`).
fn describe_error(e: reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The first [`HOOK_BODY_EXCERPT_CHARS`] characters of a body, lossily decoded, on one line.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut chars = one_line.chars();
    let mut out: String = chars.by_ref().take(HOOK_BODY_EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running batches.
// ---------------------------------------------------------------------------------------------

/// How a batch task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEnd {
    /// Every result was committed (or refused as stale: the rollout moved on).
    Done,
    /// A proposal failed (not leader, node stopping): its hook must run again.
    Interrupted(String),
}

enum Task {
    Running(JoinHandle<BatchEnd>),
    Done,
}

/// The leader's running hook batches, one task each, keyed by [`BatchKey`] so a batch runs once
/// per stage observation. Every task is cancelled by [`HookTasks::abort_all`] (leadership lost)
/// or [`HookTasks::shutdown`].
pub struct HookTasks<R> {
    runner: Arc<R>,
    raft: RaftHandle,
    tasks: HashMap<BatchKey, Task>,
}

impl<R: HookRunner> HookTasks<R> {
    /// No batch running yet.
    pub fn new(runner: Arc<R>, raft: RaftHandle) -> HookTasks<R> {
        HookTasks {
            runner,
            raft,
            tasks: HashMap::new(),
        }
    }

    /// Starts `batch` unless it runs or ran already.
    pub fn start(&mut self, batch: HookBatch) {
        if self.tasks.contains_key(&batch.key) {
            return;
        }
        let key = batch.key.clone();
        tracing::info!(rollout = %key.id, on = %key.on, stage = key.stage + 1, hooks = batch.hooks.len(), "running hooks");
        let task = tokio::spawn(run_batch(self.runner.clone(), self.raft.clone(), batch));
        self.tasks.insert(key, Task::Running(task));
    }

    /// Forgets batches the rollout has moved past (cancelling them if they still run), and
    /// interrupted ones, so that they run again.
    pub fn tidy(&mut self, registry: &Registry) {
        self.tasks.retain(|key, task| {
            if !key.is_current(registry) {
                if let Task::Running(handle) = task {
                    handle.abort();
                }
                return false;
            }
            let Task::Running(handle) = task else {
                return true;
            };
            if !handle.is_finished() {
                return true;
            }
            match handle.now_or_never() {
                Some(Ok(BatchEnd::Done)) => {
                    *task = Task::Done;
                    true
                }
                Some(Ok(BatchEnd::Interrupted(why))) => {
                    tracing::warn!(rollout = %key.id, on = %key.on, reason = %why, "hook results not committed; the hooks run again");
                    false
                }
                Some(Err(e)) => {
                    tracing::error!(rollout = %key.id, on = %key.on, error = %e, "hook task failed; the hooks run again");
                    false
                }
                None => true,
            }
        });
    }

    /// Cancels every running batch (this node stopped being the leader): the next leader runs
    /// their hooks again.
    pub fn abort_all(&mut self) {
        for (_, task) in self.tasks.drain() {
            if let Task::Running(handle) = task {
                handle.abort();
            }
        }
    }

    /// Cancels every running batch and waits until each has stopped.
    pub async fn shutdown(mut self) {
        let handles: Vec<_> = self
            .tasks
            .drain()
            .filter_map(|(_, t)| match t {
                Task::Running(h) => Some(h),
                Task::Done => None,
            })
            .collect();
        for handle in &handles {
            handle.abort();
        }
        for handle in handles {
            let _ = handle.await;
        }
    }
}

/// Runs a batch's hooks in order, committing each result as it comes; a failed `pre_*` hook
/// ends the batch (its command holds or aborts the rollout).
async fn run_batch<R: HookRunner>(runner: Arc<R>, raft: RaftHandle, batch: HookBatch) -> BatchEnd {
    let key = batch.key;
    for (hook, payload) in &batch.hooks {
        let run = runner.call(hook, payload).await;
        let passed = run.passed();
        tracing::info!(rollout = %key.id, hook = %hook.name, on = %hook.on, outcome = %run.describe(), "hook ran");
        let command = Command::HookRan {
            id: key.id.clone(),
            stage: key.stage,
            run,
            at: now_millis(),
        };
        match propose(&raft, command).await {
            Proposed::Committed => {}
            Proposed::Stale => return BatchEnd::Done,
            Proposed::Failed(why) => return BatchEnd::Interrupted(why),
        }
        if !passed && key.on.gates() {
            return BatchEnd::Done;
        }
    }
    if let Some(mut then) = batch.then {
        if let Command::StagePassed { at, .. } = &mut then {
            *at = now_millis();
        }
        if let Proposed::Failed(why) = propose(&raft, then).await {
            return BatchEnd::Interrupted(why);
        }
    }
    BatchEnd::Done
}

enum Proposed {
    Committed,
    Stale,
    Failed(String),
}

async fn propose(raft: &RaftHandle, command: Command) -> Proposed {
    let action = command.action();
    match raft.propose(command).await {
        Ok(_) => Proposed::Committed,
        Err(ProposeError::Rejected(rejection)) => {
            tracing::debug!(%rejection, action, "hook result superseded");
            Proposed::Stale
        }
        Err(e) => Proposed::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
