//! WebSocket (RFC 6455) for the server side, with permessage-deflate (RFC 7692).
//!
//! - [`handshake`]: `Sec-WebSocket-Accept` and extension negotiation.
//! - [`Decoder`]: bytes from a client become [`Event`]s (messages, pings, pongs, close), or a
//!   [`DecodeError`] that names the close code to answer with.
//! - [`encode_frame`] / [`encode_close`]: server frames, unmasked, so one encoded frame can be
//!   written unchanged to every subscriber of a channel.

pub mod close;
mod decoder;
pub mod deflate;
mod frame;
pub mod handshake;

pub use decoder::{DecodeError, Decoder, DecoderConfig, Event};
pub use frame::{encode_close, encode_frame, push_client_frame, OpCode};

/// Whether a data message is text (valid UTF-8) or binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Text,
    Binary,
}
