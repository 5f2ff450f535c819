use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub(crate) fn from_u8(byte: u8) -> Option<OpCode> {
        Some(match byte {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub(crate) fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Length of the header of an unmasked frame carrying `payload_len` bytes.
fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Encodes one complete, unmasked server frame (`FIN` set) in a single buffer.
///
/// `compressed` sets RSV1, the permessage-deflate marker; the payload must then already be
/// deflated. The result is immutable and cheap to clone, so a broadcast encodes once and writes
/// the same bytes to every subscriber.
pub fn encode_frame(opcode: OpCode, payload: &[u8], compressed: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    let rsv1 = if compressed { 0x40 } else { 0 };
    put_header(&mut out, 0x80 | rsv1 | opcode as u8, 0, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Appends one masked frame as a client sends it (RFC 6455 §5.3): `first` is its first byte
/// (FIN, RSV bits, opcode), `mask` the masking key. For clients and tests of the server.
pub fn push_client_frame(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: [u8; 4]) {
    put_header(out, first, 0x80, payload.len());
    out.extend_from_slice(&mask);
    out.extend(
        payload
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, mask)| byte ^ mask),
    );
}

/// The first byte, then the payload length (7, 16 or 64 bits) with the MASK bit `mask_bit`.
fn put_header(out: &mut impl BufMut, first: u8, mask_bit: u8, len: usize) {
    out.put_u8(first);
    match len {
        0..=125 => out.put_u8(mask_bit | len as u8),
        126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(len as u64);
        }
    }
}

/// Encodes a close frame with a code and a reason (cut to fit the 125-byte control payload
/// on a character boundary).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut reason_end = reason.len().min(123);
    while !reason.is_char_boundary(reason_end) {
        reason_end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + reason_end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..reason_end]);
    encode_frame(OpCode::Close, &payload, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_decode_as_the_server_reads_them() {
        use crate::ws::{Decoder, DecoderConfig, Event};
        let mut decoder = Decoder::new(DecoderConfig {
            max_message_size: 1 << 20,
            deflate: false,
        });
        let mut out = Vec::new();
        for len in [0, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            out.clear();
            push_client_frame(&mut out, 0x82, &payload, [1, 2, 3, 4]);
            assert_eq!(out[1] & 0x80, 0x80, "masked");
            decoder.feed(&out);
            match decoder.next_event().unwrap() {
                Some(Event::Message { data, .. }) => assert_eq!(&data[..], &payload[..]),
                other => panic!("{len}: {other:?}"),
            }
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(&encode_frame(OpCode::Text, b"hi", false)[..], b"\x81\x02hi");
        let medium = encode_frame(OpCode::Binary, &[7; 300], false);
        assert_eq!(&medium[..4], &[0x82, 126, 0x01, 0x2C]);
        assert_eq!(medium.len(), 304);
        let large = encode_frame(OpCode::Binary, &vec![0; 70_000], true);
        assert_eq!(&large[..2], &[0xC2, 127]);
        assert_eq!(u64::from_be_bytes(large[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let frame = encode_close(1001, &"é".repeat(100));
        assert_eq!(frame[1] as usize, frame.len() - 2);
        assert!(frame.len() - 2 <= 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
