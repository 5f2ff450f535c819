//! The write-ahead file, `history.wal`: what makes a batch durable.
//!
//! A batch is one *record*, written at the file's tail and made durable with one
//! `fdatasync`. A record is a 24-byte header followed by its body:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | body length (little endian) |
//! | 4 | CRC-32 of the generation, the sequence number and the body |
//! | 8 | generation: the checkpoint this record follows |
//! | 8 | sequence number within the generation, from 0 |
//!
//! The body is a list of [`Op`]s. A checkpoint (see `snapshot`) stores the generation the
//! file starts over with, and the writer then overwrites the file from offset 0. Recovery
//! reads records from offset 0 while each one is whole (its CRC matches), belongs to the
//! stored generation and carries the next sequence number; the first record that fails
//! any of these ends the log. A record torn by a crash, or left from an older generation,
//! is therefore never replayed, and a record is only acknowledged after the `fdatasync`
//! that follows it, so every acknowledged record is in the replayed prefix.
//!
//! The file grows in zero-filled chunks written ahead of the tail, and is reused from the
//! start after each checkpoint, so most `fdatasync`s only write the record's own blocks:
//! the file's size and block map do not change under them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

/// Name of the write-ahead file inside the log directory.
pub const WAL_FILE_NAME: &str = "history.wal";

const HEADER: usize = 24;
/// The file is extended this much at a time, with zeros, ahead of the tail.
const CHUNK: u64 = 1 << 20;
/// The largest record body recovery accepts (a batch of 1,024 appends of 1 MiB each fits).
const MAX_BODY: usize = 1 << 31;

const OP_CREATE: u8 = 1;
const OP_APPEND: u8 = 2;
const OP_REMOVE: u8 = 3;

/// One change to the streams. Applying a record's ops in order, to the state of the
/// checkpoint it follows, gives the state after the record (see `streams::apply`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// A stream was created with this epoch (by a read or `top` of an unknown channel).
    Create { channel: String, epoch: String },
    /// An entry was appended at `offset` (the stream is created first if it is unknown).
    Append {
        channel: String,
        epoch: String,
        offset: u64,
        time_ms: u64,
        max_len: u64,
        ttl_ms: u64,
        data: Bytes,
    },
    /// Every entry up to `top` was removed; the stream and its offsets stay.
    Remove {
        channel: String,
        epoch: String,
        top: u64,
    },
}

impl Op {
    pub(super) fn channel(&self) -> &str {
        match self {
            Op::Create { channel, .. }
            | Op::Append { channel, .. }
            | Op::Remove { channel, .. } => channel,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Create { channel, epoch } => {
                out.push(OP_CREATE);
                put_str(out, channel);
                put_str(out, epoch);
            }
            Op::Append {
                channel,
                epoch,
                offset,
                time_ms,
                max_len,
                ttl_ms,
                data,
            } => {
                out.push(OP_APPEND);
                put_str(out, channel);
                put_str(out, epoch);
                for n in [*offset, *time_ms, *max_len, *ttl_ms] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                put_bytes(out, data);
            }
            Op::Remove {
                channel,
                epoch,
                top,
            } => {
                out.push(OP_REMOVE);
                put_str(out, channel);
                put_str(out, epoch);
                out.extend_from_slice(&top.to_le_bytes());
            }
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Bodies are bounded by MAX_BODY, so every length fits in a u32.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_bytes(out, text.as_bytes());
}

/// Reads a body back; `None` if it is malformed in any way.
fn decode_body(mut body: &[u8]) -> Option<Vec<Op>> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if body.len() < n {
            return None;
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Some(head)
    }
    fn u64_(body: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(body, 8)?.try_into().ok()?))
    }
    fn bytes<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(take(body, 4)?.try_into().ok()?) as usize;
        take(body, len)
    }
    fn string(body: &mut &[u8]) -> Option<String> {
        std::str::from_utf8(bytes(body)?).ok().map(str::to_owned)
    }
    let mut ops = Vec::new();
    while !body.is_empty() {
        let tag = take(&mut body, 1)?[0];
        let channel = string(&mut body)?;
        let epoch = string(&mut body)?;
        ops.push(match tag {
            OP_CREATE => Op::Create { channel, epoch },
            OP_APPEND => Op::Append {
                channel,
                epoch,
                offset: u64_(&mut body)?,
                time_ms: u64_(&mut body)?,
                max_len: u64_(&mut body)?,
                ttl_ms: u64_(&mut body)?,
                data: Bytes::copy_from_slice(bytes(&mut body)?),
            },
            OP_REMOVE => Op::Remove {
                channel,
                epoch,
                top: u64_(&mut body)?,
            },
            _ => return None,
        });
    }
    Some(ops)
}

fn checksum(generation: u64, sequence: u64, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.to_le_bytes());
    hasher.update(&sequence.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// The open write-ahead file and where the next record goes.
pub(super) struct Wal {
    file: File,
    generation: u64,
    sequence: u64,
    tail: u64,
    /// Bytes of the file known to exist (written, zeros or records).
    allocated: u64,
    buf: Vec<u8>,
}

impl Wal {
    /// Opens (or creates) the file and reads back the records of `generation`, in order.
    /// Writing then starts over at offset 0, so call [`Wal::restart`] with a new
    /// generation (after a checkpoint) before appending if any record was returned.
    pub(super) fn open(path: &Path, generation: u64) -> io::Result<(Wal, Vec<Vec<Op>>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let allocated = file.metadata()?.len();
        let mut records = Vec::new();
        let mut at = 0u64;
        let mut header = [0u8; HEADER];
        let mut body = Vec::new();
        while at + HEADER as u64 <= allocated {
            file.read_exact_at(&mut header, at)?;
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
            let gen = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            let seq = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
            let end = at + (HEADER + len) as u64;
            if len == 0
                || len > MAX_BODY
                || gen != generation
                || seq != records.len() as u64
                || end > allocated
            {
                break;
            }
            body.resize(len, 0);
            file.read_exact_at(&mut body, at + HEADER as u64)?;
            if checksum(gen, seq, &body) != crc {
                break;
            }
            let Some(ops) = decode_body(&body) else {
                break;
            };
            records.push(ops);
            at = end;
        }
        let wal = Wal {
            file,
            generation,
            sequence: 0,
            tail: 0,
            allocated,
            buf: Vec::new(),
        };
        Ok((wal, records))
    }

    /// Starts writing records of `generation` from offset 0 (after a checkpoint stored it).
    pub(super) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.sequence = 0;
        self.tail = 0;
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes written since the last restart.
    pub(super) fn len(&self) -> u64 {
        self.tail
    }

    /// Writes `ops` as one record and makes it durable. On error nothing counts as written:
    /// the next record goes to the same place.
    pub(super) fn append(&mut self, ops: &[Op]) -> io::Result<()> {
        self.buf.clear();
        self.buf.resize(HEADER, 0);
        for op in ops {
            op.encode(&mut self.buf);
        }
        let len = self.buf.len() - HEADER;
        if len > MAX_BODY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "history batch too large for one write-ahead record",
            ));
        }
        let crc = checksum(self.generation, self.sequence, &self.buf[HEADER..]);
        self.buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.buf[8..16].copy_from_slice(&self.generation.to_le_bytes());
        self.buf[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        let end = self.tail + self.buf.len() as u64;
        // Zeros follow the record where the file was never this long, so a scan stops
        // right after it; in a reused file an older generation's record follows, and the
        // generation check stops the scan there.
        self.extend_to(end + HEADER as u64)?;
        self.file.write_all_at(&self.buf, self.tail)?;
        self.file.sync_data()?;
        self.tail = end;
        self.sequence += 1;
        Ok(())
    }

    /// Zeroes the header at the tail and makes that durable, so that a record whose write
    /// failed (and may have reached the disk anyway) is never replayed.
    pub(super) fn clear_tail(&mut self) -> io::Result<()> {
        self.file.write_all_at(&[0u8; HEADER], self.tail)?;
        self.file.sync_data()
    }

    fn extend_to(&mut self, needed: u64) -> io::Result<()> {
        if needed <= self.allocated {
            return Ok(());
        }
        let target = needed.div_ceil(CHUNK) * CHUNK;
        let zeros = vec![0u8; CHUNK as usize];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(CHUNK) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.allocated = target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(channel: &str, offset: u64, data: &'static [u8]) -> Op {
        Op::Append {
            channel: channel.into(),
            epoch: "e".into(),
            offset,
            time_ms: 7,
            max_len: 10,
            ttl_ms: 1000,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn records_of_the_generation_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let (mut wal, records) = Wal::open(&path, 3).unwrap();
        assert!(records.is_empty());
        wal.restart(3);
        let first = vec![
            Op::Create {
                channel: "a".into(),
                epoch: "e".into(),
            },
            append("a", 1, b"one"),
        ];
        let second = vec![
            append("a", 2, b"two"),
            Op::Remove {
                channel: "a".into(),
                epoch: "e".into(),
                top: 2,
            },
        ];
        wal.append(&first).unwrap();
        wal.append(&second).unwrap();
        drop(wal);
        let (_, records) = Wal::open(&path, 3).unwrap();
        assert_eq!(records, vec![first, second]);
        // Another generation's records are not replayed.
        let (_, records) = Wal::open(&path, 4).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn a_torn_or_stale_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        for offset in 1..=3 {
            wal.append(&[append("a", offset, b"payload")]).unwrap();
        }
        let second_at = (wal.len() / 3) as usize;
        // After a checkpoint the next generation overwrites from the start: the old
        // generation's later records must not be taken for the new one's.
        wal.restart(1);
        wal.append(&[append("a", 4, b"payload")]).unwrap();
        drop(wal);
        let (_, records) = Wal::open(&path, 1).unwrap();
        assert_eq!(records, vec![vec![append("a", 4, b"payload")]]);

        // A flipped byte inside the second record of generation 0 ends the log there.
        let (mut wal, _) = Wal::open(&path, 5).unwrap();
        wal.restart(5);
        for offset in 1..=3 {
            wal.append(&[append("b", offset, b"payload")]).unwrap();
        }
        drop(wal);
        let mut raw = std::fs::read(&path).unwrap();
        raw[second_at + HEADER + 3] ^= 0xff;
        std::fs::write(&path, &raw).unwrap();
        let (_, records) = Wal::open(&path, 5).unwrap();
        assert_eq!(records, vec![vec![append("b", 1, b"payload")]]);
    }

    #[test]
    fn a_cleared_tail_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        wal.append(&[append("a", 1, b"kept")]).unwrap();
        let (tail, sequence) = (wal.tail, wal.sequence);
        // A record that reached the disk although its append reported an error: the
        // writer's position stays where it was, and the writer clears it.
        wal.append(&[append("a", 2, b"failed")]).unwrap();
        wal.tail = tail;
        wal.sequence = sequence;
        wal.clear_tail().unwrap();
        drop(wal);
        let (mut wal, records) = Wal::open(&path, 0).unwrap();
        assert_eq!(records, vec![vec![append("a", 1, b"kept")]]);
        // And the next record takes its place.
        wal.restart(0);
        wal.append(&[append("a", 1, b"kept")]).unwrap();
        wal.append(&[append("a", 2, b"next")]).unwrap();
        drop(wal);
        let (_, records) = Wal::open(&path, 0).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1], vec![append("a", 2, b"next")]);
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        let mut body = Vec::new();
        append("a", 1, b"x").encode(&mut body);
        assert!(decode_body(&body).is_some());
        assert!(decode_body(&body[..body.len() - 1]).is_none());
        let mut bad_tag = body.clone();
        bad_tag[0] = 9;
        assert!(decode_body(&bad_tag).is_none());
    }
}
