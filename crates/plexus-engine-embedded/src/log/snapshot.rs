//! The checkpoint: the streams as of some write-ahead generation, in one
//! [redb](https://docs.rs/redb) file, `history.redb`.
//!
//! Three tables:
//!
//! * `stream_meta`: channel → epoch, top offset, time of the last append and the retention
//!   of the last append;
//! * `entries`: `(channel, offset)` → `(append time in ms since the Unix epoch, data)`;
//! * `log_state`: `"generation"` → the write-ahead generation that follows this checkpoint.
//!
//! A checkpoint writes, for each stream changed since the last one, its metadata, deletes
//! the entries it no longer retains and inserts the entries it gained, then the next
//! generation. The writer splits that into slices ([`Commit::Slice`], no `fsync`) and ends
//! with the one that stores the generation ([`Commit::Generation`], durable, which makes the
//! slices durable with it). So the file holds everything up to the start of the generation
//! it names, and that generation's records are what follows it. A crash before the last
//! slice rolls the file back to the previous checkpoint, whose records are all still in the
//! write-ahead file. The file may also hold part of the current generation: a stream stored
//! between checkpoints (`store_now`, when `on_commit` calls back into the log), or slices
//! made durable by such a store. Replaying those records is harmless, because replay skips
//! what a stream already has. Stream metadata is kept forever (a few dozen bytes per
//! channel), which is what keeps offsets from being reused and epochs stable for as long as
//! the data directory lives.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};

use super::streams::{expiry_cutoff, Stored, Stream, Streams};
use super::{storage, LogError};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("stream_meta");
const ENTRIES: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("entries");
const STATE: TableDefinition<&str, u64> = TableDefinition::new("log_state");
const GENERATION: &str = "generation";

/// Version tag of the encoded metadata record.
const META_VERSION: u8 = 1;
/// Bytes before the epoch in encoded metadata: version + four `u64`s.
const META_HEADER: usize = 1 + 4 * 8;

/// Creates the tables if they are missing, so readers can always open them.
pub(super) fn prepare(db: &Database, quick_repair: bool) -> Result<(), LogError> {
    let txn = begin(db, quick_repair)?;
    txn.open_table(META).map_err(storage)?;
    txn.open_table(ENTRIES).map_err(storage)?;
    txn.open_table(STATE).map_err(storage)?;
    txn.commit().map_err(storage)
}

/// What [`load`] found.
pub(super) struct Loaded {
    pub streams: Streams,
    /// The write-ahead generation that follows the checkpoint.
    pub generation: u64,
    /// Streams with entries that expired while the server was down: the next checkpoint
    /// deletes them from the file.
    pub expired: HashSet<Arc<str>>,
}

/// Every stream of the checkpoint, with the entries still retained at `now`.
pub(super) fn load(db: &Database, now: u64) -> Result<Loaded, LogError> {
    let txn = db.begin_read().map_err(storage)?;
    let generation = txn
        .open_table(STATE)
        .map_err(storage)?
        .get(GENERATION)
        .map_err(storage)?
        .map_or(0, |v| v.value());
    let metas = txn.open_table(META).map_err(storage)?;
    let entries = txn.open_table(ENTRIES).map_err(storage)?;
    let mut streams = HashMap::new();
    let mut expired = HashSet::new();
    for item in metas.iter().map_err(storage)? {
        let (key, value) = item.map_err(storage)?;
        let channel = key.value();
        let mut stream = decode_meta(value.value()).ok_or_else(|| LogError::Corrupt {
            channel: channel.to_owned(),
        })?;
        if stream.top > 0 {
            for item in entries
                .range((channel, 1u64)..=(channel, stream.top))
                .map_err(storage)?
            {
                let (key, value) = item.map_err(storage)?;
                let (time_ms, data) = value.value();
                stream.entries.push_back(Stored {
                    offset: key.value().1,
                    time_ms,
                    data: bytes::Bytes::copy_from_slice(data),
                });
            }
        }
        stream.saved_top = stream.top;
        // Only what the retention still allows; the next checkpoint deletes the rest.
        let cutoff = expiry_cutoff(now, stream.ttl_ms);
        let before = stream.entries.len();
        stream.entries.retain(|e| e.time_ms >= cutoff);
        let channel: Arc<str> = channel.into();
        if stream.entries.len() < before {
            expired.insert(channel.clone());
        }
        streams.insert(channel, stream);
    }
    Ok(Loaded {
        streams,
        generation,
        expired,
    })
}

/// How a [`save`] commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Commit {
    /// Durably, and with this as the write-ahead generation that follows: the end of a
    /// checkpoint.
    Generation(u64),
    /// Durably, leaving the generation as it is (a stream stored between checkpoints).
    Durable,
    /// Without `fsync`, leaving the generation as it is: one slice of a checkpoint. It
    /// becomes durable with the next durable commit, and a crash before that rolls it back,
    /// which loses nothing: the write-ahead records still hold it.
    Slice,
}

/// Stores `streams` (channel and stream) in one transaction, committed as `commit` says.
pub(super) fn save<'s>(
    db: &Database,
    streams: impl IntoIterator<Item = (&'s str, &'s Stream)>,
    commit: Commit,
    quick_repair: bool,
) -> Result<(), LogError> {
    let mut txn = begin(db, quick_repair)?;
    if commit == Commit::Slice {
        txn.set_durability(Durability::None).map_err(storage)?;
    }
    {
        let mut metas = txn.open_table(META).map_err(storage)?;
        let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
        for (channel, stream) in streams {
            save_stream(&mut metas, &mut entries, channel, stream)?;
        }
        if let Commit::Generation(generation) = commit {
            txn.open_table(STATE)
                .map_err(storage)?
                .insert(GENERATION, generation)
                .map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)
}

type MetaTable<'t> = Table<'t, &'static str, &'static [u8]>;
type EntriesTable<'t> = Table<'t, (&'static str, u64), (u64, &'static [u8])>;

fn save_stream(
    metas: &mut MetaTable<'_>,
    entries: &mut EntriesTable<'_>,
    channel: &str,
    stream: &Stream,
) -> Result<(), LogError> {
    metas
        .insert(channel, encode_meta(stream).as_slice())
        .map_err(storage)?;
    // Everything below the oldest retained entry is gone (trimmed, expired or removed).
    let first_kept = stream.entries.front().map_or(stream.top + 1, |e| e.offset);
    if first_kept > 1 {
        entries
            .retain_in((channel, 0u64)..=(channel, first_kept - 1), |_, _| false)
            .map_err(storage)?;
    }
    for entry in stream
        .entries
        .iter()
        .filter(|e| e.offset > stream.saved_top)
    {
        entries
            .insert(
                (channel, entry.offset),
                (entry.time_ms, entry.data.as_ref()),
            )
            .map_err(storage)?;
    }
    Ok(())
}

fn begin(db: &Database, quick_repair: bool) -> Result<WriteTransaction, LogError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_quick_repair(quick_repair);
    Ok(txn)
}

fn encode_meta(stream: &Stream) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_HEADER + stream.epoch.len());
    out.push(META_VERSION);
    for n in [stream.top, stream.last_ms, stream.max_len, stream.ttl_ms] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(stream.epoch.as_bytes());
    out
}

fn decode_meta(raw: &[u8]) -> Option<Stream> {
    if raw.len() < META_HEADER || raw[0] != META_VERSION {
        return None;
    }
    let num = |i: usize| {
        let start = 1 + i * 8;
        raw[start..start + 8]
            .try_into()
            .ok()
            .map(u64::from_le_bytes)
    };
    let mut stream = Stream::new(std::str::from_utf8(&raw[META_HEADER..]).ok()?.into());
    stream.top = num(0)?;
    stream.last_ms = num(1)?;
    stream.max_len = num(2)?;
    stream.ttl_ms = num(3)?;
    Some(stream)
}
