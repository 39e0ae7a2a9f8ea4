//! Raft: the replicated log under the coordinator's state (raft-rs 0.7 driven over a sled store).
//!
//! - [`storage`]: raft-rs `Storage` on sled, plus the snapshot's state machine.
//! - [`records`]: the registry as the records a snapshot stores, one per rollout and service.
//! - [`node`]: the task that owns the `RawNode`, and the handle everyone else uses.
//! - [`transport`]: raft messages between coordinators over gRPC, and the members' addresses.

pub mod node;
pub mod records;
pub mod storage;
pub mod transport;

pub use node::{
    ClusterStatus, MembershipChange, NodeConfig, NodeView, ProposeError, RaftHandle, Role,
};
