//! What nodes send each other through a broker engine (Redis, NATS), written once for all of
//! them: the envelope of a delivery, a client descriptor (presence values, joins and leaves) and
//! a node command. Engines add only where these bytes travel.
//!
//! # Delivery envelope
//!
//! ```text
//! kind     1 byte      b'p' publication, b'j' join, b'l' leave
//! offset   ASCII       decimal digits of the offset (0 without history, and for joins/leaves)
//! b':'     1 byte      end of the offset
//! body     the rest    p: Publication::to_stored(); j, l: a client descriptor (below)
//! ```
//!
//! The offset is text because the Redis engine's publish script (Lua, whose numbers are doubles)
//! writes it with `string.format('%d', top)`; the channel is not repeated: the engine's subject
//! or pub/sub channel names it.
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
//! # Node command
//!
//! ```text
//! kind     1 byte      b'D' disconnect, b'U' unsubscribe, b'S' subscribe, b'R' refresh,
//!                      b'I' refresh with new info, b'E' emulation, b'N' node stats,
//!                      b'Q' survey, b'A' survey reply
//! D        user, client (u32::MAX for none), code (u16 big-endian), reason
//! U, S     user, channel
//! R        user, client (u32::MAX for none), expire_at (u64 big-endian Unix seconds, 0 never)
//! I        as R, then info (u32 length + bytes)
//! E        node, session, data (u32 length + bytes)
//! N        node, name, version, num_clients, num_users, num_channels, num_subs (u32 each,
//!          big-endian), uptime (u64 big-endian)
//! Q        from, id (u64 big-endian), op, data (u32 length + bytes)
//! A        to, id (u64 big-endian), from, data (u32 length + bytes)
//! ```
//!
//! Kinds are only ever added: a node decodes every message of an older node; a kind it does not
//! know (from a newer node) is an error it logs and skips. Likewise a stored publication with
//! tags (a flags bit older nodes do not know) is corrupt to a node older than tags.
//!
//! Strings are u32-length-prefixed UTF-8 as in the descriptor.

use std::sync::Arc;

use crate::engine::{NodeCommand, NodeStats};
use crate::publication::{ClientDescriptor, CorruptPublication, Publication};
use bytes::{Buf, BufMut, Bytes, BytesMut};

const DESCRIPTOR_VERSION: u8 = 1;
const NONE: u32 = u32::MAX;

/// What a pub/sub message carries.
#[derive(Debug)]
pub enum Envelope {
    Publication(Box<Publication>),
    Join(Arc<ClientDescriptor>),
    Leave(Arc<ClientDescriptor>),
}

/// The envelope of a publication (the publish script builds the same bytes itself).
pub fn publication_envelope(offset: u64, stored: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(stored.len() + 24);
    out.put_u8(b'p');
    out.put_slice(offset.to_string().as_bytes());
    out.put_u8(b':');
    out.put_slice(stored);
    out.freeze()
}

/// The envelope of a join (`joined`) or leave.
pub fn membership_envelope(joined: bool, client: &ClientDescriptor) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(if joined { b'j' } else { b'l' });
    out.put_slice(b"0:");
    put_descriptor(&mut out, client);
    out.freeze()
}

/// Reads an envelope received on the pub/sub channel of `channel`.
pub fn decode_envelope(channel: Arc<str>, message: &[u8]) -> Result<Envelope, CorruptPublication> {
    let (&kind, rest) = message.split_first().ok_or(CorruptPublication)?;
    let colon = rest
        .iter()
        .position(|&b| b == b':')
        .ok_or(CorruptPublication)?;
    let offset: u64 = std::str::from_utf8(&rest[..colon])
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

fn put_text(out: &mut BytesMut, text: &[u8]) {
    out.put_u32(text.len() as u32);
    out.put_slice(text);
}

fn put_optional(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => out.put_u32(NONE),
        Some(bytes) => put_text(out, bytes),
    }
}

fn take(input: &mut Bytes) -> Result<Option<Bytes>, CorruptPublication> {
    if input.remaining() < 4 {
        return Err(CorruptPublication);
    }
    let len = input.get_u32();
    if len == NONE {
        return Ok(None);
    }
    let len = len as usize;
    if input.remaining() < len {
        return Err(CorruptPublication);
    }
    Ok(Some(input.split_to(len)))
}

fn take_text(input: &mut Bytes) -> Result<Arc<str>, CorruptPublication> {
    let bytes = take(input)?.ok_or(CorruptPublication)?;
    std::str::from_utf8(&bytes)
        .map(Arc::from)
        .map_err(|_| CorruptPublication)
}

fn put_descriptor(out: &mut BytesMut, client: &ClientDescriptor) {
    out.put_u8(DESCRIPTOR_VERSION);
    put_text(out, client.user.as_bytes());
    put_text(out, client.client.as_bytes());
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
    if input.remaining() < 1 || input.get_u8() != DESCRIPTOR_VERSION {
        return Err(CorruptPublication);
    }
    let descriptor = ClientDescriptor {
        user: take_text(&mut input)?,
        client: take_text(&mut input)?,
        conn_info: take(&mut input)?,
        chan_info: take(&mut input)?,
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
            put_text(&mut out, user.as_bytes());
            put_optional(&mut out, client.as_deref().map(str::as_bytes));
            out.put_u16(*code);
            put_text(&mut out, reason.as_bytes());
        }
        NodeCommand::Unsubscribe { user, channel } | NodeCommand::Subscribe { user, channel } => {
            out.put_u8(if matches!(command, NodeCommand::Unsubscribe { .. }) {
                b'U'
            } else {
                b'S'
            });
            put_text(&mut out, user.as_bytes());
            put_text(&mut out, channel.as_bytes());
        }
        NodeCommand::Refresh {
            user,
            client,
            expire_at,
            info,
        } => {
            // A refresh without info stays `R`, which nodes older than `I` read.
            out.put_u8(if info.is_some() { b'I' } else { b'R' });
            put_text(&mut out, user.as_bytes());
            put_optional(&mut out, client.as_deref().map(str::as_bytes));
            out.put_u64(*expire_at);
            if let Some(info) = info {
                put_text(&mut out, info);
            }
        }
        NodeCommand::Emulation {
            node,
            session,
            data,
        } => {
            out.put_u8(b'E');
            put_text(&mut out, node.as_bytes());
            put_text(&mut out, session.as_bytes());
            put_text(&mut out, data);
        }
        NodeCommand::Stats(stats) => {
            out.put_u8(b'N');
            put_text(&mut out, stats.node.as_bytes());
            put_text(&mut out, stats.name.as_bytes());
            put_text(&mut out, stats.version.as_bytes());
            out.put_u32(stats.num_clients);
            out.put_u32(stats.num_users);
            out.put_u32(stats.num_channels);
            out.put_u32(stats.num_subs);
            out.put_u64(stats.uptime);
        }
        NodeCommand::Survey { from, id, op, data } => {
            out.put_u8(b'Q');
            put_text(&mut out, from.as_bytes());
            out.put_u64(*id);
            put_text(&mut out, op.as_bytes());
            put_text(&mut out, data);
        }
        NodeCommand::SurveyReply { to, id, from, data } => {
            out.put_u8(b'A');
            put_text(&mut out, to.as_bytes());
            out.put_u64(*id);
            put_text(&mut out, from.as_bytes());
            put_text(&mut out, data);
        }
    }
    out.freeze()
}

/// Text that may be absent (see `put_optional`).
fn take_optional_text(input: &mut Bytes) -> Result<Option<Arc<str>>, CorruptPublication> {
    match take(input)? {
        None => Ok(None),
        Some(bytes) => std::str::from_utf8(&bytes)
            .map(|text| Some(Arc::from(text)))
            .map_err(|_| CorruptPublication),
    }
}

pub fn decode_command(message: &[u8]) -> Result<NodeCommand, CorruptPublication> {
    let mut input = Bytes::copy_from_slice(message);
    if !input.has_remaining() {
        return Err(CorruptPublication);
    }
    let command = match input.get_u8() {
        b'D' => {
            let user = take_text(&mut input)?;
            let client = take_optional_text(&mut input)?;
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
        kind @ (b'U' | b'S') => {
            let user = take_text(&mut input)?;
            let channel = take_text(&mut input)?;
            if kind == b'U' {
                NodeCommand::Unsubscribe { user, channel }
            } else {
                NodeCommand::Subscribe { user, channel }
            }
        }
        kind @ (b'R' | b'I') => {
            let user = take_text(&mut input)?;
            let client = take_optional_text(&mut input)?;
            if input.remaining() < 8 {
                return Err(CorruptPublication);
            }
            let expire_at = input.get_u64();
            let info = match kind {
                b'I' => Some(take(&mut input)?.ok_or(CorruptPublication)?),
                _ => None,
            };
            NodeCommand::Refresh {
                user,
                client,
                expire_at,
                info,
            }
        }
        b'E' => {
            let node = take_text(&mut input)?;
            let session = take_text(&mut input)?;
            let data = take(&mut input)?.ok_or(CorruptPublication)?;
            NodeCommand::Emulation {
                node,
                session,
                data,
            }
        }
        b'N' => {
            let node = take_text(&mut input)?;
            let name = take_text(&mut input)?;
            let version = take_text(&mut input)?;
            if input.remaining() < 24 {
                return Err(CorruptPublication);
            }
            NodeCommand::Stats(NodeStats {
                node,
                name,
                version,
                num_clients: input.get_u32(),
                num_users: input.get_u32(),
                num_channels: input.get_u32(),
                num_subs: input.get_u32(),
                uptime: input.get_u64(),
            })
        }
        kind @ (b'Q' | b'A') => {
            let node = take_text(&mut input)?;
            if input.remaining() < 8 {
                return Err(CorruptPublication);
            }
            let id = input.get_u64();
            let text = take_text(&mut input)?;
            let data = take(&mut input)?.ok_or(CorruptPublication)?;
            if kind == b'Q' {
                NodeCommand::Survey {
                    from: node,
                    id,
                    op: text,
                    data,
                }
            } else {
                NodeCommand::SurveyReply {
                    to: node,
                    id,
                    from: text,
                    data,
                }
            }
        }
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
    use crate::MessageKind;

    fn client(conn_info: Option<&'static [u8]>) -> ClientDescriptor {
        ClientDescriptor {
            user: "42".into(),
            client: "c-1".into(),
            conn_info: conn_info.map(Bytes::from_static),
            chan_info: None,
        }
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
            let envelope = membership_envelope(joined, &ann);
            match decode_envelope("chat:a".into(), &envelope).unwrap() {
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
            NodeCommand::Refresh {
                user: "u3".into(),
                client: Some("c-1".into()),
                expire_at: 1_900_000_000,
                info: None,
            },
            NodeCommand::Refresh {
                user: "u3".into(),
                client: None,
                expire_at: 0,
                info: None,
            },
            NodeCommand::Refresh {
                user: "u3".into(),
                client: Some("c-1".into()),
                expire_at: 0,
                info: Some(Bytes::from_static(br#"{"name":"Ann B."}"#)),
            },
            NodeCommand::Emulation {
                node: "n1".into(),
                session: "s1".into(),
                data: Bytes::from_static(b"{}\n{\"id\":2}"),
            },
            NodeCommand::Emulation {
                node: "n1".into(),
                session: "s1".into(),
                data: Bytes::new(),
            },
            NodeCommand::Stats(NodeStats {
                node: "n1".into(),
                name: "host".into(),
                version: "0.1.0".into(),
                num_clients: 1,
                num_users: 2,
                num_channels: 3,
                num_subs: 4,
                uptime: 5,
            }),
            NodeCommand::Survey {
                from: "n1".into(),
                id: u64::MAX - 1,
                op: "channels".into(),
                data: Bytes::from_static(b"chat:*"),
            },
            NodeCommand::SurveyReply {
                to: "n1".into(),
                id: 7,
                from: "n2".into(),
                data: Bytes::from_static(b"{\"chat:a\":2}"),
            },
        ];
        for command in commands {
            let encoded = encode_command(&command);
            assert_eq!(decode_command(&encoded).unwrap(), command);
            assert!(decode_command(&encoded[..encoded.len() - 1]).is_err());
        }
        assert!(decode_command(b"X").is_err());
        // Bytes as nodes wrote them before emulation commands existed still decode.
        assert_eq!(
            decode_command(b"S\0\0\0\x01u\0\0\0\x04news").unwrap(),
            NodeCommand::Subscribe {
                user: "u".into(),
                channel: "news".into(),
            }
        );
    }

    #[test]
    fn descriptor_round_trip() {
        let ann = ClientDescriptor {
            chan_info: Some(Bytes::from_static(b"{}")),
            ..client(Some(b"[1]"))
        };
        assert_eq!(decode_descriptor(encode_descriptor(&ann)).unwrap(), ann);
        assert!(decode_descriptor(Bytes::from_static(b"\x02")).is_err());
    }
}
