//! Core values as protocol messages in a client's format, and pushes encoded once per format
//! for all subscribers.
//!
//! Data rules (also in docs/protocol.md):
//! - a JSON client publishes JSON; the publication keeps those bytes as a text message, so raw
//!   `/chat/{room}` clients receive the JSON text as is;
//! - a Protobuf client publishes any bytes, and the publish proxy may give any bytes instead:
//!   valid UTF-8 is kept as a text message, anything else as a binary one;
//! - Protobuf clients receive every publication's bytes exactly as published;
//! - JSON clients receive text that is valid JSON as that JSON value, other text as a JSON
//!   string, and binary data as a JSON string holding its standard base64.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use plexus_core::{ClientDescriptor, Encoding, Membership, MessageKind, Publication};
use plexus_protocol::client::{self as proto, Format, Payload, PushBody};

use crate::ws::data_frame;

fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

/// Publication data as a protocol payload for a client of `format`.
pub(crate) fn data(format: Format, kind: MessageKind, data: &Bytes) -> Payload {
    match (format, kind, std::str::from_utf8(data)) {
        (Format::Protobuf, _, _) => Payload::new(data.clone()),
        (Format::Json, MessageKind::Text, Ok(_)) if is_json(data) => Payload::new(data.clone()),
        (Format::Json, MessageKind::Text, Ok(text)) => json_string(text),
        (Format::Json, MessageKind::Text, Err(_)) | (Format::Json, MessageKind::Binary, _) => {
            json_string(&BASE64.encode(data))
        }
    }
}

/// The message kind a protocol client's published data is kept as (see the module docs):
/// text when it is UTF-8 (always so for a JSON client's own data; not always for data the
/// publish proxy gave instead).
pub(crate) fn published_kind(data: &[u8]) -> MessageKind {
    match std::str::from_utf8(data) {
        Ok(_) => MessageKind::Text,
        Err(_) => MessageKind::Binary,
    }
}

/// Info bytes (from a token): for JSON, JSON as is and anything else as data.
fn info(format: Format, bytes: &Option<Bytes>) -> Option<Payload> {
    bytes
        .as_ref()
        .map(|bytes| data(format, MessageKind::Text, bytes))
}

pub(crate) fn client_info(format: Format, descriptor: &ClientDescriptor) -> proto::ClientInfo {
    proto::ClientInfo {
        user: descriptor.user.to_string(),
        client: descriptor.client.to_string(),
        conn_info: info(format, &descriptor.conn_info),
        chan_info: info(format, &descriptor.chan_info),
    }
}

pub(crate) fn publication(format: Format, publication: &Publication) -> proto::Publication {
    proto::Publication {
        data: Some(data(format, publication.kind, &publication.data)),
        info: publication
            .info
            .as_deref()
            .map(|info| client_info(format, info)),
        offset: publication.offset,
        tags: publication.tags.as_deref().cloned().unwrap_or_default(),
        ..proto::Publication::default()
    }
}

/// Where a push in `format` is cached: a WebSocket frame (compressed or not), or unframed for
/// the stream transports.
fn encoding(format: Format, framed: bool, deflate: bool) -> Encoding {
    match (format, framed, deflate) {
        (Format::Json, true, false) => Encoding::WebSocketJson,
        (Format::Json, true, true) => Encoding::WebSocketJsonDeflated,
        (Format::Json, false, _) => Encoding::Json,
        (Format::Protobuf, true, false) => Encoding::WebSocketProtobuf,
        (Format::Protobuf, true, true) => Encoding::WebSocketProtobufDeflated,
        (Format::Protobuf, false, _) => Encoding::Protobuf,
    }
}

/// The WebSocket message kind a format's messages go in.
pub(crate) fn message_kind(format: Format) -> MessageKind {
    if format.is_binary() {
        MessageKind::Binary
    } else {
        MessageKind::Text
    }
}

fn frame(format: Format, push: &[u8], deflate: bool) -> Bytes {
    data_frame(message_kind(format), push, deflate)
}

fn publication_push(format: Format, p: &Publication) -> Vec<u8> {
    format.encode_push(&p.channel, &PushBody::Publication(publication(format, p)))
}

/// The `pub` push of a publication in a WebSocket frame, encoded once for all subscribers of
/// the format.
pub(crate) fn publication_frame(p: &Publication, format: Format, deflate: bool) -> &Bytes {
    p.encoded(encoding(format, true, deflate), |p| {
        frame(format, &publication_push(format, p), deflate)
    })
}

/// The `pub` push of a publication unframed (stream transports: SSE, HTTP streaming), encoded
/// once for all subscribers of the format.
pub(crate) fn publication_message(p: &Publication, format: Format) -> Bytes {
    p.encoded(encoding(format, false, false), |p| {
        publication_push(format, p).into()
    })
    .clone()
}

/// A publication for a subscriber with delta compression that holds `base`, the last
/// publication it got in the channel (if any). Where `base` is the publication just before (by
/// offset), the data is the Fossil delta from `base`'s, unless that is not smaller. Otherwise
/// the publication goes whole: in JSON its data is a JSON string holding the JSON it would
/// otherwise be (the client parses it, and keeps its bytes to apply the next delta to); in
/// Protobuf it is the ordinary publication.
pub(crate) fn delta_or_whole(
    format: Format,
    p: &Publication,
    base: Option<&Publication>,
) -> proto::Publication {
    let base = follows(p, base);
    let mut publication = publication(format, p);
    match format {
        Format::Json => {
            let text = json_text(publication.data.as_ref());
            let delta = base
                .map(|base| {
                    let from = data(format, base.kind, &base.data);
                    plexus_protocol::fossil::create_text(&json_text(Some(&from)), &text)
                })
                .filter(|delta| delta.len() < text.len());
            publication.delta = delta.is_some();
            publication.data = Some(json_string(delta.as_deref().unwrap_or(&text)));
        }
        Format::Protobuf => {
            if let Some(base) = base {
                let delta = plexus_protocol::fossil::create(&base.data, &p.data);
                if delta.len() < p.data.len() {
                    publication.delta = true;
                    publication.data = Some(Payload::new(delta));
                }
            }
        }
    }
    publication
}

/// Data longer than this goes whole: a delta of it would hold a runtime worker for
/// milliseconds.
const MAX_DELTA_DATA: usize = 256 * 1024;

/// `base`, if it is the publication just before `p`: what a delta may be made from.
fn follows<'a>(p: &Publication, base: Option<&'a Publication>) -> Option<&'a Publication> {
    base.filter(|base| {
        base.offset > 0
            && base.offset + 1 == p.offset
            && base.data.len() <= MAX_DELTA_DATA
            && p.data.len() <= MAX_DELTA_DATA
    })
}

/// The JSON text of a publication's data for a JSON client.
fn json_text(data: Option<&Payload>) -> String {
    String::from_utf8_lossy(data.map_or(&b"null"[..], Payload::as_bytes)).into_owned()
}

/// `text` as a JSON string.
fn json_string(text: &str) -> Payload {
    Payload::new(serde_json::to_vec(text).expect("a string is JSON"))
}

/// The `pub` push of [`delta_or_whole`], framed for WebSocket or not, encoded once for all
/// subscribers of the format: those in step all hold the same `base`.
pub(crate) fn delta_publication(
    p: &Publication,
    base: Option<&Publication>,
    format: Format,
    framed: bool,
    deflate: bool,
) -> Bytes {
    if framed {
        return delta_frame(p, base, format, deflate).clone();
    }
    match usable_base(p, base) {
        None if format == Format::Protobuf => publication_message(p, format),
        base => encoded_delta(p, base, format, false, deflate).clone(),
    }
}

/// [`delta_publication`] in a WebSocket frame, borrowed from the publication's cache (the
/// flush lane writes it without a reference count).
pub(crate) fn delta_frame<'a>(
    p: &'a Publication,
    base: Option<&Publication>,
    format: Format,
    deflate: bool,
) -> &'a Bytes {
    match usable_base(p, base) {
        None if format == Format::Protobuf => publication_frame(p, format, deflate),
        base => encoded_delta(p, base, format, true, deflate),
    }
}

/// `base`, if a delta from it may be sent: it is the publication just before `p`, and the data
/// the cached delta encodings were made from. They are cached for the base of the first
/// subscriber to ask: one holding other data at that offset (another epoch's) gets the
/// publication whole.
fn usable_base<'a>(p: &Publication, base: Option<&'a Publication>) -> Option<&'a Publication> {
    follows(p, base).filter(|base| {
        let made_from = p.encoded(Encoding::DeltaBase, |_| base.data.clone());
        made_from.as_ptr() == base.data.as_ptr() && made_from.len() == base.data.len()
            || *made_from == base.data
    })
}

/// The cached push of [`delta_or_whole`] from `base` (already checked by [`usable_base`]); for
/// Protobuf only with a base (whole, it is the ordinary publication).
fn encoded_delta<'a>(
    p: &'a Publication,
    base: Option<&Publication>,
    format: Format,
    framed: bool,
    deflate: bool,
) -> &'a Bytes {
    let encoding = match (format, base.is_some(), framed, deflate) {
        (Format::Protobuf, _, true, false) => Encoding::WebSocketProtobufDelta,
        (Format::Protobuf, _, true, true) => Encoding::WebSocketProtobufDeltaDeflated,
        (Format::Protobuf, _, false, _) => Encoding::ProtobufDelta,
        (Format::Json, true, true, false) => Encoding::WebSocketJsonDelta,
        (Format::Json, true, true, true) => Encoding::WebSocketJsonDeltaDeflated,
        (Format::Json, true, false, _) => Encoding::JsonDelta,
        (Format::Json, false, true, false) => Encoding::WebSocketJsonWhole,
        (Format::Json, false, true, true) => Encoding::WebSocketJsonWholeDeflated,
        (Format::Json, false, false, _) => Encoding::JsonWhole,
    };
    p.encoded(encoding, |p| {
        let publication = delta_or_whole(format, p, base);
        let push = format.encode_push(&p.channel, &PushBody::Publication(publication));
        if framed {
            frame(format, &push, deflate)
        } else {
            push.into()
        }
    })
}

/// The `join` or `leave` push in a WebSocket frame, encoded once for all subscribers.
pub(crate) fn membership_frame(
    membership: &Membership,
    joined: bool,
    format: Format,
    deflate: bool,
) -> &Bytes {
    membership.encoded(encoding(format, true, deflate), |m| {
        frame(format, &membership_push(m, joined, format), deflate)
    })
}

/// The `join` or `leave` push unframed, encoded once for all subscribers.
pub(crate) fn membership_message(membership: &Membership, joined: bool, format: Format) -> Bytes {
    membership
        .encoded(encoding(format, false, false), |m| {
            membership_push(m, joined, format).into()
        })
        .clone()
}

fn membership_push(m: &Membership, joined: bool, format: Format) -> Vec<u8> {
    let info = client_info(format, &m.client);
    let body = if joined {
        PushBody::Join(proto::Join { info })
    } else {
        PushBody::Leave(proto::Leave { info })
    };
    format.encode_push(&m.channel, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_conversions() {
        let check = |format, kind, bytes: &[u8], expected: &[u8]| {
            let bytes = Bytes::copy_from_slice(bytes);
            assert_eq!(data(format, kind, &bytes).as_bytes(), expected);
        };
        use Format::{Json, Protobuf};
        use MessageKind::{Binary, Text};
        check(Json, Text, br#"{"text":"hi"}"#, br#"{"text":"hi"}"#);
        check(Json, Text, b"hello", br#""hello""#);
        check(Json, Text, b"42", b"42");
        check(Json, Text, b"{", br#""{""#);
        check(Json, Binary, &[0, 1, 2], br#""AAEC""#);
        check(Protobuf, Binary, &[0, 1, 2], &[0, 1, 2]);
        check(Protobuf, Text, b"hello", b"hello");
        check(Protobuf, Text, br#"{"a":1}"#, br#"{"a":1}"#);
    }

    fn quote(offset: u64, price: u32) -> Publication {
        let data =
            format!(r#"{{"symbol":"BTC","venue":"plexus","price":{price},"volume":1234567}}"#);
        let mut publication = Publication::new("p:x".into(), MessageKind::Text, data.into(), None);
        publication.offset = offset;
        publication
    }

    /// The `pub` object of a JSON push.
    fn pushed(push: &Bytes) -> serde_json::Value {
        let push: serde_json::Value = serde_json::from_slice(push).unwrap();
        push["push"]["pub"].clone()
    }

    #[test]
    fn deltas_only_from_the_base_they_were_made_from() {
        let next = quote(6, 50_017);
        // Two subscribers at offset 5 holding different data (another epoch's, say).
        let (base, other) = (quote(5, 50_000), quote(5, 1));
        let first = pushed(&delta_publication(
            &next,
            Some(&base),
            Format::Json,
            false,
            false,
        ));
        assert_eq!(first["delta"], true, "{first}");
        let delta = first["data"].as_str().unwrap();
        let rebuilt = plexus_protocol::fossil::apply(&base.data, delta.as_bytes()).unwrap();
        assert_eq!(rebuilt, next.data);
        // The other is not sent the cached delta, which would not apply to what it holds.
        let second = pushed(&delta_publication(
            &next,
            Some(&other),
            Format::Json,
            false,
            false,
        ));
        assert!(second.get("delta").is_none(), "{second}");
        assert_eq!(second["data"].as_str().unwrap().as_bytes(), next.data);
        // A copy of the first base's data is the same base.
        let copy = quote(5, 50_000);
        let third = pushed(&delta_publication(
            &next,
            Some(&copy),
            Format::Json,
            false,
            false,
        ));
        assert_eq!(third, first);
        // Not the publication just before, or none: whole.
        for base in [None, Some(quote(4, 50_000)), Some(quote(0, 50_000))] {
            let whole = pushed(&delta_publication(
                &next,
                base.as_ref(),
                Format::Json,
                false,
                false,
            ));
            assert!(whole.get("delta").is_none(), "{whole}");
        }
    }

    #[test]
    fn non_json_data_goes_as_the_json_string_a_client_would_get() {
        // Text that is not JSON, and bytes, reach JSON clients as JSON strings: the whole
        // publication is that JSON text, itself in a string, and the delta rebuilds it.
        let text = |offset, body: &str| {
            let mut p = Publication::new(
                "p:x".into(),
                MessageKind::Text,
                body.to_owned().into(),
                None,
            );
            p.offset = offset;
            p
        };
        let (base, next) = (
            text(1, "status: all systems nominal, 42 nodes"),
            text(2, "status: all systems nominal, 43 nodes"),
        );
        let whole = pushed(&delta_publication(&base, None, Format::Json, false, false));
        let held = whole["data"].as_str().unwrap().to_owned();
        assert_eq!(
            serde_json::from_str::<String>(&held).unwrap(),
            "status: all systems nominal, 42 nodes"
        );
        let delta = pushed(&delta_publication(
            &next,
            Some(&base),
            Format::Json,
            false,
            false,
        ));
        assert_eq!(delta["delta"], true, "{delta}");
        let rebuilt = plexus_protocol::fossil::apply(
            held.as_bytes(),
            delta["data"].as_str().unwrap().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<String>(&rebuilt).unwrap(),
            "status: all systems nominal, 43 nodes"
        );
    }

    #[test]
    fn published_kinds() {
        assert_eq!(published_kind(b"{}"), MessageKind::Text);
        assert_eq!(published_kind(b"hi"), MessageKind::Text);
        assert_eq!(published_kind(&[0xff, 0]), MessageKind::Binary);
    }
}
