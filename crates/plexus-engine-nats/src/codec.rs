//! The bytes this engine puts in NATS besides `Publication::to_stored()`, in the same formats as
//! the Redis engine's (so tools and docs describe both): the envelope of a message on a
//! channel's core subject, a client descriptor (presence, joins and leaves) and a node command.
//! Also how a channel or client name becomes one subject token.
//!
//! # Envelope (`{prefix}.pub.{channel token}`)
//!
//! ```text
//! kind     1 byte      b'p' publication, b'j' join, b'l' leave
//! offset   ASCII       decimal digits (0 without history, and for joins and leaves)
//! b':'     1 byte
//! body     the rest    p: Publication::to_stored(); j, l: a client descriptor
//! ```
//!
//! A publication with an offset also carries its stream's epoch in the `Plexus-Epoch` header.
//!
//! # Client descriptor
//!
//! ```text
//! version  1 byte      1
//! user     u32 length (big-endian) + UTF-8
//! client   u32 length + UTF-8
//! conn     u32 length + bytes, or u32::MAX for none
//! chan     u32 length + bytes, or u32::MAX for none
//! ```
//!
//! # Node command (`{prefix}.control`)
//!
//! ```text
//! kind     1 byte      b'D' disconnect, b'U' unsubscribe, b'S' subscribe
//! D        user, client (u32::MAX for none), code (u16 big-endian), reason
//! U, S     user, channel
//! ```

use std::sync::Arc;

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use plexus_core::{ClientDescriptor, CorruptPublication, NodeCommand, Publication};

const DESCRIPTOR_VERSION: u8 = 1;
/// The length written for an absent optional field.
const ABSENT: u32 = u32::MAX;

/// One subject token (and key-value key) for any name: URL-safe base64 without padding, so
/// `.`, `*`, `>` and spaces in channel names are never subject syntax. The empty name, whose
/// base64 would be an empty token, is `-` (no other name encodes to one character).
pub fn token(name: &str) -> String {
    if name.is_empty() {
        return "-".to_owned();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name.as_bytes())
}

/// The name a [`token`] stands for.
pub fn untoken(token: &str) -> Option<String> {
    if token == "-" {
        return Some(String::new());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// What a message on a channel's subject carries.
#[derive(Debug)]
pub enum Envelope {
    Publication(Box<Publication>),
    Join(Arc<ClientDescriptor>),
    Leave(Arc<ClientDescriptor>),
}

fn envelope(kind: u8, offset: u64, body: impl FnOnce(&mut BytesMut), capacity: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(capacity + 24);
    out.put_u8(kind);
    out.put_slice(offset.to_string().as_bytes());
    out.put_u8(b':');
    body(&mut out);
    out.freeze()
}

/// The envelope of a publication at `offset` (0 without history).
pub fn publication_envelope(offset: u64, stored: &[u8]) -> Bytes {
    envelope(b'p', offset, |out| out.put_slice(stored), stored.len())
}

/// The envelope of a join (`joined`) or a leave.
pub fn membership_envelope(joined: bool, client: &ClientDescriptor) -> Bytes {
    let kind = if joined { b'j' } else { b'l' };
    envelope(kind, 0, |out| put_descriptor(out, client), 64)
}

/// Reads an envelope received on the subject of `channel`.
pub fn decode_envelope(channel: Arc<str>, message: &[u8]) -> Result<Envelope, CorruptPublication> {
    let (&kind, rest) = message.split_first().ok_or(CorruptPublication)?;
    let colon = rest
        .iter()
        .position(|&byte| byte == b':')
        .ok_or(CorruptPublication)?;
    let digits = &rest[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(CorruptPublication);
    }
    let offset: u64 = std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or(CorruptPublication)?;
    let body = Bytes::copy_from_slice(&rest[colon + 1..]);
    match kind {
        b'p' => Publication::from_stored(channel, offset, body)
            .map(|publication| Envelope::Publication(Box::new(publication))),
        b'j' => decode_descriptor(body).map(|client| Envelope::Join(Arc::new(client))),
        b'l' => decode_descriptor(body).map(|client| Envelope::Leave(Arc::new(client))),
        _ => Err(CorruptPublication),
    }
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    let len = u32::try_from(bytes.len())
        .unwrap_or(ABSENT - 1)
        .min(ABSENT - 1);
    out.put_u32(len);
    out.put_slice(&bytes[..len as usize]);
}

fn put_optional(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => put_bytes(out, bytes),
        None => out.put_u32(ABSENT),
    }
}

fn take_optional(input: &mut Bytes) -> Result<Option<Bytes>, CorruptPublication> {
    if input.remaining() < 4 {
        return Err(CorruptPublication);
    }
    let len = input.get_u32();
    if len == ABSENT {
        return Ok(None);
    }
    let len = len as usize;
    if input.remaining() < len {
        return Err(CorruptPublication);
    }
    Ok(Some(input.split_to(len)))
}

fn take_text(input: &mut Bytes) -> Result<Arc<str>, CorruptPublication> {
    let bytes = take_optional(input)?.ok_or(CorruptPublication)?;
    std::str::from_utf8(&bytes)
        .map(Arc::from)
        .map_err(|_| CorruptPublication)
}

fn put_descriptor(out: &mut BytesMut, client: &ClientDescriptor) {
    out.put_u8(DESCRIPTOR_VERSION);
    put_bytes(out, client.user.as_bytes());
    put_bytes(out, client.client.as_bytes());
    put_optional(out, client.conn_info.as_deref());
    put_optional(out, client.chan_info.as_deref());
}

/// A client descriptor as stored in presence.
pub fn encode_descriptor(client: &ClientDescriptor) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    put_descriptor(&mut out, client);
    out.freeze()
}

pub fn decode_descriptor(mut input: Bytes) -> Result<ClientDescriptor, CorruptPublication> {
    if !input.has_remaining() || input.get_u8() != DESCRIPTOR_VERSION {
        return Err(CorruptPublication);
    }
    let descriptor = ClientDescriptor {
        user: take_text(&mut input)?,
        client: take_text(&mut input)?,
        conn_info: take_optional(&mut input)?,
        chan_info: take_optional(&mut input)?,
    };
    if input.has_remaining() {
        return Err(CorruptPublication);
    }
    Ok(descriptor)
}

pub fn encode_command(command: &NodeCommand) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    match command {
        NodeCommand::Disconnect {
            user,
            client,
            code,
            reason,
        } => {
            out.put_u8(b'D');
            put_bytes(&mut out, user.as_bytes());
            put_optional(&mut out, client.as_deref().map(str::as_bytes));
            out.put_u16(*code);
            put_bytes(&mut out, reason.as_bytes());
        }
        NodeCommand::Unsubscribe { user, channel } => {
            out.put_u8(b'U');
            put_bytes(&mut out, user.as_bytes());
            put_bytes(&mut out, channel.as_bytes());
        }
        NodeCommand::Subscribe { user, channel } => {
            out.put_u8(b'S');
            put_bytes(&mut out, user.as_bytes());
            put_bytes(&mut out, channel.as_bytes());
        }
    }
    out.freeze()
}

pub fn decode_command(message: &[u8]) -> Result<NodeCommand, CorruptPublication> {
    let mut input = Bytes::copy_from_slice(message);
    if !input.has_remaining() {
        return Err(CorruptPublication);
    }
    let command = match input.get_u8() {
        b'D' => {
            let user = take_text(&mut input)?;
            let client = match take_optional(&mut input)? {
                None => None,
                Some(bytes) => Some(
                    std::str::from_utf8(&bytes)
                        .map(Arc::from)
                        .map_err(|_| CorruptPublication)?,
                ),
            };
            if input.remaining() < 2 {
                return Err(CorruptPublication);
            }
            let code = input.get_u16();
            let reason = take_text(&mut input)?;
            NodeCommand::Disconnect {
                user,
                client,
                code,
                reason,
            }
        }
        b'U' => NodeCommand::Unsubscribe {
            user: take_text(&mut input)?,
            channel: take_text(&mut input)?,
        },
        b'S' => NodeCommand::Subscribe {
            user: take_text(&mut input)?,
            channel: take_text(&mut input)?,
        },
        _ => return Err(CorruptPublication),
    };
    if input.has_remaining() {
        return Err(CorruptPublication);
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::MessageKind;

    fn client(conn_info: Option<&'static [u8]>) -> ClientDescriptor {
        ClientDescriptor {
            user: "42".into(),
            client: "c-1".into(),
            conn_info: conn_info.map(Bytes::from_static),
            chan_info: None,
        }
    }

    #[test]
    fn tokens_are_one_safe_subject_token() {
        for name in ["chat:a", "a.b", "*", ">", "with space", "ünï", "", "x"] {
            let token = token(name);
            assert!(!token.is_empty());
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{name:?} → {token:?}"
            );
            assert_eq!(untoken(&token).as_deref(), Some(name));
        }
        assert_ne!(token("a.b"), token("a_b"));
        assert_eq!(untoken("!"), None);
    }

    #[test]
    fn publication_envelope_round_trip() {
        let publication = Publication::new(
            "chat:a".into(),
            MessageKind::Binary,
            Bytes::from_static(b"\x00:data"),
            Some(Arc::new(client(None))),
        );
        let envelope = publication_envelope(1234, &publication.to_stored());
        assert!(envelope.starts_with(b"p1234:"));
        let Envelope::Publication(back) = decode_envelope("chat:a".into(), &envelope).unwrap()
        else {
            panic!("not a publication");
        };
        assert_eq!(
            (&*back.channel, back.offset, back.kind, &back.data[..]),
            ("chat:a", 1234, MessageKind::Binary, &b"\x00:data"[..])
        );
        assert_eq!(back.publisher(), Some("c-1"));
    }

    #[test]
    fn membership_envelope_round_trip() {
        let ann = client(Some(b"{\"name\":\"ann\"}"));
        for joined in [true, false] {
            match decode_envelope("chat:a".into(), &membership_envelope(joined, &ann)).unwrap() {
                Envelope::Join(back) if joined => assert_eq!(*back, ann),
                Envelope::Leave(back) if !joined => assert_eq!(*back, ann),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn corrupt_envelopes_are_errors() {
        for bad in [
            &b""[..],
            b"p",
            b"p12",
            b"px:",
            b"p:",
            b"p+1:",
            b"q1:",
            b"j0:\x01",
            b"p1:\x09",
        ] {
            assert!(decode_envelope("c".into(), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commands_round_trip() {
        let commands = [
            NodeCommand::Disconnect {
                user: "u1".into(),
                client: None,
                code: 3011,
                reason: "force reconnect".into(),
            },
            NodeCommand::Disconnect {
                user: "u1".into(),
                client: Some("c-9".into()),
                code: 3000,
                reason: "".into(),
            },
            NodeCommand::Unsubscribe {
                user: "u2".into(),
                channel: "chat:x".into(),
            },
            NodeCommand::Subscribe {
                user: "".into(),
                channel: "news".into(),
            },
        ];
        for command in commands {
            let encoded = encode_command(&command);
            assert_eq!(decode_command(&encoded).unwrap(), command);
            assert!(decode_command(&encoded[..encoded.len() - 1]).is_err());
        }
        assert!(decode_command(b"X").is_err());
        assert!(decode_command(b"").is_err());
    }

    #[test]
    fn descriptor_round_trip() {
        let ann = ClientDescriptor {
            chan_info: Some(Bytes::from_static(b"{}")),
            ..client(Some(b"[1]"))
        };
        assert_eq!(decode_descriptor(encode_descriptor(&ann)).unwrap(), ann);
        assert!(decode_descriptor(Bytes::from_static(b"\x02")).is_err());
        assert!(decode_descriptor(Bytes::new()).is_err());
    }
}
