//! Raft messages between coordinators, over gRPC (`RaftService.Send`).
//!
//! # Why one task and one connection per peer
//!
//! raft-rs expects a peer's messages to arrive in the order it produced them (a task per
//! message reorders them), and a peer that is down must not slow the node or make it buffer
//! without bound. So [`PeerTransport`] gives every peer:
//!
//! - a bounded queue ([`PEER_QUEUE`] messages): [`Transport::send`] never blocks; when the queue
//!   is full the message is dropped and the peer reported unreachable (raft retries what it
//!   needs: heartbeats, appends after a probe, a snapshot);
//! - one task that takes what is queued (up to [`MAX_BATCH`] messages), sends it as one
//!   `RaftBatch` on one long-lived HTTP/2 channel and waits for the answer before the next batch,
//!   so order holds;
//! - on a failed call: `report_unreachable` to the node (it then probes the peer instead of
//!   streaming appends), `report_snapshot(Failure)` for any snapshot in the batch, and the rest
//!   of the queue dropped (stale after a partition), then [`RETRY_PAUSE`] before the next try.
//!   A snapshot that was delivered is reported `Finish`: a follower stays stuck in the
//!   snapshot state until one of the two is reported.
//!
//! # Addresses
//!
//! A peer's gRPC address (the same server agents and operators use) comes from the
//! [`AddressBook`]: the `--peers` of the command line, the members committed in the registry
//! (a conf change carries the added member's address), and the address a sender puts in each
//! batch (so a member that joined learns the leader's address from its first message).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use serin_proto::v1 as pb;
use serin_proto::v1::raft_service_client::RaftServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::node::{PeerReport, RaftHandle, Transport};

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 4096;
/// Messages per `RaftBatch`.
pub const MAX_BATCH: usize = 256;
/// Pause after a failed send before the next one.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long one batch may take (a snapshot is the biggest).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout for a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The largest raft batch a coordinator accepts or sends. The biggest message is a snapshot:
/// every record of the registry, each bounded by the limits of `crate::limits` (a finished
/// rollout is about 1 KiB, docs/benchmarks.md §14), so this holds some 200,000 rollouts.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// A batch stops growing at this many bytes, so a batch stays within the message limit even
/// when it holds a snapshot and full appends.
const MAX_BATCH_BYTES: usize = MAX_RAFT_MESSAGE_BYTES / 4;

/// Where each member's gRPC server is, shared by the transport, the API (to point clients at
/// the leader) and the raft service (which learns senders' addresses).
#[derive(Debug, Clone, Default)]
pub struct AddressBook {
    inner: Arc<RwLock<BTreeMap<u64, String>>>,
}

impl AddressBook {
    /// A book holding `peers`.
    pub fn new(peers: BTreeMap<u64, String>) -> AddressBook {
        AddressBook {
            inner: Arc::new(RwLock::new(peers)),
        }
    }

    /// The address of member `id`, if known.
    pub fn get(&self, id: u64) -> Option<String> {
        self.read().get(&id).cloned()
    }

    /// Records `address` for `id`; true when it changed.
    pub fn set(&self, id: u64, address: &str) -> bool {
        let mut book = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if book.get(&id).map(String::as_str) == Some(address) {
            return false;
        }
        book.insert(id, address.to_owned());
        true
    }

    /// Records `address` for `id` only when the book has none for it.
    pub fn learn(&self, id: u64, address: &str) {
        if address.is_empty() || self.read().contains_key(&id) {
            return;
        }
        tracing::info!(peer = id, %address, "learned a peer's address from its messages");
        self.set(id, address);
    }

    /// Every known address.
    pub fn all(&self) -> BTreeMap<u64, String> {
        self.read().clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, String>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The gRPC transport: one queue and one sending task per peer, created on first use.
pub struct PeerTransport {
    id: u64,
    book: AddressBook,
    peers: HashMap<u64, Peer>,
    reports: mpsc::UnboundedSender<PeerReport>,
    shutdown: CancellationToken,
}

struct Peer {
    address: String,
    queue: mpsc::Sender<Message>,
}

impl PeerTransport {
    /// The transport of node `id`; `reports` goes back to the node (see [`RaftHandle::reports`]).
    pub fn new(
        id: u64,
        book: AddressBook,
        reports: mpsc::UnboundedSender<PeerReport>,
        shutdown: CancellationToken,
    ) -> PeerTransport {
        PeerTransport {
            id,
            book,
            peers: HashMap::new(),
            reports,
            shutdown,
        }
    }

    fn peer(&mut self, to: u64) -> Option<&Peer> {
        let address = self.book.get(to)?;
        let stale = self.peers.get(&to).is_some_and(|p| p.address != address);
        if stale {
            // Its address changed (removed and added again elsewhere): a new task and channel.
            self.peers.remove(&to);
        }
        if !self.peers.contains_key(&to) {
            let (queue, rx) = mpsc::channel(PEER_QUEUE);
            let sender = PeerSender {
                from: self.id,
                own_address: self.book.get(self.id).unwrap_or_default(),
                to,
                address: address.clone(),
                reports: self.reports.clone(),
            };
            tokio::spawn(sender.run(rx, self.shutdown.clone()));
            self.peers.insert(to, Peer { address, queue });
        }
        self.peers.get(&to)
    }
}

impl Transport for PeerTransport {
    fn send(&mut self, messages: Vec<Message>) -> Vec<u64> {
        let mut unreachable = Vec::new();
        for message in messages {
            let to = message.to;
            let Some(peer) = self.peer(to) else {
                tracing::debug!(peer = to, "no address for a raft peer; message dropped");
                unreachable.push(to);
                continue;
            };
            if peer.queue.try_send(message).is_err() && !unreachable.contains(&to) {
                unreachable.push(to);
            }
        }
        unreachable
    }

    fn forget(&mut self, id: u64) {
        // Dropping the queue ends the peer's task.
        self.peers.remove(&id);
    }

    fn reports_snapshots(&self) -> bool {
        true
    }
}

/// The task sending one peer's messages.
struct PeerSender {
    from: u64,
    own_address: String,
    to: u64,
    address: String,
    reports: mpsc::UnboundedSender<PeerReport>,
}

impl PeerSender {
    async fn run(self, mut queue: mpsc::Receiver<Message>, shutdown: CancellationToken) {
        let client = match tonic::transport::Endpoint::from_shared(self.address.clone()) {
            Ok(endpoint) => RaftServiceClient::new(
                endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy(),
            )
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES),
            Err(e) => {
                tracing::error!(peer = self.to, address = %self.address, error = %e, "unusable peer address");
                return;
            }
        };
        let mut failing = false;
        // A message taken from the queue that did not fit the previous batch.
        let mut carried: Option<Message> = None;
        loop {
            let first = match carried.take() {
                Some(m) => m,
                None => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = queue.recv() => match m { Some(m) => m, None => return },
                },
            };
            let mut bytes = first.compute_size() as usize;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match queue.try_recv() {
                    Ok(m) => {
                        let size = m.compute_size() as usize;
                        if bytes + size > MAX_BATCH_BYTES {
                            carried = Some(m);
                            break;
                        }
                        bytes += size;
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            let snapshots = batch
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .count();
            let result = self.send_batch(&client, &batch).await;
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!(peer = self.to, address = %self.address, "raft peer reachable again");
                        failing = false;
                    }
                    for _ in 0..snapshots {
                        let _ = self.reports.send(PeerReport::SnapshotDelivered(self.to));
                    }
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(peer = self.to, address = %self.address, %error, "raft peer unreachable");
                        failing = true;
                    } else {
                        tracing::debug!(peer = self.to, %error, "raft peer still unreachable");
                    }
                    let mut dropped_snapshots = snapshots;
                    let rest = carried.take().into_iter();
                    for m in rest.chain(std::iter::from_fn(|| queue.try_recv().ok())) {
                        dropped_snapshots +=
                            usize::from(m.get_msg_type() == MessageType::MsgSnapshot);
                    }
                    let _ = self.reports.send(PeerReport::Unreachable(self.to));
                    for _ in 0..dropped_snapshots {
                        let _ = self.reports.send(PeerReport::SnapshotFailed(self.to));
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
            }
        }
    }

    async fn send_batch(
        &self,
        client: &RaftServiceClient<tonic::transport::Channel>,
        batch: &[Message],
    ) -> Result<(), String> {
        let mut messages = Vec::with_capacity(batch.len());
        for m in batch {
            let size = m.compute_size() as usize;
            if size > MAX_RAFT_MESSAGE_BYTES {
                return Err(format!(
                    "a raft {:?} of {} MiB is over the {} MiB message limit: this member cannot \
                     be sent it (docs/cluster.md, \"Peer transport\")",
                    m.get_msg_type(),
                    size >> 20,
                    MAX_RAFT_MESSAGE_BYTES >> 20
                ));
            }
            messages.push(
                m.write_to_bytes()
                    .map_err(|e| format!("encoding a raft message: {e}"))?,
            );
        }
        let request = pb::RaftBatch {
            from: self.from,
            sender_address: self.own_address.clone(),
            messages,
        };
        let mut client = client.clone();
        match tokio::time::timeout(SEND_TIMEOUT, client.send(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {}s", SEND_TIMEOUT.as_secs())),
        }
    }
}

/// The `RaftService` server: decodes a peer's batch and steps each message into the node, in
/// order.
#[derive(Clone)]
pub struct RaftApi {
    raft: RaftHandle,
    book: AddressBook,
}

impl RaftApi {
    /// The service in front of `raft`.
    pub fn new(raft: RaftHandle, book: AddressBook) -> RaftApi {
        RaftApi { raft, book }
    }
}

#[tonic::async_trait]
impl pb::raft_service_server::RaftService for RaftApi {
    async fn send(
        &self,
        request: tonic::Request<pb::RaftBatch>,
    ) -> Result<tonic::Response<pb::RaftAck>, tonic::Status> {
        let batch = request.into_inner();
        if batch.from != 0 {
            self.book.learn(batch.from, &batch.sender_address);
        }
        for bytes in batch.messages {
            let mut message = Message::default();
            message.merge_from_bytes(&bytes).map_err(|e| {
                tonic::Status::invalid_argument(format!("undecodable raft message: {e}"))
            })?;
            self.raft
                .step(message)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        }
        Ok(tonic::Response::new(pb::RaftAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_learned_only_when_none_is_known() {
        let book = AddressBook::new(BTreeMap::from([(1, "http://a:1".to_owned())]));
        book.learn(1, "http://elsewhere:1");
        book.learn(2, "http://b:2");
        book.learn(3, "");
        assert_eq!(book.get(1).as_deref(), Some("http://a:1"));
        assert_eq!(book.get(2).as_deref(), Some("http://b:2"));
        assert_eq!(book.get(3), None);
        assert!(book.set(1, "http://c:1"));
        assert!(!book.set(1, "http://c:1"));
        assert_eq!(book.all().len(), 2);
    }
}
