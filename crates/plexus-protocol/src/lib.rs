//! Plexus wire formats, as pure data transformations.
//!
//! This crate turns bytes into typed values and typed values into bytes: WebSocket frames and
//! messages (RFC 6455), the opening handshake's key and extension negotiation, permessage-deflate
//! (RFC 7692), and the line protocol of the TCP chat listener.
//! [`client`] holds the Centrifugo-compatible client protocol v2 (JSON and Protobuf), [`fossil`]
//! the deltas of its delta compression.
//!
//! It deliberately does **no I/O**: no sockets, no tasks, no clocks. Callers feed it the bytes
//! they read and write out the bytes it returns. That keeps every rule of the wire testable with
//! plain unit tests, and lets the server share one encoded frame among many connections.

pub mod channel;
pub mod chat;
pub mod client;
pub mod fossil;
pub mod ws;
