//! Client-side WebSocket framing (RFC 6455 §5) for the lean fan-out readers: server→client
//! frames parsed where they were read (unmasked; text, binary, ping, pong, close; fragmented
//! messages; 7-, 16- and 64-bit lengths), and masked client→server frames.
//!
//! `plexus_protocol::ws::Decoder` is the server's side of the same format: it requires masked
//! frames and copies every payload into an allocation of its own, which is what a server wants
//! and what a reader of thousands of sockets on one core does not. No extension is negotiated
//! here, so reserved bits are an error. Nothing here panics on what a server sends: a bad frame
//! is a [`FrameError`], which ends that one client.

use std::hash::{BuildHasher, Hasher};

/// The largest message accepted, reassembled: well past `--size` (and a native push batch).
pub const MAX_MESSAGE: usize = 16 << 20;

const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// One complete thing the server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// A WebSocket ping: answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    Pong,
    /// The server closes: its code (1005 when the frame has none) and reason.
    Close(u16, String),
}

/// A frame the parser refuses: the end of that client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("server frames must not be masked")]
    Masked,
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
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooBig,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame with a one-byte payload or a reason that is not UTF-8")]
    BadClose,
}

/// A data message whose later fragments have not all arrived.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// The parsing state of one connection: normally empty, so thousands of idle clients cost
/// nothing here; bytes are kept only for a frame cut by the end of a read.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// The start of a frame whose end has not been read yet.
    pending: Vec<u8>,
    partial: Option<Partial>,
}

impl FrameReader {
    /// Parses `input`, the bytes just read, after whatever an earlier read left incomplete, and
    /// hands each complete frame to `on_frame` in order. After an error the reader must not be
    /// fed again (the connection is finished).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_frame: impl FnMut(Frame<'_>),
    ) -> Result<(), FrameError> {
        if self.pending.is_empty() {
            // The usual case: whole frames straight from the read buffer, nothing copied.
            let used = parse(&mut self.partial, input, &mut on_frame)?;
            self.pending.extend_from_slice(&input[used..]);
        } else {
            self.pending.extend_from_slice(input);
            let pending = std::mem::take(&mut self.pending);
            let used = parse(&mut self.partial, &pending, &mut on_frame)?;
            self.pending = pending;
            self.pending.drain(..used);
            if self.pending.is_empty() {
                // Give a large frame's buffer back.
                self.pending = Vec::new();
            }
        }
        Ok(())
    }
}

/// A frame's header: what follows it, and how long it is.
struct Header {
    fin: bool,
    opcode: u8,
    /// Header bytes, the extended length included.
    len: usize,
    payload_len: usize,
}

/// Reads a header at the start of `bytes`: `Ok(None)` while incomplete.
fn header(bytes: &[u8], partial: Option<&Partial>) -> Result<Option<Header>, FrameError> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    let fin = first & 0x80 != 0;
    if first & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = first & 0x0F;
    if second & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (payload_len, len) = match second & 0x7F {
        126 => match bytes.get(2..4) {
            Some(&[high, low]) => (u64::from(u16::from_be_bytes([high, low])), 4),
            _ => return Ok(None),
        },
        127 => match bytes
            .get(2..10)
            .and_then(|slice| <[u8; 8]>::try_from(slice).ok())
        {
            Some(length) => (u64::from_be_bytes(length), 10),
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    match opcode {
        CLOSE | PING | PONG if !fin || payload_len > 125 => {
            return Err(FrameError::BadControlFrame)
        }
        CLOSE | PING | PONG => {}
        TEXT | BINARY if partial.is_some() => return Err(FrameError::ExpectedContinuation),
        CONTINUATION if partial.is_none() => return Err(FrameError::UnexpectedContinuation),
        TEXT | BINARY | CONTINUATION => {
            let so_far = partial.map_or(0, |partial| partial.data.len()) as u64;
            if so_far.saturating_add(payload_len) > MAX_MESSAGE as u64 {
                return Err(FrameError::TooBig);
            }
        }
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    Ok(Some(Header {
        fin,
        opcode,
        len,
        // At most MAX_MESSAGE (data) or 125 (control), checked above.
        payload_len: payload_len as usize,
    }))
}

/// Parses the complete frames at the start of `input`; returns how many bytes they took.
fn parse(
    partial: &mut Option<Partial>,
    input: &[u8],
    on_frame: &mut impl FnMut(Frame<'_>),
) -> Result<usize, FrameError> {
    let mut at = 0;
    loop {
        let rest = &input[at..];
        let Some(header) = header(rest, partial.as_ref())? else {
            return Ok(at);
        };
        let Some(payload) = rest.get(header.len..header.len + header.payload_len) else {
            return Ok(at);
        };
        at += header.len + header.payload_len;
        match header.opcode {
            PING => on_frame(Frame::Ping(payload)),
            PONG => on_frame(Frame::Pong),
            CLOSE => on_frame(close_frame(payload)?),
            CONTINUATION => {
                let Some(message) = partial.as_mut() else {
                    return Err(FrameError::UnexpectedContinuation);
                };
                message.data.extend_from_slice(payload);
                if header.fin {
                    if let Some(message) = partial.take() {
                        deliver(message.text, &message.data, on_frame)?;
                    }
                }
            }
            opcode if header.fin => deliver(opcode == TEXT, payload, on_frame)?,
            opcode => {
                *partial = Some(Partial {
                    text: opcode == TEXT,
                    data: payload.to_vec(),
                })
            }
        }
    }
}

fn deliver(
    text: bool,
    data: &[u8],
    on_frame: &mut impl FnMut(Frame<'_>),
) -> Result<(), FrameError> {
    if text {
        let text = std::str::from_utf8(data).map_err(|_| FrameError::InvalidUtf8)?;
        on_frame(Frame::Text(text));
    } else {
        on_frame(Frame::Binary(data));
    }
    Ok(())
}

fn close_frame(payload: &[u8]) -> Result<Frame<'static>, FrameError> {
    match payload {
        [] => Ok(Frame::Close(1005, String::new())),
        [high, low, reason @ ..] => {
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::BadClose)?;
            Ok(Frame::Close(
                u16::from_be_bytes([*high, *low]),
                reason.to_owned(),
            ))
        }
        [_] => Err(FrameError::BadClose),
    }
}

/// Appends one final, masked client frame to `out`.
pub fn push_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    plexus_protocol::ws::push_client_frame(out, 0x80 | opcode, payload, mask_key());
}

/// A masked close frame with `code` and no reason.
pub fn push_close(out: &mut Vec<u8>, code: u16) {
    push_masked(out, CLOSE, &code.to_be_bytes());
}

/// A masked text frame.
pub fn push_text(out: &mut Vec<u8>, text: &str) {
    push_masked(out, TEXT, text.as_bytes());
}

/// A fresh masking key (RFC 6455 wants it unpredictable; `RandomState` is seeded randomly).
fn mask_key() -> [u8; 4] {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    (hasher.finish() as u32).to_ne_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            len @ 0..=125 => out.push(len as u8),
            len @ 126..=0xFFFF => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(u16, String),
    }

    /// Feeds `chunks` one read at a time; what came out, and the first error.
    fn run(chunks: &[&[u8]]) -> (Vec<Seen>, Option<FrameError>) {
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        for chunk in chunks {
            let result = reader.feed(chunk, |frame| {
                seen.push(match frame {
                    Frame::Text(text) => Seen::Text(text.to_owned()),
                    Frame::Binary(data) => Seen::Binary(data.to_vec()),
                    Frame::Ping(data) => Seen::Ping(data.to_vec()),
                    Frame::Pong => Seen::Pong,
                    Frame::Close(code, reason) => Seen::Close(code, reason),
                })
            });
            if let Err(error) = result {
                return (seen, Some(error));
            }
        }
        (seen, None)
    }

    fn text(text: &str) -> Seen {
        Seen::Text(text.to_owned())
    }

    #[test]
    fn whole_frames_in_one_read() {
        let mut bytes = frame(0x81, b"one");
        bytes.extend(frame(0x82, &[1, 2]));
        bytes.extend(frame(0x81, b""));
        assert_eq!(
            run(&[&bytes]),
            (vec![text("one"), Seen::Binary(vec![1, 2]), text("")], None)
        );
    }

    #[test]
    fn frames_split_across_reads_at_every_byte() {
        let mut bytes = frame(0x81, &[b'a'; 300]); // a 16-bit length
        bytes.extend(frame(0x89, b"hb"));
        bytes.extend(frame(0x81, b"two"));
        for cut in 0..bytes.len() {
            let (first, second) = bytes.split_at(cut);
            let (seen, error) = run(&[first, second]);
            assert_eq!(error, None, "cut at {cut}");
            assert_eq!(
                seen,
                [
                    text(&"a".repeat(300)),
                    Seen::Ping(b"hb".to_vec()),
                    text("two")
                ],
                "cut at {cut}"
            );
        }
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&one_by_one).0.len(), 3);
    }

    #[test]
    fn a_64_bit_length() {
        let payload = vec![b'z'; 70_000];
        let bytes = frame(0x81, &payload);
        assert_eq!(bytes[1], 127);
        let (first, second) = bytes.split_at(5);
        assert_eq!(
            run(&[first, second]),
            (vec![text(std::str::from_utf8(&payload).unwrap())], None)
        );
    }

    #[test]
    fn fragments_with_a_ping_in_the_middle() {
        let mut bytes = frame(0x01, b"hel"); // text, not final
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x00, b"lo ")); // continuation
        bytes.extend(frame(0x80, "wörld".as_bytes())); // final continuation
        bytes.extend(frame(0x8A, b""));
        for cut in 0..bytes.len() {
            let (first, second) = bytes.split_at(cut);
            assert_eq!(
                run(&[first, second]),
                (
                    vec![Seen::Ping(b"p".to_vec()), text("hello wörld"), Seen::Pong],
                    None
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn close_frames() {
        let mut payload = 3008u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"slow");
        assert_eq!(
            run(&[&frame(0x88, &payload)]),
            (vec![Seen::Close(3008, "slow".into())], None)
        );
        assert_eq!(
            run(&[&frame(0x88, b"")]),
            (vec![Seen::Close(1005, String::new())], None)
        );
        assert_eq!(
            run(&[&frame(0x88, b"x")]),
            (vec![], Some(FrameError::BadClose))
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        let check = |bytes: Vec<u8>, expected: FrameError| {
            assert_eq!(run(&[&bytes]).1, Some(expected), "{bytes:?}");
        };
        check(vec![0x81, 0x81, 1, 2, 3, 4, b'x'], FrameError::Masked);
        check(frame(0xC1, b"x"), FrameError::ReservedBits);
        check(frame(0x83, b"x"), FrameError::UnknownOpcode(3));
        check(frame(0x09, b"x"), FrameError::BadControlFrame);
        check(frame(0x89, &[0; 126]), FrameError::BadControlFrame);
        check(frame(0x80, b"x"), FrameError::UnexpectedContinuation);
        let mut twice = frame(0x01, b"a");
        twice.extend(frame(0x81, b"b"));
        check(twice, FrameError::ExpectedContinuation);
        check(frame(0x81, &[0xFF, 0xFE]), FrameError::InvalidUtf8);
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        check(huge, FrameError::TooBig);
    }

    #[test]
    fn masked_frames_unmask_to_the_payload() {
        for len in [0, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            push_masked(&mut out, TEXT, &payload);
            let (header_len, mask_at) = match len {
                0..=125 => (6, 2),
                126..=0xFFFF => (8, 4),
                _ => (14, 10),
            };
            assert_eq!(out[0], 0x81);
            assert_ne!(out[1] & 0x80, 0, "the mask bit");
            assert_eq!(out.len(), header_len + len);
            let mask = &out[mask_at..mask_at + 4];
            let unmasked: Vec<u8> = out[header_len..]
                .iter()
                .zip(mask.iter().cycle())
                .map(|(byte, mask)| byte ^ mask)
                .collect();
            assert_eq!(unmasked, payload);
        }
    }
}
