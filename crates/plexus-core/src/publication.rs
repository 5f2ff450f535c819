use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use plexus_protocol::ws::MessageKind;

use crate::hub::ConnectionId;

/// The wire encodings a publication can be cached in. The hub never produces them; transports
/// do, through [`Publication::encoded`], and each is computed at most once per publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A raw WebSocket frame carrying the data unchanged (`/chat/{room}`).
    WebSocketRaw = 0,
    /// The same, compressed with permessage-deflate.
    WebSocketRawDeflated = 1,
    /// The TCP chat's line form.
    ChatLine = 2,
}

const N_ENCODINGS: usize = 3;

/// One message published in one channel.
#[derive(Debug)]
pub struct Publication {
    pub channel: Arc<str>,
    pub kind: MessageKind,
    pub data: Bytes,
    /// The connection that published it, if any: lets a transport whose convention is "to
    /// everyone else" (the TCP chat) skip its own messages.
    pub origin: Option<ConnectionId>,
    /// Encoded forms, filled on first use and then shared by every subscriber.
    encodings: [OnceLock<Bytes>; N_ENCODINGS],
}

impl Publication {
    pub fn new(
        channel: Arc<str>,
        kind: MessageKind,
        data: Bytes,
        origin: Option<ConnectionId>,
    ) -> Publication {
        Publication {
            channel,
            kind,
            data,
            origin,
            encodings: Default::default(),
        }
    }

    /// The publication in `encoding`, produced by `encode` the first time it is asked for.
    pub fn encoded(&self, encoding: Encoding, encode: impl FnOnce(&Publication) -> Bytes) -> Bytes {
        self.encodings[encoding as usize]
            .get_or_init(|| encode(self))
            .clone()
    }

    /// Bytes this publication counts for in an outbox.
    pub fn weight(&self) -> usize {
        self.data.len() + 64
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
            assert_eq!(publication.encoded(Encoding::WebSocketRaw, encode), "<hi>");
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        publication.encoded(Encoding::ChatLine, encode);
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}
