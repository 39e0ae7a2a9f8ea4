//! The Raft log on disk: a sled-backed [`raft::Storage`].
//!
//! [`SledStorage`] keeps everything raft-rs needs to restart (log entries, hard state, conf
//! state, the latest snapshot) plus the state machine's own applied state, all in one sled tree.
//!
//! # Key layout (tree `"raft"`)
//!
//! | key                                     | value                                          |
//! |-----------------------------------------|------------------------------------------------|
//! | `b'e'` ++ index as 8 big-endian bytes   | `eraftpb::Entry`                               |
//! | `m/hard_state`                          | `eraftpb::HardState`                           |
//! | `m/conf_state`                          | `eraftpb::ConfState` (current membership)      |
//! | `m/snapshot_meta`                       | `eraftpb::SnapshotMetadata` (latest snapshot)  |
//! | `a/` ++ record key                      | one record of the latest snapshot's state (1)  |
//! | `d/snapshot_data`                       | the latest snapshot's state as one blob (1)    |
//! | `m/applied`                             | applied index (8 bytes, big-endian) ++ state   |
//!
//! (1) A snapshot's state machine is stored one of two ways. As **records** (what the node
//! writes, [`SledStorage::create_snapshot_of_records`]): the state machine's own keys and
//! values under `a/`, of which a snapshot writes only those that changed since the previous
//! one ([`StateDelta`]), so a snapshot costs what changed, not the whole history. Or as one
//! opaque **blob** ([`SledStorage::create_snapshot`]; stores written by earlier versions).
//! Exactly one of the two is current: writing either removes the other. A snapshot sent to a
//! follower carries the blob, or the records encoded with [`encode_records`]; installing one
//! stores it back the same way. Both sort before the log's tail and the hard state, which
//! every append updates: sled rewrites a whole leaf when it consolidates. Stores written
//! before kept the blob at `m/snapshot_data`; it is read from there until the next snapshot.
//!
//! Raft messages are encoded with raft-rs's own codec (protobuf 2). Big-endian indexes make
//! sled's key order the log order, so the first and last index are the first and last keys under
//! prefix `e`; they are cached in memory and recomputed from disk on [`SledStorage::open`].
//! Bytes read from disk are never trusted: anything that does not decode, or a log with a gap,
//! is a [`StorageError::Corrupt`].
//!
//! # Log model (as raft-rs's `MemStorage`)
//!
//! The latest snapshot covers every index up to `snapshot.index`; entries `[first, last]` are
//! contiguous with `first <= snapshot.index + 1`. With no entries, `first = snapshot.index + 1`
//! and `last = snapshot.index`. `term(snapshot.index)` is the snapshot's term, lower indexes are
//! `Compacted`, higher than `last` are `Unavailable`. [`SledStorage::compact`] only discards
//! entries covered by a durable snapshot, so a lagging follower can always be sent one.
//!
//! # Durability rules
//!
//! - Every method writes one `apply_batch` on this single tree: all of it lands or none of it.
//!   Batches are atomic within one tree only, which is why everything lives in one tree.
//! - sled keeps writes in memory until `flush`; a crash loses anything not flushed. Methods that
//!   flush before returning: [`SledStorage::persist_ready`] with `sync = true`,
//!   [`SledStorage::apply_snapshot`], [`SledStorage::create_snapshot`],
//!   [`SledStorage::set_conf_state`], [`SledStorage::save_applied`] and
//!   [`SledStorage::initialize_if_empty`]. [`SledStorage::set_commit`] and
//!   [`SledStorage::compact`] do not (losing either is harmless); they become durable with the
//!   next flush. We rely on sled recovering writes in order (a later write never survives
//!   without an earlier one); the kill -9 test below exercises that.
//! - Entries and hard state go in the same batch, so a stored hard state never points past the
//!   stored log (a known restart panic elsewhere came from writing hard state first).
//! - Stored `commit` never exceeds the last index and is raised, in the same batch, to any index
//!   recorded as applied or snapshotted, so on restart `applied <= commit` as raft-rs requires.
//!
//! # Restart
//!
//! The applied index to give `raft::Config::applied` is
//! `max(load_applied().index, snapshot_metadata().index)`; when the snapshot is newer, restore
//! the state machine from the snapshot's data. Either way the state and its index were written
//! in one batch, so they match; raft-rs then re-delivers the committed entries after it. The
//! node saves an applied state only with a conf change (the snapshots are its state machine
//! otherwise, see `node`'s module docs); installing a snapshot discards it.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};

/// Name of the sled tree holding the Raft state.
pub const TREE_NAME: &str = "raft";

/// Index and term of the snapshot written by [`SledStorage::initialize_if_empty`]: a non-zero
/// first index makes nodes that join later catch up by snapshot first (raft-rs
/// `examples/five_mem_node`), so every node starts from the same state.
pub const INITIAL_INDEX: u64 = 1;
/// See [`INITIAL_INDEX`].
pub const INITIAL_TERM: u64 = 1;

const ENTRY_PREFIX: u8 = b'e';
const KEY_HARD_STATE: &[u8] = b"m/hard_state";
const KEY_CONF_STATE: &[u8] = b"m/conf_state";
const KEY_SNAPSHOT_META: &[u8] = b"m/snapshot_meta";
/// Sorts before the log (`e`) and the `m/` keys: sled rewrites a whole leaf when it
/// consolidates its updates, and the leaf holding the log's tail and the hard state is updated
/// at every append, so the snapshot's data (the whole registry) must not live in it.
const KEY_SNAPSHOT_DATA: &[u8] = b"d/snapshot_data";
/// Where versions before `KEY_SNAPSHOT_DATA` kept the snapshot's data; read when the new key
/// is absent, removed by the next snapshot.
const KEY_SNAPSHOT_DATA_OLD: &[u8] = b"m/snapshot_data";
const KEY_APPLIED: &[u8] = b"m/applied";
/// Prefix of the snapshot's state records; sorts before every other key.
const STATE_PREFIX: &[u8] = b"a/";
/// How [`encode_records`] starts: snapshot data that does not is a blob.
const RECORDS_MAGIC: &[u8] = b"serin-records-1\n";

/// A state record: (key, value).
pub type Record = (Vec<u8>, Vec<u8>);

/// Changes to the state machine's records since the previous snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDelta {
    /// Records new or changed: (key, value).
    pub put: Vec<Record>,
    /// Keys of records that are gone.
    pub removed: Vec<Vec<u8>>,
}

/// A snapshot's state as it is sent: [`RECORDS_MAGIC`], then per record its key and value,
/// each preceded by its length (4 bytes, big-endian).
pub fn encode_records<'a>(records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut out = RECORDS_MAGIC.to_vec();
    for (key, value) in records {
        for part in [key, value] {
            let len = u32::try_from(part.len()).expect("a record is smaller than 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

/// The records in snapshot data made by [`encode_records`], or `None` when the data is a blob
/// (anything else). Truncated or malformed records are [`StorageError::Corrupt`].
pub fn decode_records(data: &[u8]) -> Result<Option<Vec<Record>>, StorageError> {
    let Some(mut rest) = data.strip_prefix(RECORDS_MAGIC) else {
        return Ok(None);
    };
    let mut records = Vec::new();
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, StorageError> {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(corrupt("snapshot records", "truncated length"));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(corrupt(
                "snapshot records",
                format!("a {len}-byte part with {} bytes left", tail.len()),
            ));
        }
        let (part, tail) = tail.split_at(len);
        *rest = tail;
        Ok(part.to_vec())
    };
    while !rest.is_empty() {
        let key = take(&mut rest)?;
        let value = take(&mut rest)?;
        records.push((key, value));
    }
    Ok(Some(records))
}

fn state_key(key: &[u8]) -> Vec<u8> {
    [STATE_PREFIX, key].concat()
}

/// Errors from [`SledStorage`]. Inside raft-rs they surface as
/// `raft::Error::Store(raft::StorageError::Other(..))`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// sled failed (I/O, or its own corruption detection).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A raft message could not be encoded.
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: protobuf::ProtobufError,
    },
    /// Bytes on disk do not decode, or the stored state breaks an invariant.
    #[error("corrupt raft store: {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// Appending would overwrite entries that were compacted away.
    #[error("cannot append at index {append_index}: entries below {first_index} are compacted")]
    AppendCompacted { append_index: u64, first_index: u64 },
    /// Appending would leave a gap after the last entry.
    #[error("cannot append at index {append_index}: the last index is {last_index}")]
    LogGap { append_index: u64, last_index: u64 },
    /// The entries handed to `persist_ready` do not have consecutive indexes.
    #[error("entries to append are not consecutive: expected index {expected}, got {got}")]
    NonConsecutiveEntries { expected: u64, got: u64 },
    /// A commit index past the end of the stored log.
    #[error("commit index {commit} is beyond the last log index {last_index}")]
    CommitBeyondLog { commit: u64, last_index: u64 },
    /// An applied index past the end of the stored log.
    #[error("applied index {applied} is beyond the last log index {last_index}")]
    AppliedBeyondLog { applied: u64, last_index: u64 },
    /// A snapshot older than what the store already holds.
    #[error("snapshot at index {index} is out of date: the store is already at {current}")]
    SnapshotOutOfDate { index: u64, current: u64 },
    /// A snapshot at an index the log has not reached.
    #[error("cannot snapshot at index {index}: the last log index is {last_index}")]
    SnapshotBeyondLog { index: u64, last_index: u64 },
    /// The entry at `index` was compacted away.
    #[error("entry {index} is compacted: the first index is {first_index}")]
    Compacted { index: u64, first_index: u64 },
    /// Compaction past the end of the log.
    #[error("cannot compact to {compact_index}: the last log index is {last_index}")]
    CompactBeyondLog { compact_index: u64, last_index: u64 },
    /// Compaction past the latest snapshot would leave entries no follower can get.
    #[error("cannot compact to {compact_index}: the latest snapshot is at {snapshot_index}")]
    CompactBeyondSnapshot {
        compact_index: u64,
        snapshot_index: u64,
    },
    /// `initialize_if_empty` needs at least one voter.
    #[error("cannot initialize raft storage without voters")]
    NoVoters,
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}

/// Sled-backed Raft storage. Cloning is cheap and clones share the same state.
#[derive(Clone)]
pub struct SledStorage {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Tree,
    /// Mirror of what is on disk. Held for the whole of every operation, so readers never see
    /// the log half-written and the cache only changes after its batch has been applied.
    cache: Mutex<Cache>,
    /// Bytes of keys and values written since open (see [`SledStorage::bytes_written`]).
    written: AtomicU64,
}

/// A `sled::Batch` that counts the bytes of the keys and values it writes.
#[derive(Default)]
struct Batch {
    inner: sled::Batch,
    bytes: u64,
}

impl Batch {
    fn insert(&mut self, key: &[u8], value: Vec<u8>) {
        self.bytes += (key.len() + value.len()) as u64;
        self.inner.insert(key, value);
    }

    fn remove(&mut self, key: &[u8]) {
        self.bytes += key.len() as u64;
        self.inner.remove(key);
    }
}

#[derive(Clone, Debug, Default)]
struct Cache {
    first_index: u64,
    last_index: u64,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
}

impl Cache {
    fn log_is_empty(&self) -> bool {
        self.last_index < self.first_index
    }
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cache = self.lock();
        f.debug_struct("SledStorage")
            .field("first_index", &cache.first_index)
            .field("last_index", &cache.last_index)
            .field("snapshot_index", &cache.snapshot.index)
            .field("commit", &cache.hard_state.commit)
            .finish()
    }
}

impl SledStorage {
    /// Open (or create) the store in tree `"raft"` of the given sled Db, checking that what is
    /// on disk decodes and forms a contiguous log.
    pub fn open(db: &sled::Db) -> Result<Self, StorageError> {
        let tree = db.open_tree(TREE_NAME)?;
        let hard_state: HardState = read_message(&tree, KEY_HARD_STATE, "hard state")?;
        let conf_state: ConfState = read_message(&tree, KEY_CONF_STATE, "conf state")?;
        let snapshot: SnapshotMetadata =
            read_message(&tree, KEY_SNAPSHOT_META, "snapshot metadata")?;

        let mut bounds: Option<(u64, u64)> = None;
        for item in tree.scan_prefix([ENTRY_PREFIX]) {
            let (key, _) = item?;
            let index = entry_index_from_key(&key)?;
            bounds = match bounds {
                None => Some((index, index)),
                Some((first, last)) if index == last + 1 => Some((first, index)),
                Some((_, last)) => {
                    return Err(corrupt(
                        format!("log entry {index}"),
                        format!("gap in the log after index {last}"),
                    ));
                }
            };
        }
        let (first_index, last_index) = bounds.unwrap_or((snapshot.index + 1, snapshot.index));
        if first_index > snapshot.index + 1 {
            return Err(corrupt(
                "log",
                format!(
                    "first index {first_index} leaves a gap after the snapshot at {}",
                    snapshot.index
                ),
            ));
        }
        if hard_state.commit > last_index || hard_state.commit + 1 < first_index {
            return Err(corrupt(
                "hard state",
                format!(
                    "commit {} is outside the log [{first_index}, {last_index}]",
                    hard_state.commit
                ),
            ));
        }

        let cache = Cache {
            first_index,
            last_index,
            hard_state,
            conf_state,
            snapshot,
        };
        tracing::debug!(?cache, "opened raft storage");
        Ok(Self {
            inner: Arc::new(Inner {
                tree,
                cache: Mutex::new(cache),
                written: AtomicU64::new(0),
            }),
        })
    }

    /// For a brand-new node: if nothing is stored yet, store a snapshot at
    /// ([`INITIAL_INDEX`], [`INITIAL_TERM`]) with empty data and conf state `voters`, with the
    /// matching hard state and conf state. No-op if anything is stored already (membership on
    /// disk wins over the caller's idea of it).
    pub fn initialize_if_empty(&self, voters: &[u64]) -> Result<(), StorageError> {
        self.initialize_with(voters, Vec::new())
    }

    /// [`SledStorage::initialize_if_empty`] with `data` as the bootstrap snapshot's state
    /// machine (every member of a new group must be given the same).
    pub fn initialize_with(&self, voters: &[u64], data: Vec<u8>) -> Result<(), StorageError> {
        if voters.is_empty() {
            return Err(StorageError::NoVoters);
        }
        {
            let cache = self.lock();
            let empty = cache.log_is_empty()
                && cache.snapshot.index == 0
                && cache.hard_state == HardState::default()
                && cache.conf_state == ConfState::default();
            if !empty {
                return Ok(());
            }
        }
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = INITIAL_INDEX;
        meta.term = INITIAL_TERM;
        meta.mut_conf_state().voters = voters.to_vec();
        snapshot.data = data.into();
        self.apply_snapshot(snapshot)
    }

    /// Persist a Ready: append `entries` (truncating any conflicting suffix) and, if given, the
    /// hard state, in one atomic sled batch; flush to disk when `sync` is true.
    pub fn persist_ready(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StorageError> {
        {
            let mut cache = self.lock();
            let mut batch = Batch::default();
            let mut last_index = cache.last_index;

            if let Some(head) = entries.first() {
                if head.index < cache.first_index {
                    return Err(StorageError::AppendCompacted {
                        append_index: head.index,
                        first_index: cache.first_index,
                    });
                }
                if head.index > cache.last_index + 1 {
                    return Err(StorageError::LogGap {
                        append_index: head.index,
                        last_index: cache.last_index,
                    });
                }
                for (expected, entry) in (head.index..).zip(entries) {
                    if entry.index != expected {
                        return Err(StorageError::NonConsecutiveEntries {
                            expected,
                            got: entry.index,
                        });
                    }
                    batch.insert(&entry_key(entry.index)[..], encode(entry, "log entry")?);
                }
                let new_last = head.index + entries.len() as u64 - 1;
                for stale in new_last + 1..=cache.last_index {
                    batch.remove(&entry_key(stale)[..]);
                }
                last_index = new_last;
            }

            if let Some(hs) = hard_state {
                if hs.commit > last_index {
                    return Err(StorageError::CommitBeyondLog {
                        commit: hs.commit,
                        last_index,
                    });
                }
                batch.insert(KEY_HARD_STATE, encode(hs, "hard state")?);
            }

            if entries.is_empty() && hard_state.is_none() {
                drop(cache);
                return self.flush_if(sync);
            }
            self.apply(batch)?;
            if !entries.is_empty() && cache.log_is_empty() {
                cache.first_index = entries[0].index;
            }
            cache.last_index = last_index;
            if let Some(hs) = hard_state {
                cache.hard_state = hs.clone();
            }
        }
        self.flush_if(sync)
    }

    /// Update only the commit index in the stored hard state (a `LightReady`'s commit index).
    /// Never moves the commit index backwards. Not flushed: a lost commit index is recovered
    /// by raft, and it becomes durable with the next flush.
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut cache = self.lock();
        if commit <= cache.hard_state.commit {
            return Ok(());
        }
        if commit > cache.last_index {
            return Err(StorageError::CommitBeyondLog {
                commit,
                last_index: cache.last_index,
            });
        }
        let mut hs = cache.hard_state.clone();
        hs.commit = commit;
        let mut batch = Batch::default();
        batch.insert(KEY_HARD_STATE, encode(&hs, "hard state")?);
        self.apply(batch)?;
        cache.hard_state = hs;
        Ok(())
    }

    /// Store the current membership (after applying a conf change), flushed.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        {
            let mut cache = self.lock();
            let mut batch = Batch::default();
            batch.insert(KEY_CONF_STATE, encode(cs, "conf state")?);
            self.apply(batch)?;
            cache.conf_state = cs.clone();
        }
        self.flush_if(true)
    }

    /// Install a snapshot received from a leader: clear the log and the saved applied state,
    /// write the snapshot metadata and data (records or blob, as it came: see the module docs), the hard state (term raised to the snapshot's,
    /// commit set to its index) and the snapshot's conf state in one batch, then flush.
    ///
    /// Fails with [`StorageError::SnapshotOutOfDate`] when the snapshot is older than the first
    /// index, as `MemStorage` does.
    pub fn apply_snapshot(&self, mut snapshot: Snapshot) -> Result<(), StorageError> {
        {
            let mut cache = self.lock();
            let meta = snapshot.take_metadata();
            if meta.index < cache.first_index {
                return Err(StorageError::SnapshotOutOfDate {
                    index: meta.index,
                    current: cache.first_index,
                });
            }
            let mut hs = cache.hard_state.clone();
            hs.term = hs.term.max(meta.term);
            hs.commit = meta.index;
            let conf_state = meta.get_conf_state().clone();

            let mut batch = Batch::default();
            if !cache.log_is_empty() {
                for index in cache.first_index..=cache.last_index {
                    batch.remove(&entry_key(index)[..]);
                }
            }
            batch.insert(KEY_SNAPSHOT_META, encode(&meta, "snapshot metadata")?);
            self.replace_state(&mut batch, &snapshot.data)?;
            batch.insert(KEY_HARD_STATE, encode(&hs, "hard state")?);
            batch.insert(KEY_CONF_STATE, encode(&conf_state, "conf state")?);
            // The snapshot replaces the state machine: a state saved on the discarded log
            // must not win over it on restart.
            batch.remove(KEY_APPLIED);
            self.apply(batch)?;

            cache.first_index = meta.index + 1;
            cache.last_index = meta.index;
            cache.hard_state = hs;
            cache.conf_state = conf_state;
            cache.snapshot = meta;
        }
        self.flush_if(true)
    }

    /// Record a snapshot of the state machine taken at `index` (which must have been applied,
    /// so at most the last index) with the given data and conf state, flushed. Later
    /// [`raft::Storage::snapshot`] calls return it. Raises the stored commit index to `index`
    /// if it is lower, and drops a saved applied state at or below `index`.
    pub fn create_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.record_snapshot(index, conf_state, |storage, batch| {
            storage.remove_records(batch)?;
            batch.insert(KEY_SNAPSHOT_DATA, data);
            batch.remove(KEY_SNAPSHOT_DATA_OLD);
            Ok(())
        })
    }

    /// [`SledStorage::create_snapshot`] with the state as records: `delta` is what changed
    /// since the previous snapshot's records (all of them if that one was a blob: the blob is
    /// removed). What it writes is the delta, whatever the size of the whole state.
    pub fn create_snapshot_of_records(
        &self,
        index: u64,
        conf_state: ConfState,
        delta: &StateDelta,
    ) -> Result<(), StorageError> {
        self.record_snapshot(index, conf_state, |_, batch| {
            for (key, value) in &delta.put {
                batch.insert(&state_key(key), value.clone());
            }
            for key in &delta.removed {
                batch.remove(&state_key(key));
            }
            batch.remove(KEY_SNAPSHOT_DATA);
            batch.remove(KEY_SNAPSHOT_DATA_OLD);
            Ok(())
        })
    }

    /// The latest snapshot's state records (empty when it is a blob), in key order.
    pub fn state_records(&self) -> Result<Vec<Record>, StorageError> {
        let _cache = self.lock();
        self.read_records()
    }

    /// The latest snapshot's blob, if its state is one (see the module docs).
    pub fn state_blob(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let _cache = self.lock();
        self.read_blob()
    }

    fn read_records(&self) -> Result<Vec<Record>, StorageError> {
        let mut records = Vec::new();
        for item in self.inner.tree.scan_prefix(STATE_PREFIX) {
            let (key, value) = item?;
            records.push((key[STATE_PREFIX.len()..].to_vec(), value.to_vec()));
        }
        Ok(records)
    }

    fn read_blob(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(match self.inner.tree.get(KEY_SNAPSHOT_DATA)? {
            Some(data) => Some(data.to_vec()),
            None => self
                .inner
                .tree
                .get(KEY_SNAPSHOT_DATA_OLD)?
                .map(|d| d.to_vec()),
        })
    }

    /// Adds the removal of every state record to `batch`.
    fn remove_records(&self, batch: &mut Batch) -> Result<(), StorageError> {
        for item in self.inner.tree.scan_prefix(STATE_PREFIX) {
            let (key, _) = item?;
            batch.remove(&key);
        }
        Ok(())
    }

    /// Adds to `batch` what replaces the stored state with snapshot `data`: its records, or
    /// the blob it is.
    fn replace_state(&self, batch: &mut Batch, data: &[u8]) -> Result<(), StorageError> {
        self.remove_records(batch)?;
        match decode_records(data)? {
            Some(records) => {
                for (key, value) in records {
                    batch.insert(&state_key(&key), value);
                }
                batch.remove(KEY_SNAPSHOT_DATA);
            }
            None => batch.insert(KEY_SNAPSHOT_DATA, data.to_vec()),
        }
        batch.remove(KEY_SNAPSHOT_DATA_OLD);
        Ok(())
    }

    /// Records a snapshot at `index`; `write_state` adds its state to the batch.
    fn record_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        write_state: impl FnOnce(&Self, &mut Batch) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        {
            let mut cache = self.lock();
            if index < cache.snapshot.index {
                return Err(StorageError::SnapshotOutOfDate {
                    index,
                    current: cache.snapshot.index,
                });
            }
            if index > cache.last_index {
                return Err(StorageError::SnapshotBeyondLog {
                    index,
                    last_index: cache.last_index,
                });
            }
            let term = self.term_of(&cache, index)?;
            let meta = SnapshotMetadata {
                index,
                term,
                conf_state: Some(conf_state).into(),
                ..Default::default()
            };

            let mut batch = Batch::default();
            batch.insert(KEY_SNAPSHOT_META, encode(&meta, "snapshot metadata")?);
            write_state(self, &mut batch)?;
            // A saved applied state this snapshot covers is never restored again.
            if self
                .load_applied()?
                .is_some_and(|(applied, _)| applied <= index)
            {
                batch.remove(KEY_APPLIED);
            }
            let mut hs = None;
            if cache.hard_state.commit < index {
                let mut raised = cache.hard_state.clone();
                raised.commit = index;
                batch.insert(KEY_HARD_STATE, encode(&raised, "hard state")?);
                hs = Some(raised);
            }
            self.apply(batch)?;
            cache.snapshot = meta;
            if let Some(hs) = hs {
                cache.hard_state = hs;
            }
        }
        self.flush_if(true)
    }

    /// Discard log entries below `compact_index`. A no-op at or below the first index; an error
    /// past the last index + 1 (`MemStorage` panics there) or past the latest snapshot + 1,
    /// since entries no snapshot covers must stay available to followers. Not flushed.
    pub fn compact(&self, compact_index: u64) -> Result<(), StorageError> {
        let mut cache = self.lock();
        if compact_index <= cache.first_index {
            return Ok(());
        }
        if compact_index > cache.last_index + 1 {
            return Err(StorageError::CompactBeyondLog {
                compact_index,
                last_index: cache.last_index,
            });
        }
        if compact_index > cache.snapshot.index + 1 {
            return Err(StorageError::CompactBeyondSnapshot {
                compact_index,
                snapshot_index: cache.snapshot.index,
            });
        }
        let mut batch = Batch::default();
        for index in cache.first_index..compact_index {
            batch.remove(&entry_key(index)[..]);
        }
        self.apply(batch)?;
        cache.first_index = compact_index;
        Ok(())
    }

    /// Atomically persist the state machine's serialized state together with the last applied
    /// index (one batch, flushed): a restart point newer than the latest snapshot. Raises the stored commit index to `applied` in the same
    /// batch if it is lower, so a restart never sees `applied > commit`.
    pub fn save_applied(&self, applied: u64, state: &[u8]) -> Result<(), StorageError> {
        {
            let mut cache = self.lock();
            if applied > cache.last_index {
                return Err(StorageError::AppliedBeyondLog {
                    applied,
                    last_index: cache.last_index,
                });
            }
            let mut value = Vec::with_capacity(8 + state.len());
            value.extend_from_slice(&applied.to_be_bytes());
            value.extend_from_slice(state);

            let mut batch = Batch::default();
            batch.insert(KEY_APPLIED, value);
            let mut hs = None;
            if cache.hard_state.commit < applied {
                let mut raised = cache.hard_state.clone();
                raised.commit = applied;
                batch.insert(KEY_HARD_STATE, encode(&raised, "hard state")?);
                hs = Some(raised);
            }
            self.apply(batch)?;
            if let Some(hs) = hs {
                cache.hard_state = hs;
            }
        }
        self.flush_if(true)
    }

    /// The last saved (applied index, state bytes), if any.
    pub fn load_applied(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some(value) = self.inner.tree.get(KEY_APPLIED)? else {
            return Ok(None);
        };
        let Some((index, state)) = value.split_first_chunk::<8>() else {
            return Err(corrupt(
                "applied state",
                format!("{} bytes, shorter than an index", value.len()),
            ));
        };
        Ok(Some((u64::from_be_bytes(*index), state.to_vec())))
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> Result<HardState, StorageError> {
        Ok(self.lock().hard_state.clone())
    }

    /// The stored (current) conf state.
    pub fn conf_state(&self) -> ConfState {
        self.lock().conf_state.clone()
    }

    /// Metadata of the latest stored snapshot (index 0 when there is none).
    pub fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.lock().snapshot.clone()
    }

    /// The latest stored snapshot with its data, whatever its index.
    pub fn latest_snapshot(&self) -> Result<Snapshot, StorageError> {
        let cache = self.lock();
        self.read_snapshot(&cache)
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        // The cache is only written after its batch succeeded, by code that does not panic in
        // between, so a poisoned lock still guards a cache that matches the disk.
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes of keys and values this store has handed to sled since it was opened (shared by
    /// clones). What a workload costs in writes, before sled's own framing and compaction.
    pub fn bytes_written(&self) -> u64 {
        self.inner.written.load(Ordering::Relaxed)
    }

    /// Applies `batch` atomically and counts its bytes.
    fn apply(&self, batch: Batch) -> Result<(), StorageError> {
        self.inner.tree.apply_batch(batch.inner)?;
        self.inner.written.fetch_add(batch.bytes, Ordering::Relaxed);
        Ok(())
    }

    fn flush_if(&self, sync: bool) -> Result<(), StorageError> {
        if sync {
            self.inner.tree.flush()?;
        }
        Ok(())
    }

    /// The latest snapshot with its data: the blob, or the records encoded (which reads the
    /// whole state: done when a follower needs it, never per entry).
    fn read_snapshot(&self, cache: &Cache) -> Result<Snapshot, StorageError> {
        let data = match self.read_blob()? {
            Some(blob) => blob,
            None => {
                let records = self.read_records()?;
                encode_records(records.iter().map(|(k, v)| (&k[..], &v[..])))
            }
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(cache.snapshot.clone());
        snapshot.data = data.into();
        Ok(snapshot)
    }

    /// Term of `index`, which the caller has checked is at most the last index.
    fn term_of(&self, cache: &Cache, index: u64) -> Result<u64, StorageError> {
        if index == cache.snapshot.index {
            return Ok(cache.snapshot.term);
        }
        if index < cache.first_index {
            return Err(StorageError::Compacted {
                index,
                first_index: cache.first_index,
            });
        }
        Ok(self.read_entry(index)?.term)
    }

    fn read_entry(&self, index: u64) -> Result<Entry, StorageError> {
        match self.inner.tree.get(entry_key(index))? {
            Some(bytes) => decode_entry(index, &bytes),
            None => Err(corrupt(
                format!("log entry {index}"),
                "missing inside the log",
            )),
        }
    }

    /// Entries in `range`, all present on disk, stopping once `max_size` is exceeded (but
    /// returning at least one).
    fn read_entries(&self, range: Range<u64>, max_size: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut size: u64 = 0;
        let mut expected = range.start;
        for item in self
            .inner
            .tree
            .range(entry_key(range.start)..entry_key(range.end))
        {
            let (key, bytes) = item?;
            let index = entry_index_from_key(&key)?;
            if index != expected {
                return Err(corrupt(
                    format!("log entry {expected}"),
                    "missing inside the log",
                ));
            }
            let entry = decode_entry(index, &bytes)?;
            size = size.saturating_add(u64::from(entry.compute_size()));
            if !out.is_empty() && size > max_size {
                return Ok(out);
            }
            out.push(entry);
            expected += 1;
        }
        if expected != range.end {
            return Err(corrupt(
                format!("log entry {expected}"),
                "missing inside the log",
            ));
        }
        Ok(out)
    }
}

impl raft::Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let cache = self.lock();
        Ok(RaftState::new(
            cache.hard_state.clone(),
            cache.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(raft::NO_LIMIT);
        let cache = self.lock();
        if low < cache.first_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        // MemStorage panics here; raft-rs treats `Unavailable` from `entries` as fatal anyway.
        if high > cache.last_index + 1 || low > high {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.read_entries(low..high, max_size)?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let cache = self.lock();
        if idx == cache.snapshot.index {
            return Ok(cache.snapshot.term);
        }
        if idx < cache.first_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > cache.last_index {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.read_entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.lock().first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.lock().last_index)
    }

    /// The latest snapshot recorded by [`SledStorage::create_snapshot`] or
    /// [`SledStorage::apply_snapshot`]. When there is none, or it is older than
    /// `request_index`, returns `SnapshotTemporarilyUnavailable`: raft retries later, once the
    /// node has created a newer one. (`MemStorage` instead fabricates a data-less snapshot at
    /// the commit index, raised to `request_index`.)
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cache = self.lock();
        if cache.snapshot.index == 0 || cache.snapshot.index < request_index {
            tracing::debug!(
                to,
                request_index,
                snapshot_index = cache.snapshot.index,
                "no snapshot recent enough"
            );
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.read_snapshot(&cache)?)
    }
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = ENTRY_PREFIX;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn entry_index_from_key(key: &[u8]) -> Result<u64, StorageError> {
    match key.split_first() {
        Some((&ENTRY_PREFIX, rest)) => match <[u8; 8]>::try_from(rest) {
            Ok(bytes) => Ok(u64::from_be_bytes(bytes)),
            Err(_) => Err(corrupt(
                format!("log key {key:02x?}"),
                "not prefix + 8-byte index",
            )),
        },
        _ => Err(corrupt(format!("log key {key:02x?}"), "wrong prefix")),
    }
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

fn encode<M: protobuf::Message>(message: &M, what: &'static str) -> Result<Vec<u8>, StorageError> {
    message
        .write_to_bytes()
        .map_err(|source| StorageError::Encode { what, source })
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: impl Into<String>) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|e| corrupt(what, e.to_string()))
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
    let entry: Entry = decode(bytes, format!("log entry {index}"))?;
    if entry.index != index {
        return Err(corrupt(
            format!("log entry {index}"),
            format!("stored entry says index {}", entry.index),
        ));
    }
    Ok(entry)
}

/// A stored message, or its default when the key is absent.
fn read_message<M: protobuf::Message + Default>(
    tree: &sled::Tree,
    key: &[u8],
    what: &str,
) -> Result<M, StorageError> {
    match tree.get(key)? {
        Some(bytes) => decode(&bytes, what),
        None => Ok(M::default()),
    }
}

/// Why [`open_db`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenDbError {
    /// Another process holds the database's lock.
    #[error("{0} (is another coordinator using it?)")]
    Locked(sled::Error),
    /// The files could not be read or written (permissions, a failing disk).
    #[error("{0}")]
    Io(sled::Error),
    /// The files are damaged, or are not a database this version of sled reads.
    #[error("{0}")]
    Damaged(String),
}

/// Opens a sled database at `path`, waiting up to `wait` for a lock a just-dropped handle in
/// this process may still hold: sled 0.34 releases its file lock from a background thread after
/// `Db` is dropped (spacejam/sled#1234), so an immediate in-process reopen can fail. A lock held
/// by another live process still fails once `wait` has passed.
///
/// Damaged files are [`OpenDbError::Damaged`], whichever way sled meets them: an error, a panic
/// in its recovery (contained here), or, as it recovers an unreadable log as empty, a directory
/// that held files but comes back without the raft tree.
pub fn open_db(path: &std::path::Path, wait: std::time::Duration) -> Result<sled::Db, OpenDbError> {
    let existed = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some());
    let deadline = std::time::Instant::now() + wait;
    let db = loop {
        match contain_panic(|| sled::open(path)) {
            Err(panic) => {
                return Err(OpenDbError::Damaged(format!(
                    "sled panicked reading it: {panic}"
                )));
            }
            Ok(Ok(db)) => break db,
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(OpenDbError::Locked(sled::Error::Io(e)));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(Err(e @ sled::Error::Io(_))) => return Err(OpenDbError::Io(e)),
            Ok(Err(e)) => return Err(OpenDbError::Damaged(e.to_string())),
        }
    };
    if existed && !db.tree_names().iter().any(|n| n == TREE_NAME.as_bytes()) {
        return Err(OpenDbError::Damaged(format!(
            "it holds files but sled recovered no `{TREE_NAME}` tree from them"
        )));
    }
    Ok(db)
}

pub use serin_proto::panic::contain_panic;

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    use protobuf::Message as _;
    use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
    use raft::{Error as RaftError, GetEntriesContext, Storage, StorageError as RaftStorageError};

    use super::{
        SledStorage, StateDelta, StorageError, TREE_NAME, decode_records, encode_records, entry_key,
    };

    fn new_entry(index: u64, term: u64) -> Entry {
        Entry {
            term,
            index,
            ..Default::default()
        }
    }

    fn size_of(m: &Entry) -> u32 {
        m.compute_size()
    }

    fn new_snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = voters;
        s
    }

    fn conf_state(voters: Vec<u64>) -> ConfState {
        ConfState {
            voters,
            ..Default::default()
        }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn temp_db() -> sled::Db {
        sled::Config::new()
            .temporary(true)
            .open()
            .expect("open temporary sled db")
    }

    fn open_db(path: &std::path::Path) -> sled::Db {
        super::open_db(path, std::time::Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("open sled db at {}: {e}", path.display()))
    }

    fn empty_store() -> SledStorage {
        SledStorage::open(&temp_db()).expect("open storage")
    }

    /// The state raft-rs's tests build with `storage.wl().entries = ents`: a log starting at
    /// `ents[0].index`. Our store cannot hold a log that starts after index 1 without a
    /// snapshot right before it, so the snapshot is at `ents[0].index - 1` with the term of
    /// the same index (the ported tests use term == index).
    fn store_with(ents: &[Entry]) -> SledStorage {
        let store = empty_store();
        let first = ents[0].index;
        store
            .apply_snapshot(new_snapshot(first - 1, first - 1, vec![1, 2, 3]))
            .expect("apply base snapshot");
        store.persist_ready(ents, None, false).expect("append");
        store
    }

    fn all_entries(store: &SledStorage) -> Vec<Entry> {
        let first = store.first_index().unwrap();
        let last = store.last_index().unwrap();
        store.entries(first, last + 1, None, ctx()).unwrap()
    }

    // ---- raft-rs 0.7 `src/storage.rs` tests, ported ----

    #[test]
    fn test_storage_term() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let tests = vec![
            (1, Err(RaftError::Store(RaftStorageError::Compacted))),
            // MemStorage's test expects Compacted at 2: its log has no snapshot before it.
            // Ours does, and the term of the entry before the first index is retained.
            (2, Ok(2)),
            (3, Ok(3)),
            (4, Ok(4)),
            (5, Ok(5)),
            (6, Err(RaftError::Store(RaftStorageError::Unavailable))),
        ];
        for (i, (idx, wterm)) in tests.into_iter().enumerate() {
            let storage = store_with(&ents);
            let t = storage.term(idx);
            assert_eq!(t, wterm, "#{i}: term({idx})");
        }
    }

    #[test]
    fn test_storage_entries() {
        let ents = vec![
            new_entry(3, 3),
            new_entry(4, 4),
            new_entry(5, 5),
            new_entry(6, 6),
        ];
        let max_u64 = u64::MAX;
        let tests = vec![
            (
                2,
                6,
                max_u64,
                Err(RaftError::Store(RaftStorageError::Compacted)),
            ),
            (3, 4, max_u64, Ok(vec![new_entry(3, 3)])),
            (4, 5, max_u64, Ok(vec![new_entry(4, 4)])),
            (4, 6, max_u64, Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
            (
                4,
                7,
                max_u64,
                Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)]),
            ),
            // even if maxsize is zero, the first entry should be returned
            (4, 7, 0, Ok(vec![new_entry(4, 4)])),
            // limit to 2
            (
                4,
                7,
                u64::from(size_of(&ents[1]) + size_of(&ents[2])),
                Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
            ),
            (
                4,
                7,
                u64::from(size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) / 2),
                Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
            ),
            (
                4,
                7,
                u64::from(size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) - 1),
                Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
            ),
            // all
            (
                4,
                7,
                u64::from(size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3])),
                Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)]),
            ),
        ];
        let storage = store_with(&ents);
        for (i, (lo, hi, maxsize, wentries)) in tests.into_iter().enumerate() {
            let e = storage.entries(lo, hi, maxsize, ctx());
            assert_eq!(e, wentries, "#{i}: entries({lo}, {hi}, {maxsize})");
        }
        // Not in raft-rs (MemStorage panics): past the last index is an error, not a panic.
        assert_eq!(
            storage.entries(4, 8, None, ctx()),
            Err(RaftError::Store(RaftStorageError::Unavailable))
        );
        assert_eq!(storage.entries(4, 4, None, ctx()), Ok(vec![]));
    }

    #[test]
    fn test_storage_last_index() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let storage = store_with(&ents);
        assert_eq!(storage.last_index(), Ok(5));

        storage
            .persist_ready(&[new_entry(6, 5)], None, false)
            .unwrap();
        assert_eq!(storage.last_index(), Ok(6));
    }

    #[test]
    fn test_storage_first_index() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let storage = store_with(&ents);
        assert_eq!(storage.first_index(), Ok(3));
        // We only compact below a durable snapshot.
        storage
            .create_snapshot(5, conf_state(vec![1]), vec![])
            .unwrap();
        storage.compact(4).unwrap();
        assert_eq!(storage.first_index(), Ok(4));
    }

    #[test]
    fn test_storage_compact() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let tests = vec![(2, 3, 3, 3), (3, 3, 3, 3), (4, 4, 4, 2), (5, 5, 5, 1)];
        for (i, (idx, windex, wterm, wlen)) in tests.into_iter().enumerate() {
            let storage = store_with(&ents);
            storage
                .create_snapshot(5, conf_state(vec![1]), vec![])
                .unwrap();

            storage.compact(idx).unwrap();
            let index = storage.first_index().unwrap();
            assert_eq!(index, windex, "#{i}: first index");
            let term = storage
                .entries(index, index + 1, 1, ctx())
                .map(|v| v.first().map_or(0, |e| e.term))
                .unwrap_or(0);
            assert_eq!(term, wterm, "#{i}: term");
            let last = storage.last_index().unwrap();
            let len = storage.entries(index, last + 1, 100, ctx()).unwrap().len();
            assert_eq!(len, wlen, "#{i}: len");
        }
    }

    #[test]
    fn compact_stops_at_snapshot_and_log_end() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let storage = store_with(&ents);
        // The snapshot is at 2: nothing past it may go.
        assert!(matches!(
            storage.compact(4),
            Err(StorageError::CompactBeyondSnapshot {
                compact_index: 4,
                snapshot_index: 2
            })
        ));
        storage
            .create_snapshot(4, conf_state(vec![1]), vec![])
            .unwrap();
        assert!(matches!(
            storage.compact(7),
            Err(StorageError::CompactBeyondLog {
                compact_index: 7,
                last_index: 5
            })
        ));
        storage.compact(5).unwrap();
        assert_eq!(storage.first_index(), Ok(5));
        // The snapshot index keeps its term; older indexes are gone.
        assert_eq!(storage.term(4), Ok(4));
        assert_eq!(
            storage.term(3),
            Err(RaftError::Store(RaftStorageError::Compacted))
        );
    }

    #[test]
    fn test_storage_create_snapshot() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let nodes = vec![1, 2, 3];
        let with_data = |mut s: Snapshot, data: &[u8]| {
            s.data = data.to_vec().into();
            s
        };

        let unavailable = Err(RaftError::Store(
            RaftStorageError::SnapshotTemporarilyUnavailable,
        ));
        let tests = vec![
            (
                4,
                Ok(with_data(new_snapshot(4, 4, nodes.clone()), b"state@4")),
                0,
            ),
            (
                5,
                Ok(with_data(new_snapshot(5, 5, nodes.clone()), b"state@5")),
                5,
            ),
            // MemStorage fabricates a snapshot at 6 here; we have no state at 6 to offer.
            (5, unavailable, 6),
        ];
        for (i, (idx, wresult, windex)) in tests.into_iter().enumerate() {
            let storage = store_with(&ents);
            let data = format!("state@{idx}").into_bytes();
            storage
                .create_snapshot(idx, conf_state(nodes.clone()), data)
                .unwrap();
            let result = storage.snapshot(windex, 0);
            assert_eq!(result, wresult, "#{i}: snapshot({windex})");
        }

        let storage = store_with(&ents);
        assert!(matches!(
            storage.create_snapshot(6, conf_state(nodes.clone()), vec![]),
            Err(StorageError::SnapshotBeyondLog {
                index: 6,
                last_index: 5
            })
        ));
        storage
            .create_snapshot(5, conf_state(nodes.clone()), vec![])
            .unwrap();
        assert!(matches!(
            storage.create_snapshot(4, conf_state(nodes), vec![]),
            Err(StorageError::SnapshotOutOfDate {
                index: 4,
                current: 5
            })
        ));
        // Snapshotted state is committed state.
        assert_eq!(storage.hard_state().unwrap().commit, 5);
    }

    #[test]
    fn snapshot_without_one_stored_is_temporarily_unavailable() {
        let storage = empty_store();
        assert_eq!(
            storage.snapshot(0, 2),
            Err(RaftError::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable
            ))
        );
    }

    #[test]
    fn test_storage_append() {
        let ents = vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
        let tests = vec![
            (
                vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)],
                Some(vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]),
            ),
            (
                vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)],
                Some(vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)]),
            ),
            (
                vec![
                    new_entry(3, 3),
                    new_entry(4, 4),
                    new_entry(5, 5),
                    new_entry(6, 5),
                ],
                Some(vec![
                    new_entry(3, 3),
                    new_entry(4, 4),
                    new_entry(5, 5),
                    new_entry(6, 5),
                ]),
            ),
            // overwrite compacted raft logs is not allowed
            (
                vec![new_entry(2, 3), new_entry(3, 3), new_entry(4, 5)],
                None,
            ),
            // truncate the existing entries and append
            (
                vec![new_entry(4, 5)],
                Some(vec![new_entry(3, 3), new_entry(4, 5)]),
            ),
            // direct append
            (
                vec![new_entry(6, 6)],
                Some(vec![
                    new_entry(3, 3),
                    new_entry(4, 4),
                    new_entry(5, 5),
                    new_entry(6, 6),
                ]),
            ),
            // Not in raft-rs (MemStorage panics): a gap, and non-consecutive entries.
            (vec![new_entry(7, 6)], None),
            (vec![new_entry(6, 6), new_entry(8, 6)], None),
        ];
        for (i, (entries, wentries)) in tests.into_iter().enumerate() {
            let storage = store_with(&ents);
            let res = storage.persist_ready(&entries, None, false);
            match wentries {
                Some(wentries) => {
                    res.unwrap_or_else(|e| panic!("#{i}: append failed: {e}"));
                    assert_eq!(all_entries(&storage), wentries, "#{i}");
                    assert_eq!(
                        storage.last_index(),
                        Ok(wentries.last().unwrap().index),
                        "#{i}"
                    );
                    // Truncated entries are really gone from disk.
                    assert!(
                        storage
                            .inner
                            .tree
                            .get(entry_key(wentries.last().unwrap().index + 1))
                            .unwrap()
                            .is_none(),
                        "#{i}: stale suffix left on disk"
                    );
                }
                None => {
                    assert!(res.is_err(), "#{i}: append should fail");
                    assert_eq!(all_entries(&storage), ents, "#{i}: log changed");
                }
            }
        }
    }

    #[test]
    fn test_storage_apply_snapshot() {
        let nodes = vec![1, 2, 3];
        let storage = empty_store();

        // Apply snapshot successfully
        let mut snap = new_snapshot(4, 4, nodes.clone());
        snap.data = b"state".to_vec().into();
        storage.apply_snapshot(snap.clone()).unwrap();
        assert_eq!(storage.first_index(), Ok(5));
        assert_eq!(storage.last_index(), Ok(4));
        assert_eq!(storage.term(4), Ok(4));
        let state = storage.initial_state().unwrap();
        assert_eq!(state.hard_state.term, 4);
        assert_eq!(state.hard_state.commit, 4);
        assert_eq!(state.conf_state.voters, nodes);
        assert_eq!(storage.snapshot(4, 2), Ok(snap));

        // Apply snapshot fails due to StorageError::SnapshotOutOfDate
        let snap = new_snapshot(3, 3, nodes);
        assert!(matches!(
            storage.apply_snapshot(snap),
            Err(StorageError::SnapshotOutOfDate { index: 3, .. })
        ));
    }

    #[test]
    fn apply_snapshot_clears_the_log_and_keeps_the_vote() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        let hs = HardState {
            term: 9,
            vote: 2,
            commit: 4,
            ..Default::default()
        };
        storage.persist_ready(&[], Some(&hs), true).unwrap();

        storage.apply_snapshot(new_snapshot(7, 6, vec![4])).unwrap();
        assert_eq!(storage.first_index(), Ok(8));
        assert_eq!(storage.last_index(), Ok(7));
        for index in 3..=5 {
            assert!(storage.inner.tree.get(entry_key(index)).unwrap().is_none());
        }
        let hs = storage.hard_state().unwrap();
        assert_eq!((hs.term, hs.vote, hs.commit), (9, 2, 7));
        assert_eq!(storage.conf_state().voters, vec![4]);
    }

    // ---- serin's own ----

    /// sled splits leaves by item count, not size, and rewrites a whole leaf when it
    /// consolidates its updates: a large value sharing a leaf with the hard state and the
    /// newest entries would be rewritten every few appends.
    #[test]
    fn the_snapshot_data_sorts_apart_from_the_log_tail_and_the_hard_state() {
        use super::{KEY_HARD_STATE, KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_META};
        assert!(KEY_SNAPSHOT_DATA < &entry_key(0)[..]);
        assert!(KEY_SNAPSHOT_DATA < KEY_HARD_STATE && KEY_SNAPSHOT_DATA < KEY_SNAPSHOT_META);
    }

    #[test]
    fn a_snapshot_stored_under_the_old_key_is_read_and_moved_by_the_next_one() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        storage
            .create_snapshot(3, conf_state(vec![1]), Vec::new())
            .unwrap();
        let tree = &storage.inner.tree;
        tree.remove(super::KEY_SNAPSHOT_DATA).unwrap();
        tree.insert(b"m/snapshot_data", &b"old@3"[..]).unwrap();
        assert_eq!(&storage.latest_snapshot().unwrap().data[..], b"old@3");

        storage
            .create_snapshot(4, conf_state(vec![1]), b"new@4".to_vec())
            .unwrap();
        assert_eq!(&storage.latest_snapshot().unwrap().data[..], b"new@4");
        assert_eq!(tree.get(b"m/snapshot_data").unwrap(), None);
    }

    /// Older versions saved the registry at every apply; the first snapshot at or past it
    /// makes it dead weight, in the leaf that every append rewrites.
    #[test]
    fn a_snapshot_discards_a_saved_applied_state_it_covers() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        storage.save_applied(4, b"state@4").unwrap();
        storage
            .create_snapshot(3, conf_state(vec![1]), b"snap@3".to_vec())
            .unwrap();
        assert_eq!(
            storage.load_applied().unwrap(),
            Some((4, b"state@4".to_vec())),
            "a newer saved state is kept"
        );
        storage
            .create_snapshot(4, conf_state(vec![1]), b"snap@4".to_vec())
            .unwrap();
        assert_eq!(storage.load_applied().unwrap(), None);
    }

    fn records(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn delta(put: &[(&str, &str)], removed: &[&str]) -> StateDelta {
        StateDelta {
            put: records(put),
            removed: removed.iter().map(|k| k.as_bytes().to_vec()).collect(),
        }
    }

    fn snapshot_records(storage: &SledStorage) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        decode_records(&storage.latest_snapshot().unwrap().data).unwrap()
    }

    #[test]
    fn a_records_snapshot_writes_its_delta_and_sends_every_record() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        let cs = conf_state(vec![1]);
        storage
            .create_snapshot_of_records(3, cs.clone(), &delta(&[("a", "1"), ("b", "2")], &[]))
            .unwrap();
        let before = storage.bytes_written();
        storage
            .create_snapshot_of_records(4, cs.clone(), &delta(&[("c", "3")], &["a"]))
            .unwrap();
        let written = storage.bytes_written() - before;
        let expected = records(&[("b", "2"), ("c", "3")]);
        assert_eq!(storage.state_records().unwrap(), expected);
        assert_eq!(snapshot_records(&storage), Some(expected));
        assert_eq!(storage.snapshot_metadata().index, 4);
        // The delta, the metadata and the removed keys; never the records left alone.
        assert!(
            written < 120,
            "{written} bytes written for a one-record delta"
        );
        assert_eq!(storage.state_blob().unwrap(), None);
    }

    #[test]
    fn records_and_a_blob_replace_each_other() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        let cs = conf_state(vec![1]);
        storage
            .create_snapshot_of_records(3, cs.clone(), &delta(&[("a", "1")], &[]))
            .unwrap();
        storage
            .create_snapshot(4, cs.clone(), b"blob@4".to_vec())
            .unwrap();
        assert_eq!(storage.state_records().unwrap(), vec![]);
        assert_eq!(&storage.latest_snapshot().unwrap().data[..], b"blob@4");
        storage
            .create_snapshot_of_records(5, cs, &delta(&[("b", "2")], &[]))
            .unwrap();
        assert_eq!(storage.state_blob().unwrap(), None);
        assert_eq!(snapshot_records(&storage), Some(records(&[("b", "2")])));
    }

    #[test]
    fn an_installed_snapshot_is_stored_as_it_came_records_or_blob() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4)]);
        storage
            .create_snapshot_of_records(3, conf_state(vec![1]), &delta(&[("old", "x")], &[]))
            .unwrap();
        let sent = records(&[("k1", "v1"), ("k2", "")]);
        let mut snap = new_snapshot(6, 6, vec![1]);
        snap.data = encode_records(sent.iter().map(|(k, v)| (&k[..], &v[..]))).into();
        storage.apply_snapshot(snap).unwrap();
        assert_eq!(
            storage.state_records().unwrap(),
            sent,
            "the old records are gone"
        );
        assert_eq!(storage.state_blob().unwrap(), None);

        let mut blob = new_snapshot(7, 7, vec![1]);
        blob.data = b"{}".to_vec().into();
        storage.apply_snapshot(blob).unwrap();
        assert_eq!(storage.state_records().unwrap(), vec![]);
        assert_eq!(storage.state_blob().unwrap(), Some(b"{}".to_vec()));
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path());
            let storage = SledStorage::open(&db).unwrap();
            storage.initialize_if_empty(&[1]).unwrap();
            storage
                .persist_ready(&[new_entry(2, 1)], None, true)
                .unwrap();
            storage
                .create_snapshot_of_records(2, conf_state(vec![1]), &delta(&[("r/x", "1")], &[]))
                .unwrap();
        }
        let storage = SledStorage::open(&open_db(dir.path())).unwrap();
        assert_eq!(storage.state_records().unwrap(), records(&[("r/x", "1")]));
        assert_eq!(storage.snapshot_metadata().index, 2);
    }

    #[test]
    fn encoded_records_round_trip_and_framing_errors_are_corrupt() {
        let sent = records(&[("a", "1"), ("", ""), ("key", "a longer value")]);
        let data = encode_records(sent.iter().map(|(k, v)| (&k[..], &v[..])));
        assert_eq!(decode_records(&data).unwrap(), Some(sent));
        assert_eq!(decode_records(b"{\"rollouts\":{}}").unwrap(), None);
        assert_eq!(decode_records(b"").unwrap(), None);
        for cut in [1, 3, 5] {
            let err = decode_records(&data[..data.len() - cut]).unwrap_err();
            assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        }
    }

    /// A state saved at 5 on top of a log the snapshot at 4 just replaced would be restored at
    /// an index past the end of the log.
    #[test]
    fn installing_a_snapshot_discards_the_saved_applied_state() {
        let storage = store_with(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        let hs = HardState {
            term: 5,
            commit: 5,
            ..Default::default()
        };
        storage.persist_ready(&[], Some(&hs), true).unwrap();
        storage.save_applied(5, b"state@5").unwrap();
        storage.apply_snapshot(new_snapshot(4, 4, vec![1])).unwrap();
        assert_eq!(storage.load_applied().unwrap(), None);
        assert_eq!(storage.snapshot_metadata().index, 4);
    }

    #[test]
    fn initialize_if_empty_bootstraps_once() {
        let storage = empty_store();
        assert!(!storage.initial_state().unwrap().initialized());
        assert!(matches!(
            storage.initialize_if_empty(&[]),
            Err(StorageError::NoVoters)
        ));
        storage.initialize_if_empty(&[1]).unwrap();

        let state = storage.initial_state().unwrap();
        assert!(state.initialized());
        assert_eq!(state.conf_state.voters, vec![1]);
        assert_eq!((state.hard_state.term, state.hard_state.commit), (1, 1));
        assert_eq!(storage.first_index(), Ok(2));
        assert_eq!(storage.last_index(), Ok(1));
        assert_eq!(storage.term(1), Ok(1));
        assert_eq!(storage.snapshot(0, 2).unwrap().get_metadata().index, 1);

        // Second call: no-op, the stored membership wins.
        storage.initialize_if_empty(&[7, 8]).unwrap();
        assert_eq!(storage.conf_state().voters, vec![1]);

        // Anything stored counts as initialized.
        let other = empty_store();
        other
            .persist_ready(&[new_entry(1, 1)], None, false)
            .unwrap();
        other.initialize_if_empty(&[1]).unwrap();
        assert_eq!(other.conf_state(), ConfState::default());
        assert_eq!(other.first_index(), Ok(1));
    }

    #[test]
    fn persist_ready_writes_hard_state_with_entries() {
        let storage = empty_store();
        storage.initialize_if_empty(&[1]).unwrap();
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 3,
            ..Default::default()
        };
        // commit 3 with the log ending at 1 is refused, and nothing is written.
        assert!(matches!(
            storage.persist_ready(&[], Some(&hs), true),
            Err(StorageError::CommitBeyondLog {
                commit: 3,
                last_index: 1
            })
        ));
        assert_eq!(storage.hard_state().unwrap().term, 1);

        storage
            .persist_ready(&[new_entry(2, 2), new_entry(3, 2)], Some(&hs), true)
            .unwrap();
        assert_eq!(storage.hard_state().unwrap(), hs);
        assert_eq!(storage.initial_state().unwrap().hard_state, hs);
        assert_eq!(storage.last_index(), Ok(3));
    }

    #[test]
    fn set_commit_moves_forward_within_the_log() {
        let storage = empty_store();
        storage.initialize_if_empty(&[1]).unwrap();
        storage
            .persist_ready(&[new_entry(2, 2), new_entry(3, 2)], None, true)
            .unwrap();
        storage.set_commit(3).unwrap();
        assert_eq!(storage.hard_state().unwrap().commit, 3);
        storage.set_commit(2).unwrap();
        assert_eq!(storage.hard_state().unwrap().commit, 3, "moved backwards");
        assert!(matches!(
            storage.set_commit(4),
            Err(StorageError::CommitBeyondLog { commit: 4, .. })
        ));
        assert_eq!(storage.hard_state().unwrap().term, 1, "term untouched");
    }

    #[test]
    fn save_applied_round_trips_and_raises_commit() {
        let storage = empty_store();
        assert_eq!(storage.load_applied().unwrap(), None);
        storage.initialize_if_empty(&[1]).unwrap();
        storage
            .persist_ready(&[new_entry(2, 2), new_entry(3, 2)], None, true)
            .unwrap();
        storage.save_applied(3, b"{\"rollouts\":[]}").unwrap();
        assert_eq!(
            storage.load_applied().unwrap(),
            Some((3, b"{\"rollouts\":[]}".to_vec()))
        );
        assert_eq!(storage.hard_state().unwrap().commit, 3);
        storage.save_applied(2, b"").unwrap();
        assert_eq!(storage.load_applied().unwrap(), Some((2, vec![])));
        assert!(matches!(
            storage.save_applied(4, b""),
            Err(StorageError::AppliedBeyondLog { applied: 4, .. })
        ));
    }

    #[test]
    fn corrupt_bytes_are_errors_not_panics() {
        let db = temp_db();
        let storage = SledStorage::open(&db).unwrap();
        storage.initialize_if_empty(&[1]).unwrap();
        storage
            .persist_ready(&[new_entry(2, 1), new_entry(3, 1)], None, true)
            .unwrap();
        let tree = db.open_tree(TREE_NAME).unwrap();

        // An entry that does not decode: reads fail with an error.
        tree.insert(entry_key(3), &[0xff, 0xff, 0xff][..]).unwrap();
        assert!(matches!(
            storage.entries(2, 4, None, ctx()),
            Err(RaftError::Store(RaftStorageError::Other(_)))
        ));
        assert!(storage.term(3).is_err());
        // An entry stored under the wrong index.
        tree.insert(entry_key(3), new_entry(9, 1).write_to_bytes().unwrap())
            .unwrap();
        assert!(storage.term(3).is_err());

        // A short applied record.
        tree.insert(super::KEY_APPLIED, &[1, 2][..]).unwrap();
        assert!(matches!(
            storage.load_applied(),
            Err(StorageError::Corrupt { .. })
        ));

        // A gap in the log is found on open.
        tree.remove(entry_key(2)).unwrap();
        tree.insert(entry_key(4), new_entry(4, 1).write_to_bytes().unwrap())
            .unwrap();
        assert!(matches!(
            SledStorage::open(&db),
            Err(StorageError::Corrupt { .. })
        ));
        tree.remove(entry_key(4)).unwrap();
        tree.insert(entry_key(2), new_entry(2, 1).write_to_bytes().unwrap())
            .unwrap();
        SledStorage::open(&db).expect("repaired log opens");

        // A hard state that does not decode is found on open.
        tree.insert(super::KEY_HARD_STATE, &[0x08][..]).unwrap();
        assert!(matches!(
            SledStorage::open(&db),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_directory_that_sled_recovers_as_empty_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(open_db(&path).open_tree(TREE_NAME).unwrap());
        std::fs::write(path.join("db"), vec![0x5a; 4096]).unwrap();
        let wait = std::time::Duration::from_secs(10);
        match super::open_db(&path, wait) {
            Err(super::OpenDbError::Damaged(detail)) => {
                assert!(detail.contains("raft"), "{detail}")
            }
            other => panic!("expected Damaged, got {:?}", other.map(|_| ())),
        }
        // A directory that never held anything is a new store, not a damaged one.
        let fresh = dir.path().join("fresh");
        super::open_db(&fresh, wait).expect("a new store opens");
    }

    #[test]
    fn bytes_written_counts_the_keys_and_values_of_every_write_and_is_shared_by_clones() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"));
        let storage = SledStorage::open(&db).unwrap();
        assert_eq!(storage.bytes_written(), 0);
        storage.initialize_if_empty(&[1]).unwrap();
        let clone = storage.clone();
        let before = clone.bytes_written();
        assert!(before > 0, "the initial snapshot is a write");
        let mut e = new_entry(2, 1);
        e.data = vec![7u8; 1000].into();
        let entry_bytes = (9 + e.write_to_bytes().unwrap().len()) as u64;
        storage.persist_ready(&[e], None, true).unwrap();
        assert_eq!(clone.bytes_written() - before, entry_bytes);
        storage.save_applied(2, &[0u8; 500]).unwrap();
        assert!(clone.bytes_written() - before >= entry_bytes + 500);
    }

    #[test]
    fn reopen_restores_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let hs = HardState {
            term: 3,
            vote: 1,
            commit: 5,
            ..Default::default()
        };
        {
            let db = open_db(&path);
            let storage = SledStorage::open(&db).unwrap();
            storage.initialize_if_empty(&[1]).unwrap();
            let ents: Vec<Entry> = (2..=6)
                .map(|i| {
                    let mut e = new_entry(i, 2 + i / 4);
                    e.data = format!("cmd{i}").into_bytes().into();
                    e
                })
                .collect();
            storage.persist_ready(&ents, Some(&hs), true).unwrap();
            storage.set_conf_state(&conf_state(vec![1, 2])).unwrap();
            storage
                .create_snapshot(4, conf_state(vec![1, 2]), b"snap@4".to_vec())
                .unwrap();
            storage.compact(3).unwrap();
            storage.save_applied(5, b"state@5").unwrap();
        }
        let db = open_db(&path);
        let storage = SledStorage::open(&db).unwrap();
        let state = storage.initial_state().unwrap();
        assert_eq!(state.hard_state, hs);
        assert_eq!(state.conf_state.voters, vec![1, 2]);
        assert_eq!(storage.first_index(), Ok(3));
        assert_eq!(storage.last_index(), Ok(6));
        let ents = storage.entries(3, 7, None, ctx()).unwrap();
        assert_eq!(
            ents.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(3, 2), (4, 3), (5, 3), (6, 3)]
        );
        assert_eq!(&ents[3].data[..], b"cmd6");
        assert_eq!(
            storage.term(2),
            Err(RaftError::Store(RaftStorageError::Compacted))
        );
        let snap = storage.snapshot(4, 2).unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_metadata().term),
            (4, 3)
        );
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2]);
        assert_eq!(&snap.data[..], b"snap@4");
        assert_eq!(
            storage.load_applied().unwrap(),
            Some((5, b"state@5".to_vec()))
        );
    }

    /// raft-rs itself, over our store: a single voter elects itself, commits a proposal, and
    /// after a restart from disk comes back with the same log and hard state.
    #[test]
    fn raw_node_commits_and_restarts_over_sled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let config = |applied| raft::Config {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 3,
            applied,
            ..Default::default()
        };

        // Handle readies until there are none; returns the data of applied entries.
        fn drive(node: &mut raft::RawNode<SledStorage>, storage: &SledStorage) -> Vec<Vec<u8>> {
            let mut applied = Vec::new();
            while node.has_ready() {
                let mut ready = node.ready();
                let apply = |ents: Vec<Entry>, applied: &mut Vec<Vec<u8>>| {
                    for e in ents {
                        if !e.data.is_empty() {
                            applied.push(e.data.to_vec());
                        }
                        storage.save_applied(e.index, &e.data).unwrap();
                    }
                };
                apply(ready.take_committed_entries(), &mut applied);
                storage
                    .persist_ready(ready.entries(), ready.hs(), ready.must_sync())
                    .unwrap();
                let mut light = node.advance(ready);
                if let Some(commit) = light.commit_index() {
                    storage.set_commit(commit).unwrap();
                }
                apply(light.take_committed_entries(), &mut applied);
                node.advance_apply();
            }
            applied
        }

        {
            let db = open_db(&path);
            let storage = SledStorage::open(&db).unwrap();
            storage.initialize_if_empty(&[1]).unwrap();
            let mut node = raft::RawNode::new(&config(0), storage.clone(), &logger).unwrap();
            node.campaign().unwrap();
            drive(&mut node, &storage);
            assert_eq!(node.raft.state, raft::StateRole::Leader);
            node.propose(vec![], b"hello".to_vec()).unwrap();
            assert_eq!(drive(&mut node, &storage), vec![b"hello".to_vec()]);
        }

        let db = open_db(&path);
        let storage = SledStorage::open(&db).unwrap();
        let (applied, state) = storage.load_applied().unwrap().unwrap();
        assert_eq!(state, b"hello");
        let hs = storage.hard_state().unwrap();
        assert_eq!((hs.term, hs.commit), (2, applied));
        let node = raft::RawNode::new(&config(applied), storage.clone(), &logger).unwrap();
        assert_eq!(node.raft.raft_log.last_index(), 3);
        assert_eq!(node.raft.raft_log.committed, 3);
        assert_eq!(node.raft.term, 2);
    }

    // ---- kill -9 ----

    const CRASH_ENV: &str = "SERIN_STORAGE_CRASH_CHILD";
    const CRASH_SNAPSHOT_EVERY: u64 = 100;
    const CRASH_KEEP: u64 = 40;

    fn crash_payload(index: u64) -> Vec<u8> {
        // Varying sizes so entries straddle sled's internal buffers.
        let len = 16 + (index * 37 % 400) as usize;
        format!("entry-{index}:")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(len)
            .collect()
    }

    /// Child side: append one synced entry at a time forever, reporting each. Every
    /// `CRASH_SNAPSHOT_EVERY` entries, snapshot and compact, so those paths get killed too.
    fn crash_child(dir: &str) {
        let db = open_db(std::path::Path::new(dir));
        let storage = SledStorage::open(&db).expect("child: open storage");
        storage.initialize_if_empty(&[1]).expect("child: init");
        let mut index = storage.last_index().unwrap() + 1;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        // Bounded, so a child whose parent died does not run forever.
        while std::time::Instant::now() < deadline {
            let mut e = new_entry(index, 1);
            e.data = crash_payload(index).into();
            let hs = HardState {
                term: 1,
                vote: 1,
                commit: index,
                ..Default::default()
            };
            storage
                .persist_ready(&[e], Some(&hs), true)
                .expect("child: persist");
            // Reported only once the synced write returned.
            println!("persisted {index}");
            if index.is_multiple_of(CRASH_SNAPSHOT_EVERY) {
                storage
                    .create_snapshot(index, conf_state(vec![1]), crash_payload(index))
                    .expect("child: snapshot");
                storage.compact(index - CRASH_KEEP).expect("child: compact");
                storage
                    .save_applied(index, b"applied")
                    .expect("child: applied");
            }
            index += 1;
        }
    }

    /// Kills the child if the test fails before it does.
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn crash_kill9_keeps_every_synced_entry() {
        if let Ok(dir) = std::env::var(CRASH_ENV) {
            crash_child(&dir);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("db");
        let module = module_path!();
        let test_name = format!(
            "{}::crash_kill9_keeps_every_synced_entry",
            module.split_once("::").map_or(module, |(_, rest)| rest)
        );
        let exe = std::env::current_exe().unwrap();

        // initialize_if_empty puts the first snapshot at index 1.
        let mut prev_last = 1;
        let mut reported_max = 0;
        for round in 0..3 {
            let child = Command::new(&exe)
                .args([test_name.as_str(), "--exact", "--nocapture"])
                .env(CRASH_ENV, &db_path)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut child = KillOnDrop(child);
            let stdout = child.0.stdout.take().unwrap();
            let mut reported = Vec::new();
            // Kill at a different point each round, mid-snapshot-cycle or not.
            let want = 130 + round * 45;
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(n) = line.strip_prefix("persisted ") {
                    reported.push(n.parse::<u64>().unwrap());
                    if reported.len() >= want {
                        break;
                    }
                }
            }
            assert_eq!(
                reported.len(),
                want,
                "round {round}: child stopped early after reporting {reported:?}"
            );
            child.0.kill().unwrap();
            let status = child.0.wait().unwrap();
            assert!(!status.success(), "round {round}: child was not killed");
            drop(child);

            let db = open_db(&db_path);
            let storage = SledStorage::open(&db).unwrap();
            let first = storage.first_index().unwrap();
            let last = storage.last_index().unwrap();
            let snapshot = storage.snapshot_metadata();
            assert!(
                reported.windows(2).all(|w| w[1] == w[0] + 1),
                "round {round}: child skipped an index: {reported:?}"
            );
            assert_eq!(
                reported[0],
                prev_last + 1,
                "round {round}: child did not resume after the last stored entry"
            );
            let max = *reported.last().unwrap();
            assert!(
                last >= max,
                "round {round}: child reported {max} persisted, log ends at {last}"
            );
            assert!(
                first <= snapshot.index + 1,
                "round {round}: gap after snapshot"
            );
            let ents = storage.entries(first, last + 1, None, ctx()).unwrap();
            assert_eq!(ents.len() as u64, last - first + 1, "round {round}");
            for (e, index) in ents.iter().zip(first..) {
                assert_eq!(e.index, index, "round {round}: log not contiguous");
                assert_eq!(e.term, 1);
                assert_eq!(
                    &e.data[..],
                    &crash_payload(index)[..],
                    "round {round}: entry {index}"
                );
            }
            for &index in &reported {
                assert!(
                    index >= first || index <= snapshot.index,
                    "round {round}: reported index {index} is neither in the log \
                     [{first}, {last}] nor covered by the snapshot at {}",
                    snapshot.index
                );
            }
            let hs = storage.hard_state().unwrap();
            assert!(
                hs.commit <= last && hs.commit >= max,
                "round {round}: {hs:?}"
            );
            if let Some((applied, _)) = storage.load_applied().unwrap() {
                assert!(applied <= hs.commit);
            }
            reported_max = max;
            prev_last = last;
        }
        assert!(reported_max > 400, "three rounds should pass 400 entries");
    }
}
