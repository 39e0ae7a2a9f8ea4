//! serin agent.
pub mod collect;
pub mod nginx;
