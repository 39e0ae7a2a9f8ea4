//! A service's revisions and `serin rollout undo`: the `Undo` command of the state machine and
//! the traffic of a service an undo pinned to a version. Pure, like the rest of the registry.
//!
//! Why a module of its own: an undo is about a *service*, not a rollout, and its rules (which
//! revision, whether any instance runs it, what the balancers then route to) are apart from the
//! stage machine. Design in docs/fleet.md, "Revisions and `serin rollout undo`":
//! - an undo appends a revision (the old version, `undo_of` the revision gone back to), never
//!   rewriting the history, and pins the service's traffic to that version until the next
//!   rollout starts;
//! - it is refused while a rollout runs, for an unknown revision (naming the valid range), for
//!   the version already current, and when no instance is known to run the version
//!   ([`crate::inventory::serving`]): nothing changes then.

use super::{
    Actor, Generation, Millis, Registry, Rejection, Revision, RolloutId, Service, ServiceEvent,
    TrafficPlan,
};
use crate::inventory::{VariantVersions, serving, versions_running};
use crate::limits::{MAX_EVENT_REASON, cut};

/// Why an undo was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndoRefusal {
    /// No rollout ever touched the service.
    #[error("service '{0}' not found: it has no revisions (no rollout has named it)")]
    UnknownService(String),
    /// A rollout of the service runs.
    #[error(
        "service '{service}' has rollout '{active}' in progress; abort rollout {active} first (`serin rollout abort {active}`)"
    )]
    RolloutActive {
        /// Service.
        service: String,
        /// The running rollout.
        active: RolloutId,
    },
    /// The service has only its first revision.
    #[error("service '{service}' has only revision 1 ({version}); there is nothing to undo")]
    NothingToUndo {
        /// Service.
        service: String,
        /// Its only version.
        version: String,
    },
    /// No such revision.
    #[error(
        "to_revision: revision {asked} does not exist: service '{service}' has revisions 1..={last}"
    )]
    UnknownRevision {
        /// Service.
        service: String,
        /// What was asked.
        asked: u32,
        /// The newest revision.
        last: u32,
    },
    /// The revision's version is the one the service runs.
    #[error(
        "service '{service}' is already at revision {current} ({version}), the version of revision {asked}; nothing to undo"
    )]
    AlreadyAt {
        /// Service.
        service: String,
        /// What was asked.
        asked: u32,
        /// The current revision.
        current: u32,
        /// Their version.
        version: String,
    },
    /// No instance is known to run the revision's version.
    #[error(
        "no instance of service '{service}' is known to run {version} (revision {revision}); the fleet runs {running}. Deploy {version} on some instances (and declare `version = \"{version}\"` in their [[instances]]) first: serin routes only to what runs, redeploying arrives with containers"
    )]
    NotRunning {
        /// Service.
        service: String,
        /// The revision asked for.
        revision: u32,
        /// Its version.
        version: String,
        /// The versions the fleet runs, as text ("v2, v3" or "no known version").
        running: String,
    },
}

/// The traffic of a service pinned by an undo: where its version runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The revision the service is pinned to (the one the undo appended).
    pub revision: u32,
    /// Its version, which every request goes to.
    pub version: String,
    /// What the latest rollout ran on which variant, for instances that declare no version.
    pub mapping: VariantVersions,
}

impl Registry {
    /// What the service's latest rollout ran on each variant (empty before any rollout).
    pub fn variant_versions(&self, service: &Service) -> VariantVersions {
        match service.latest.as_ref().and_then(|id| self.rollouts.get(id)) {
            Some(r) => VariantVersions {
                stable: Some(r.stable_version.clone()),
                canary: Some(r.version.clone()),
            },
            None => VariantVersions {
                stable: service.stable_version().map(str::to_owned),
                canary: None,
            },
        }
    }

    /// The pin of `service`, when an undo set one.
    pub fn pin(&self, service: &str) -> Option<Pin> {
        let record = self.services.get(service)?;
        let number = record.pinned?;
        let revision = record.revisions.iter().find(|r| r.number == number)?;
        Some(Pin {
            revision: number,
            version: revision.version.clone(),
            mapping: self.variant_versions(record),
        })
    }

    /// The plan of a pinned service: no rollout, and the whole share on the side whose
    /// instances ran the version in the last rollout (100% canary only when the canary ones
    /// did and the stable ones did not). Balancers fed from the inventory get only the members
    /// that run it instead (`agents::desired_state`).
    pub(super) fn pinned_traffic(&self, record: &Service) -> Option<TrafficPlan> {
        let pin = self.pin(&record.name)?;
        // When serin deploys the versions ([`crate::deploy`]), it runs the pinned version on
        // the stable instances and nothing on the canary ones.
        let deployed = self.deploy_spec(&record.name).is_some();
        let on_canary = !deployed
            && pin.mapping.canary.as_deref() == Some(pin.version.as_str())
            && pin.mapping.stable.as_deref() != Some(pin.version.as_str());
        Some(TrafficPlan {
            service: record.name.clone(),
            canary_weight: if on_canary { 100 } else { 0 },
            stable_version: pin.version.clone(),
            canary_version: if on_canary {
                pin.version
            } else {
                String::new()
            },
            rollout: None,
            sticky_key: None,
            override_header: None,
            override_cookie: None,
            generation: record.generation,
        })
    }

    /// Applies `Undo`: see the module docs. `to_revision` 0 means the one before the current.
    pub(super) fn undo(
        &mut self,
        service: &str,
        to_revision: u32,
        actor: Actor,
        reason: String,
        at: Millis,
        generation: Generation,
    ) -> Result<super::Applied, Rejection> {
        let record = self
            .services
            .get(service)
            .filter(|s| !s.revisions.is_empty())
            .ok_or_else(|| UndoRefusal::UnknownService(service.to_owned()))?;
        if let Some(active) = &record.active {
            return Err(UndoRefusal::RolloutActive {
                service: service.to_owned(),
                active: active.clone(),
            }
            .into());
        }
        let current = record.revisions.last().expect("checked non-empty");
        let last = current.number;
        if record.revisions.len() == 1 {
            return Err(UndoRefusal::NothingToUndo {
                service: service.to_owned(),
                version: current.version.clone(),
            }
            .into());
        }
        let asked = if to_revision == 0 {
            record.revisions[record.revisions.len() - 2].number
        } else {
            to_revision
        };
        let target = record
            .revisions
            .iter()
            .find(|r| r.number == asked)
            .ok_or_else(|| UndoRefusal::UnknownRevision {
                service: service.to_owned(),
                asked,
                last,
            })?;
        if target.version == current.version {
            return Err(UndoRefusal::AlreadyAt {
                service: service.to_owned(),
                asked,
                current: last,
                version: current.version.clone(),
            }
            .into());
        }
        let version = target.version.clone();
        let mapping = self.variant_versions(record);
        // When serin deploys the versions ([`crate::deploy`]) it starts the pinned one itself.
        let deployed = self.deploy_spec(&record.name).is_some();
        let known = deployed
            || match &record.upstreams {
                Some(members) => !serving(members, &version, &mapping).is_empty(),
                // Balancers route their own [[instances]]: only the variant mapping says where.
                None => {
                    mapping.stable.as_deref() == Some(&version)
                        || mapping.canary == Some(version.clone())
                }
            };
        if !known {
            let running = match &record.upstreams {
                Some(members) => versions_running(members, &mapping),
                None => {
                    let mut v: Vec<String> = [mapping.stable.clone(), mapping.canary.clone()]
                        .into_iter()
                        .flatten()
                        .collect();
                    v.sort();
                    v.dedup();
                    v
                }
            };
            return Err(UndoRefusal::NotRunning {
                service: service.to_owned(),
                revision: asked,
                version,
                running: if running.is_empty() {
                    "no known version".to_owned()
                } else {
                    running.join(", ")
                },
            }
            .into());
        }
        let record = self.services.get_mut(service).expect("found above");
        let number = last + 1;
        record.revisions.push(Revision {
            number,
            version: version.clone(),
            rollout: None,
            undo_of: Some(asked),
            at,
        });
        record.pinned = Some(number);
        record.generation = generation;
        let why = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        record.history.push(ServiceEvent {
            at,
            reason: cut(
                &format!(
                    "undo to revision {asked} ({version}) by {actor}, as revision {number}{why}"
                ),
                MAX_EVENT_REASON,
            ),
            generation,
        });
        if record.history.len() > super::MAX_SERVICE_HISTORY {
            let excess = record.history.len() - super::MAX_SERVICE_HISTORY;
            record.history.drain(..excess);
        }
        Ok(super::Applied {
            id: None,
            state: None,
            traffic_changed: true,
        })
    }
}

#[cfg(test)]
mod tests;
