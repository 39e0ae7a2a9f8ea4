//! Shard sets of the `shards` deploy model (docs/deploy.md, "Agent: shard sets"): one task per
//! managed instance of a sharded service pushes the shards granted to it to its process
//! (`PUT /__serin/shards` on its address) and reads back what it holds (`GET`).
//!
//! Each granted shard is pushed no sooner than its `start_after` after this agent first saw it
//! granted to the instance at its target version (the leader paces session starts so); a shard
//! no longer granted is released at once. Which shards are due is [`GrantClock::update`], pure.
//! A shard the process at the target version already holds is due at once: it is started, and
//! delaying it (after an agent restart, say) would release a shard the leader still grants.
//!
//! The held set is read every [`POLL_EVERY`] and right after each push; a failed read keeps the
//! last known set (the leader waits for a confirmed release), and nothing running is an empty
//! set. A push answered `504` or timed out is in progress (the process keeps trying); one that
//! could not connect or answered another `5xx` is tried again after [`PUT_RETRY`]; one refused
//! (`4xx`) is logged and not tried again until the due set changes. A read showing the process
//! wants another set than the one pushed (it restarted, or missed the push) pushes again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bound on one shard call (a `PUT` may block until the shards are held: it is not waited out).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the held set is read while the instance runs.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// How soon a push that could not connect or answered a `5xx` (not `504`) is tried again.
pub const PUT_RETRY: Duration = Duration::from_secs(1);
/// The path of the shard set on an instance's address.
const SHARDS_PATH: &str = "/__serin/shards";

/// How far the instance's process is, as the workload reconciler knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Nothing runs: the held set is empty, nothing is called.
    #[default]
    Stopped,
    /// Deployed, not (yet) healthy at its target: the held set is read, nothing is pushed.
    Starting,
    /// Runs its target version healthy: the due set is pushed.
    Healthy,
}

/// What the shard task of one instance works towards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardTarget {
    /// The service's shard count; 0: not sharded, no HTTP calls at all.
    pub shard_count: u32,
    /// The target version: first-seen times are kept per version.
    pub version: String,
    /// The shards granted to the instance, each with its start delay.
    pub grants: BTreeMap<u32, Duration>,
    /// How far the process is.
    pub phase: Phase,
}

/// When each granted shard was first seen, for one instance at one target version.
#[derive(Debug, Default)]
pub struct GrantClock {
    version: String,
    first_seen: BTreeMap<u32, Instant>,
}

/// The shards due now, and when the next granted one falls due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Granted, and past their delay or already held.
    pub shards: BTreeSet<u32>,
    /// The earliest due time of the granted shards not due yet.
    pub next: Option<Instant>,
}

impl GrantClock {
    /// Records `grants` of `version` as seen at `now` and returns what is due then. A shard
    /// seen before keeps its first-seen time (a re-push does not restart its delay); one no
    /// longer granted is forgotten (granted again, it waits again); a new version forgets all.
    /// A granted shard in `held` (held by the process at this version) is due at once.
    pub fn update(
        &mut self,
        version: &str,
        grants: &BTreeMap<u32, Duration>,
        held: &BTreeSet<u32>,
        now: Instant,
    ) -> Due {
        if self.version != version {
            version.clone_into(&mut self.version);
            self.first_seen.clear();
        }
        self.first_seen
            .retain(|shard, _| grants.contains_key(shard));
        let mut due = Due {
            shards: BTreeSet::new(),
            next: None,
        };
        for (&shard, &delay) in grants {
            let at = *self.first_seen.entry(shard).or_insert(now) + delay;
            if at <= now || held.contains(&shard) {
                due.shards.insert(shard);
            } else {
                due.next = Some(due.next.map_or(at, |next| next.min(at)));
            }
        }
        due
    }
}

/// The answer of a push.
#[derive(Debug)]
enum Pushed {
    /// `200`, `504` or no answer in time: the process took the set (it keeps trying).
    Taken,
    /// `4xx`: the process refused the set, for this reason.
    Refused(String),
    /// No connection, or a `5xx` other than `504`: why.
    Failed(String),
}

/// `GET /__serin/shards`.
#[derive(Debug, Deserialize)]
struct ShardsBody {
    held: BTreeSet<u32>,
    wanted: BTreeSet<u32>,
}

/// The shard calls on one instance's address.
struct ShardApi {
    client: reqwest::Client,
    url: String,
}

impl ShardApi {
    fn new(address: &str) -> Self {
        ShardApi {
            client: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .no_proxy()
                .build()
                .unwrap_or_default(),
            url: format!("http://{address}{SHARDS_PATH}"),
        }
    }

    async fn put(&self, shards: &BTreeSet<u32>) -> Pushed {
        let body = serde_json::json!({ "shards": shards }).to_string();
        let sent = self
            .client
            .put(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() && !e.is_connect() => return Pushed::Taken,
            Err(e) => {
                return Pushed::Failed(format!(
                    "PUT {} {shards:?} failed: {}",
                    self.url,
                    crate::error::error_chain(&e)
                ));
            }
        };
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::GATEWAY_TIMEOUT {
            return Pushed::Taken;
        }
        let text = response.text().await.unwrap_or_default();
        let why = format!(
            "PUT {} {shards:?} answered {status}: {}",
            self.url,
            text.trim()
        );
        if status.is_server_error() {
            Pushed::Failed(why)
        } else {
            Pushed::Refused(why)
        }
    }

    async fn get(&self) -> Result<ShardsBody, String> {
        let response =
            self.client.get(&self.url).send().await.map_err(|e| {
                format!("GET {} failed: {}", self.url, crate::error::error_chain(&e))
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("GET {}: {}", self.url, crate::error::error_chain(&e)))?;
        if !status.is_success() {
            return Err(format!(
                "GET {} answered {status}: {}",
                self.url,
                text.trim()
            ));
        }
        serde_json::from_str(&text)
            .map_err(|e| format!("GET {} answered no shard set ({e}): {text}", self.url))
    }
}

/// Sleeps until `at`, forever when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps the shard set of the instance at `address` at what `target` grants, until `shutdown`
/// or until `target`'s sender is dropped. `publish` gets every held set read, and an empty one
/// when nothing runs. A newer target is taken at once, also in the middle of a call.
pub async fn sync_shards(
    address: &str,
    mut target: watch::Receiver<ShardTarget>,
    mut publish: impl FnMut(&[u32]),
    shutdown: CancellationToken,
) {
    let api = ShardApi::new(address);
    let mut clock = GrantClock::default();
    let mut version = String::new();
    // The set last taken or refused (refused: `true`): not pushed again until the due set
    // changes.
    let mut pushed: Option<(BTreeSet<u32>, bool)> = None;
    let mut retry_at: Option<Instant> = None;
    // What the healthy process at `version` holds, by its last answer.
    let mut held_here = BTreeSet::new();
    let mut next_poll = Instant::now();
    loop {
        let now = Instant::now();
        let wanted = target.borrow_and_update().clone();
        if wanted.version != version {
            version.clone_from(&wanted.version);
            (pushed, retry_at) = (None, None);
            held_here.clear();
        }
        let due = clock.update(&wanted.version, &wanted.grants, &held_here, now);
        let mut wake = None;
        if wanted.shard_count == 0 || wanted.phase == Phase::Stopped {
            (pushed, retry_at) = (None, None);
            held_here.clear();
            publish(&[]);
        } else {
            let healthy = wanted.phase == Phase::Healthy;
            let to_push = healthy && pushed.as_ref().is_none_or(|(set, _)| *set != due.shards);
            if to_push && retry_at.is_none_or(|at| at <= now) {
                let answer = tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = target.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    // A shard fell due meanwhile: push the newer set instead.
                    () = sleep_until(due.next) => continue,
                    answer = api.put(&due.shards) => answer,
                };
                retry_at = None;
                match answer {
                    Pushed::Taken => pushed = Some((due.shards.clone(), false)),
                    Pushed::Refused(why) => {
                        tracing::warn!(%address, error = %why, "shard set refused; not pushed again until the grants change");
                        pushed = Some((due.shards.clone(), true));
                    }
                    Pushed::Failed(why) => {
                        tracing::warn!(%address, error = %why, "shard set push failed; retrying");
                        retry_at = Some(Instant::now() + PUT_RETRY);
                    }
                }
                next_poll = Instant::now();
            }
            if Instant::now() >= next_poll {
                let read = tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = target.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    read = api.get() => read,
                };
                next_poll = Instant::now() + POLL_EVERY;
                match read {
                    Ok(body) => {
                        publish(&body.held.iter().copied().collect::<Vec<_>>());
                        if healthy {
                            if pushed
                                .as_ref()
                                .is_some_and(|(set, refused)| !refused && *set != body.wanted)
                            {
                                pushed = None;
                            }
                            held_here = body.held;
                        }
                    }
                    Err(why) => {
                        tracing::debug!(%address, error = %why, "shard set unknown; keeping the last one")
                    }
                }
                continue;
            }
            wake = [Some(next_poll), due.next, retry_at.filter(|_| to_push)]
                .into_iter()
                .flatten()
                .min();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = target.changed() => if changed.is_err() { return },
            () = sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn grants(list: &[(u32, u64)]) -> BTreeMap<u32, Duration> {
        list.iter()
            .map(|&(s, ms)| (s, Duration::from_millis(ms)))
            .collect()
    }

    fn set(list: &[u32]) -> BTreeSet<u32> {
        list.iter().copied().collect()
    }

    fn due(shards: &[u32], next: Option<Instant>) -> Due {
        Due {
            shards: set(shards),
            next,
        }
    }

    #[test]
    fn a_shard_is_due_once_its_delay_after_first_seen_has_passed() {
        let (mut clock, t0, none) = (GrantClock::default(), Instant::now(), set(&[]));
        let g = grants(&[(0, 0), (1, 1500), (2, 700)]);
        assert_eq!(
            clock.update("v1", &g, &none, t0),
            due(&[0], Some(t0 + 700 * MS))
        );
        assert_eq!(
            clock.update("v1", &g, &none, t0 + 699 * MS),
            due(&[0], Some(t0 + 700 * MS))
        );
        assert_eq!(
            clock.update("v1", &g, &none, t0 + 700 * MS),
            due(&[0, 2], Some(t0 + 1500 * MS))
        );
        assert_eq!(
            clock.update("v1", &g, &none, t0 + 1500 * MS),
            due(&[0, 1, 2], None)
        );
    }

    #[test]
    fn nothing_granted_is_nothing_due() {
        let mut clock = GrantClock::default();
        assert_eq!(
            clock.update("v1", &grants(&[]), &set(&[3]), Instant::now()),
            due(&[], None)
        );
    }

    #[test]
    fn a_repush_of_the_same_grants_does_not_restart_their_delays() {
        let (mut clock, t0, none) = (GrantClock::default(), Instant::now(), set(&[]));
        let g = grants(&[(1, 1000)]);
        clock.update("v1", &g, &none, t0);
        assert_eq!(
            clock.update("v1", &g, &none, t0 + 900 * MS),
            due(&[], Some(t0 + 1000 * MS))
        );
        // A new grant beside it starts its own delay; shard 1 keeps its first-seen time.
        let more = grants(&[(1, 1000), (2, 1000)]);
        assert_eq!(
            clock.update("v1", &more, &none, t0 + 950 * MS),
            due(&[], Some(t0 + 1000 * MS))
        );
        assert_eq!(
            clock.update("v1", &more, &none, t0 + 1000 * MS),
            due(&[1], Some(t0 + 1950 * MS))
        );
        // A changed delay counts from the first sighting too.
        assert_eq!(
            clock.update("v1", &grants(&[(1, 3000)]), &none, t0 + 1000 * MS),
            due(&[], Some(t0 + 3000 * MS))
        );
    }

    #[test]
    fn a_removed_shard_leaves_the_due_set_at_once_and_waits_again_when_granted_again() {
        let (mut clock, t0, none) = (GrantClock::default(), Instant::now(), set(&[]));
        let both = grants(&[(0, 0), (1, 500)]);
        clock.update("v1", &both, &none, t0);
        assert_eq!(
            clock.update("v1", &both, &none, t0 + 600 * MS),
            due(&[0, 1], None)
        );
        assert_eq!(
            clock.update("v1", &grants(&[(1, 500)]), &none, t0 + 600 * MS),
            due(&[1], None)
        );
        // Shard 0 granted again with a delay: its delay counts from now.
        let again = grants(&[(0, 400), (1, 500)]);
        assert_eq!(
            clock.update("v1", &again, &none, t0 + 700 * MS),
            due(&[1], Some(t0 + 1100 * MS))
        );
        assert_eq!(
            clock.update("v1", &again, &none, t0 + 1100 * MS),
            due(&[0, 1], None)
        );
    }

    #[test]
    fn a_new_target_version_forgets_every_first_sighting() {
        let (mut clock, t0, none) = (GrantClock::default(), Instant::now(), set(&[]));
        let g = grants(&[(0, 1000)]);
        clock.update("v1", &g, &none, t0);
        assert_eq!(
            clock.update("v2", &g, &none, t0 + 900 * MS),
            due(&[], Some(t0 + 1900 * MS))
        );
        assert_eq!(
            clock.update("v2", &g, &none, t0 + 1000 * MS),
            due(&[], Some(t0 + 1900 * MS))
        );
        // Back to v1: not the old sighting either.
        assert_eq!(
            clock.update("v1", &g, &none, t0 + 2000 * MS),
            due(&[], Some(t0 + 3000 * MS))
        );
    }

    #[test]
    fn a_granted_shard_already_held_is_due_at_once_and_an_ungranted_held_one_is_not() {
        let (mut clock, t0) = (GrantClock::default(), Instant::now());
        assert_eq!(
            clock.update(
                "v1",
                &grants(&[(3, 10_000), (4, 10_000)]),
                &set(&[3, 5]),
                t0
            ),
            due(&[3], Some(t0 + 10_000 * MS))
        );
    }

    /// The `PUT`s a [`FakeBot`] got: when, and the shards.
    type Puts = Mutex<Vec<(Instant, Vec<u32>)>>;

    /// A bot that answers its first `PUT` with `503`, a `PUT` of shard 3 with `400`, other
    /// `PUT`s with `200` (holding that set at once), and `GET` with the set held. Records each
    /// `PUT`'s shards and when it came.
    struct FakeBot {
        address: String,
        puts: Arc<Puts>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeBot {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads one request from `socket` and answers it as [`FakeBot`] describes.
    async fn answer(
        socket: &mut tokio::net::TcpStream,
        puts: &Puts,
        held: &Mutex<Vec<u32>>,
    ) -> Option<()> {
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        let (head, body) = loop {
            let n = socket.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            request.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    break (head.to_owned(), body.to_owned());
                }
            }
        };
        let (status, reply) = if head.starts_with("PUT") {
            let shards: Vec<u32> = serde_json::from_str::<serde_json::Value>(&body).ok()?["shards"]
                .as_array()?
                .iter()
                .filter_map(|s| s.as_u64().and_then(|s| u32::try_from(s).ok()))
                .collect();
            let first = {
                let mut puts = puts.lock().unwrap();
                puts.push((Instant::now(), shards.clone()));
                puts.len() == 1
            };
            if first {
                ("503 Service Unavailable", "{}".to_owned())
            } else if shards.contains(&3) {
                (
                    "400 Bad Request",
                    r#"{"error":"shard 3 is out of range"}"#.to_owned(),
                )
            } else {
                *held.lock().unwrap() = shards.clone();
                (
                    "200 OK",
                    serde_json::json!({"held": shards, "wanted": shards}).to_string(),
                )
            }
        } else {
            let held = held.lock().unwrap().clone();
            (
                "200 OK",
                serde_json::json!({"held": held, "wanted": held}).to_string(),
            )
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        socket.write_all(response.as_bytes()).await.ok()?;
        socket.shutdown().await.ok()
    }

    /// Starts a [`FakeBot`] on a free loopback port.
    async fn fake_bot() -> FakeBot {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let puts = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let puts = Arc::clone(&puts);
            async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let (puts, held) = (Arc::clone(&puts), Arc::clone(&held));
                    tokio::spawn(async move { answer(&mut socket, &puts, &held).await });
                }
            }
        });
        FakeBot {
            address,
            puts,
            task,
        }
    }

    fn healthy(grants: &[(u32, u64)]) -> ShardTarget {
        ShardTarget {
            shard_count: 4,
            version: "v1".into(),
            grants: self::grants(grants),
            phase: Phase::Healthy,
        }
    }

    #[tokio::test]
    async fn a_failed_push_is_retried_after_a_second_and_a_refused_one_only_when_the_set_changes() {
        let bot = fake_bot().await;
        let held = Arc::new(Mutex::new(None::<Vec<u32>>));
        let (tx, rx) = watch::channel(healthy(&[(0, 0)]));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (address, held, shutdown) =
                (bot.address.clone(), Arc::clone(&held), shutdown.clone());
            async move {
                let publish = |h: &[u32]| *held.lock().unwrap() = Some(h.to_vec());
                sync_shards(&address, rx, publish, shutdown).await;
            }
        });
        let puts = || bot.puts.lock().unwrap().clone();
        let wait_held = async |want: &[u32]| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while held.lock().unwrap().as_deref() != Some(want) {
                assert!(
                    Instant::now() < deadline,
                    "never held {want:?}: {:?}",
                    puts()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };

        // The 503 is retried after PUT_RETRY.
        wait_held(&[0]).await;
        let sent = puts();
        assert_eq!(
            sent.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
            [vec![0], vec![0]]
        );
        assert!(sent[1].0 - sent[0].0 >= PUT_RETRY, "{sent:?}");

        // A refused set is not pushed again while the grants stay.
        tx.send_replace(healthy(&[(0, 0), (3, 0)]));
        tokio::time::sleep(PUT_RETRY * 2).await;
        let sets: Vec<_> = puts().into_iter().map(|(_, s)| s).collect();
        assert_eq!(sets, [vec![0], vec![0], vec![0, 3]]);
        assert_eq!(held.lock().unwrap().as_deref(), Some(&[0][..]));

        // New grants: pushed.
        tx.send_replace(healthy(&[(0, 0), (1, 0)]));
        wait_held(&[0, 1]).await;
        assert_eq!(puts().len(), 4);

        shutdown.cancel();
        task.await.unwrap();
    }
}
