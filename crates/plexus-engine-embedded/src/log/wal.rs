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
//!
//! Where the file system supports it, records are written with `O_DIRECT`, straight from
//! the writer's buffer to the disk: the page cache would only add a copy and the work of
//! writing it back, and the file is never read while the log is open. Direct writes cover
//! whole 4 KiB blocks, so each one rewrites the tail's partial block: the bytes before the
//! tail as they are (the writer keeps a copy), the record, and zeros to the block's end.
//! A torn write of that block leaves its earlier bytes as they were either way, since
//! they are written unchanged. Where `O_DIRECT` is refused (tmpfs, some FUSE file
//! systems), the file is written through the page cache; the format is the same.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

/// Name of the write-ahead file inside the log directory.
pub const WAL_FILE_NAME: &str = "history.wal";

const HEADER: usize = 24;
/// The file is extended this much at a time, with zeros, ahead of the tail.
const CHUNK: u64 = 1 << 20;
/// Direct writes start and end on multiples of this, from a buffer aligned to it.
const BLOCK: usize = 4096;
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
    Create { channel: Arc<str>, epoch: Arc<str> },
    /// An entry was appended at `offset` (the stream is created first if it is unknown).
    Append {
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        time_ms: u64,
        max_len: u64,
        ttl_ms: u64,
        data: Bytes,
    },
    /// Every entry up to `top` was removed; the stream and its offsets stay.
    Remove {
        channel: Arc<str>,
        epoch: Arc<str>,
        top: u64,
    },
}

impl Op {
    pub(super) fn channel(&self) -> &Arc<str> {
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
    fn string(body: &mut &[u8]) -> Option<Arc<str>> {
        std::str::from_utf8(bytes(body)?).ok().map(Arc::from)
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
    path: PathBuf,
    /// Whether `file` was opened with `O_DIRECT`.
    direct: bool,
    generation: u64,
    sequence: u64,
    tail: u64,
    /// Bytes of the file known to exist (written, zeros or records).
    allocated: u64,
    /// The record being written.
    buf: Vec<u8>,
    /// Direct mode: the file's bytes from the start of the tail's block to the tail.
    tail_block: Vec<u8>,
    /// Direct mode: where whole blocks are put together for writing.
    aligned: AlignedBuf,
}

/// Memory whose usable part starts at a [`BLOCK`]-aligned address, as `O_DIRECT` needs.
#[derive(Default)]
struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    /// Held on to between writes up to this size; a bigger one is freed after its write.
    const KEEP: usize = 4 << 20;

    /// Frees the memory if it grew past [`AlignedBuf::KEEP`] for an unusually big record.
    fn trim(&mut self) {
        if self.raw.len() > Self::KEEP {
            self.raw = Vec::new();
        }
    }

    /// `len` zero bytes starting at an aligned address.
    fn zeroed(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + BLOCK {
            self.raw.resize(len + BLOCK, 0);
        }
        let address = self.raw.as_ptr() as usize;
        let start = (BLOCK - address % BLOCK) % BLOCK;
        let out = &mut self.raw[start..start + len];
        out.fill(0);
        out
    }
}

/// `n` rounded down to a multiple of [`BLOCK`].
fn block_start(n: u64) -> u64 {
    n - n % BLOCK as u64
}

/// Direct mode: writes `bytes` at `tail` as whole blocks, from the start of the tail's block
/// (whose bytes before the tail are `before`) to the end of the last block `bytes` touches,
/// zeros after them.
fn write_tail_blocks(
    file: &File,
    aligned: &mut AlignedBuf,
    tail: u64,
    before: &[u8],
    bytes: &[u8],
) -> io::Result<()> {
    let head = before.len();
    let blocks = aligned.zeroed((head + bytes.len()).next_multiple_of(BLOCK));
    blocks[..head].copy_from_slice(before);
    blocks[head..head + bytes.len()].copy_from_slice(bytes);
    file.write_all_at(blocks, block_start(tail))
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
        let mut wal = Wal {
            file,
            path: path.to_owned(),
            direct: false,
            generation,
            sequence: 0,
            tail: 0,
            allocated,
            buf: Vec::new(),
            tail_block: Vec::new(),
            aligned: AlignedBuf::default(),
        };
        // Direct writes start at block boundaries: the file's end must be one (it always is
        // when this module wrote it, as it grows by whole chunks).
        if allocated % BLOCK as u64 == 0 {
            if let Ok(direct) = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                wal.file = direct;
                wal.direct = true;
            }
        }
        Ok((wal, records))
    }

    /// Starts writing records of `generation` from offset 0 (after a checkpoint stored it).
    pub(super) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.sequence = 0;
        self.tail = 0;
        self.tail_block.clear();
    }

    /// Whether records are written with `O_DIRECT`.
    pub(super) fn is_direct(&self) -> bool {
        self.direct
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
        let mut written = self.write_at_tail(end + HEADER as u64);
        if let Err(err) = &written {
            if self.direct && err.raw_os_error() == Some(libc::EINVAL) {
                // The file system took the O_DIRECT open but not the write.
                self.stop_direct(err)?;
                written = self.write_at_tail(end + HEADER as u64);
            }
        }
        self.aligned.trim();
        written?;
        self.file.sync_data()?;
        if self.direct {
            // Keep what is now before the tail in its block.
            let new_start = block_start(end);
            if new_start > block_start(self.tail) {
                self.tail_block.clear();
                let from = (new_start - self.tail) as usize;
                self.tail_block.extend_from_slice(&self.buf[from..]);
            } else {
                self.tail_block.extend_from_slice(&self.buf);
            }
        }
        self.tail = end;
        self.sequence += 1;
        Ok(())
    }

    /// Writes the record in `buf` at the tail (not yet durable), with the file at least
    /// `needed` bytes long.
    fn write_at_tail(&mut self, needed: u64) -> io::Result<()> {
        self.extend_to(needed)?;
        if !self.direct {
            return self.file.write_all_at(&self.buf, self.tail);
        }
        write_tail_blocks(
            &self.file,
            &mut self.aligned,
            self.tail,
            &self.tail_block,
            &self.buf,
        )
    }

    /// Goes on through the page cache after a direct write was refused.
    fn stop_direct(&mut self, err: &io::Error) -> io::Result<()> {
        tracing::warn!(%err, "history log: O_DIRECT write refused; writing through the page cache");
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.direct = false;
        self.tail_block.clear();
        Ok(())
    }

    /// Zeroes the header at the tail and makes that durable, so that a record whose write
    /// failed (and may have reached the disk anyway) is never replayed.
    pub(super) fn clear_tail(&mut self) -> io::Result<()> {
        if self.direct {
            // The header may cross into the next block: zero both.
            write_tail_blocks(
                &self.file,
                &mut self.aligned,
                self.tail,
                &self.tail_block,
                &[0u8; HEADER],
            )?;
        } else {
            self.file.write_all_at(&[0u8; HEADER], self.tail)?;
        }
        self.file.sync_data()
    }

    fn extend_to(&mut self, needed: u64) -> io::Result<()> {
        if needed <= self.allocated {
            return Ok(());
        }
        let target = needed.div_ceil(CHUNK) * CHUNK;
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(CHUNK) as usize;
            let zeros = self.aligned.zeroed(n);
            self.file.write_all_at(zeros, at)?;
            at += n as u64;
        }
        self.allocated = target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(channel: &str, offset: u64, data: &[u8]) -> Op {
        Op::Append {
            channel: channel.into(),
            epoch: "e".into(),
            offset,
            time_ms: 7,
            max_len: 10,
            ttl_ms: 1000,
            data: Bytes::copy_from_slice(data),
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
        let (tail, sequence, block) = (wal.tail, wal.sequence, wal.tail_block.clone());
        // A record that reached the disk although its append reported an error: the
        // writer's position stays where it was, and the writer clears it.
        wal.append(&[append("a", 2, b"failed")]).unwrap();
        wal.tail = tail;
        wal.sequence = sequence;
        wal.tail_block = block;
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

    /// Records of many sizes, so that they start and end anywhere in a block and some
    /// span several blocks, before and after a restart.
    fn records_of_many_sizes(path: &Path) -> (Wal, Vec<Vec<Op>>) {
        let (mut wal, _) = Wal::open(path, 0).unwrap();
        wal.restart(7);
        let mut written = Vec::new();
        for offset in 1..=120u64 {
            let len = (offset as usize * 577) % 9000;
            let record = vec![append("sizes", offset, &vec![offset as u8; len])];
            wal.append(&record).unwrap();
            written.push(record);
        }
        (wal, written)
    }

    #[test]
    fn a_cleared_tail_at_a_block_end_is_not_replayed() {
        // A record "a" with `len` data bytes takes 71 + len bytes: the kept one ends (and
        // the failed one starts) at `end`, where the failed one's header may cross into the
        // next block; the failed one is small or spans several blocks.
        for end in [4095usize, 4090, 4072, 100] {
            // 465: a body of 512 bytes, whose length starts with a zero byte.
            for failed_len in [10usize, 465, 9000] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join(WAL_FILE_NAME);
                let (mut wal, _) = Wal::open(&path, 0).unwrap();
                let kept = vec![append("a", 1, &vec![1u8; end - 71])];
                wal.append(&kept).unwrap();
                assert_eq!(wal.len(), end as u64);
                let (tail, sequence, block) = (wal.tail, wal.sequence, wal.tail_block.clone());
                // On disk, although reported failed (say its fdatasync failed).
                let failed = vec![append("a", 2, &vec![2u8; failed_len])];
                wal.append(&failed).unwrap();
                wal.tail = tail;
                wal.sequence = sequence;
                wal.tail_block = block;
                wal.clear_tail().unwrap();
                drop(wal);
                let (_, records) = Wal::open(&path, 0).unwrap();
                assert_eq!(
                    records,
                    vec![kept],
                    "end {end}, failed record of {failed_len}"
                );
            }
        }
    }

    #[test]
    fn records_that_straddle_blocks_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let (mut wal, written) = records_of_many_sizes(&path);
        // Where the file system takes O_DIRECT, the log uses it.
        let probe = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("probe"));
        assert_eq!(wal.is_direct(), probe.is_ok());
        drop(wal);
        let (_, records) = Wal::open(&path, 7).unwrap();
        assert_eq!(records, written);

        // A new generation from offset 0 over the old one, ending inside a block that
        // still holds the old generation's bytes after it.
        let (reopened, _) = Wal::open(&path, 7).unwrap();
        wal = reopened;
        wal.restart(8);
        let fresh = vec![append("b", 1, b"fresh")];
        wal.append(&fresh).unwrap();
        drop(wal);
        let (_, records) = Wal::open(&path, 8).unwrap();
        assert_eq!(records, vec![fresh]);
    }

    #[test]
    fn switching_to_the_page_cache_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let (mut wal, mut written) = records_of_many_sizes(&path);
        // What the writer does when a direct write is refused with EINVAL.
        wal.stop_direct(&io::Error::from_raw_os_error(libc::EINVAL))
            .unwrap();
        assert!(!wal.is_direct());
        for offset in 121..=130 {
            let record = vec![append("sizes", offset, b"through the page cache")];
            wal.append(&record).unwrap();
            written.push(record);
        }
        drop(wal);
        let (_, records) = Wal::open(&path, 7).unwrap();
        assert_eq!(records, written);
    }

    #[test]
    fn records_on_tmpfs_come_back() {
        // tmpfs refuses O_DIRECT before Linux 6.6, and takes it since.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            println!("skipped: no /dev/shm here");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let (wal, written) = records_of_many_sizes(&path);
        drop(wal);
        let (wal, records) = Wal::open(&path, 7).unwrap();
        assert_eq!(records, written);
        println!("O_DIRECT on /dev/shm: {}", wal.is_direct());
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
