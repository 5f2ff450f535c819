//! The Centrifugo client protocol v2, JSON encoding, so the official SDKs (`centrifuge` for
//! JavaScript, `centrifuge-python`, ...) talk to Plexus unchanged.
//!
//! # Wire format
//!
//! A WebSocket text message holds one or more JSON objects separated by `\n`.
//!
//! - Client to server: each object is a *command* `{"id":N,"<method>":{...}}` with exactly one
//!   request field ([`Request`]), or `{}`, the client's pong. [`parse_frame`] reads a message into
//!   [`Incoming`] values.
//! - Server to client: each object is a *reply* ([`Reply`]): `{"id":N,"<method>":{...}}` or
//!   `{"id":N,"error":{...}}` answering command `N`, `{"push":{...}}` for asynchronous messages
//!   ([`Push`]), or `{}`, the server's ping ([`SERVER_PING`]). [`encode_reply`] and
//!   [`encode_push`] write one; [`join_batch`] joins several into one message.
//!
//! Field names are the protocol's, in snake_case. Fields holding their default value are left
//! out when writing and may be missing (or `null`) when reading; unknown fields are ignored.
//! `bytes` fields (`data`, `info`, ...) are JSON values embedded as is ([`RawJson`]), passed
//! through byte for byte. Offsets are plain JSON numbers.
//!
//! # Bad input
//!
//! Each object that is not a valid command gives a [`ParseError`], always error code 107 (bad
//! request). As in Centrifugo, malformed JSON, a command without a known request field (an
//! unknown method included) and a command other than `send` without an id are fatal: the server
//! disconnects with 3501 (bad request). A command with an id and two request fields gets an error
//! reply instead. See [`ParseError::is_fatal`].
//!
//! # Codes
//!
//! [`ErrorCode`], [`DisconnectCode`] and [`UnsubscribeCode`] hold the numbers, texts, and whether
//! the SDKs retry, reconnect or resubscribe.

pub mod codes;
mod command;
mod raw;
mod reply;
mod types;

pub use codes::{DisconnectCode, ErrorCode, UnsubscribeCode};
pub use command::{
    encode_command, parse_command, parse_frame, Incoming, ParseError, ParseErrorKind, Request,
    CLIENT_PONG,
};
pub use raw::RawJson;
pub use reply::{
    encode_push, encode_reply, join_batch, parse_replies, Push, PushBody, Reply, ReplyBody,
    SERVER_PING,
};
pub use types::*;

/// Compact JSON for a protocol value.
fn compact_json<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // The protocol's values only have string map keys and no floats, so this cannot fail.
    serde_json::to_vec(value).expect("protocol values always serialize")
}

/// The one `Some` among `options`: `Ok(None)` when none is, `Err(count)` when several are.
fn one_of<T, const N: usize>(options: [Option<T>; N]) -> Result<Option<T>, usize> {
    let mut present = options.into_iter().flatten();
    let first = present.next();
    match present.count() {
        0 => Ok(first),
        more => Err(more + 1),
    }
}
