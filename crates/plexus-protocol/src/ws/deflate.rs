//! permessage-deflate (RFC 7692) payload transforms.
//!
//! Plexus negotiates `server_no_context_takeover` and `client_no_context_takeover`, so every
//! message is compressed on its own. That costs a little ratio and buys two things: a broadcast
//! is compressed once and the same bytes go to every subscriber, and no connection keeps a
//! compressor's window (tens of KiB) alive between messages. The (de)compressor state itself
//! is kept per thread and reset before each message.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The four bytes a sync flush ends with; removed on send, restored on receive (RFC 7692 §7.2).
const SYNC_TRAILER: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

thread_local! {
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static DECOMPRESSOR: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("decompressed message is larger than {limit} bytes")]
    TooBig { limit: usize },
    #[error("compressed message is corrupt")]
    Corrupt,
}

/// Deflates one message payload, ready to send in a frame with RSV1 set.
pub fn compress(payload: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        compressor.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            let before = compressor.total_in();
            compressor
                .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .expect("deflate with a sync flush cannot fail on valid state");
            consumed += (compressor.total_in() - before) as usize;
            // The flush is complete once all input is in and the output was not filled up.
            if consumed == payload.len() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&SYNC_TRAILER) {
            out.truncate(out.len() - SYNC_TRAILER.len());
        }
        out
    })
}

/// Inflates one message payload, refusing to produce more than `limit` bytes.
pub fn decompress(payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESSOR.with(|decompressor| {
        let mut decompressor = decompressor.borrow_mut();
        decompressor.reset(false);
        // Never more than one byte past the limit (that byte proves the limit was passed).
        let cap = limit.saturating_add(1);
        let mut out: Vec<u8> = Vec::with_capacity(payload.len().saturating_mul(3).max(64).min(cap));
        for input in [payload, &SYNC_TRAILER[..]] {
            let mut consumed = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(InflateError::TooBig { limit });
                    }
                    let room = (cap - out.len()).min(out.capacity().max(64));
                    out.reserve_exact(room.max(1));
                }
                let (in_before, out_before) = (decompressor.total_in(), decompressor.total_out());
                let status = decompressor
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                consumed += (decompressor.total_in() - in_before) as usize;
                if out.len() > limit {
                    return Err(InflateError::TooBig { limit });
                }
                if status == Status::StreamEnd {
                    return Ok(out);
                }
                let progressed =
                    decompressor.total_in() != in_before || decompressor.total_out() != out_before;
                if consumed == input.len() && out.len() < out.capacity() {
                    break;
                }
                if !progressed && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for payload in [
            &b""[..],
            b"hello",
            &b"abcabcabc".repeat(1000),
            &(0..=255u8).cycle().take(100_000).collect::<Vec<_>>(),
        ] {
            let compressed = compress(payload);
            assert!(!compressed.ends_with(&SYNC_TRAILER));
            assert_eq!(decompress(&compressed, 1 << 20).unwrap(), payload);
        }
        assert!(compress(&b"a".repeat(10_000)).len() < 200);
    }

    #[test]
    fn limits_and_garbage() {
        let bomb = compress(&vec![0u8; 1_000_000]);
        assert_eq!(
            decompress(&bomb, 65_536),
            Err(InflateError::TooBig { limit: 65_536 })
        );
        assert_eq!(
            decompress(&[0xFF, 0xFF, 0xFF, 0xFF], 1024),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn tiny_and_huge_limits() {
        let compressed = compress(b"hi");
        assert_eq!(decompress(&compressed, 2).unwrap(), b"hi");
        assert_eq!(
            decompress(&compressed, 1),
            Err(InflateError::TooBig { limit: 1 })
        );
        assert_eq!(decompress(&compressed, usize::MAX).unwrap(), b"hi");
    }

    #[test]
    fn rfc7692_example() {
        // "Hello" compressed, from RFC 7692 §7.2.3.1.
        let payload = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(decompress(&payload, 100).unwrap(), b"Hello");
    }
}
