//! Embedded storage engine for Plexus.
//!
//! For now this crate holds [`log`]: a per-channel, append-only publication history that is
//! durable on disk (one [redb](https://docs.rs/redb) file) and commits concurrent appends
//! together (group commit), acknowledging each append only once it is durable.

pub mod log;

pub use log::{
    DurableLog, Entry, LogError, LogOptions, LogStats, OnCommit, Retention, StreamPosition,
};
