//! How the registry is stored in a snapshot: one record per rollout and per service.
//!
//! | record key            | value                               |
//! |-----------------------|-------------------------------------|
//! | `r/` ++ rollout id    | the rollout (JSON)                  |
//! | `s/` ++ service name  | the service (JSON)                  |
//! | `members`             | the members' addresses (JSON)       |
//!
//! A snapshot writes the records changed since the previous one ([`delta`]), found by
//! comparing the registry with the copy taken at that snapshot ([`crate::rollout::Table`]),
//! so a history of thousands of finished rollouts costs a snapshot nothing. Stores and
//! leaders of earlier versions hold the registry as one JSON blob: [`decode_snapshot`] reads
//! both.

use crate::rollout::table::Change;
use crate::rollout::{Registry, RolloutId};

use super::storage::{Record, StateDelta, StorageError, decode_records};

const ROLLOUT: &[u8] = b"r/";
const SERVICE: &[u8] = b"s/";
const MEMBERS: &[u8] = b"members";

/// Why stored records do not make a registry.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record's value does not decode.
    #[error("record {key}: {source}")]
    Json {
        /// The record's key, lossily as text.
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A key this version does not know.
    #[error("unknown record key {0:?}")]
    UnknownKey(String),
    /// The records' framing is broken.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Every record of `registry`, in key order.
pub fn all(registry: &Registry) -> Result<Vec<Record>, serde_json::Error> {
    Ok(delta(registry, &Registry::default())?.put)
}

/// The records that changed from `older` (the registry as last stored) to `registry`.
pub fn delta(registry: &Registry, older: &Registry) -> Result<StateDelta, serde_json::Error> {
    let mut out = StateDelta::default();
    for change in registry.rollouts.changes_since(&older.rollouts) {
        match change {
            Change::Put(id, rollout) => out
                .put
                .push((key(ROLLOUT, &id.0), serde_json::to_vec(rollout)?)),
            Change::Removed(id) => out.removed.push(key(ROLLOUT, &id.0)),
        }
    }
    for change in registry.services.changes_since(&older.services) {
        match change {
            Change::Put(name, service) => out
                .put
                .push((key(SERVICE, name), serde_json::to_vec(service)?)),
            Change::Removed(name) => out.removed.push(key(SERVICE, name)),
        }
    }
    if registry.members != older.members {
        out.put
            .push((MEMBERS.to_vec(), serde_json::to_vec(&registry.members)?));
    }
    Ok(out)
}

/// The registry the records make.
pub fn registry(records: Vec<Record>) -> Result<Registry, RecordError> {
    let mut rollouts = Vec::new();
    let mut services = Vec::new();
    let mut out = Registry::default();
    for (record, value) in records {
        let json_error = |source| RecordError::Json {
            key: String::from_utf8_lossy(&record).into_owned(),
            source,
        };
        if let Some(id) = record.strip_prefix(ROLLOUT) {
            let id = RolloutId(text(id)?);
            rollouts.push((id, serde_json::from_slice(&value).map_err(json_error)?));
        } else if let Some(name) = record.strip_prefix(SERVICE) {
            services.push((
                text(name)?,
                serde_json::from_slice(&value).map_err(json_error)?,
            ));
        } else if record == MEMBERS {
            out.members = serde_json::from_slice(&value).map_err(json_error)?;
        } else {
            return Err(RecordError::UnknownKey(
                String::from_utf8_lossy(&record).into_owned(),
            ));
        }
    }
    out.rollouts = rollouts.into_iter().collect();
    out.services = services.into_iter().collect();
    Ok(out)
}

/// The registry in a snapshot's data, and whether that data was records (else a blob of an
/// earlier version, JSON, or empty for the empty registry).
pub fn decode_snapshot(data: &[u8]) -> Result<(Registry, bool), RecordError> {
    if let Some(records) = decode_records(data)? {
        return Ok((registry(records)?, true));
    }
    Ok((decode_blob(data)?, false))
}

/// A registry stored whole (earlier versions; the saved applied state); empty bytes are the
/// empty registry.
pub fn decode_blob(data: &[u8]) -> Result<Registry, RecordError> {
    if data.is_empty() {
        return Ok(Registry::default());
    }
    serde_json::from_slice(data).map_err(|source| RecordError::Json {
        key: "(whole registry)".into(),
        source,
    })
}

fn key(prefix: &[u8], name: &str) -> Vec<u8> {
    [prefix, name.as_bytes()].concat()
}

fn text(bytes: &[u8]) -> Result<String, RecordError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| RecordError::UnknownKey(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::storage::encode_records;
    use crate::rollout::{Actor, Command, Generation};
    use crate::strategy::Strategy;

    fn registry_with(services: &[&str]) -> Registry {
        let mut reg = Registry::default();
        reg.members.insert(1, "127.0.0.1:7000".into());
        for (i, service) in services.iter().enumerate() {
            let command = Command::Start {
                id: RolloutId(format!("{service}-{i}")),
                service: (*service).into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy: Strategy::from_toml("[[stages]]\nweight = 10\n").expect("a strategy"),
                actor: Actor::Operator("test".into()),
                at: 1000,
            };
            let generation = Generation {
                term: 1,
                index: i as u64 + 2,
            };
            reg.apply(command, generation).expect("the start applies");
        }
        reg
    }

    fn encoded(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encode_records(records.iter().map(|(k, v)| (&k[..], &v[..])))
    }

    #[test]
    fn records_round_trip_to_the_same_registry() {
        let reg = registry_with(&["api", "web"]);
        let records = all(&reg).unwrap();
        assert_eq!(records.len(), 5, "two rollouts, two services, the members");
        let (back, were_records) = decode_snapshot(&encoded(&records)).unwrap();
        assert!(were_records);
        assert_eq!(back, reg);
    }

    #[test]
    fn a_delta_holds_only_what_changed_since_the_copy() {
        let reg = registry_with(&["api", "web", "db"]);
        let stored = reg.clone();
        assert_eq!(delta(&reg, &stored).unwrap(), StateDelta::default());

        let mut next = reg.clone();
        let id = next.rollouts.keys().next().unwrap().clone();
        next.rollouts.get_mut(&id).unwrap().events_dropped += 1;
        let d = delta(&next, &stored).unwrap();
        assert_eq!(d.removed, Vec::<Vec<u8>>::new());
        assert_eq!(d.put.len(), 1);
        assert_eq!(d.put[0].0, key(ROLLOUT, &id.0));

        next.rollouts.remove(&id);
        next.members.insert(2, "127.0.0.2:7000".into());
        let d = delta(&next, &stored).unwrap();
        assert_eq!(d.removed, vec![key(ROLLOUT, &id.0)]);
        assert_eq!(d.put.len(), 1);
        assert_eq!(d.put[0].0, MEMBERS.to_vec());
    }

    #[test]
    fn a_blob_of_an_earlier_version_still_reads() {
        let reg = registry_with(&["api"]);
        let blob = serde_json::to_vec(&reg).unwrap();
        let (back, were_records) = decode_snapshot(&blob).unwrap();
        assert!(!were_records);
        assert_eq!(back, reg);
        assert_eq!(decode_snapshot(b"").unwrap(), (Registry::default(), false));
    }

    #[test]
    fn bad_records_are_named_errors() {
        let bad_value = encoded(&[(b"r/api-1".to_vec(), b"{not json".to_vec())]);
        let err = decode_snapshot(&bad_value).unwrap_err().to_string();
        assert!(err.contains("record r/api-1"), "{err}");
        let unknown = encoded(&[(b"x/what".to_vec(), b"{}".to_vec())]);
        let err = decode_snapshot(&unknown).unwrap_err().to_string();
        assert!(err.contains("unknown record key \"x/what\""), "{err}");
        let mut truncated = encoded(&[(b"members".to_vec(), b"{}".to_vec())]);
        truncated.pop();
        let err = decode_snapshot(&truncated).unwrap_err().to_string();
        assert!(err.contains("snapshot records"), "{err}");
    }
}
