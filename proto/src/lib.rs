//! serin's gRPC contract, generated from `proto/serin.proto`.
//!
//! Two services share one port on the coordinator:
//! - `AgentService`: one bidirectional stream per agent (reports up, desired state down);
//! - `ControlService`: the operator's API (start, inspect and steer rollouts).
#![allow(clippy::all, missing_docs)]

pub mod overrides;
pub mod panic;
pub mod templates;
pub mod weights;

/// Version 1 of the wire contract.
pub mod v1 {
    tonic::include_proto!("serin.v1");
}
