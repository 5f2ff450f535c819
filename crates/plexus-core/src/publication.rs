use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use plexus_protocol::ws::MessageKind;

/// A client as others see it: in a publication's `info`, in presence, in join and leave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientDescriptor {
    /// User id; empty for anonymous connections.
    pub user: Arc<str>,
    /// Client (connection) id, unique across nodes.
    pub client: Arc<str>,
    /// Connection info from the token or connect request (raw JSON), if any.
    pub conn_info: Option<Bytes>,
    /// Channel info from the subscription token (raw JSON), if any.
    pub chan_info: Option<Bytes>,
}

/// The wire encodings a delivery can be cached in. The hub never produces them; transports
/// do, through `encoded`, and each is computed at most once per delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A raw WebSocket frame carrying the data unchanged (`/chat/{room}`).
    WebSocketRaw = 0,
    /// The same, compressed with permessage-deflate.
    WebSocketRawDeflated = 1,
    /// The TCP chat's line form.
    ChatLine = 2,
    /// A native-protocol JSON push in a WebSocket frame.
    WebSocketJson = 3,
    /// The same, compressed.
    WebSocketJsonDeflated = 4,
    /// A native-protocol JSON push, unframed (for batching and other transports).
    Json = 5,
    /// A native-protocol Protobuf push in a binary WebSocket frame.
    WebSocketProtobuf = 6,
    /// The same, compressed.
    WebSocketProtobufDeflated = 7,
    /// A native-protocol Protobuf push, unframed (HTTP streaming).
    Protobuf = 8,
    /// For subscribers with delta compression (`delta: "fossil"`) that hold the previous
    /// publication: a JSON push whose data is the delta from it (or, where the delta would not
    /// be smaller, the whole data), in a WebSocket frame.
    WebSocketJsonDelta = 9,
    /// The same, compressed.
    WebSocketJsonDeltaDeflated = 10,
    /// The same, unframed.
    JsonDelta = 11,
    /// For subscribers with delta compression that do not hold the previous publication: a
    /// JSON push whose data is the whole data as a JSON string, in a WebSocket frame.
    WebSocketJsonWhole = 12,
    /// The same, compressed.
    WebSocketJsonWholeDeflated = 13,
    /// The same, unframed.
    JsonWhole = 14,
    /// The Protobuf push of a delta (a whole publication is the ordinary push), in a WebSocket
    /// frame.
    WebSocketProtobufDelta = 15,
    /// The same, compressed.
    WebSocketProtobufDeltaDeflated = 16,
    /// The same, unframed.
    ProtobufDelta = 17,
    /// Not an encoding: the data of the publication the delta encodings above were made from
    /// (the one before), so that a subscriber holding another one (of another epoch) is not
    /// sent them.
    DeltaBase = 18,
}

const N_ENCODINGS: usize = 19;

/// Encodings a delivery keeps in place; most are sent in one or two.
const INLINE: usize = 4;

/// A slot's tag while no encoding has claimed it.
const FREE: u8 = u8::MAX;

/// One in-place slot: the encoding that claimed it, and its bytes once made.
#[derive(Debug)]
struct Slot {
    encoding: AtomicU8,
    bytes: OnceLock<Bytes>,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            encoding: AtomicU8::new(FREE),
            bytes: OnceLock::new(),
        }
    }
}

impl Clone for Slot {
    fn clone(&self) -> Slot {
        Slot {
            encoding: AtomicU8::new(self.encoding.load(Ordering::Acquire)),
            bytes: self.bytes.clone(),
        }
    }
}

/// Cached encodings of one delivery: 208 bytes, where one slot for each of the nineteen
/// encodings would take 760 (and a publication in history keeps its cache).
///
/// An encoding first claims a slot (an atomic tag), then makes its bytes in it: so threads
/// wanting the same encoding wait for one maker, while one wanting another encoding never
/// waits for it, and an encoder may ask the same cache for another encoding.
#[derive(Debug, Default, Clone)]
pub struct EncodingCache {
    /// Claimed in order, each by the first encoding asked for that no earlier slot holds; so an
    /// encoding is in one slot at most.
    slots: [Slot; INLINE],
    /// Every encoding in its own place, once more than `INLINE` were asked for.
    more: OnceLock<Box<[OnceLock<Bytes>; N_ENCODINGS]>>,
}

impl EncodingCache {
    pub fn get_or_init(&self, encoding: Encoding, encode: impl FnOnce() -> Bytes) -> &Bytes {
        let tag = encoding as u8;
        for slot in &self.slots {
            // A plain load first: the hot path (every delivery of a publication) only reads.
            let mut held = slot.encoding.load(Ordering::Acquire);
            if held == FREE {
                held = match slot.encoding.compare_exchange(
                    FREE,
                    tag,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => tag,
                    Err(held) => held,
                };
            }
            if held == tag {
                return slot.bytes.get_or_init(encode);
            }
        }
        let more = self.more.get_or_init(Default::default);
        more[encoding as usize].get_or_init(encode)
    }
}

/// One message published in one channel.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: Arc<str>,
    pub kind: MessageKind,
    pub data: Bytes,
    /// The publishing client, when a client published it.
    pub info: Option<Arc<ClientDescriptor>>,
    /// Position in the channel's stream; 0 when the channel keeps no history.
    pub offset: u64,
    /// Key-value metadata the publisher attached (the server API's `tags`), delivered and
    /// kept with the data.
    pub tags: Option<Arc<Tags>>,
    encodings: EncodingCache,
}

/// A publication's tags, in key order.
pub type Tags = std::collections::BTreeMap<String, String>;

/// Why stored bytes could not be read back as a publication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored publication is corrupt")]
pub struct CorruptPublication;

const STORED_VERSION: u8 = 1;

impl Publication {
    pub fn new(
        channel: Arc<str>,
        kind: MessageKind,
        data: Bytes,
        info: Option<Arc<ClientDescriptor>>,
    ) -> Publication {
        Publication {
            channel,
            kind,
            data,
            info,
            offset: 0,
            tags: None,
            encodings: EncodingCache::default(),
        }
    }

    /// The same publication with `tags` (none if empty).
    pub fn with_tags(mut self, tags: Tags) -> Publication {
        self.tags = (!tags.is_empty()).then(|| Arc::new(tags));
        self
    }

    /// The same publication at a stream position.
    pub fn with_offset(mut self, offset: u64) -> Publication {
        self.offset = offset;
        self
    }

    /// The publication in `encoding`, produced by `encode` the first time it is asked for.
    /// Borrowed, so a writer can hand it to the socket without touching its reference count.
    pub fn encoded(
        &self,
        encoding: Encoding,
        encode: impl FnOnce(&Publication) -> Bytes,
    ) -> &Bytes {
        self.encodings.get_or_init(encoding, || encode(self))
    }

    /// Bytes this publication counts for in an outbox.
    pub fn weight(&self) -> usize {
        let tags = self.tags.as_ref().map_or(0, |tags| {
            tags.iter()
                .map(|(key, value)| key.len() + value.len() + 8)
                .sum()
        });
        self.data.len() + tags + 64
    }

    /// The publisher's client id, if a client published it.
    pub fn publisher(&self) -> Option<&str> {
        self.info.as_ref().map(|info| &*info.client)
    }

    /// The storage form engines keep in history (channel and offset are kept by the engine).
    pub fn to_stored(&self) -> Bytes {
        // Exactly the size needed: history keeps this buffer, capacity included.
        let info = self.info.as_ref().map_or(0, |info| {
            4 * 4
                + info.user.len()
                + info.client.len()
                + info.conn_info.as_ref().map_or(0, |b| b.len())
                + info.chan_info.as_ref().map_or(0, |b| b.len())
        });
        let tags = self.tags.as_ref().map_or(0, |tags| {
            4 + tags
                .iter()
                .map(|(key, value)| 8 + key.len() + value.len())
                .sum::<usize>()
        });
        let mut out = BytesMut::with_capacity(3 + info + tags + self.data.len());
        out.put_u8(STORED_VERSION);
        out.put_u8(match self.kind {
            MessageKind::Text => 0,
            MessageKind::Binary => 1,
        });
        // Flags: 1 the publisher's info follows, 2 tags follow (after the info).
        let flags = u8::from(self.info.is_some()) | (u8::from(self.tags.is_some()) << 1);
        out.put_u8(flags);
        match &self.info {
            None => {}
            Some(info) => {
                for part in [info.user.as_bytes(), info.client.as_bytes()] {
                    out.put_u32(part.len() as u32);
                    out.put_slice(part);
                }
                for part in [&info.conn_info, &info.chan_info] {
                    match part {
                        None => out.put_u32(u32::MAX),
                        Some(bytes) => {
                            out.put_u32(bytes.len() as u32);
                            out.put_slice(bytes);
                        }
                    }
                }
            }
        }
        if let Some(tags) = &self.tags {
            out.put_u32(tags.len() as u32);
            for (key, value) in tags.iter() {
                for part in [key, value] {
                    out.put_u32(part.len() as u32);
                    out.put_slice(part.as_bytes());
                }
            }
        }
        out.put_slice(&self.data);
        out.freeze()
    }

    /// Reads back [`Publication::to_stored`].
    pub fn from_stored(
        channel: Arc<str>,
        offset: u64,
        mut stored: Bytes,
    ) -> Result<Publication, CorruptPublication> {
        fn take(stored: &mut Bytes) -> Result<Option<Bytes>, CorruptPublication> {
            if stored.remaining() < 4 {
                return Err(CorruptPublication);
            }
            let len = stored.get_u32();
            if len == u32::MAX {
                return Ok(None);
            }
            let len = len as usize;
            if stored.remaining() < len {
                return Err(CorruptPublication);
            }
            Ok(Some(stored.split_to(len)))
        }
        fn text(bytes: Option<Bytes>) -> Result<Arc<str>, CorruptPublication> {
            let bytes = bytes.ok_or(CorruptPublication)?;
            std::str::from_utf8(&bytes)
                .map(Arc::from)
                .map_err(|_| CorruptPublication)
        }
        if stored.remaining() < 3 || stored.get_u8() != STORED_VERSION {
            return Err(CorruptPublication);
        }
        let kind = match stored.get_u8() {
            0 => MessageKind::Text,
            1 => MessageKind::Binary,
            _ => return Err(CorruptPublication),
        };
        let flags = stored.get_u8();
        if flags > 3 {
            return Err(CorruptPublication);
        }
        let info = match flags & 1 {
            0 => None,
            _ => {
                let user = text(take(&mut stored)?)?;
                let client = text(take(&mut stored)?)?;
                let conn_info = take(&mut stored)?;
                let chan_info = take(&mut stored)?;
                Some(Arc::new(ClientDescriptor {
                    user,
                    client,
                    conn_info,
                    chan_info,
                }))
            }
        };
        let mut tags = Tags::new();
        if flags & 2 != 0 {
            if stored.remaining() < 4 {
                return Err(CorruptPublication);
            }
            for _ in 0..stored.get_u32() {
                let key = text(take(&mut stored)?)?;
                let value = text(take(&mut stored)?)?;
                tags.insert(key.to_string(), value.to_string());
            }
        }
        Ok(Publication::new(channel, kind, stored, info)
            .with_offset(offset)
            .with_tags(tags))
    }
}

/// A client joining or leaving a channel (`join_leave`).
#[derive(Debug)]
pub struct Membership {
    pub channel: Arc<str>,
    pub client: Arc<ClientDescriptor>,
    encodings: EncodingCache,
}

impl Membership {
    pub fn new(channel: Arc<str>, client: Arc<ClientDescriptor>) -> Membership {
        Membership {
            channel,
            client,
            encodings: EncodingCache::default(),
        }
    }

    pub fn encoded(&self, encoding: Encoding, encode: impl FnOnce(&Membership) -> Bytes) -> &Bytes {
        self.encodings.get_or_init(encoding, || encode(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn encodes_once_per_encoding() {
        let publication = Publication::new("chat:a".into(), MessageKind::Text, "hi".into(), None);
        let calls = AtomicUsize::new(0);
        let encode = |publication: &Publication| {
            calls.fetch_add(1, Ordering::Relaxed);
            Bytes::from(format!(
                "<{}>",
                std::str::from_utf8(&publication.data).unwrap()
            ))
        };
        for _ in 0..3 {
            assert_eq!(*publication.encoded(Encoding::WebSocketRaw, encode), "<hi>");
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        publication.encoded(Encoding::ChatLine, encode);
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn every_encoding_has_its_own_bytes_even_when_asked_for_at_once() {
        use Encoding::*;
        let all = [
            WebSocketRaw,
            WebSocketRawDeflated,
            ChatLine,
            WebSocketJson,
            WebSocketJsonDeflated,
            Json,
            WebSocketProtobuf,
            WebSocketProtobufDeflated,
            Protobuf,
        ];
        let cache = EncodingCache::default();
        let calls = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (cache, calls) = (&cache, &calls);
                scope.spawn(move || {
                    // Each thread in its own order, so they race for the slots.
                    for i in 0..all.len() {
                        let encoding = all[(i + thread * 2) % all.len()];
                        let bytes = cache.get_or_init(encoding, || {
                            calls.fetch_add(1, Ordering::Relaxed);
                            Bytes::from(format!("{encoding:?}"))
                        });
                        assert_eq!(*bytes, format!("{encoding:?}"));
                    }
                });
            }
        });
        assert_eq!(calls.load(Ordering::Relaxed), all.len());
        assert!(std::mem::size_of::<EncodingCache>() <= 208);
    }

    #[test]
    fn an_encoder_may_ask_for_another_encoding() {
        let cache = EncodingCache::default();
        let framed = cache.get_or_init(Encoding::WebSocketJson, || {
            let message = cache.get_or_init(Encoding::Json, || Bytes::from_static(b"{}"));
            Bytes::from([b"\x81\x02", &message[..]].concat())
        });
        assert_eq!(&framed[..], b"\x81\x02{}");
        assert_eq!(
            cache.get_or_init(Encoding::Json, || unreachable!()),
            &b"{}"[..]
        );
    }

    #[test]
    fn stored_round_trip() {
        let info = Arc::new(ClientDescriptor {
            user: "42".into(),
            client: "c-1".into(),
            conn_info: Some(Bytes::from_static(b"{\"name\":\"ann\"}")),
            chan_info: None,
        });
        let tags = Tags::from([("k".to_owned(), "v".to_owned()), ("é".into(), "".into())]);
        for (kind, info, tags) in [
            (MessageKind::Text, None, Tags::new()),
            (MessageKind::Binary, Some(info.clone()), Tags::new()),
            (MessageKind::Text, None, tags.clone()),
            (MessageKind::Binary, Some(info), tags),
        ] {
            let publication = Publication::new(
                "chat:a".into(),
                kind,
                Bytes::from_static(b"\x00data"),
                info.clone(),
            )
            .with_tags(tags.clone());
            let stored = publication.to_stored();
            let back = Publication::from_stored("chat:a".into(), 9, stored.clone()).unwrap();
            assert_eq!(
                (back.kind, &back.data, &back.info, back.offset),
                (kind, &publication.data, &info, 9)
            );
            assert_eq!(back.tags.as_deref().cloned().unwrap_or_default(), tags);
            // Cut anywhere before the data, it is corrupt.
            let header = stored.len() - publication.data.len();
            for cut in 0..header {
                assert!(Publication::from_stored("c".into(), 1, stored.slice(..cut)).is_err());
            }
        }
        // Stored before tags existed (flags 0 or 1) still reads; unknown flags do not.
        let old = Publication::from_stored("x".into(), 1, Bytes::from_static(b"\x01\x00\x00hi"));
        assert_eq!(&old.unwrap().data[..], b"hi");
        assert!(
            Publication::from_stored("x".into(), 1, Bytes::from_static(b"\x01\x00\x04hi")).is_err()
        );
        assert_eq!(
            Publication::from_stored("x".into(), 1, Bytes::from_static(b"\x01\x00\x01\x00"))
                .unwrap_err(),
            CorruptPublication
        );
    }
}
