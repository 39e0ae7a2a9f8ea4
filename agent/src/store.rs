//! The agent's local store: what it last applied, so that a restarted agent tells the
//! coordinator where it stands (`Register.last_applied`) and ignores older desired states;
//! and the agent's instance id (`Register.instance_id`), so that the coordinator tells this
//! agent restarting from a second agent that was given the same name.
//!
//! One sled database at `<data_dir>/agent.sled`. Each record is written and flushed before
//! the agent acknowledges it, so an acknowledged generation survives a crash. Records are
//! JSON with a format number, read back without trusting the bytes: a damaged record is an
//! error naming the store, never a panic.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serin_proto::v1 as pb;

use crate::traffic::Variant;

/// Name of the sled directory inside the agent's `data_dir`.
pub const STORE_DIR: &str = "agent.sled";

const LAST_APPLIED_KEY: &[u8] = b"last_applied";
const INSTANCE_ID_KEY: &[u8] = b"instance_id";
/// The generation a live canary lease revert was derived from (JSON), while it is live.
const LEASE_REVERTED_KEY: &[u8] = b"lease_reverted";
const RECORD_FORMAT: u32 = 1;
/// How long [`LocalStore::open`] waits for a lock that a just-dropped handle in this process
/// may still hold.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// sled's page cache limit; the store holds a single small record.
const CACHE_BYTES: u64 = 1 << 20;

/// A desired-state version: the leader's term and the log index of the change. Ordered
/// lexicographically (term first), as the coordinator assigns them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Generation {
    pub term: u64,
    pub index: u64,
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.index)
    }
}

impl From<pb::Generation> for Generation {
    fn from(g: pb::Generation) -> Self {
        Generation {
            term: g.term,
            index: g.index,
        }
    }
}

impl From<Generation> for pb::Generation {
    fn from(g: Generation) -> Self {
        pb::Generation {
            term: g.term,
            index: g.index,
        }
    }
}

/// What one service's traffic should look like (the agent's copy of `ServiceTraffic`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTraffic {
    pub service: String,
    /// Percentage of traffic for the canary; the wire allows any `u32`, the actuator checks.
    pub canary_weight: u32,
    pub stable_version: String,
    pub canary_version: String,
    pub rollout_id: String,
    /// nginx variable to key a sticky split on; `None` = weighted.
    pub sticky_key: Option<String>,
    /// The service's upstream servers from the coordinator's inventory, for a balancer.
    /// Absent in a store written before the inventory existed.
    #[serde(default)]
    pub servers: Vec<UpstreamServer>,
    /// `servers` is authoritative: route to them, not to this agent's `[[instances]]`.
    #[serde(default)]
    pub from_inventory: bool,
    /// The request header whose value `canary` or `stable` routes to that variant (see
    /// [`crate::traffic::VariantOverride`]); `None` = no header override. Absent in a store
    /// written before overrides existed.
    #[serde(default)]
    pub override_header: Option<String>,
    /// The cookie with the same meaning; `None` = no cookie override.
    #[serde(default)]
    pub override_cookie: Option<String>,
    /// Why the coordinator's servers could not be read (naming the server): the applier
    /// refuses the service. Never stored: a state carrying it is never applied.
    #[serde(skip)]
    pub invalid_servers: Option<String>,
}

/// One upstream server of a service, from the coordinator's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamServer {
    /// The instance's name in its agent's config.
    pub instance: String,
    /// `host:port` the balancer sends traffic to; never empty.
    pub address: String,
    pub variant: Variant,
    /// The coordinator's per-server weight. Informational: balancers recompute the weights
    /// with [`crate::traffic::server_weights`], the same rule.
    pub weight: u64,
    /// The agent that declared (and scrapes) it.
    pub agent: String,
}

impl UpstreamServer {
    /// Reads the `index`th server of a service; the error names the server.
    fn from_proto(index: usize, s: pb::UpstreamServer) -> Result<UpstreamServer, String> {
        let name = format!(
            "server {index} (instance {:?} of agent {:?})",
            s.instance, s.agent
        );
        let variant = match pb::Variant::try_from(s.variant) {
            Ok(pb::Variant::Stable) => Variant::Stable,
            Ok(pb::Variant::Canary) => Variant::Canary,
            _ => {
                return Err(format!(
                    "{name}: variant {} is neither stable nor canary",
                    s.variant
                ));
            }
        };
        if s.address.is_empty() {
            return Err(format!("{name}: the address is empty"));
        }
        Ok(UpstreamServer {
            instance: s.instance,
            address: s.address,
            variant,
            weight: s.weight,
            agent: s.agent,
        })
    }
}

impl From<pb::ServiceTraffic> for ServiceTraffic {
    /// A server that cannot be read is not dropped: it empties `servers` and sets
    /// `invalid_servers`, which the applier refuses.
    fn from(s: pb::ServiceTraffic) -> Self {
        let servers: Result<Vec<UpstreamServer>, String> = s
            .servers
            .into_iter()
            .enumerate()
            .map(|(i, server)| UpstreamServer::from_proto(i, server))
            .collect();
        let (servers, invalid_servers) = match servers {
            Ok(servers) => (servers, None),
            Err(error) => (
                Vec::new(),
                Some(format!(
                    "service '{}': the coordinator sent an unusable upstream {error}",
                    s.service
                )),
            ),
        };
        ServiceTraffic {
            service: s.service,
            canary_weight: s.canary_weight,
            stable_version: s.stable_version,
            canary_version: s.canary_version,
            rollout_id: s.rollout_id,
            sticky_key: Some(s.sticky_key).filter(|k| !k.is_empty()),
            servers,
            from_inventory: s.from_inventory,
            override_header: Some(s.override_header).filter(|h| !h.is_empty()),
            override_cookie: Some(s.override_cookie).filter(|c| !c.is_empty()),
            invalid_servers,
        }
    }
}

/// One desired state: everything the agent should make true, at one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub generation: Generation,
    pub services: Vec<ServiceTraffic>,
}

impl DesiredState {
    /// Converts the wire message; `None` when it carries no generation (which cannot be
    /// ordered or acknowledged).
    pub fn from_proto(d: pb::DesiredState) -> Option<DesiredState> {
        Some(DesiredState {
            generation: d.generation?.into(),
            services: d.services.into_iter().map(Into::into).collect(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    format: u32,
    desired: DesiredState,
}

/// Errors of the local store; each names the store's path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the agent data directory '{}': {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot open the agent store '{}': {source} (is another agent using this data_dir?)",
        path.display()
    )]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "the agent store '{}' is corrupted or was written by another program ({detail}): move it \
         aside to start with an empty store (the coordinator sends the current desired state \
         when the agent connects)",
        path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("cannot {action} the agent store '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the agent store '{}' holds an unreadable {key} record: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

use serin_proto::panic::contain_panic;

/// The agent's sled store. Cheap to clone (handles share one database).
#[derive(Clone)]
pub struct LocalStore {
    db: sled::Db,
    path: PathBuf,
}

impl fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStore")
            .field("path", &self.path)
            .finish()
    }
}

impl LocalStore {
    /// Opens (creating if needed) `<data_dir>/agent.sled`. Blocking.
    pub fn open(data_dir: &Path) -> Result<LocalStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(STORE_DIR);
        // sled 0.34 releases its file lock from a background thread after the `Db` is dropped
        // (spacejam/sled#1234), so reopening in the same process right after a drop can find
        // the lock still held: wait for it briefly. Another live agent's lock still fails.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let opened = loop {
            let attempt = contain_panic(|| {
                sled::Config::new()
                    .path(&path)
                    // One small record: keep the page cache (and the agent's memory) small.
                    .cache_capacity(CACHE_BYTES)
                    .open()
            });
            match &attempt {
                Ok(Err(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break attempt,
            }
        };
        let damaged = |detail: String| StoreError::Damaged {
            path: path.clone(),
            detail,
        };
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(source @ sled::Error::Io(_))) => {
                return Err(StoreError::Open {
                    path: path.clone(),
                    source,
                });
            }
            Ok(Err(e)) => return Err(damaged(e.to_string())),
            Err(panic) => return Err(damaged(format!("sled panicked reading it: {panic}"))),
        };
        Ok(LocalStore { db, path })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last desired state recorded by [`record_applied`](Self::record_applied), if any.
    pub fn last_applied(&self) -> Result<Option<DesiredState>, StoreError> {
        let Some(bytes) = self
            .db
            .get(LAST_APPLIED_KEY)
            .map_err(|source| self.io("read", source))?
        else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            key: "last_applied",
            reason,
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if record.format != RECORD_FORMAT {
            return Err(corrupt(format!(
                "format {} is not known to this agent (expected {RECORD_FORMAT})",
                record.format
            )));
        }
        Ok(Some(record.desired))
    }

    /// This agent's instance id: 128 random bits in hex, made and flushed on the first call
    /// for this data directory, the same ever after. It tells the coordinator a restart of
    /// this agent (same name, same id) from a second agent using the same name. Blocking.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            key: "instance_id",
            reason,
        };
        let read = |bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .ok()
                .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()))
                .map(str::to_owned)
                .ok_or_else(|| {
                    corrupt(format!(
                        "not a hex id: {:?}",
                        String::from_utf8_lossy(bytes)
                    ))
                })
        };
        let fresh = format!("{:032x}", rand::random::<u128>());
        // Only the first writer's id is kept, should two handles race.
        let previous = self
            .db
            .compare_and_swap(INSTANCE_ID_KEY, None::<&[u8]>, Some(fresh.as_bytes()))
            .map_err(|source| self.io("write", source))?;
        match previous {
            Ok(()) => {
                self.db.flush().map_err(|source| self.io("flush", source))?;
                Ok(fresh)
            }
            Err(sled::CompareAndSwapError { current, .. }) => {
                read(current.as_deref().unwrap_or_default())
            }
        }
    }

    /// Records `desired` as applied and flushes it to disk before returning. Blocking.
    pub fn record_applied(&self, desired: &DesiredState) -> Result<(), StoreError> {
        let record = Record {
            format: RECORD_FORMAT,
            desired: desired.clone(),
        };
        // Serializing plain strings and integers cannot fail.
        let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            key: "last_applied",
            reason: format!("cannot encode: {e}"),
        })?;
        // A coordinator state applied ends any lease revert, in the same atomic batch.
        let mut batch = sled::Batch::default();
        batch.insert(LAST_APPLIED_KEY, bytes);
        batch.remove(LEASE_REVERTED_KEY);
        self.db
            .apply_batch(batch)
            .map_err(|source| self.io("write", source))?;
        self.db.flush().map_err(|source| self.io("flush", source))?;
        Ok(())
    }

    /// Records that this host was reverted by its canary lease, from the state of
    /// `generation`, and flushes it: an agent restarted while reverted then applies the
    /// coordinator's state of that generation again instead of only acknowledging it
    /// (docs/agent.md, "Canary lease"). [`record_applied`](Self::record_applied) clears it.
    /// Blocking.
    pub fn record_lease_reverted(&self, generation: Generation) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&generation).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            key: "lease_reverted",
            reason: format!("cannot encode: {e}"),
        })?;
        self.db
            .insert(LEASE_REVERTED_KEY, bytes)
            .map_err(|source| self.io("write", source))?;
        self.db.flush().map_err(|source| self.io("flush", source))?;
        Ok(())
    }

    /// The generation of the live lease revert recorded by
    /// [`record_lease_reverted`](Self::record_lease_reverted), if any.
    pub fn lease_reverted(&self) -> Result<Option<Generation>, StoreError> {
        let Some(bytes) = self
            .db
            .get(LEASE_REVERTED_KEY)
            .map_err(|source| self.io("read", source))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: "lease_reverted",
                reason: e.to_string(),
            })
    }

    fn io(&self, action: &'static str, source: sled::Error) -> StoreError {
        StoreError::Io {
            action,
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(term: u64, index: u64, weight: u32) -> DesiredState {
        DesiredState {
            generation: Generation { term, index },
            services: vec![ServiceTraffic {
                service: "web".into(),
                canary_weight: weight,
                stable_version: "v1".into(),
                canary_version: "v2".into(),
                rollout_id: "r-1".into(),
                sticky_key: Some("$cookie_uid".into()),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn empty_store_has_nothing_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("nested/data")).unwrap();
        assert_eq!(store.last_applied().unwrap(), None);
        assert!(store.path().ends_with("nested/data/agent.sled"));
    }

    #[test]
    fn reopen_keeps_the_last_applied_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(dir.path()).unwrap();
            store.record_applied(&desired(1, 5, 10)).unwrap();
            store.record_applied(&desired(2, 7, 50)).unwrap();
            assert_eq!(store.last_applied().unwrap(), Some(desired(2, 7, 50)));
        }
        let store = LocalStore::open(dir.path()).unwrap();
        assert_eq!(store.last_applied().unwrap(), Some(desired(2, 7, 50)));
    }

    /// A sled directory (tests/fixtures) on which sled 0.34 panics in its recovery, every
    /// time: a multi-segment store with one 512 KiB segment zeroed, found by the search below
    /// and kept, since which segment makes sled panic depends on its background flushes.
    #[test]
    fn a_store_that_makes_sled_panic_is_a_damaged_error() {
        let data_dir = tempfile::tempdir().unwrap();
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/sled-panics-on-open.tar.gz"
        );
        let status = std::process::Command::new("tar")
            .arg("xzf")
            .arg(fixture)
            .arg("-C")
            .arg(data_dir.path())
            .status()
            .expect("running tar");
        assert!(status.success(), "tar xzf {fixture}: {status}");
        std::fs::rename(
            data_dir.path().join("raft.sled"),
            data_dir.path().join(STORE_DIR),
        )
        .unwrap();
        let opened = std::panic::catch_unwind(|| LocalStore::open(data_dir.path()).map(|_| ()));
        match opened.expect("LocalStore::open let sled's panic through") {
            Err(e @ StoreError::Damaged { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("agent.sled")
                        && text.contains("sled panicked")
                        && text.contains("move it aside"),
                    "{text}"
                );
            }
            other => panic!("the fixture opened as {other:?}, not as a damaged store"),
        }
    }

    /// Zero one 512 KiB segment of a multi-segment store at a time: every open is an error or
    /// a store, never a panic.
    #[test]
    fn a_store_with_any_segment_zeroed_opens_or_is_an_error_never_a_panic() {
        const SEGMENT: usize = 512 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let pristine = dir.path().join("pristine");
        {
            // Another program's data, shaped like a log: appends, an overwritten record,
            // removals, a flush at every step.
            let store = LocalStore::open(&pristine).unwrap();
            let tree = store.db.open_tree("log").unwrap();
            for i in 1..2000u64 {
                let key = |i: u64| [&[b'e'][..], &i.to_be_bytes()].concat();
                tree.insert(key(i), vec![i as u8; 400]).unwrap();
                tree.insert(b"m/applied", vec![i as u8; 2000 + (i as usize % 1000) * 20])
                    .unwrap();
                if i % 200 == 0 {
                    for j in i - 200..i {
                        tree.remove(key(j)).unwrap();
                    }
                }
                store.db.flush().unwrap();
            }
        }
        let db = std::fs::read(pristine.join(STORE_DIR).join("db")).unwrap();
        assert!(
            db.len() / SEGMENT >= 4,
            "only {} segments",
            db.len() / SEGMENT
        );
        for segment in 1..db.len() / SEGMENT {
            let data_dir = dir.path().join(format!("segment-{segment}"));
            std::fs::create_dir_all(data_dir.join(STORE_DIR)).unwrap();
            for file in ["conf", "db"] {
                let mut bytes = std::fs::read(pristine.join(STORE_DIR).join(file)).unwrap();
                if file == "db" {
                    bytes[segment * SEGMENT..(segment + 1) * SEGMENT].fill(0);
                }
                std::fs::write(data_dir.join(STORE_DIR).join(file), bytes).unwrap();
            }
            let opened = std::panic::catch_unwind(|| LocalStore::open(&data_dir).map(|_| ()));
            // Other segments recover, or fail as another error: sled's call, not ours.
            if let Err(e @ StoreError::Damaged { .. }) =
                opened.expect("LocalStore::open let sled's panic through")
            {
                let text = e.to_string();
                assert!(
                    text.contains("agent.sled") && text.contains("move it aside"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn the_instance_id_is_made_once_per_data_directory_and_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = LocalStore::open(dir.path()).unwrap();
            let id = store.instance_id().unwrap();
            assert_eq!(store.instance_id().unwrap(), id);
            id
        };
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!(
            LocalStore::open(dir.path()).unwrap().instance_id().unwrap(),
            id
        );

        let other = tempfile::tempdir().unwrap();
        let other_id = LocalStore::open(other.path())
            .unwrap()
            .instance_id()
            .unwrap();
        assert_ne!(other_id, id, "another data directory is another agent");
    }

    #[test]
    fn a_damaged_instance_id_is_an_error_naming_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store.db.insert(INSTANCE_ID_KEY, &b"\xff\xfe"[..]).unwrap();
        let err = store.instance_id().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    key: "instance_id",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("agent.sled"), "{err}");
    }

    #[test]
    fn damaged_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .db
            .insert(LAST_APPLIED_KEY, &b"\xff{not json"[..])
            .unwrap();
        let err = store.last_applied().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("agent.sled"), "{err}");

        store
            .db
            .insert(
                LAST_APPLIED_KEY,
                &br#"{"format":9,"desired":{"generation":{"term":1,"index":1},"services":[]}}"#[..],
            )
            .unwrap();
        let err = store.last_applied().unwrap_err();
        assert!(err.to_string().contains("format 9"), "{err}");
    }

    /// A `last_applied` record as the agent before the inventory wrote it (no `servers`,
    /// no `from_inventory`).
    const PRE_INVENTORY_RECORD: &[u8] =
        br#"{"format":1,"desired":{"generation":{"term":2,"index":7},
        "services":[{"service":"web","canary_weight":50,"stable_version":"v1",
        "canary_version":"v2","rollout_id":"r-1","sticky_key":"$cookie_uid"}]}}"#;

    #[test]
    fn a_store_written_before_the_inventory_still_loads_with_local_servers() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .db
            .insert(LAST_APPLIED_KEY, PRE_INVENTORY_RECORD)
            .unwrap();
        let loaded = store.last_applied().unwrap().expect("a record");
        assert_eq!(loaded, desired(2, 7, 50));
        assert!(!loaded.services[0].from_inventory);
        assert!(loaded.services[0].servers.is_empty());
        assert_eq!(loaded.services[0].override_header, None);
        assert_eq!(loaded.services[0].override_cookie, None);
    }

    #[test]
    fn override_names_are_converted_empty_as_none_and_survive_the_store() {
        let d = DesiredState::from_proto(pb::DesiredState {
            generation: Some(pb::Generation { term: 1, index: 5 }),
            services: vec![
                pb::ServiceTraffic {
                    service: "web".into(),
                    override_header: "X-Serin-Variant".into(),
                    override_cookie: "serin_variant".into(),
                    ..Default::default()
                },
                pb::ServiceTraffic {
                    service: "api".into(),
                    ..Default::default()
                },
            ],
        })
        .unwrap();
        let (web, api) = (&d.services[0], &d.services[1]);
        assert_eq!(web.override_header.as_deref(), Some("X-Serin-Variant"));
        assert_eq!(web.override_cookie.as_deref(), Some("serin_variant"));
        assert_eq!((&api.override_header, &api.override_cookie), (&None, &None));
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store.record_applied(&d).unwrap();
        assert_eq!(store.last_applied().unwrap(), Some(d));
    }

    fn server(instance: &str, variant: pb::Variant, address: &str) -> pb::UpstreamServer {
        pb::UpstreamServer {
            instance: instance.into(),
            address: address.into(),
            variant: variant.into(),
            weight: 3,
            agent: "app-1".into(),
            version: String::new(),
        }
    }

    #[test]
    fn inventory_servers_are_converted_and_survive_the_store() {
        let d = DesiredState::from_proto(pb::DesiredState {
            generation: Some(pb::Generation { term: 1, index: 4 }),
            services: vec![pb::ServiceTraffic {
                service: "web".into(),
                servers: vec![
                    server("web-s", pb::Variant::Stable, "10.0.0.1:8080"),
                    server("web-c", pb::Variant::Canary, "10.0.0.2:8080"),
                ],
                from_inventory: true,
                ..Default::default()
            }],
        })
        .unwrap();
        let web = &d.services[0];
        assert!(web.from_inventory);
        assert_eq!(web.invalid_servers, None);
        assert_eq!(
            web.servers,
            [
                UpstreamServer {
                    instance: "web-s".into(),
                    address: "10.0.0.1:8080".into(),
                    variant: Variant::Stable,
                    weight: 3,
                    agent: "app-1".into(),
                },
                UpstreamServer {
                    instance: "web-c".into(),
                    address: "10.0.0.2:8080".into(),
                    variant: Variant::Canary,
                    weight: 3,
                    agent: "app-1".into(),
                },
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store.record_applied(&d).unwrap();
        assert_eq!(store.last_applied().unwrap(), Some(d));
    }

    #[test]
    fn an_unusable_inventory_server_marks_its_service_invalid_naming_the_server() {
        let cases = [
            (
                server("web-x", pb::Variant::Unspecified, "10.0.0.3:8080"),
                "variant 0 is neither stable nor canary",
            ),
            (
                server("web-x", pb::Variant::Stable, ""),
                "the address is empty",
            ),
        ];
        for (bad, reason) in cases {
            let d = DesiredState::from_proto(pb::DesiredState {
                generation: Some(pb::Generation { term: 1, index: 4 }),
                services: vec![pb::ServiceTraffic {
                    service: "web".into(),
                    servers: vec![server("web-s", pb::Variant::Stable, "10.0.0.1:8080"), bad],
                    from_inventory: true,
                    ..Default::default()
                }],
            })
            .unwrap();
            let invalid = d.services[0].invalid_servers.as_deref().expect("invalid");
            for part in [
                "service 'web'",
                "server 1",
                "\"web-x\"",
                "\"app-1\"",
                reason,
            ] {
                assert!(invalid.contains(part), "{part:?} not in {invalid:?}");
            }
        }
    }

    #[test]
    fn generations_order_by_term_then_index() {
        let g = |term, index| Generation { term, index };
        assert!(g(1, 9) < g(2, 1));
        assert!(g(2, 1) < g(2, 2));
        assert_eq!(g(3, 4).to_string(), "3.4");
    }

    #[test]
    fn desired_state_from_proto() {
        let d = DesiredState::from_proto(pb::DesiredState {
            generation: Some(pb::Generation { term: 3, index: 9 }),
            services: vec![pb::ServiceTraffic {
                service: "web".into(),
                canary_weight: 5,
                sticky_key: String::new(),
                ..Default::default()
            }],
        })
        .unwrap();
        assert_eq!(d.generation, Generation { term: 3, index: 9 });
        assert_eq!(d.services[0].sticky_key, None);
        assert_eq!(d.services[0].canary_weight, 5);
        assert!(DesiredState::from_proto(pb::DesiredState::default()).is_none());
    }
}
