//! The simulation harness of `tests/simulation.rs`.

pub mod checker;
pub mod cluster;
pub mod network;
