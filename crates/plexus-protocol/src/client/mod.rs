//! The Centrifugo client protocol v2, in its two encodings, JSON and Protobuf ([`Format`]), so
//! the official SDKs (`centrifuge` for JavaScript, `centrifuge-python`, and the Protobuf-only
//! ones for Dart, Swift and Java) talk to Plexus unchanged.
//!
//! The messages ([`Request`], [`Reply`], [`Push`] and the structs in [`types`]) are the same in
//! both encodings; [`protobuf`] holds the Protobuf form. The rest of this page is about JSON.
//!
//! # Wire format (JSON)
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
//! `bytes` fields (`data`, `info`, ...) are JSON values embedded as is ([`Payload`]), passed
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
mod filter;
mod payload;
pub mod protobuf;
mod raw;
mod reply;
mod types;

pub use codes::{DisconnectCode, ErrorCode, UnsubscribeCode};
pub use command::{
    encode_command, parse_command, parse_frame, Incoming, ParseError, ParseErrorKind, Request,
    CLIENT_PONG,
};
pub use filter::FilterError;
pub use payload::Payload;
pub use raw::RawJson;
pub use reply::{
    encode_push, encode_reply, join_batch, parse_replies, Push, PushBody, Reply, ReplyBody,
    SERVER_PING,
};
pub use types::*;

/// The encoding a client speaks, chosen when it connects: JSON (text WebSocket messages), or
/// Protobuf (binary ones; the WebSocket subprotocol `centrifuge-protobuf` or the query
/// `cf_protocol=protobuf`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Format {
    #[default]
    Json,
    Protobuf,
}

/// The WebSocket subprotocol with which the SDKs ask for Protobuf.
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";

impl Format {
    /// What a WebSocket client asks for: Protobuf when one of its `Sec-WebSocket-Protocol`
    /// headers lists [`PROTOBUF_SUBPROTOCOL`] (the server then names it in its answer), or its
    /// query says `cf_protocol=protobuf`; JSON otherwise. Returns the format and whether the
    /// subprotocol was asked for.
    pub fn requested<'a>(
        subprotocols: impl IntoIterator<Item = &'a str>,
        query: Option<&str>,
    ) -> (Format, bool) {
        let subprotocol = subprotocols
            .into_iter()
            .flat_map(|header| header.split(','))
            .any(|name| name.trim() == PROTOBUF_SUBPROTOCOL);
        let by_query = query
            .unwrap_or_default()
            .split('&')
            .any(|pair| pair == "cf_protocol=protobuf");
        let format = if subprotocol || by_query {
            Format::Protobuf
        } else {
            Format::Json
        };
        (format, subprotocol)
    }

    /// The name the SDKs and the proxy protocol use: `json` or `protobuf`.
    pub const fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Protobuf => "protobuf",
        }
    }

    /// Whether messages in this format go in binary WebSocket messages.
    pub const fn is_binary(self) -> bool {
        matches!(self, Format::Protobuf)
    }

    /// Parses one message from a client: commands and pongs, in order. JSON that is not UTF-8 is
    /// one fatal error.
    pub fn parse_frame(self, data: &[u8]) -> Vec<Result<Incoming, ParseError>> {
        match self {
            Format::Json => match std::str::from_utf8(data) {
                Ok(text) => parse_frame(text),
                Err(error) => vec![Err(ParseError::malformed(error.to_string()))],
            },
            Format::Protobuf => protobuf::parse_frame(data),
        }
    }

    /// Encodes a reply, ready to be joined with others by [`Format::join_batch`].
    pub fn encode_reply(self, reply: &Reply) -> Vec<u8> {
        match self {
            Format::Json => encode_reply(reply),
            Format::Protobuf => protobuf::encode_reply(reply),
        }
    }

    /// Encodes the reply holding a push about `channel`.
    pub fn encode_push(self, channel: &str, body: &PushBody) -> Vec<u8> {
        match self {
            Format::Json => encode_push(channel, body),
            Format::Protobuf => protobuf::encode_push(channel, body),
        }
    }

    /// Joins encoded replies into one message: lines in JSON, a concatenation in Protobuf
    /// (each reply carries its length).
    pub fn join_batch<I, B>(self, replies: I) -> Vec<u8>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        match self {
            Format::Json => join_batch(replies),
            Format::Protobuf => replies.into_iter().fold(Vec::new(), |mut out, reply| {
                out.extend_from_slice(reply.as_ref());
                out
            }),
        }
    }

    /// The server's ping, the empty reply: `{}`, or the single byte 0 (a zero length).
    pub const fn server_ping(self) -> &'static [u8] {
        match self {
            Format::Json => SERVER_PING,
            Format::Protobuf => &[0],
        }
    }

    /// The client's pong, the empty command.
    pub const fn client_pong(self) -> &'static [u8] {
        match self {
            Format::Json => CLIENT_PONG,
            Format::Protobuf => &[0],
        }
    }

    /// Encodes a command as a client sends it.
    pub fn encode_command(self, id: u32, request: &Request) -> Vec<u8> {
        match self {
            Format::Json => encode_command(id, request),
            Format::Protobuf => protobuf::encode_command(id, request),
        }
    }

    /// Parses a message from the server, as a client would.
    pub fn parse_replies(self, data: &[u8]) -> Vec<Result<Reply, String>> {
        match self {
            Format::Json => match std::str::from_utf8(data) {
                Ok(text) => parse_replies(text)
                    .into_iter()
                    .map(|reply| reply.map_err(|error| error.to_string()))
                    .collect(),
                Err(error) => vec![Err(error.to_string())],
            },
            Format::Protobuf => protobuf::parse_replies(data)
                .into_iter()
                .map(|reply| reply.map_err(|error| error.to_string()))
                .collect(),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_requested() {
        assert_eq!(Format::requested([], None), (Format::Json, false));
        assert_eq!(
            Format::requested(["chat, centrifuge-protobuf"], None),
            (Format::Protobuf, true)
        );
        assert_eq!(
            Format::requested([], Some("a=1&cf_protocol=protobuf")),
            (Format::Protobuf, false)
        );
        assert_eq!(
            Format::requested(["centrifuge-json"], Some("cf_protocol=json")),
            (Format::Json, false)
        );
    }
}
