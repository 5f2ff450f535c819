//! The durable per-channel publication log.
//!
//! # Model
//!
//! Every channel is a *stream*: an append-only sequence of opaque entries numbered by a
//! strictly increasing `offset` (the first entry gets 1), plus an `epoch`, a random string
//! chosen when the stream is created. A `(offset, epoch)` pair is a [`StreamPosition`].
//!
//! # Storage
//!
//! Everything lives in one [redb](https://docs.rs/redb) file, `history.redb`, inside the
//! directory given to [`DurableLog::open`]. Two tables:
//!
//! * `stream_meta`: channel → epoch, top offset, time of the last append and the retention
//!   of the last append (so reads and the background sweep can apply it);
//! * `entries`: `(channel, offset)` → `(append time in ms since the Unix epoch, data)`.
//!
//! Stream metadata is kept **forever** (it is a few dozen bytes per channel): that is what
//! makes offsets never reused and the epoch stable for as long as the data directory
//! survives. Only entries expire.
//!
//! # Group commit
//!
//! [`DurableLog::append`] writes nothing itself: it queues the request to a single writer
//! thread. The writer takes every request that is pending (up to
//! [`LogOptions::max_batch`]), assigns offsets in arrival order, writes the whole batch in
//! one redb write transaction and commits it with [`redb::Durability::Immediate`] (an
//! `fsync`). Only after the commit has succeeded does it call the `on_commit` callback for
//! every appended entry, in order, and then resolve every `append` future. So an append is
//! acknowledged only once it is durable, `on_commit` sees entries strictly in offset order
//! and only once they are durable, and N concurrent appends cost about one `fsync`.
//!
//! If a commit fails, every request of the batch gets the error; nothing of the batch is
//! visible (the transaction is dropped), so no offset of a failed batch was ever
//! acknowledged, and the writer carries on with the next batch.
//!
//! # Crash safety
//!
//! redb commits are atomic and checksummed: after a crash (even `SIGKILL` or power loss,
//! given a disk that honours `fsync`) reopening the file yields exactly the state of the
//! last successful commit. Because appends are acknowledged only after their commit, every
//! acknowledged entry survives with its offset, and the stored top offset is never lower
//! than an acknowledged offset, so offsets are never reused.
//!
//! # Streams that do not exist yet
//!
//! [`DurableLog::top`] and [`DurableLog::read`] on a channel that has no stream yet create
//! it (fresh epoch, offset 0) and persist it durably before returning, so the epoch a
//! subscriber was shown stays valid. These calls go through the writer too (and so are
//! group-committed with other work); they block the calling thread until that commit, which
//! takes about one `fsync`. Calls on existing streams only read and never block on the
//! writer.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

/// Name of the database file inside the log directory.
pub const DB_FILE_NAME: &str = "history.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("stream_meta");
const ENTRIES: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("entries");

/// Version tag of the encoded [`Meta`] record.
const META_VERSION: u8 = 1;
/// Bytes before the epoch in an encoded [`Meta`]: version + four `u64`s.
const META_HEADER: usize = 1 + 4 * 8;
/// At most this many channels are expired by one sweep, to keep transactions small.
const MAX_SWEEP_CHANNELS: usize = 4096;

/// Position in a stream: the offset of its newest entry (0 when nothing was ever appended)
/// and the stream's epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// How much history to keep for a channel; given with every append, and the values of the
/// latest append apply. Both must be greater than zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Only the newest `max_len` entries are kept.
    pub max_len: usize,
    /// Entries older than this (by their append time) are neither returned nor kept.
    pub ttl: Duration,
}

/// One stored publication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    /// The opaque encoded publication, as given to [`DurableLog::append`].
    pub data: Bytes,
}

/// Counters of the writer, see [`DurableLog::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Successful durable commits (one per batch).
    pub commits: u64,
    /// Commits that failed; their requests got the error.
    pub failed_commits: u64,
    /// Entries appended and acknowledged.
    pub appends: u64,
    /// The largest number of requests committed in one batch.
    pub max_batch: u64,
}

/// Tuning knobs; [`LogOptions::default`] suits a server.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Most requests committed in one transaction (default 1024).
    pub max_batch: usize,
    /// How often the writer deletes expired entries when it is otherwise idle (default 5 s).
    /// Expired entries are also trimmed on every append to their channel, and they are
    /// never returned by reads, whatever this interval.
    pub sweep_interval: Duration,
    /// redb's quick-repair: each commit also saves the allocator state and uses two-phase
    /// commit (two `fsync`s), which makes reopening after a crash nearly instant instead of
    /// a walk over the whole file. Default `false`: one `fsync` per commit.
    pub quick_repair: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            sweep_interval: Duration::from_secs(5),
            quick_repair: false,
        }
    }
}

/// Called by the writer thread for every committed entry, in offset order, before the
/// corresponding `append` completes. It runs on the writer thread, so it must be quick
/// (hand the entry over to a channel or a hub, do not do I/O), and it must not keep a
/// [`DurableLog`] alive (that would be a reference cycle that keeps the writer running).
pub type OnCommit = Arc<dyn Fn(&str, &StreamPosition, &Bytes) + Send + Sync>;

/// Errors of the log. Cloneable, because one failed commit fails every request of its batch.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LogError {
    /// The embedded database failed (I/O error, corruption, file already open, ...).
    #[error("history storage error: {0}")]
    Storage(#[source] Arc<redb::Error>),
    /// A file system operation outside the database failed (creating the directory,
    /// starting the writer thread).
    #[error("history log I/O error: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// Stored stream metadata could not be decoded.
    #[error("corrupt stream metadata for channel {channel:?}")]
    Corrupt { channel: String },
    /// `max_len` or `ttl` was zero.
    #[error("invalid retention: max_len and ttl must both be greater than zero")]
    InvalidRetention,
    /// The log was closed (or its writer stopped) before the request was committed.
    #[error("history log is closed")]
    Closed,
}

fn storage<E: Into<redb::Error>>(err: E) -> LogError {
    LogError::Storage(Arc::new(err.into()))
}

/// The durable log. Cheap to clone (all clones share one database and one writer); `Send`
/// and `Sync`. The writer stops when [`DurableLog::close`] is called on any clone or the
/// last clone is dropped, after committing what was already queued.
#[derive(Clone)]
pub struct DurableLog {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<Database>,
    tx: Sender<Cmd>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    writer_id: ThreadId,
    stats: Arc<Stats>,
    quick_repair: bool,
}

#[derive(Default)]
struct Stats {
    commits: AtomicU64,
    failed_commits: AtomicU64,
    appends: AtomicU64,
    max_batch: AtomicU64,
}

type Reply<T> = oneshot::Sender<Result<T, LogError>>;
type SyncReply<T> = SyncSender<Result<T, LogError>>;

enum Cmd {
    Append {
        channel: String,
        data: Bytes,
        retention: Retention,
        reply: Reply<StreamPosition>,
    },
    Ensure {
        channel: String,
        reply: SyncReply<StreamPosition>,
    },
    Remove {
        channel: String,
        reply: SyncReply<()>,
    },
    Shutdown,
}

impl DurableLog {
    /// Opens (or creates) the log stored in `dir`, with default [`LogOptions`].
    pub fn open(dir: &Path, on_commit: OnCommit) -> Result<DurableLog, LogError> {
        Self::open_with_options(dir, on_commit, LogOptions::default())
    }

    /// Opens (or creates) the log stored in `dir`. After an unclean shutdown redb repairs
    /// the file here, rolling back to the last successful commit.
    pub fn open_with_options(
        dir: &Path,
        on_commit: OnCommit,
        options: LogOptions,
    ) -> Result<DurableLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Io(Arc::new(e)))?;
        let db = Database::builder()
            .create(dir.join(DB_FILE_NAME))
            .map_err(storage)?;
        let db = Arc::new(db);
        // Create both tables up front so readers can always open them.
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_quick_repair(options.quick_repair);
        txn.open_table(META).map_err(storage)?;
        txn.open_table(ENTRIES).map_err(storage)?;
        txn.commit().map_err(storage)?;

        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let writer = Writer {
            db: db.clone(),
            rx,
            on_commit,
            stats: stats.clone(),
            options: LogOptions {
                max_batch: options.max_batch.max(1),
                ..options.clone()
            },
            schedule: Schedule::default(),
        };
        let handle = std::thread::Builder::new()
            .name("plexus-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| LogError::Io(Arc::new(e)))?;
        let writer_id = handle.thread().id();
        Ok(DurableLog {
            shared: Arc::new(Shared {
                db,
                tx,
                closed: AtomicBool::new(false),
                writer: Mutex::new(Some(handle)),
                writer_id,
                stats,
                quick_repair: options.quick_repair,
            }),
        })
    }

    /// Appends `data` to `channel`. The request is queued when this is called (so appends are
    /// ordered by call, not by when their futures are polled); the future resolves once the
    /// entry is durable, after `on_commit` was called for it. If the future is dropped, the
    /// entry is still committed (and `on_commit` still called); only the acknowledgement is lost.
    pub fn append(
        &self,
        channel: &str,
        data: Bytes,
        retention: Retention,
    ) -> impl std::future::Future<Output = Result<StreamPosition, LogError>> + Send + 'static {
        let queued = self.enqueue(channel, data, retention);
        async move {
            // A dropped reply sender means the writer stopped before committing this entry.
            queued?.await.map_err(|_| LogError::Closed)?
        }
    }

    fn enqueue(
        &self,
        channel: &str,
        data: Bytes,
        retention: Retention,
    ) -> Result<oneshot::Receiver<Result<StreamPosition, LogError>>, LogError> {
        if retention.max_len == 0 || retention.ttl.is_zero() {
            return Err(LogError::InvalidRetention);
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let (reply, rx) = oneshot::channel();
        self.shared
            .tx
            .send(Cmd::Append {
                channel: channel.to_owned(),
                data,
                retention,
                reply,
            })
            .map_err(|_| LogError::Closed)?;
        Ok(rx)
    }

    /// Retained entries of `channel`. With `since = Some(o)`, only entries with offset > `o`;
    /// otherwise all retained ones. Oldest first, or newest first when `reverse`; at most
    /// `limit` of them (the oldest ones, or the newest ones when `reverse`). Also returns
    /// the stream's current position. An unknown channel is created (see the module docs).
    pub fn read(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: Option<usize>,
        reverse: bool,
    ) -> Result<(Vec<Entry>, StreamPosition), LogError> {
        let txn = self.shared.db.begin_read().map_err(storage)?;
        let meta_table = txn.open_table(META).map_err(storage)?;
        let Some(meta) = load_meta(&meta_table, channel)? else {
            drop(meta_table);
            drop(txn);
            return Ok((Vec::new(), self.ensure(channel)?));
        };
        let position = meta.position();
        let limit = limit.unwrap_or(usize::MAX);
        let low = since.map_or(1, |o| o.saturating_add(1));
        if limit == 0 || low > meta.top {
            return Ok((Vec::new(), position));
        }
        let cutoff = expiry_cutoff(now_ms(), meta.ttl_ms);
        let entries = txn.open_table(ENTRIES).map_err(storage)?;
        let range = entries
            .range((channel, low)..=(channel, meta.top))
            .map_err(storage)?;
        let mut out = Vec::new();
        // Append times never decrease along a stream, so expired entries form a prefix.
        if reverse {
            for item in range.rev() {
                let (key, value) = item.map_err(storage)?;
                let (time, data) = value.value();
                if time < cutoff || out.len() == limit {
                    break;
                }
                out.push(Entry {
                    offset: key.value().1,
                    data: Bytes::copy_from_slice(data),
                });
            }
        } else {
            for item in range {
                let (key, value) = item.map_err(storage)?;
                let (time, data) = value.value();
                if time < cutoff {
                    continue;
                }
                out.push(Entry {
                    offset: key.value().1,
                    data: Bytes::copy_from_slice(data),
                });
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok((out, position))
    }

    /// Current position of `channel`. An unknown channel is created (see the module docs).
    pub fn top(&self, channel: &str) -> Result<StreamPosition, LogError> {
        let txn = self.shared.db.begin_read().map_err(storage)?;
        let meta_table = txn.open_table(META).map_err(storage)?;
        match load_meta(&meta_table, channel)? {
            Some(meta) => Ok(meta.position()),
            None => {
                drop(meta_table);
                drop(txn);
                self.ensure(channel)
            }
        }
    }

    /// Deletes every entry of `channel` but keeps its epoch and top offset, so clients that
    /// hold older offsets learn that they cannot recover. Blocks until durable. A no-op for
    /// an unknown channel.
    pub fn remove(&self, channel: &str) -> Result<(), LogError> {
        let channel = channel.to_owned();
        let quick_repair = self.shared.quick_repair;
        self.request(
            |reply| Cmd::Remove {
                channel: channel.clone(),
                reply,
            },
            |db| {
                let txn = begin(db, quick_repair)?;
                {
                    let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                    remove_entries(&mut entries, &channel)?;
                }
                txn.commit().map_err(storage)
            },
        )
    }

    /// Counters of the writer.
    pub fn stats(&self) -> LogStats {
        let s = &self.shared.stats;
        LogStats {
            commits: s.commits.load(Ordering::Relaxed),
            failed_commits: s.failed_commits.load(Ordering::Relaxed),
            appends: s.appends.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
        }
    }

    /// Commits what is queued, stops the writer and waits for it, for every clone of this
    /// log: later appends fail with [`LogError::Closed`]. Dropping the last clone does the
    /// same. Blocks for up to one commit.
    pub fn close(self) {
        self.shared.shutdown();
    }

    /// Creates the stream of `channel` if it does not exist, durably, and returns its
    /// position.
    fn ensure(&self, channel: &str) -> Result<StreamPosition, LogError> {
        let channel = channel.to_owned();
        let quick_repair = self.shared.quick_repair;
        self.request(
            |reply| Cmd::Ensure {
                channel: channel.clone(),
                reply,
            },
            |db| {
                let txn = begin(db, quick_repair)?;
                let position = {
                    let mut metas = txn.open_table(META).map_err(storage)?;
                    let meta = match load_meta(&metas, &channel)? {
                        Some(meta) => meta,
                        None => {
                            let meta = Meta::new();
                            metas
                                .insert(channel.as_str(), meta.encode().as_slice())
                                .map_err(storage)?;
                            meta
                        }
                    };
                    meta.position()
                };
                txn.commit().map_err(storage)?;
                Ok(position)
            },
        )
    }

    /// Runs a blocking request through the writer, or directly in its own transaction
    /// when called from the writer thread itself (from `on_commit`), which would otherwise
    /// wait for itself.
    fn request<T>(
        &self,
        make: impl FnOnce(SyncReply<T>) -> Cmd,
        inline: impl FnOnce(&Database) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        if std::thread::current().id() == self.shared.writer_id {
            return inline(&self.shared.db);
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.shared
            .tx
            .send(make(reply))
            .map_err(|_| LogError::Closed)?;
        rx.recv().map_err(|_| LogError::Closed)?
    }
}

impl std::fmt::Debug for DurableLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableLog")
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn shutdown(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // Fails only if the writer is already gone.
            let _ = self.tx.send(Cmd::Shutdown);
        }
        if std::thread::current().id() == self.writer_id {
            // Closed from `on_commit`: the writer stops after the current batch.
            return;
        }
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("history log writer thread panicked");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Stored per-channel metadata.
#[derive(Clone, Debug)]
struct Meta {
    epoch: String,
    top: u64,
    /// Append time of the newest entry (ms since the Unix epoch).
    last_ms: u64,
    /// Retention of the latest append; 0 while nothing was appended.
    max_len: u64,
    ttl_ms: u64,
}

impl Meta {
    fn new() -> Self {
        Self {
            epoch: new_epoch(),
            top: 0,
            last_ms: 0,
            max_len: 0,
            ttl_ms: 0,
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_HEADER + self.epoch.len());
        out.push(META_VERSION);
        for n in [self.top, self.last_ms, self.max_len, self.ttl_ms] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(self.epoch.as_bytes());
        out
    }

    fn decode(raw: &[u8]) -> Option<Self> {
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
        Some(Self {
            top: num(0)?,
            last_ms: num(1)?,
            max_len: num(2)?,
            ttl_ms: num(3)?,
            epoch: std::str::from_utf8(&raw[META_HEADER..]).ok()?.to_owned(),
        })
    }
}

fn load_meta(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    channel: &str,
) -> Result<Option<Meta>, LogError> {
    match table.get(channel).map_err(storage)? {
        None => Ok(None),
        Some(raw) => Meta::decode(raw.value())
            .map(Some)
            .ok_or_else(|| LogError::Corrupt {
                channel: channel.to_owned(),
            }),
    }
}

/// 16 random hex characters.
fn new_epoch() -> String {
    let mut buf = [0u8; 8];
    if getrandom::fill(&mut buf).is_err() {
        // No OS randomness: fall back to std's randomly keyed hasher, mixed with the time.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        buf = hasher.finish().to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Entries appended before this time (ms) are expired; `ttl_ms == 0` means no TTL.
fn expiry_cutoff(now: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now.saturating_sub(ttl_ms)
    }
}

fn begin(db: &Database, quick_repair: bool) -> Result<WriteTransaction, LogError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_quick_repair(quick_repair);
    Ok(txn)
}

type EntriesTable<'t> = Table<'t, (&'static str, u64), (u64, &'static [u8])>;

fn remove_entries(entries: &mut EntriesTable<'_>, channel: &str) -> Result<(), LogError> {
    entries
        .retain_in((channel, 0u64)..=(channel, u64::MAX), |_, _| false)
        .map_err(storage)
}

/// Deletes the entries of `channel` beyond `meta`'s retention at time `now` and returns the
/// append time of the oldest entry left, if any.
fn trim(
    entries: &mut EntriesTable<'_>,
    channel: &str,
    meta: &Meta,
    now: u64,
) -> Result<Option<u64>, LogError> {
    if meta.top == 0 {
        return Ok(None);
    }
    let cutoff = expiry_cutoff(now, meta.ttl_ms);
    // Everything at or below `last_dead` goes: beyond max_len, or expired.
    let mut last_dead = if meta.max_len > 0 {
        meta.top.saturating_sub(meta.max_len)
    } else {
        0
    };
    let mut oldest_alive = None;
    for item in entries
        .range((channel, last_dead.saturating_add(1))..=(channel, meta.top))
        .map_err(storage)?
    {
        let (key, value) = item.map_err(storage)?;
        let time = value.value().0;
        if time < cutoff {
            last_dead = key.value().1;
        } else {
            oldest_alive = Some(time);
            break;
        }
    }
    if last_dead > 0 {
        entries
            .retain_in((channel, 0u64)..=(channel, last_dead), |_, _| false)
            .map_err(storage)?;
    }
    Ok(oldest_alive)
}

/// When each channel's oldest entry expires, so the sweep visits only channels with
/// something to delete. Lives in the writer; rebuilt from the database at start.
#[derive(Default)]
struct Schedule {
    by_due: BTreeSet<(u64, String)>,
    due_of: HashMap<String, u64>,
}

impl Schedule {
    fn set(&mut self, channel: &str, due: Option<u64>) {
        if let Some(old) = self.due_of.remove(channel) {
            self.by_due.remove(&(old, channel.to_owned()));
        }
        if let Some(due) = due {
            self.due_of.insert(channel.to_owned(), due);
            self.by_due.insert((due, channel.to_owned()));
        }
    }

    fn due(&self, now: u64) -> Vec<String> {
        self.by_due
            .iter()
            .take_while(|(due, _)| *due <= now)
            .take(MAX_SWEEP_CHANNELS)
            .map(|(_, channel)| channel.clone())
            .collect()
    }
}

fn due_time(oldest: Option<u64>, ttl_ms: u64) -> Option<u64> {
    match oldest {
        Some(time) if ttl_ms > 0 => Some(time.saturating_add(ttl_ms)),
        _ => None,
    }
}

struct Writer {
    db: Arc<Database>,
    rx: Receiver<Cmd>,
    on_commit: OnCommit,
    stats: Arc<Stats>,
    options: LogOptions,
    schedule: Schedule,
}

/// What a successful batch hands back, per request, in order.
enum Done {
    Appended {
        channel: String,
        data: Bytes,
        position: StreamPosition,
        reply: Reply<StreamPosition>,
    },
    Ensured {
        position: StreamPosition,
        reply: SyncReply<StreamPosition>,
    },
    Removed {
        reply: SyncReply<()>,
    },
}

impl Writer {
    fn run(mut self) {
        if let Err(err) = self.rebuild_schedule() {
            tracing::error!(%err, "history log: cannot scan streams for expiry; relying on appends to expire entries");
        }
        let mut next_sweep = Instant::now() + self.options.sweep_interval;
        let mut stopping = false;
        loop {
            let first = if stopping {
                match self.rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                }
            } else {
                let wait = next_sweep.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(wait) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => {
                        self.process(Vec::new(), true);
                        next_sweep = Instant::now() + self.options.sweep_interval;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next {
                match cmd {
                    Cmd::Shutdown => stopping = true,
                    cmd => batch.push(cmd),
                }
                next = if batch.len() < self.options.max_batch {
                    self.rx.try_recv().ok()
                } else {
                    None
                };
            }
            let sweep = Instant::now() >= next_sweep;
            if sweep {
                next_sweep = Instant::now() + self.options.sweep_interval;
            }
            if !batch.is_empty() || sweep {
                self.process(batch, sweep);
            }
        }
    }

    fn rebuild_schedule(&mut self) -> Result<(), LogError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let metas = txn.open_table(META).map_err(storage)?;
        let entries = txn.open_table(ENTRIES).map_err(storage)?;
        for item in metas.iter().map_err(storage)? {
            let (key, value) = item.map_err(storage)?;
            let channel = key.value();
            let Some(meta) = Meta::decode(value.value()) else {
                tracing::warn!(channel, "history log: corrupt stream metadata");
                continue;
            };
            if meta.top == 0 || meta.ttl_ms == 0 {
                continue;
            }
            let oldest = match entries
                .range((channel, 0u64)..=(channel, meta.top))
                .map_err(storage)?
                .next()
            {
                Some(item) => Some(item.map_err(storage)?.1.value().0),
                None => None,
            };
            self.schedule.set(channel, due_time(oldest, meta.ttl_ms));
        }
        Ok(())
    }

    /// Commits one batch (and an expiry sweep if `sweep`), then acknowledges it.
    fn process(&mut self, batch: Vec<Cmd>, sweep: bool) {
        let size = batch.len() as u64;
        let now = now_ms();
        if batch.is_empty() && (!sweep || self.schedule.due(now).is_empty()) {
            return;
        }
        let mut reschedule = Vec::new();
        match self.commit(batch, sweep, now, &mut reschedule) {
            Ok(done) => {
                if done.is_empty() && reschedule.is_empty() {
                    return;
                }
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.max_batch.fetch_max(size, Ordering::Relaxed);
                for (channel, due) in reschedule {
                    self.schedule.set(&channel, due);
                }
                // Deliver everything, in offset order, before acknowledging anything.
                let mut appended = 0;
                for item in &done {
                    if let Done::Appended {
                        channel,
                        data,
                        position,
                        ..
                    } = item
                    {
                        appended += 1;
                        let on_commit = &self.on_commit;
                        if catch_unwind(AssertUnwindSafe(|| on_commit(channel, position, data)))
                            .is_err()
                        {
                            tracing::error!(
                                channel,
                                offset = position.offset,
                                "history log: on_commit panicked"
                            );
                        }
                    }
                }
                self.stats.appends.fetch_add(appended, Ordering::Relaxed);
                for item in done {
                    // A failed send means the caller stopped waiting; nothing to do.
                    match item {
                        Done::Appended {
                            position, reply, ..
                        } => {
                            let _ = reply.send(Ok(position));
                        }
                        Done::Ensured { position, reply } => {
                            let _ = reply.send(Ok(position));
                        }
                        Done::Removed { reply } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err((err, batch)) => {
                self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%err, requests = batch.len(), "history log: commit failed");
                for cmd in batch {
                    match cmd {
                        Cmd::Append { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Cmd::Ensure { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Cmd::Remove { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Cmd::Shutdown => {}
                    }
                }
            }
        }
    }

    /// Writes and durably commits `batch` in one transaction. On failure nothing was
    /// committed and the batch is handed back so each request can get the error.
    fn commit(
        &mut self,
        batch: Vec<Cmd>,
        sweep: bool,
        now: u64,
        reschedule: &mut Vec<(String, Option<u64>)>,
    ) -> Result<Vec<Done>, (LogError, Vec<Cmd>)> {
        let txn = match begin(&self.db, self.options.quick_repair) {
            Ok(txn) => txn,
            Err(err) => return Err((err, batch)),
        };
        let mut done = Vec::with_capacity(batch.len());
        let result = self
            .write(&txn, &batch, sweep, now, &mut done, reschedule)
            .and_then(|deleted| {
                if deleted || !batch.is_empty() {
                    txn.commit().map_err(storage)
                } else {
                    // An idle sweep that found nothing to delete: skip the fsync.
                    txn.abort().map_err(storage)
                }
            });
        if let Err(err) = result {
            reschedule.clear();
            return Err((err, batch));
        }
        // Pair the results with the replies, in order.
        let mut out = Vec::with_capacity(batch.len());
        for (cmd, result) in batch.into_iter().zip(done) {
            match (cmd, result) {
                (
                    Cmd::Append {
                        channel,
                        data,
                        reply,
                        ..
                    },
                    position,
                ) => out.push(Done::Appended {
                    channel,
                    data,
                    position,
                    reply,
                }),
                (Cmd::Ensure { reply, .. }, position) => {
                    out.push(Done::Ensured { position, reply })
                }
                (Cmd::Remove { reply, .. }, _) => out.push(Done::Removed { reply }),
                (Cmd::Shutdown, _) => {}
            }
        }
        Ok(out)
    }

    /// The body of a batch transaction. Pushes one position per request into `done`
    /// (the stream's position after it) and returns whether the sweep deleted anything.
    fn write(
        &mut self,
        txn: &WriteTransaction,
        batch: &[Cmd],
        sweep: bool,
        now: u64,
        done: &mut Vec<StreamPosition>,
        reschedule: &mut Vec<(String, Option<u64>)>,
    ) -> Result<bool, LogError> {
        let mut metas = txn.open_table(META).map_err(storage)?;
        let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
        // Streams touched by this batch, with their up-to-date metadata.
        let mut touched: HashMap<&str, (Meta, bool)> = HashMap::new();
        for cmd in batch {
            match cmd {
                Cmd::Append {
                    channel,
                    data,
                    retention,
                    ..
                } => {
                    let (meta, appended) = touch_or_create(&mut touched, &metas, channel)?;
                    meta.top += 1;
                    // Keep append times monotonic per stream even if the clock steps back.
                    meta.last_ms = meta.last_ms.max(now);
                    meta.max_len = retention.max_len as u64;
                    meta.ttl_ms = ttl_ms(retention.ttl);
                    *appended = true;
                    entries
                        .insert((channel.as_str(), meta.top), (meta.last_ms, data.as_ref()))
                        .map_err(storage)?;
                    done.push(meta.position());
                }
                Cmd::Ensure { channel, .. } => {
                    let (meta, _) = touch_or_create(&mut touched, &metas, channel)?;
                    done.push(meta.position());
                }
                Cmd::Remove { channel, .. } => {
                    remove_entries(&mut entries, channel)?;
                    if let Some((meta, appended)) = touch(&mut touched, &metas, channel, false)? {
                        // Nothing left to trim or expire unless appended again later.
                        *appended = false;
                        done.push(meta.position());
                        reschedule.push((channel.clone(), None));
                    } else {
                        done.push(StreamPosition {
                            offset: 0,
                            epoch: String::new(),
                        });
                    }
                }
                Cmd::Shutdown => {}
            }
        }
        for (channel, (meta, appended)) in &touched {
            if *appended {
                let oldest = trim(&mut entries, channel, meta, now)?;
                reschedule.push(((*channel).to_owned(), due_time(oldest, meta.ttl_ms)));
            }
            metas
                .insert(*channel, meta.encode().as_slice())
                .map_err(storage)?;
        }
        let mut deleted = false;
        if sweep {
            for channel in self.schedule.due(now) {
                if touched.contains_key(channel.as_str()) {
                    continue;
                }
                let Some(meta) = load_meta(&metas, &channel)? else {
                    reschedule.push((channel, None));
                    continue;
                };
                let oldest = trim(&mut entries, &channel, &meta, now)?;
                deleted = true;
                reschedule.push((channel, due_time(oldest, meta.ttl_ms)));
            }
        }
        Ok(deleted)
    }
}

/// The batch's view of a stream, loaded on first use; `None` for an unknown stream. The
/// flag tells whether the batch appended to it.
fn touch<'b, 'm>(
    touched: &'m mut HashMap<&'b str, (Meta, bool)>,
    metas: &Table<'_, &'static str, &'static [u8]>,
    channel: &'b str,
    create: bool,
) -> Result<Option<&'m mut (Meta, bool)>, LogError> {
    if !touched.contains_key(channel) {
        let meta = match load_meta(metas, channel)? {
            Some(meta) => meta,
            None if create => Meta::new(),
            None => return Ok(None),
        };
        touched.insert(channel, (meta, false));
    }
    Ok(touched.get_mut(channel))
}

/// Like [`touch`], creating the stream (fresh epoch, offset 0) if it is unknown.
fn touch_or_create<'b, 'm>(
    touched: &'m mut HashMap<&'b str, (Meta, bool)>,
    metas: &Table<'_, &'static str, &'static [u8]>,
    channel: &'b str,
) -> Result<&'m mut (Meta, bool), LogError> {
    touch(touched, metas, channel, true)?;
    Ok(touched
        .entry(channel)
        .or_insert_with(|| (Meta::new(), false)))
}
