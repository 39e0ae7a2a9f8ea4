//! The agent's side of the coordinator session: one gRPC `AgentService.Session` stream at a
//! time, reconnected for as long as the agent runs.
//!
//! Per session:
//! 1. connect to the next coordinator address (a `NotLeader` hint goes first, then the
//!    configured addresses in turn);
//! 2. queue `Register` (with the last applied generation) as the first outbound message,
//!    queue the reports measured while disconnected (merged into one, at most
//!    `MAX_CARRIED_MS` of them), open the stream;
//! 3. forward reports and acks up, and hand desired states down to the applier through a
//!    `watch` channel, which keeps only the newest (so queued states coalesce).
//!
//! Any error, a closed stream or `NotLeader` ends the session; the next attempt waits
//! [`Backoff`] (100 ms doubling to 5 s, with jitter). Any session that registered (the
//! coordinator accepted the stream), however short, starts the backoff over: a coordinator
//! that was just restarted is reached again at once. One warning is logged per failure
//! streak, the retries themselves at debug level.
//!
//! `Register` carries the agent's instance id (made once per data directory, see
//! [`crate::store`]). A coordinator that already has another agent of this name connected
//! refuses the session with `ALREADY_EXISTS`: before any session of this process registered,
//! that is fatal (a copied config, caught at start, the process exits); after one did, it is
//! logged as an error and retried with backoff, so the connected agent keeps its name and the
//! two never take turns.
//!
//! Reports measured while no session was open are not lost: they are merged (counts add up)
//! into the first report after `Register`, up to 30 s of them, so a leader change does not
//! remove the requests served meanwhile from the rollout's evidence. Acks are kept (a few)
//! and sent after the next `Register`.
//!
//! The canary lease ([`crate::lease`]) needs to know when a leader is reachable: the
//! connection publishes `true` on [`Connection::leader`] when a session's coordinator sent
//! its first desired state (a leader always does at once; a follower answers `NotLeader`,
//! which is no leader), and `false` when that session ends. An expired lease waiting to be
//! told ([`Connection::lease_expiry`]) goes in every `Register` until a leader sends a
//! desired state in the session it was sent in; then it is cleared.

use std::time::Duration;

use rand::Rng;
use serin_proto::v1 as pb;
use serin_proto::v1::agent_service_client::AgentServiceClient;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::error::{AgentError, error_chain};
use crate::store::{DesiredState, Generation};

/// First reconnect delay of a failure streak.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// TCP connect timeout for a coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the coordinator may take to accept the session stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings detect a coordinator that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbound messages buffered for the gRPC stream.
const OUTBOUND_CAPACITY: usize = 64;

/// Exponential reconnect delay: [`INITIAL_BACKOFF`] doubling up to [`MAX_BACKOFF`]; each
/// delay is drawn uniformly from the upper half of the current step, so a fleet that lost
/// its coordinator at once does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            step: INITIAL_BACKOFF,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt; doubles the step for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(MAX_BACKOFF);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Starts over at [`INITIAL_BACKOFF`].
    pub fn reset(&mut self) {
        self.step = INITIAL_BACKOFF;
    }

    /// Keeps the step at or below `cap` (a member answered that the group is electing:
    /// worth asking again soon, not after the full backoff).
    pub fn cap(&mut self, cap: Duration) {
        self.step = self.step.min(cap);
    }
}

/// The longest wait between attempts while members answer that no leader is elected yet
/// (an election takes 1-2 s).
pub const ELECTION_BACKOFF: Duration = Duration::from_millis(800);

/// The coordinator addresses, tried in turn; a leader hint is tried next, once.
#[derive(Debug, Clone)]
pub struct Coordinators {
    addresses: Vec<String>,
    next: usize,
    hint: Option<String>,
}

impl Coordinators {
    /// `addresses` must not be empty (the configuration guarantees it).
    pub fn new(addresses: Vec<String>) -> Coordinators {
        Coordinators {
            addresses,
            next: 0,
            hint: None,
        }
    }

    /// The address for the next attempt.
    pub fn next_address(&mut self) -> String {
        if let Some(hint) = self.hint.take() {
            return hint;
        }
        let Some(address) = self.addresses.get(self.next % self.addresses.len().max(1)) else {
            return String::new();
        };
        self.next = (self.next + 1) % self.addresses.len();
        address.clone()
    }

    /// Makes `leader_hint` the next address tried (ignored when empty). A bare `host:port`
    /// gets `http://`.
    pub fn prefer(&mut self, leader_hint: &str) {
        let hint = leader_hint.trim();
        if hint.is_empty() {
            return;
        }
        self.hint = Some(if hint.contains("://") {
            hint.to_owned()
        } else {
            format!("http://{hint}")
        });
    }
}

/// The gRPC endpoint for a coordinator address, or why it is unusable.
pub(crate) fn endpoint(address: &str) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(address.to_owned()).map_err(|e| error_chain(&e))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        let s = error_chain(source);
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
    }
    text
}

/// How one session attempt ended.
enum SessionEnd {
    Shutdown,
    /// No session was established.
    Failed(String),
    /// An established session ended.
    Ended {
        reason: String,
        lasted: Duration,
    },
    /// The coordinator is not the leader.
    NotLeader {
        hint: String,
    },
    /// The coordinator refused this agent (`ALREADY_EXISTS`): another agent with the same
    /// name is connected. Holds the coordinator's message.
    DuplicateName(String),
}

/// How a refused session open ended: `ALREADY_EXISTS` is a duplicate agent name, anything
/// else a failure to retry.
fn open_refused(status: &tonic::Status) -> SessionEnd {
    if status.code() == tonic::Code::AlreadyExists {
        SessionEnd::DuplicateName(status.message().to_owned())
    } else {
        SessionEnd::Failed(status_text(status))
    }
}

/// The connection task's state.
pub(crate) struct Connection {
    pub(crate) coordinators: Coordinators,
    /// `Register` without `last_applied`, which is filled in per session.
    pub(crate) register: pb::Register,
    /// The last generation the applier recorded.
    pub(crate) applied: watch::Receiver<Option<Generation>>,
    pub(crate) reports: mpsc::Receiver<pb::Report>,
    pub(crate) acks: mpsc::Receiver<pb::Ack>,
    /// Desired states for the applier; holds the newest received.
    pub(crate) desired: watch::Sender<Option<DesiredState>>,
    /// The same desired states as sent, for the workload reconciler of an agent with managed
    /// instances (`runtime::workloads`); `None` without any.
    pub(crate) workloads: Option<watch::Sender<Option<pb::DesiredState>>>,
    pub(crate) backoff: Backoff,
    /// Failed attempts in the current streak.
    pub(crate) failures: u32,
    /// Whether a session registered since the agent started: a duplicate name refused
    /// before that is fatal, after it is retried.
    pub(crate) registered: bool,
    /// `true` while a session with a leader is registered (see the module doc).
    pub(crate) leader: watch::Sender<bool>,
    /// A canary lease expiry the coordinator has not been told yet.
    pub(crate) lease_expiry: watch::Sender<Option<pb::LeaseExpiry>>,
}

impl Connection {
    /// Keeps a session open until `shutdown`. Fails only when the coordinator refuses the
    /// agent's first session as a duplicate name.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        loop {
            let address = self.coordinators.next_address();
            let end = self.session(&address, &shutdown).await;
            self.leader
                .send_if_modified(|up| std::mem::replace(up, false));
            if matches!(end, SessionEnd::Shutdown) {
                return Ok(());
            }
            self.on_end(&address, end)?;
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Logs how a session attempt at `address` ended and updates the failure streak and the
    /// backoff: any session that registered starts the backoff over. A duplicate name is
    /// fatal (the error) before any session registered, and retried after.
    fn on_end(&mut self, address: &str, end: SessionEnd) -> Result<(), AgentError> {
        match end {
            SessionEnd::Shutdown => {}
            SessionEnd::Failed(error) => {
                self.failures += 1;
                if self.failures == 1 {
                    tracing::warn!(
                        coordinator = %address, %error,
                        "cannot reach the coordinator; retrying with backoff"
                    );
                } else {
                    tracing::debug!(
                        coordinator = %address, %error, attempt = self.failures,
                        "cannot reach the coordinator"
                    );
                }
            }
            SessionEnd::Ended { reason, lasted } => {
                // It registered: whatever went wrong was not a coordinator that cannot be
                // reached, so the next attempt starts from the shortest delay.
                self.registered = true;
                self.backoff.reset();
                self.failures = 1;
                tracing::warn!(
                    coordinator = %address, %reason, ?lasted,
                    "coordinator session ended; reconnecting"
                );
            }
            SessionEnd::NotLeader { hint } => {
                // A member answered: the group is alive. With a hint, the leader is known:
                // go there at once; without one, it is electing: ask again soon.
                self.failures += 1;
                if hint.is_empty() {
                    self.backoff.cap(ELECTION_BACKOFF);
                    tracing::info!(
                        coordinator = %address,
                        "coordinator is not the leader and knows none yet (electing); retrying soon"
                    );
                } else {
                    self.backoff.reset();
                    tracing::info!(
                        coordinator = %address, leader_hint = %hint,
                        "coordinator is not the leader; trying the leader it names"
                    );
                }
                self.coordinators.prefer(&hint);
            }
            SessionEnd::DuplicateName(message) if !self.registered => {
                tracing::error!(
                    coordinator = %address, error = %message,
                    "the coordinator refused this agent: another agent with this name is connected; stopping"
                );
                return Err(AgentError::DuplicateName(message));
            }
            SessionEnd::DuplicateName(message) => {
                // This agent was connected before: most likely a second one took its name
                // while it was away. The connected one wins; keep trying, slowly.
                self.failures += 1;
                if self.failures == 1 {
                    tracing::error!(
                        coordinator = %address, error = %message,
                        "the coordinator refused this agent: another agent with this name is \
                         connected; retrying with backoff until it is gone"
                    );
                } else {
                    tracing::debug!(
                        coordinator = %address, error = %message, attempt = self.failures,
                        "the coordinator still refuses this agent's name"
                    );
                }
            }
        }
        Ok(())
    }

    fn register_message(&self) -> pb::AgentMessage {
        let mut register = self.register.clone();
        register.last_applied = (*self.applied.borrow()).map(Into::into);
        register
            .lease_expired
            .clone_from(&self.lease_expiry.borrow());
        pb::AgentMessage {
            body: Some(pb::agent_message::Body::Register(register)),
        }
    }

    async fn session(&mut self, address: &str, shutdown: &CancellationToken) -> SessionEnd {
        let endpoint = match endpoint(address) {
            Ok(e) => e,
            Err(e) => return SessionEnd::Failed(format!("invalid address: {e}")),
        };
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = endpoint.connect() => match r {
                Ok(channel) => channel,
                Err(e) => return SessionEnd::Failed(error_chain(&e)),
            },
        };

        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        // A fresh channel has room: Register is the first message of the stream.
        if out_tx.try_send(self.register_message()).is_err() {
            return SessionEnd::Failed("outbound stream closed before Register".into());
        }
        // Reports measured while disconnected go up right after Register, merged into one
        // (the collector carries what did not fit in the queue into its next report).
        let mut queued: Option<pb::Report> = None;
        while let Ok(report) = self.reports.try_recv() {
            queued = Some(match queued.take() {
                Some(older) => crate::runtime::merge_reports(older, report),
                None => report,
            });
        }
        if let Some(report) = queued {
            let _ = out_tx.try_send(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Report(report)),
            });
        }

        // The expiry this session tells, cleared once a leader answers it.
        let told = self.lease_expiry.borrow().clone();
        let mut client = AgentServiceClient::new(channel);
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = tokio::time::timeout(OPEN_TIMEOUT, client.session(ReceiverStream::new(out_rx))) => r,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return open_refused(&status),
            Err(_) => {
                return SessionEnd::Failed(format!(
                    "the session was not accepted within {OPEN_TIMEOUT:?}"
                ));
            }
        };
        let connected_at = Instant::now();
        tracing::info!(
            coordinator = %address,
            failed_attempts = self.failures,
            last_applied = ?*self.applied.borrow(),
            "connected to the coordinator"
        );
        self.failures = 0;
        let ended = |reason: String| SessionEnd::Ended {
            reason,
            lasted: connected_at.elapsed(),
        };

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                message = inbound.message() => match message {
                    Ok(Some(pb::CoordinatorMessage { body: Some(body) })) => match body {
                        pb::coordinator_message::Body::Desired(desired) => {
                            self.on_leader(told.as_ref());
                            self.on_desired(desired);
                        }
                        pb::coordinator_message::Body::NotLeader(n) => {
                            return SessionEnd::NotLeader { hint: n.leader_hint };
                        }
                    },
                    Ok(Some(pb::CoordinatorMessage { body: None })) => {
                        tracing::debug!("empty message from the coordinator; ignored");
                    }
                    Ok(None) => return ended("the coordinator closed the stream".into()),
                    Err(status) => return ended(status_text(&status)),
                },
                Some(report) = self.reports.recv() => {
                    let seq = report.seq;
                    let message = pb::AgentMessage {
                        body: Some(pb::agent_message::Body::Report(report)),
                    };
                    match out_tx.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!(seq, "outbound stream full; report dropped");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return ended("the outbound stream closed".into());
                        }
                    }
                }
                Some(ack) = self.acks.recv() => {
                    let generation = ack.generation;
                    let message = pb::AgentMessage {
                        body: Some(pb::agent_message::Body::Ack(ack)),
                    };
                    match out_tx.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::warn!(?generation, "outbound stream full; ack dropped");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return ended("the outbound stream closed".into());
                        }
                    }
                }
            }
        }
    }

    /// A desired state arrived: this session's coordinator is the leader. Publishes it (once
    /// per session) and clears the lease expiry `told` in this session's `Register`.
    fn on_leader(&self, told: Option<&pb::LeaseExpiry>) {
        if !self
            .leader
            .send_if_modified(|up| !std::mem::replace(up, true))
        {
            return;
        }
        if let Some(told) = told {
            let cleared = self.lease_expiry.send_if_modified(|pending| {
                let same = pending.as_ref() == Some(told);
                if same {
                    *pending = None;
                }
                same
            });
            if cleared {
                tracing::info!(
                    action = %told.action,
                    "told the leader that the canary lease expired"
                );
            }
        }
    }

    /// Hands a desired state to the applier unless a newer one is already pending.
    fn on_desired(&self, desired: pb::DesiredState) {
        if let (Some(tx), Some(generation)) = (&self.workloads, desired.generation) {
            let generation = Generation::from(generation);
            tx.send_if_modified(
                |pending| match pending.as_ref().and_then(|p| p.generation) {
                    Some(p) if Generation::from(p) > generation => false,
                    _ => {
                        *pending = Some(desired.clone());
                        true
                    }
                },
            );
        }
        let Some(desired) = DesiredState::from_proto(desired) else {
            tracing::warn!("desired state without a generation; ignored");
            return;
        };
        let generation = desired.generation;
        let taken = self.desired.send_if_modified(|pending| match pending {
            Some(p) if p.generation > generation => false,
            _ => {
                *pending = Some(desired);
                true
            }
        });
        if taken {
            tracing::debug!(%generation, "desired state received");
        } else {
            tracing::debug!(%generation, "desired state older than one already received; ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let mut step = INITIAL_BACKOFF;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} not in [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(MAX_BACKOFF);
        }
        assert_eq!(step, MAX_BACKOFF);
        b.reset();
        assert!(b.next_delay() <= INITIAL_BACKOFF);
    }

    #[test]
    fn coordinators_rotate_and_take_a_hint_first_once() {
        let mut c = Coordinators::new(vec!["http://a:1".into(), "http://b:1".into()]);
        assert_eq!(c.next_address(), "http://a:1");
        assert_eq!(c.next_address(), "http://b:1");
        assert_eq!(c.next_address(), "http://a:1");
        c.prefer("10.0.0.9:7000");
        assert_eq!(c.next_address(), "http://10.0.0.9:7000");
        assert_eq!(c.next_address(), "http://b:1");
        c.prefer("");
        assert_eq!(c.next_address(), "http://a:1");
        c.prefer("http://c:2");
        assert_eq!(c.next_address(), "http://c:2");
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(endpoint("http://127.0.0.1:7000").is_ok());
        assert!(endpoint("not a url").is_err());
    }

    fn test_connection() -> Connection {
        let (desired_tx, _desired_rx) = watch::channel(None);
        let (_applied_tx, applied) = watch::channel(None);
        let (_r_tx, reports) = mpsc::channel(1);
        let (_a_tx, acks) = mpsc::channel(1);
        Connection {
            coordinators: Coordinators::new(vec!["http://a:1".into()]),
            register: pb::Register::default(),
            applied,
            reports,
            acks,
            desired: desired_tx,
            workloads: None,
            backoff: Backoff::default(),
            failures: 0,
            registered: false,
            leader: watch::channel(false).0,
            lease_expiry: watch::channel(None).0,
        }
    }

    /// Steps the backoff up to its cap, as a long failure streak does.
    fn escalate(conn: &mut Connection) {
        for _ in 0..10 {
            conn.backoff.next_delay();
        }
    }

    #[test]
    fn the_backoff_starts_over_after_any_session_that_registered_however_short() {
        let mut conn = test_connection();
        escalate(&mut conn);
        conn.on_end(
            "http://a:1",
            SessionEnd::Ended {
                reason: "the coordinator closed the stream".into(),
                lasted: Duration::from_millis(50),
            },
        )
        .expect("not fatal");
        assert!(conn.backoff.next_delay() <= INITIAL_BACKOFF);

        // Attempts that reached no coordinator continue the streak.
        let mut conn = test_connection();
        escalate(&mut conn);
        conn.on_end(
            "http://a:1",
            SessionEnd::Failed("connection refused".into()),
        )
        .expect("not fatal");
        assert!(conn.backoff.next_delay() >= MAX_BACKOFF / 2);
    }

    #[test]
    fn a_member_that_names_the_leader_is_followed_at_once_and_one_electing_soon() {
        let mut conn = test_connection();
        escalate(&mut conn);
        conn.on_end(
            "http://a:1",
            SessionEnd::NotLeader {
                hint: "http://b:2".into(),
            },
        )
        .expect("not fatal");
        assert!(conn.backoff.next_delay() <= INITIAL_BACKOFF);

        let mut conn = test_connection();
        escalate(&mut conn);
        conn.on_end(
            "http://a:1",
            SessionEnd::NotLeader {
                hint: String::new(),
            },
        )
        .expect("not fatal");
        let delay = conn.backoff.next_delay();
        assert!(
            delay <= ELECTION_BACKOFF && delay >= ELECTION_BACKOFF / 2,
            "{delay:?}"
        );
    }

    #[test]
    fn a_duplicate_name_is_fatal_before_the_first_registration_and_retried_after() {
        let message = "agent 'host-1' is already connected from 10.0.0.5:41234";
        let refused = || open_refused(&tonic::Status::already_exists(message));
        assert!(matches!(refused(), SessionEnd::DuplicateName(m) if m == message));
        assert!(matches!(
            open_refused(&tonic::Status::unavailable("down")),
            SessionEnd::Failed(_)
        ));

        // The first session at start: the agent stops, with the coordinator's words.
        let mut conn = test_connection();
        let err = conn
            .on_end("http://a:1", refused())
            .expect_err("fatal at start");
        assert!(
            matches!(&err, AgentError::DuplicateName(m) if m == message),
            "{err:?}"
        );
        assert!(err.to_string().contains(message), "{err}");

        // After a session registered: retried with a growing backoff, never fatal.
        let mut conn = test_connection();
        conn.on_end(
            "http://a:1",
            SessionEnd::Ended {
                reason: "the coordinator closed the stream".into(),
                lasted: Duration::from_secs(60),
            },
        )
        .expect("not fatal");
        for _ in 0..10 {
            conn.on_end("http://a:1", refused())
                .expect("retried after a registration");
            conn.backoff.next_delay();
        }
        assert!(conn.backoff.next_delay() >= MAX_BACKOFF / 2);
    }

    fn expiry(at: u64) -> pb::LeaseExpiry {
        pb::LeaseExpiry {
            expired_at_ms: at,
            after_ms: 3000,
            action: "revert".into(),
            ..pb::LeaseExpiry::default()
        }
    }

    #[test]
    fn the_first_desired_state_of_a_session_marks_the_leader_and_clears_the_expiry_it_told() {
        let conn = test_connection();
        let leader = conn.leader.subscribe();
        conn.lease_expiry.send_replace(Some(expiry(1)));
        let register = match conn.register_message().body {
            Some(pb::agent_message::Body::Register(r)) => r,
            other => panic!("not a Register: {other:?}"),
        };
        assert_eq!(register.lease_expired, Some(expiry(1)));
        let told = conn.lease_expiry.borrow().clone();
        conn.on_leader(told.as_ref());
        assert!(*leader.borrow());
        assert_eq!(*conn.lease_expiry.borrow(), None);
    }

    #[test]
    fn an_expiry_newer_than_the_one_told_is_kept_for_the_next_register() {
        let conn = test_connection();
        conn.lease_expiry.send_replace(Some(expiry(2)));
        conn.on_leader(Some(&expiry(1)));
        assert!(*conn.leader.borrow());
        assert_eq!(*conn.lease_expiry.borrow(), Some(expiry(2)));
        // Nothing told: nothing cleared.
        let conn = test_connection();
        conn.lease_expiry.send_replace(Some(expiry(3)));
        conn.on_leader(None);
        assert_eq!(*conn.lease_expiry.borrow(), Some(expiry(3)));
    }

    #[tokio::test]
    async fn older_desired_states_do_not_replace_newer_pending_ones() {
        let (desired_tx, desired_rx) = watch::channel(None);
        let (_applied_tx, applied) = watch::channel(None);
        let (_r_tx, reports) = mpsc::channel(1);
        let (_a_tx, acks) = mpsc::channel(1);
        let conn = Connection {
            coordinators: Coordinators::new(vec!["http://a:1".into()]),
            register: pb::Register::default(),
            applied,
            reports,
            acks,
            desired: desired_tx,
            workloads: None,
            backoff: Backoff::default(),
            failures: 0,
            registered: false,
            leader: watch::channel(false).0,
            lease_expiry: watch::channel(None).0,
        };
        let state = |term, index| pb::DesiredState {
            generation: Some(pb::Generation { term, index }),
            services: vec![],
        };
        let pending = || desired_rx.borrow().as_ref().map(|d| d.generation);
        conn.on_desired(state(2, 5));
        assert_eq!(pending(), Some(Generation { term: 2, index: 5 }));
        conn.on_desired(state(1, 9));
        assert_eq!(pending(), Some(Generation { term: 2, index: 5 }));
        conn.on_desired(state(2, 6));
        assert_eq!(pending(), Some(Generation { term: 2, index: 6 }));
        conn.on_desired(pb::DesiredState::default());
        assert_eq!(pending(), Some(Generation { term: 2, index: 6 }));
    }
}
