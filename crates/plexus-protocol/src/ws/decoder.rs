use bytes::{Buf, Bytes, BytesMut};

use super::close::{self, is_valid_received};
use super::deflate::{self, InflateError};
use super::frame::OpCode;
use super::MessageKind;

/// What a [`Decoder`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct DecoderConfig {
    /// Largest message accepted, after reassembly and decompression, in bytes.
    pub max_message_size: usize,
    /// Whether permessage-deflate was negotiated (RSV1 allowed on data frames).
    pub deflate: bool,
}

/// One thing a client said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete data message, reassembled and decompressed; text is valid UTF-8.
    Message {
        kind: MessageKind,
        data: Bytes,
    },
    Ping(Bytes),
    Pong(Bytes),
    /// The client started the close handshake; `code` is `None` for an empty close frame.
    Close {
        code: Option<u16>,
        reason: String,
    },
}

/// A protocol violation. The connection answers with [`DecodeError::close_code`] and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("control frames must be final and at most 125 bytes")]
    BadControlFrame,
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new message started before the previous one finished")]
    ExpectedContinuation,
    #[error("message is larger than {limit} bytes")]
    TooBig { limit: usize },
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame with an invalid code or length")]
    BadClose,
    #[error("compressed message is corrupt")]
    CorruptCompression,
}

impl DecodeError {
    /// The close code that tells the client what it did wrong.
    pub fn close_code(&self) -> u16 {
        match self {
            DecodeError::TooBig { .. } => close::TOO_BIG,
            DecodeError::InvalidUtf8 | DecodeError::CorruptCompression => close::INVALID_PAYLOAD,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// A data message whose later fragments have not all arrived.
#[derive(Debug)]
struct Partial {
    kind: MessageKind,
    compressed: bool,
    /// Grown exactly (never past the message limit), not by doubling.
    data: Vec<u8>,
}

/// Turns the byte stream from one client into [`Event`]s.
///
/// Feed it whatever was read with [`Decoder::feed`], then call [`Decoder::next_event`] until it
/// returns `Ok(None)`. Between messages it holds no buffer at all, so an idle connection costs
/// nothing here.
#[derive(Debug)]
pub struct Decoder {
    config: DecoderConfig,
    /// Bytes read but not yet parsed: at most one incomplete frame.
    buffer: BytesMut,
    partial: Option<Partial>,
}

impl Decoder {
    pub fn new(config: DecoderConfig) -> Decoder {
        Decoder {
            config,
            buffer: BytesMut::new(),
            partial: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes held for incomplete frames and messages.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
            + self
                .partial
                .as_ref()
                .map_or(0, |partial| partial.data.len())
    }

    pub fn next_event(&mut self) -> Result<Option<Event>, DecodeError> {
        loop {
            let Some(event) = self.next_frame()? else {
                if self.buffer.is_empty() {
                    // Give the allocation back: idle connections hold no read buffer.
                    self.buffer = BytesMut::new();
                }
                return Ok(None);
            };
            if let Some(event) = event {
                return Ok(Some(event));
            }
        }
    }

    /// Parses one frame: `Ok(None)` if it is incomplete, `Ok(Some(None))` for a fragment that
    /// completed nothing yet.
    fn next_frame(&mut self) -> Result<Option<Option<Event>>, DecodeError> {
        let buffer = &self.buffer;
        if buffer.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (buffer[0], buffer[1]);
        let fin = first & 0x80 != 0;
        let rsv1 = first & 0x40 != 0;
        if first & 0x30 != 0 {
            return Err(DecodeError::ReservedBits);
        }
        let opcode =
            OpCode::from_u8(first & 0x0F).ok_or(DecodeError::UnknownOpcode(first & 0x0F))?;
        if second & 0x80 == 0 {
            return Err(DecodeError::Unmasked);
        }
        let (length, extended) = match second & 0x7F {
            126 if buffer.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([buffer[2], buffer[3]])), 2),
            127 if buffer.len() < 10 => return Ok(None),
            127 => (
                u64::from_be_bytes(buffer[2..10].try_into().expect("8 bytes")),
                8,
            ),
            short => (u64::from(short), 0),
        };
        let limit = self.config.max_message_size;
        if opcode.is_control() {
            if !fin || length > 125 {
                return Err(DecodeError::BadControlFrame);
            }
            if rsv1 {
                return Err(DecodeError::ReservedBits);
            }
        } else {
            match (opcode, &self.partial) {
                (OpCode::Continuation, None) => return Err(DecodeError::UnexpectedContinuation),
                (OpCode::Text | OpCode::Binary, Some(_)) => {
                    return Err(DecodeError::ExpectedContinuation)
                }
                _ => {}
            }
            if rsv1 && (opcode == OpCode::Continuation || !self.config.deflate) {
                return Err(DecodeError::ReservedBits);
            }
            let so_far = self
                .partial
                .as_ref()
                .map_or(0, |partial| partial.data.len()) as u64;
            if so_far.saturating_add(length) > limit as u64 {
                return Err(DecodeError::TooBig { limit });
            }
        }
        let length = length as usize; // bounded by the checks above
        let header = 2 + extended + 4;
        if self.buffer.len() < header + length {
            self.buffer.reserve(header + length - self.buffer.len());
            return Ok(None);
        }
        let mask: [u8; 4] = self.buffer[2 + extended..header]
            .try_into()
            .expect("4 bytes");
        // Each payload gets an allocation of its own size: a small message must not keep a whole
        // read buffer alive while it waits in subscribers' outboxes.
        let mut payload = Vec::with_capacity(length);
        payload.extend_from_slice(&self.buffer[header..header + length]);
        self.buffer.advance(header + length);
        unmask(&mut payload, mask);

        let kind = match opcode {
            OpCode::Ping => return Ok(Some(Some(Event::Ping(payload.into())))),
            OpCode::Pong => return Ok(Some(Some(Event::Pong(payload.into())))),
            OpCode::Close => return parse_close(&payload).map(|event| Some(Some(event))),
            OpCode::Text => MessageKind::Text,
            OpCode::Binary => MessageKind::Binary,
            OpCode::Continuation => {
                let mut partial = self.partial.take().expect("checked above");
                partial.data.reserve_exact(payload.len());
                partial.data.extend_from_slice(&payload);
                if !fin {
                    self.partial = Some(partial);
                    return Ok(Some(None));
                }
                return self
                    .finish(partial.kind, partial.compressed, partial.data)
                    .map(|event| Some(Some(event)));
            }
        };
        if !fin {
            self.partial = Some(Partial {
                kind,
                compressed: rsv1,
                data: payload,
            });
            return Ok(Some(None));
        }
        self.finish(kind, rsv1, payload)
            .map(|event| Some(Some(event)))
    }

    fn finish(
        &self,
        kind: MessageKind,
        compressed: bool,
        data: Vec<u8>,
    ) -> Result<Event, DecodeError> {
        let mut data = if compressed {
            let limit = self.config.max_message_size;
            deflate::decompress(&data, limit).map_err(|error| match error {
                InflateError::TooBig { limit } => DecodeError::TooBig { limit },
                InflateError::Corrupt => DecodeError::CorruptCompression,
            })?
        } else {
            data
        };
        data.shrink_to_fit();
        let data = Bytes::from(data);
        if kind == MessageKind::Text && std::str::from_utf8(&data).is_err() {
            return Err(DecodeError::InvalidUtf8);
        }
        Ok(Event::Message { kind, data })
    }
}

fn parse_close(payload: &[u8]) -> Result<Event, DecodeError> {
    match payload {
        [] => Ok(Event::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(DecodeError::BadClose),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !is_valid_received(code) {
                return Err(DecodeError::BadClose);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Event::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
    }
}

/// XORs a client payload with its mask, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let value = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (index, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[index % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::compress;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    fn decoder(deflate: bool) -> Decoder {
        Decoder::new(DecoderConfig {
            max_message_size: 1024,
            deflate,
        })
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
        decoder.feed(bytes);
        let mut events = Vec::new();
        while let Some(event) = decoder.next_event()? {
            events.push(event);
        }
        Ok(events)
    }

    fn text(data: &str) -> Event {
        Event::Message {
            kind: MessageKind::Text,
            data: Bytes::copy_from_slice(data.as_bytes()),
        }
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode_all(&mut decoder(false), &bytes),
            Ok(vec![text("Hello")])
        );
    }

    #[test]
    fn byte_by_byte_and_fragments_with_interleaved_ping() {
        let mut bytes = frame(0x01, b"Hel");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x00, b"lo "));
        bytes.extend(frame(0x80, "wörld".as_bytes()));
        bytes.extend(frame(0x82, &[0, 255]));
        let mut decoder = decoder(false);
        let mut events = Vec::new();
        for byte in &bytes {
            events.extend(decode_all(&mut decoder, &[*byte]).unwrap());
        }
        assert_eq!(
            events,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                text("Hello wörld"),
                Event::Message {
                    kind: MessageKind::Binary,
                    data: Bytes::from_static(&[0, 255])
                },
            ]
        );
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn lengths_16_and_64_bit() {
        let mut decoder = Decoder::new(DecoderConfig {
            max_message_size: 100_000,
            deflate: false,
        });
        for size in [126, 65_535, 65_536, 99_999] {
            let payload = vec![b'x'; size];
            let events = decode_all(&mut decoder, &frame(0x82, &payload)).unwrap();
            assert_eq!(events.len(), 1, "size {size}");
        }
    }

    #[test]
    fn close_frames() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        assert_eq!(
            decode_all(&mut decoder(false), &frame(0x88, &payload)),
            Ok(vec![Event::Close {
                code: Some(1000),
                reason: "bye".into()
            }])
        );
        assert_eq!(
            decode_all(&mut decoder(false), &frame(0x88, b"")),
            Ok(vec![Event::Close {
                code: None,
                reason: String::new()
            }])
        );
        let check_error = |bytes: Vec<u8>, expected: DecodeError| {
            assert_eq!(decode_all(&mut decoder(false), &bytes), Err(expected));
        };
        check_error(frame(0x88, &[3]), DecodeError::BadClose);
        check_error(frame(0x88, &1005u16.to_be_bytes()), DecodeError::BadClose);
        check_error(frame(0x88, &[0x03, 0xE8, 0xFF]), DecodeError::InvalidUtf8);
    }

    #[test]
    fn violations() {
        let check = |bytes: Vec<u8>, expected: DecodeError, code: u16| {
            let result = decode_all(&mut decoder(false), &bytes);
            assert_eq!(result, Err(expected.clone()));
            assert_eq!(expected.close_code(), code);
        };
        check(vec![0x81, 0x02, b'h', b'i'], DecodeError::Unmasked, 1002);
        check(frame(0x91, b"x"), DecodeError::ReservedBits, 1002);
        check(frame(0xC1, b"x"), DecodeError::ReservedBits, 1002);
        check(frame(0x83, b"x"), DecodeError::UnknownOpcode(3), 1002);
        check(frame(0x09, b"x"), DecodeError::BadControlFrame, 1002);
        check(frame(0x89, &[0; 126]), DecodeError::BadControlFrame, 1002);
        check(frame(0x80, b"x"), DecodeError::UnexpectedContinuation, 1002);
        let mut two_starts = frame(0x01, b"a");
        two_starts.extend(frame(0x81, b"b"));
        check(two_starts, DecodeError::ExpectedContinuation, 1002);
        check(frame(0x81, &[0xC3, 0x28]), DecodeError::InvalidUtf8, 1007);
        check(
            frame(0x82, &[0; 1025]),
            DecodeError::TooBig { limit: 1024 },
            1009,
        );
        let mut fragmented_too_big = frame(0x02, &[0; 1000]);
        fragmented_too_big.extend(frame(0x80, &[0; 25]));
        check(
            fragmented_too_big,
            DecodeError::TooBig { limit: 1024 },
            1009,
        );
    }

    #[test]
    fn too_big_is_refused_before_the_payload_arrives() {
        let mut decoder = decoder(false);
        let header = &frame(0x82, &[0; 70_000])[..14];
        assert_eq!(
            decode_all(&mut decoder, header),
            Err(DecodeError::TooBig { limit: 1024 })
        );
    }

    #[test]
    fn compressed_messages() {
        let compressed = compress(b"hello hello hello");
        assert_eq!(
            decode_all(&mut decoder(true), &frame(0xC1, &compressed)),
            Ok(vec![text("hello hello hello")])
        );
        // Compressed across fragments: RSV1 on the first frame only.
        let mut bytes = frame(0x41, &compressed[..3]);
        bytes.extend(frame(0x80, &compressed[3..]));
        assert_eq!(
            decode_all(&mut decoder(true), &bytes),
            Ok(vec![text("hello hello hello")])
        );
        let bomb = compress(&[b'a'; 5000]);
        assert_eq!(
            decode_all(&mut decoder(true), &frame(0xC1, &bomb)),
            Err(DecodeError::TooBig { limit: 1024 })
        );
        assert_eq!(
            decode_all(&mut decoder(true), &frame(0xC2, &[0xFF; 8])),
            Err(DecodeError::CorruptCompression)
        );
    }
}
