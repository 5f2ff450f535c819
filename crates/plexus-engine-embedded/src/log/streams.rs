//! The streams in memory: every channel's position, retention and retained entries.
//!
//! This is what reads see. The writer changes it only by [`apply`]ing ops whose record is
//! already durable, and recovery rebuilds it the same way (checkpoint, then the
//! write-ahead records after it), so what a reader saw before a crash is what it sees
//! after.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::wal::Op;
use super::{Entry, StreamPosition};

/// One channel's stream.
#[derive(Clone, Debug)]
pub(super) struct Stream {
    pub epoch: Arc<str>,
    /// Offset of the newest entry ever appended (0 if none).
    pub top: u64,
    /// Append time of the newest entry (ms since the Unix epoch).
    pub last_ms: u64,
    /// Retention of the latest append; 0 while nothing was appended.
    pub max_len: u64,
    pub ttl_ms: u64,
    /// Retained entries, oldest first, with consecutive offsets ending at `top`.
    pub entries: VecDeque<Stored>,
    /// The highest offset whose entry is in the checkpoint (see `snapshot`).
    pub saved_top: u64,
}

#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub offset: u64,
    pub time_ms: u64,
    pub data: Bytes,
}

pub(super) type Streams = HashMap<Arc<str>, Stream>;

impl Stream {
    pub fn new(epoch: Arc<str>) -> Self {
        Stream {
            epoch,
            top: 0,
            last_ms: 0,
            max_len: 0,
            ttl_ms: 0,
            entries: VecDeque::new(),
            saved_top: 0,
        }
    }

    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// Drops the entries beyond the retention at time `now` and returns when the oldest
    /// one left expires, if it ever does.
    pub fn trim(&mut self, now: u64) -> Option<u64> {
        if self.max_len > 0 {
            while self.entries.len() as u64 > self.max_len {
                self.entries.pop_front();
            }
        }
        let cutoff = expiry_cutoff(now, self.ttl_ms);
        // Append times never decrease along a stream, so expired entries form a prefix.
        while self.entries.front().is_some_and(|e| e.time_ms < cutoff) {
            self.entries.pop_front();
        }
        match self.entries.front() {
            Some(oldest) if self.ttl_ms > 0 => Some(oldest.time_ms.saturating_add(self.ttl_ms)),
            _ => None,
        }
    }

    /// Retained entries with offset > `since` (all if `None`) and not expired at `now`:
    /// the oldest `limit`, or the newest `limit` newest first when `reverse`.
    pub fn read(&self, since: Option<u64>, limit: usize, reverse: bool, now: u64) -> Vec<Entry> {
        let cutoff = expiry_cutoff(now, self.ttl_ms);
        let Some(first) = self.entries.front().map(|e| e.offset) else {
            return Vec::new();
        };
        let low = since.map_or(1, |o| o.saturating_add(1)).max(first);
        if limit == 0 || low > self.top {
            return Vec::new();
        }
        let skip = (low - first) as usize;
        let alive = |e: &&Stored| e.time_ms >= cutoff;
        let entry = |e: &Stored| Entry {
            offset: e.offset,
            data: e.data.clone(),
        };
        let range = self.entries.range(skip..);
        if reverse {
            range
                .rev()
                .take_while(alive)
                .take(limit)
                .map(entry)
                .collect()
        } else {
            range.filter(alive).take(limit).map(entry).collect()
        }
    }
}

/// Entries appended before this time (ms) are expired; `ttl_ms == 0` means no TTL.
pub(super) fn expiry_cutoff(now: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now.saturating_sub(ttl_ms)
    }
}

/// Applies one op at time `now`. Ops already reflected in the streams (an append at or
/// below the stream's top, a create of a stream that exists) change nothing, so replaying
/// records that a checkpoint already holds is harmless. Returns when the stream's oldest
/// entry expires next, for the sweep schedule, if the op could have changed it.
pub(super) fn apply(streams: &mut Streams, op: &Op, now: u64) -> Option<Option<u64>> {
    match op {
        Op::Create { channel, epoch } => {
            stream_of(streams, channel, epoch);
            None
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
            let stream = stream_of(streams, channel, epoch)?;
            if *offset <= stream.top {
                return None;
            }
            if stream
                .entries
                .back()
                .is_some_and(|e| e.offset + 1 != *offset)
            {
                // Offsets are consecutive in a record sequence; anything else would be a
                // gap, and the deque must hold consecutive offsets.
                stream.entries.clear();
            }
            stream.top = *offset;
            stream.last_ms = stream.last_ms.max(*time_ms);
            stream.max_len = *max_len;
            stream.ttl_ms = *ttl_ms;
            stream.entries.push_back(Stored {
                offset: *offset,
                time_ms: stream.last_ms,
                data: data.clone(),
            });
            Some(stream.trim(now))
        }
        Op::Remove {
            channel,
            epoch,
            top,
        } => {
            let stream = streams.get_mut(&**channel)?;
            if stream.epoch != *epoch {
                return None;
            }
            while stream.entries.front().is_some_and(|e| e.offset <= *top) {
                stream.entries.pop_front();
            }
            Some(None)
        }
    }
}

/// The stream of `channel`, created with `epoch` if unknown; `None` if it has another epoch
/// (a record that does not belong to this stream).
fn stream_of<'s>(
    streams: &'s mut Streams,
    channel: &Arc<str>,
    epoch: &Arc<str>,
) -> Option<&'s mut Stream> {
    let stream = streams
        .entry(channel.clone())
        .or_insert_with(|| Stream::new(epoch.clone()));
    (stream.epoch == *epoch).then_some(stream)
}
