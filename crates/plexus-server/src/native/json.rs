//! Core values as protocol JSON, and publication data between raw clients and protocol clients.
//!
//! Data rules (also in docs/protocol.md):
//! - a protocol client publishes JSON; the publication keeps those bytes as a text message, so
//!   raw `/chat/{room}` clients receive the JSON text as is;
//! - a raw text message that is valid JSON reaches protocol clients as that JSON value;
//!   other text arrives as a JSON string;
//! - a raw binary message arrives as a JSON string holding its standard base64.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use plexus_core::{ClientDescriptor, Encoding, Membership, MessageKind, Publication};
use plexus_protocol::client::{self as proto, encode_push, PushBody, RawJson};

use crate::ws::data_frame;

/// Publication data as a protocol JSON value.
pub(crate) fn data_json(kind: MessageKind, data: &[u8]) -> RawJson {
    let as_string = |text: &str| RawJson::from_value(text).expect("a string serializes");
    match (kind, std::str::from_utf8(data)) {
        (MessageKind::Text, Ok(text)) => {
            RawJson::from_str(text).unwrap_or_else(|_| as_string(text))
        }
        (MessageKind::Text, Err(_)) | (MessageKind::Binary, _) => as_string(&BASE64.encode(data)),
    }
}

/// Info bytes (from a token) as JSON: JSON as is, anything else as data.
fn info_json(bytes: &Option<Bytes>) -> Option<RawJson> {
    bytes
        .as_ref()
        .map(|bytes| data_json(MessageKind::Text, bytes))
}

pub(crate) fn client_info(descriptor: &ClientDescriptor) -> proto::ClientInfo {
    proto::ClientInfo {
        user: descriptor.user.to_string(),
        client: descriptor.client.to_string(),
        conn_info: info_json(&descriptor.conn_info),
        chan_info: info_json(&descriptor.chan_info),
    }
}

pub(crate) fn publication(publication: &Publication) -> proto::Publication {
    proto::Publication {
        data: Some(data_json(publication.kind, &publication.data)),
        info: publication.info.as_deref().map(client_info),
        offset: publication.offset,
        ..proto::Publication::default()
    }
}

/// The `pub` push of a publication as protocol JSON.
fn publication_push(p: &Publication) -> Vec<u8> {
    encode_push(&p.channel, &PushBody::Publication(publication(p)))
}

/// The `pub` push of a publication in a WebSocket frame, encoded once for all subscribers.
pub(crate) fn publication_frame(p: &Publication, deflate: bool) -> &Bytes {
    let encoding = if deflate {
        Encoding::WebSocketJsonDeflated
    } else {
        Encoding::WebSocketJson
    };
    p.encoded(encoding, |p| {
        data_frame(MessageKind::Text, &publication_push(p), deflate)
    })
}

/// The `pub` push of a publication as unframed JSON (stream transports: SSE, HTTP streaming),
/// encoded once for all subscribers.
pub(crate) fn publication_json(p: &Publication) -> Bytes {
    p.encoded(Encoding::Json, |p| publication_push(p).into())
        .clone()
}

/// The `join` or `leave` push in a WebSocket frame, encoded once for all subscribers.
pub(crate) fn membership_frame(membership: &Membership, joined: bool, deflate: bool) -> &Bytes {
    let encoding = if deflate {
        Encoding::WebSocketJsonDeflated
    } else {
        Encoding::WebSocketJson
    };
    membership.encoded(encoding, |m| {
        data_frame(MessageKind::Text, &membership_push(m, joined), deflate)
    })
}

/// The `join` or `leave` push as unframed JSON, encoded once for all subscribers.
pub(crate) fn membership_json(membership: &Membership, joined: bool) -> Bytes {
    membership
        .encoded(Encoding::Json, |m| membership_push(m, joined).into())
        .clone()
}

fn membership_push(m: &Membership, joined: bool) -> Vec<u8> {
    let info = client_info(&m.client);
    let body = if joined {
        PushBody::Join(proto::Join { info })
    } else {
        PushBody::Leave(proto::Leave { info })
    };
    encode_push(&m.channel, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_conversions() {
        let check = |kind, data: &[u8], expected: &str| {
            assert_eq!(data_json(kind, data).as_str(), expected);
        };
        check(MessageKind::Text, br#"{"text":"hi"}"#, r#"{"text":"hi"}"#);
        check(MessageKind::Text, b"hello", r#""hello""#);
        check(MessageKind::Text, b"42", "42");
        check(MessageKind::Binary, &[0, 1, 2], r#""AAEC""#);
    }
}
