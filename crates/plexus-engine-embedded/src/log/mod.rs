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
//! Three parts, each in its own module:
//!
//! * `streams`: every stream in memory, with its retained entries. Reads are served from
//!   here and never touch the disk.
//! * `wal`: the write-ahead file `history.wal`. Every change is a record appended to it
//!   and made durable with `fdatasync` before anyone sees the change.
//! * `snapshot`: the checkpoint, `history.redb` (a [redb](https://docs.rs/redb) file):
//!   the streams as of the last checkpoint, and which write-ahead generation follows it.
//!
//! So the retained history is held twice: in memory for reads, on disk for restarts. Memory
//! grows with what the channels' retention keeps (see docs/capacity.md), as in Redis.
//!
//! # Group commit
//!
//! [`DurableLog::append`] writes nothing itself: it queues the request to a single writer
//! thread. The writer takes every request that is pending (up to
//! [`LogOptions::max_batch`]), assigns offsets in arrival order, writes the whole batch as
//! one write-ahead record and makes it durable with one `fdatasync`. Only then does it apply
//! the batch to the streams in memory, call the `on_commit` callback for every appended
//! entry, in order, and resolve every `append` future. So an append is acknowledged only
//! once it is durable, `on_commit` and readers see entries strictly in offset order and only
//! once they would survive a crash, and N concurrent appends cost about one `fdatasync`.
//!
//! If the record cannot be written, every request of the batch gets the error, nothing of it
//! is applied, and its place in the file is cleared (zeroed and synced) so that no restart
//! replays it; the writer carries on. If even that fails, or a checkpoint fails, the log
//! stops taking writes ([`LogError::Failed`]): what is on disk is then uncertain, and
//! acknowledging more could promise what a restart does not recover.
//!
//! # Checkpoints
//!
//! Every [`LogOptions::checkpoint_interval`] when something changed, whenever the
//! write-ahead file passes [`LogOptions::checkpoint_bytes`], and on close, the writer
//! stores the streams that changed into `history.redb`, together with the next write-ahead
//! generation, and then writes the write-ahead file from its start again. It does so in
//! slices of about a millisecond, with batches in between: each slice is a redb commit
//! without `fsync`, and the last one, which stores the generation, is durable and makes the
//! others durable with it. A checkpoint writes each changed stream's metadata, the entries it
//! gained that are still retained and the deletion of those it lost: an entry published
//! and trimmed between two checkpoints never reaches redb at all.
//!
//! # Crash safety
//!
//! redb commits are atomic and checksummed, and write-ahead records carry a CRC, their
//! generation and a sequence number. Opening the log loads the checkpoint, then applies
//! the records of its generation in order, up to the first one that is torn, of another
//! generation or out of sequence; then it takes a checkpoint. Applying a record that the
//! checkpoint already holds changes nothing, so a crash at any point (`SIGKILL` or power
//! loss, given a disk that honours `fsync`) recovers every acknowledged entry with its
//! offset, and the top offset never goes below an acknowledged one, so offsets are never
//! reused.
//!
//! # Streams that do not exist yet
//!
//! [`DurableLog::top`] and [`DurableLog::read`] on a channel that has no stream yet create
//! it (fresh epoch, offset 0) and persist it durably before returning, so the epoch a
//! subscriber was shown stays valid. These calls go through the writer too (and so are
//! group-committed with other work); they block the calling thread until that commit, which
//! takes about one `fdatasync`. Calls on existing streams only read memory: they wait at
//! most for the writer to apply a batch, never for a disk write.

mod snapshot;
mod streams;
mod wal;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::Database;
use tokio::sync::oneshot;

use streams::{Stream, Streams};
use wal::{Op, Wal};

pub use wal::WAL_FILE_NAME;

/// Name of the checkpoint file inside the log directory.
pub const DB_FILE_NAME: &str = "history.redb";

/// The writer lets requests gather (see [`LogOptions::commit_window`]) only after a batch
/// of at least this many: below it, a commit per arrival costs little, and a steady trickle
/// of appends would otherwise wait for company on every commit.
const GATHER_AFTER: usize = 8;

/// About how much one checkpoint slice stores: a stream counts [`STREAM_WORK`], each of its
/// new entries 1 (~1 µs each in redb here), so a slice takes about a millisecond.
const SLICE_WORK: usize = 1000;
const STREAM_WORK: usize = 5;
/// A checkpoint stores whatever is left in one go after this many slices.
const MAX_SLICES: u32 = 200;

/// redb's page cache, used only by checkpoints and the load at start.
const CHECKPOINT_CACHE_BYTES: usize = 16 << 20;

/// At most this many channels are expired by one sweep.
const MAX_SWEEP_CHANNELS: usize = 4096;

/// Position in a stream: the offset of its newest entry (0 when nothing was ever appended)
/// and the stream's epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: Arc<str>,
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
    /// Successful durable commits (one write-ahead record per batch).
    pub commits: u64,
    /// Commits that failed; their requests got the error.
    pub failed_commits: u64,
    /// Time spent writing records and waiting for `fdatasync`, in microseconds.
    pub commit_micros: u64,
    /// Entries appended and acknowledged.
    pub appends: u64,
    /// The largest number of requests committed in one batch.
    pub max_batch: u64,
    /// Checkpoints written to `history.redb`.
    pub checkpoints: u64,
    /// Slices those checkpoints took (see [`LogOptions::checkpoint_interval`]).
    pub checkpoint_slices: u64,
    /// Time those slices took, in microseconds.
    pub checkpoint_micros: u64,
    /// Checkpoints that failed; after one the log stops taking writes
    /// ([`LogError::Failed`]).
    pub failed_checkpoints: u64,
    /// Bytes of write-ahead records since the last checkpoint.
    pub wal_bytes: u64,
    /// Channels with a stream (their metadata is kept even when no entry is).
    pub streams: u64,
}

/// Tuning knobs; [`LogOptions::default`] suits a server.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Most requests committed in one write-ahead record (default 1024).
    pub max_batch: usize,
    /// Under load (the previous batch had 8 requests or more), the writer waits up to this
    /// long after that commit for a batch as large as it (default 2 ms), so one `fdatasync`
    /// covers more appends. Zero commits as soon as anything is queued.
    pub commit_window: Duration,
    /// How often the writer deletes expired entries (default 5 s). Expired entries are
    /// also trimmed on every append to their channel, and they are never returned by
    /// reads, whatever this interval.
    pub sweep_interval: Duration,
    /// How often a checkpoint is taken when something changed (default 5 s): this bounds
    /// how much a restart replays. A checkpoint stores the changed streams in slices of
    /// about a millisecond of work, with batches of appends in between.
    pub checkpoint_interval: Duration,
    /// A checkpoint is also taken as soon as the write-ahead file holds this many bytes
    /// (default 64 MiB), which bounds its size.
    pub checkpoint_bytes: u64,
    /// redb's quick-repair for checkpoints: each also saves the allocator state and uses
    /// two-phase commit, which makes reopening after a crash nearly instant instead of a
    /// walk over the whole file. Default `false`.
    pub quick_repair: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            commit_window: Duration::from_millis(2),
            sweep_interval: Duration::from_secs(5),
            checkpoint_interval: Duration::from_secs(5),
            checkpoint_bytes: 64 << 20,
            quick_repair: false,
        }
    }
}

/// Called by the writer thread for every committed entry, in offset order, before the
/// corresponding `append` completes, with the appended value. It runs on the writer thread,
/// so it must be quick (hand the entry over to a channel or a hub, do not do I/O), and it
/// must not keep a [`DurableLog`] alive (that would be a reference cycle that keeps the
/// writer running).
pub type OnCommit<T = Bytes> = Arc<dyn Fn(&Arc<str>, &StreamPosition, &mut T) + Send + Sync>;

/// What is appended: a value whose stored form ([`Payload::stored`]) the log keeps and
/// returns from reads. The value itself goes to `on_commit` and then back to the appender
/// with the acknowledgement.
///
/// Why the writer thread encodes it and the value goes back: memory is freed on the
/// thread that allocated it. The stored bytes live (and are dropped) with the writer's
/// streams, the value is dropped by the appender, so no allocation crosses threads on
/// the way through the log, which an allocator with per-thread caches pays for on both
/// sides.
pub trait Payload: Send + 'static {
    /// The bytes to store; called once, on the writer thread.
    fn stored(&self) -> Bytes;
}

/// Plain bytes are stored as they are.
impl Payload for Bytes {
    fn stored(&self) -> Bytes {
        self.clone()
    }
}

/// Errors of the log. Cloneable, because one failed commit fails every request of its batch.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LogError {
    /// The checkpoint database failed (I/O error, corruption, file already open, ...).
    #[error("history storage error: {0}")]
    Storage(#[source] Arc<redb::Error>),
    /// A file system operation failed (the write-ahead file, creating the directory,
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
    /// A storage failure left what is on disk uncertain (a checkpoint that failed, or a
    /// write-ahead record that failed and could not be cleared), so the log stopped taking
    /// writes rather than acknowledge what a restart might not recover. Reads go on;
    /// restarting the server recovers from what is on disk.
    #[error("history log stopped taking writes after a storage failure: {0}")]
    Failed(#[source] Arc<LogError>),
}

fn storage<E: Into<redb::Error>>(err: E) -> LogError {
    LogError::Storage(Arc::new(err.into()))
}

fn io(err: std::io::Error) -> LogError {
    LogError::Io(Arc::new(err))
}

/// The durable log. Cheap to clone (all clones share one store and one writer); `Send`
/// and `Sync`. The writer stops when [`DurableLog::close`] is called on any clone or the
/// last clone is dropped, after committing what was already queued and a checkpoint.
#[derive(Clone)]
pub struct DurableLog<T = Bytes> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    db: Arc<Database>,
    /// Set once a storage failure leaves the disk's state uncertain; then writes fail.
    failure: Arc<OnceLock<LogError>>,
    gathering: Arc<Gathering>,
    writer_thread: std::thread::Thread,
    streams: Arc<RwLock<Streams>>,
    tx: Sender<Cmd<T>>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    writer_id: ThreadId,
    stats: Arc<Stats>,
    quick_repair: bool,
}

/// How the writer and the appenders agree on when a gathering batch is complete.
struct Gathering {
    /// Requests sent and not yet taken by the writer.
    queued: AtomicUsize,
    /// While the writer gathers: how many queued requests complete its batch (the
    /// appender that reaches it wakes the writer); `usize::MAX` otherwise.
    wanted: AtomicUsize,
}

#[derive(Default)]
struct Stats {
    commits: AtomicU64,
    failed_commits: AtomicU64,
    commit_micros: AtomicU64,
    appends: AtomicU64,
    max_batch: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_slices: AtomicU64,
    checkpoint_micros: AtomicU64,
    failed_checkpoints: AtomicU64,
    wal_bytes: AtomicU64,
}

/// An appender's answer: where its entry went, and its value back.
type Appended<T> = Result<(StreamPosition, T), LogError>;
type AppendReply<T> = oneshot::Sender<Appended<T>>;
type SyncReply<T> = SyncSender<Result<T, LogError>>;

enum Cmd<T> {
    Append {
        channel: Arc<str>,
        value: T,
        retention: Retention,
        reply: AppendReply<T>,
    },
    Ensure {
        channel: Arc<str>,
        reply: SyncReply<StreamPosition>,
    },
    Remove {
        channel: Arc<str>,
        reply: SyncReply<()>,
    },
    Shutdown,
}

/// The error every write gets once `failure` stopped the log.
fn stopped(failure: &LogError) -> LogError {
    LogError::Failed(Arc::new(failure.clone()))
}

fn read_lock(streams: &RwLock<Streams>) -> RwLockReadGuard<'_, Streams> {
    // Only the writer changes the streams, and a panic there leaves them consistent
    // (an op is applied whole or not at all), so a poisoned lock is still good to read.
    streams
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock(streams: &RwLock<Streams>) -> RwLockWriteGuard<'_, Streams> {
    streams
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: Payload> DurableLog<T> {
    /// Opens (or creates) the log stored in `dir`, with default [`LogOptions`].
    pub fn open(dir: &Path, on_commit: OnCommit<T>) -> Result<DurableLog<T>, LogError> {
        Self::open_with_options(dir, on_commit, LogOptions::default())
    }

    /// Opens (or creates) the log stored in `dir`: loads the checkpoint, replays the
    /// write-ahead records after it and takes a checkpoint if there were any. After an
    /// unclean shutdown redb first repairs its file, rolling back to its last commit.
    pub fn open_with_options(
        dir: &Path,
        on_commit: OnCommit<T>,
        options: LogOptions,
    ) -> Result<DurableLog<T>, LogError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::builder()
            // Reads are served from memory, so redb's cache only helps checkpoints find the
            // pages they change; its default (1 GiB) would hold the history a second time.
            .set_cache_size(CHECKPOINT_CACHE_BYTES)
            .create(dir.join(DB_FILE_NAME))
            .map_err(storage)?;
        snapshot::prepare(&db, options.quick_repair)?;
        let now = now_ms();
        let loaded = snapshot::load(&db, now)?;
        let mut streams = loaded.streams;
        let mut changed = loaded.expired;
        let (mut wal, records) =
            Wal::open(&dir.join(WAL_FILE_NAME), loaded.generation).map_err(io)?;
        let replayed = records.len();
        for op in records.into_iter().flatten() {
            changed.insert(op.channel().clone());
            streams::apply(&mut streams, &op, now);
        }
        let mut generation = loaded.generation;
        if replayed > 0 || !changed.is_empty() {
            // The records of this generation are now in memory; store them in the
            // checkpoint so the write-ahead file can start over.
            generation += 1;
            snapshot::save(
                &db,
                changed_streams(&streams, &changed),
                snapshot::Commit::Generation(generation),
                options.quick_repair,
            )?;
            for channel in &changed {
                if let Some(stream) = streams.get_mut(channel) {
                    stream.saved_top = stream.top;
                }
            }
            tracing::info!(
                replayed,
                streams = changed.len(),
                "history log: recovered write-ahead records"
            );
        }
        wal.restart(generation);
        sync_dir(dir);
        tracing::debug!(
            direct_io = wal.is_direct(),
            "history log: write-ahead file open"
        );

        let mut schedule = Schedule::default();
        for (channel, stream) in &mut streams {
            schedule.set(channel, stream.trim(now));
        }
        let db = Arc::new(db);
        let streams = Arc::new(RwLock::new(streams));
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let gathering = Arc::new(Gathering {
            queued: AtomicUsize::new(0),
            wanted: AtomicUsize::new(usize::MAX),
        });
        let failure = Arc::new(OnceLock::new());
        let writer = Writer {
            failure: failure.clone(),
            gathering: gathering.clone(),
            db: db.clone(),
            wal,
            streams: streams.clone(),
            changed: HashSet::new(),
            round: None,
            rx,
            on_commit,
            stats: stats.clone(),
            options: LogOptions {
                max_batch: options.max_batch.max(1),
                ..options.clone()
            },
            schedule,
        };
        let handle = std::thread::Builder::new()
            .name("plexus-log-writer".into())
            .spawn(move || writer.run())
            .map_err(io)?;
        let writer_id = handle.thread().id();
        let writer_thread = handle.thread().clone();
        Ok(DurableLog {
            shared: Arc::new(Shared {
                db,
                failure,
                gathering,
                writer_thread,
                streams,
                tx,
                closed: AtomicBool::new(false),
                writer: Mutex::new(Some(handle)),
                writer_id,
                stats,
                quick_repair: options.quick_repair,
            }),
        })
    }

    /// Appends `value` to `channel`. The request is queued when this is called (so appends
    /// are ordered by call, not by when their futures are polled); the future resolves once
    /// the entry is durable, after `on_commit` was called for it. If the future is dropped,
    /// the entry is still committed (and `on_commit` still called); only the
    /// acknowledgement is lost.
    pub fn append(
        &self,
        channel: impl Into<Arc<str>>,
        value: T,
        retention: Retention,
    ) -> impl std::future::Future<Output = Result<StreamPosition, LogError>> + Send + 'static {
        let queued = self.enqueue(channel.into(), value, retention);
        async move {
            // A dropped reply sender means the writer stopped before committing this entry.
            let (position, value) = queued?.await.map_err(|_| LogError::Closed)??;
            // Dropped here, on the appender's thread, where it was made.
            drop(value);
            Ok(position)
        }
    }

    fn enqueue(
        &self,
        channel: Arc<str>,
        value: T,
        retention: Retention,
    ) -> Result<oneshot::Receiver<Appended<T>>, LogError> {
        if retention.max_len == 0 || retention.ttl.is_zero() {
            return Err(LogError::InvalidRetention);
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let (reply, rx) = oneshot::channel();
        self.shared.send(Cmd::Append {
            channel,
            value,
            retention,
            reply,
        })?;
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
        let read = |streams: &Streams| {
            streams.get(channel).map(|stream| {
                let entries = stream.read(since, limit.unwrap_or(usize::MAX), reverse, now_ms());
                (entries, stream.position())
            })
        };
        if let Some(found) = read(&read_lock(&self.shared.streams)) {
            return Ok(found);
        }
        let position = self.ensure(channel)?;
        // A concurrent append may have created the stream first, with entries.
        Ok(read(&read_lock(&self.shared.streams)).unwrap_or((Vec::new(), position)))
    }

    /// Whether `channel` has a stream.
    pub fn has_stream(&self, channel: &str) -> bool {
        read_lock(&self.shared.streams).contains_key(channel)
    }

    /// Retained entries of `channel`, oldest first, if it has a stream (none is created).
    pub fn existing(&self, channel: &str) -> Option<Vec<Entry>> {
        read_lock(&self.shared.streams)
            .get(channel)
            .map(|stream| stream.read(None, usize::MAX, false, now_ms()))
    }

    /// Current position of `channel`. An unknown channel is created (see the module docs).
    pub fn top(&self, channel: &str) -> Result<StreamPosition, LogError> {
        if let Some(stream) = read_lock(&self.shared.streams).get(channel) {
            return Ok(stream.position());
        }
        self.ensure(channel)
    }

    /// Deletes every entry of `channel` but keeps its epoch and top offset, so clients that
    /// hold older offsets learn that they cannot recover. Blocks until durable. A no-op for
    /// an unknown channel.
    pub fn remove(&self, channel: &str) -> Result<(), LogError> {
        self.request(
            |reply| Cmd::Remove {
                channel: channel.into(),
                reply,
            },
            |shared| {
                if let Some(mut stream) = shared.stream(channel) {
                    stream.entries.clear();
                    shared.store_now(channel, stream)?;
                }
                Ok(())
            },
        )
    }

    /// Whether the log still takes writes: `false` once a storage failure stopped it (see
    /// [`LogError::Failed`]); reads go on either way.
    pub fn accepts_writes(&self) -> bool {
        self.shared.failure.get().is_none()
    }

    /// Counters of the writer.
    pub fn stats(&self) -> LogStats {
        let s = &self.shared.stats;
        LogStats {
            commits: s.commits.load(Ordering::Relaxed),
            failed_commits: s.failed_commits.load(Ordering::Relaxed),
            commit_micros: s.commit_micros.load(Ordering::Relaxed),
            appends: s.appends.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            checkpoint_slices: s.checkpoint_slices.load(Ordering::Relaxed),
            checkpoint_micros: s.checkpoint_micros.load(Ordering::Relaxed),
            failed_checkpoints: s.failed_checkpoints.load(Ordering::Relaxed),
            wal_bytes: s.wal_bytes.load(Ordering::Relaxed),
            streams: read_lock(&self.shared.streams).len() as u64,
        }
    }

    /// Commits what is queued, takes a checkpoint, stops the writer and waits for it, for
    /// every clone of this log: later appends fail with [`LogError::Closed`]. Dropping the
    /// last clone does the same. Blocks for up to one commit and one checkpoint.
    pub fn close(self) {
        self.shared.shutdown();
    }

    /// Creates the stream of `channel` if it does not exist, durably, and returns its
    /// position.
    fn ensure(&self, channel: &str) -> Result<StreamPosition, LogError> {
        self.request(
            |reply| Cmd::Ensure {
                channel: channel.into(),
                reply,
            },
            |shared| match shared.stream(channel) {
                Some(stream) => Ok(stream.position()),
                None => shared.store_now(channel, Stream::new(new_epoch())),
            },
        )
    }

    /// Runs a blocking request through the writer, or directly when called from the
    /// writer thread itself (from `on_commit`), which would otherwise wait for itself.
    fn request<R>(
        &self,
        make: impl FnOnce(SyncReply<R>) -> Cmd<T>,
        inline: impl FnOnce(&Shared<T>) -> Result<R, LogError>,
    ) -> Result<R, LogError> {
        if std::thread::current().id() == self.shared.writer_id {
            return inline(&self.shared);
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.shared.send(make(reply))?;
        rx.recv().map_err(|_| LogError::Closed)?
    }
}

impl<T: Payload> std::fmt::Debug for DurableLog<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableLog")
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<T> Shared<T> {
    /// Queues `cmd` for the writer, and wakes the writer if it is gathering a batch and
    /// this request completes it.
    fn send(&self, cmd: Cmd<T>) -> Result<(), LogError> {
        let gathering = &self.gathering;
        // Counted before it can be taken, so the writer's count never goes below zero.
        gathering.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(cmd).is_err() {
            gathering.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(LogError::Closed);
        }
        // Sent, then look at `wanted`; the writer sets `wanted`, then looks at the queue.
        // With both orders enforced, either this sees the writer gathering or the writer
        // finds this request.
        fence(Ordering::SeqCst);
        let wanted = gathering.wanted.load(Ordering::SeqCst);
        if wanted != usize::MAX
            && gathering.queued.load(Ordering::SeqCst) >= wanted
            && gathering.wanted.swap(usize::MAX, Ordering::SeqCst) != usize::MAX
        {
            self.writer_thread.unpark();
        }
        Ok(())
    }

    /// A copy of the stream of `channel`, if it exists.
    fn stream(&self, channel: &str) -> Option<Stream> {
        read_lock(&self.streams).get(channel).cloned()
    }

    /// On the writer thread, between batches (from `on_commit`): stores `stream` as the
    /// stream of `channel` in the checkpoint right away, outside the write-ahead file, and
    /// then in memory. Only the writer thread changes the streams, so nothing changed them
    /// since the caller copied the stream; readers see the old state until the store is
    /// durable.
    fn store_now(&self, channel: &str, stream: Stream) -> Result<StreamPosition, LogError> {
        if let Some(failure) = self.failure.get() {
            return Err(stopped(failure));
        }
        let saved = snapshot::save(
            &self.db,
            [(channel, &stream)],
            snapshot::Commit::Durable,
            self.quick_repair,
        );
        if let Err(err) = saved {
            // The commit may or may not be on disk: stop taking writes.
            let _ = self.failure.set(err.clone());
            tracing::error!(%err, "history log: storing a stream failed; no more writes until restart");
            return Err(err);
        }
        let mut stream = stream;
        stream.saved_top = stream.top;
        let position = stream.position();
        write_lock(&self.streams).insert(channel.into(), stream);
        Ok(position)
    }

    fn shutdown(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // Fails only if the writer is already gone.
            let _ = self.send(Cmd::Shutdown);
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

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// 16 random hex characters.
fn new_epoch() -> Arc<str> {
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
    buf.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into()
}

/// The streams named in `changed` that exist.
fn changed_streams<'s>(
    streams: &'s Streams,
    changed: &'s HashSet<Arc<str>>,
) -> impl Iterator<Item = (&'s str, &'s Stream)> {
    changed
        .iter()
        .filter_map(|channel| streams.get_key_value(channel))
        .map(|(channel, stream)| (&**channel, stream))
}

/// Makes the directory's entries (the files just created) durable. Best effort: some
/// filesystems do not sync directories, and then there is nothing more to do.
fn sync_dir(dir: &Path) {
    if let Err(err) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(%err, "history log: cannot sync the data directory");
    }
}

/// `now + d`, or a time far enough away when that does not fit in an `Instant`.
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// When each channel's oldest entry expires, so the sweep visits only channels with
/// something to delete. Lives in the writer; built from the streams at start.
#[derive(Default)]
struct Schedule {
    by_due: BTreeSet<(u64, Arc<str>)>,
    due_of: HashMap<Arc<str>, u64>,
}

impl Schedule {
    fn set(&mut self, channel: &Arc<str>, due: Option<u64>) {
        if self.due_of.get(channel).copied() == due {
            return;
        }
        if let Some(old) = self.due_of.remove(channel) {
            self.by_due.remove(&(old, channel.clone()));
        }
        if let Some(due) = due {
            self.due_of.insert(channel.clone(), due);
            self.by_due.insert((due, channel.clone()));
        }
    }

    fn due(&self, now: u64) -> Vec<Arc<str>> {
        self.by_due
            .iter()
            .take_while(|(due, _)| *due <= now)
            .take(MAX_SWEEP_CHANNELS)
            .map(|(_, channel)| channel.clone())
            .collect()
    }
}

struct Writer<T> {
    db: Arc<Database>,
    failure: Arc<OnceLock<LogError>>,
    gathering: Arc<Gathering>,
    wal: Wal,
    streams: Arc<RwLock<Streams>>,
    /// Streams changed since they were last stored in the checkpoint.
    changed: HashSet<Arc<str>>,
    /// The checkpoint in progress, if any.
    round: Option<Round>,
    rx: Receiver<Cmd<T>>,
    on_commit: OnCommit<T>,
    stats: Arc<Stats>,
    options: LogOptions,
    schedule: Schedule,
}

/// A checkpoint in progress (see [`Writer::checkpoint_slice`]).
struct Round {
    started: Instant,
    slices: u32,
    /// The longest a slice held up the writer.
    longest: Duration,
}

/// A request of the batch being committed, waiting for its answer.
enum Pending<T> {
    Appended {
        /// Index of its op in the batch's record.
        op: usize,
        position: StreamPosition,
        value: T,
        reply: AppendReply<T>,
    },
    Ensured {
        position: StreamPosition,
        reply: SyncReply<StreamPosition>,
    },
    Removed {
        reply: SyncReply<()>,
    },
}

impl<T> Pending<T> {
    fn fail(self, err: &LogError) {
        // A failed send means the caller stopped waiting; nothing to do.
        match self {
            Pending::Appended { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            Pending::Ensured { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            Pending::Removed { reply } => {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }

    fn succeed(self) {
        match self {
            Pending::Appended {
                position,
                value,
                reply,
                ..
            } => {
                let _ = reply.send(Ok((position, value)));
            }
            Pending::Ensured { position, reply } => {
                let _ = reply.send(Ok(position));
            }
            Pending::Removed { reply } => {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

/// A stream as the batch being planned sees it: the applied state plus the batch so far.
struct Planned {
    epoch: Arc<str>,
    top: u64,
    last_ms: u64,
}

/// The batch's view of `channel`, loaded on first use; `None` for an unknown stream
/// unless `create`.
fn plan<'p>(
    planned: &'p mut HashMap<Arc<str>, Planned>,
    streams: &Streams,
    channel: &Arc<str>,
    create: bool,
) -> Option<&'p mut Planned> {
    if !planned.contains_key(channel) {
        let state = match streams.get(channel) {
            Some(stream) => Planned {
                epoch: stream.epoch.clone(),
                top: stream.top,
                last_ms: stream.last_ms,
            },
            None if create => Planned {
                epoch: new_epoch(),
                top: 0,
                last_ms: 0,
            },
            None => return None,
        };
        planned.insert(channel.clone(), state);
    }
    planned.get_mut(channel)
}

impl<T: Payload> Writer<T> {
    fn run(mut self) {
        let mut next_sweep = later(self.options.sweep_interval);
        let mut next_checkpoint = later(self.options.checkpoint_interval);
        let mut stopping = false;
        let mut last_batch = 0usize;
        loop {
            let mut batch = Vec::new();
            // Under load the next batch gathers from the end of this commit, so the writer
            // sleeps once per batch, until the appender that completes it wakes it.
            if !stopping {
                self.gather(&mut batch, &mut stopping, last_batch);
            }
            if batch.is_empty() {
                let first = if stopping {
                    self.rx.try_recv().ok()
                } else {
                    // During a checkpoint, only look for requests between its slices.
                    let wait = if self.round.is_some() {
                        Duration::ZERO
                    } else {
                        next_sweep
                            .min(next_checkpoint)
                            .saturating_duration_since(Instant::now())
                    };
                    match self.rx.recv_timeout(wait) {
                        Ok(cmd) => Some(cmd),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                };
                if stopping && first.is_none() {
                    break;
                }
                let first_taken = first.is_some();
                match first {
                    Some(Cmd::Shutdown) => stopping = true,
                    Some(cmd) => batch.push(cmd),
                    None => {}
                }
                if first_taken {
                    self.gathering.queued.fetch_sub(1, Ordering::SeqCst);
                }
                if !batch.is_empty() {
                    self.drain(&mut batch, &mut stopping);
                }
            }
            last_batch = batch.len();
            if !batch.is_empty() {
                self.process(batch);
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now_ms());
                next_sweep = later(self.options.sweep_interval);
            }
            if self.round.is_none()
                && (now >= next_checkpoint || self.wal.len() >= self.options.checkpoint_bytes)
            {
                self.round = Some(Round {
                    started: now,
                    slices: 0,
                    longest: Duration::ZERO,
                });
                next_checkpoint = later(self.options.checkpoint_interval);
            }
            if self.round.is_some() {
                self.checkpoint_slice(false);
            }
        }
        // On the way out: the whole checkpoint at once.
        self.round.get_or_insert(Round {
            started: Instant::now(),
            slices: 0,
            longest: Duration::ZERO,
        });
        self.checkpoint_slice(true);
    }

    /// Under load, lets requests gather before a commit. Each commit costs the same
    /// `fdatasync` whatever its size, so fewer, bigger batches leave more of the core to
    /// the server. After a batch of several requests, the writer waits, from the end of
    /// that commit, until as many are queued again (the appender that completes the batch
    /// wakes it), for at most [`LogOptions::commit_window`]. So when every appender waits for the writer the
    /// batch is complete at once, under a steady load batches grow until a window fills
    /// them, and after small batches (fewer than [`GATHER_AFTER`]) nothing waits.
    fn gather(&self, batch: &mut Vec<Cmd<T>>, stopping: &mut bool, last_batch: usize) {
        if last_batch < GATHER_AFTER || self.options.commit_window.is_zero() {
            return;
        }
        let wanted = last_batch.min(self.options.max_batch);
        let deadline = later(self.options.commit_window);
        while batch.len() < wanted && !*stopping {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.gathering
                .wanted
                .store(wanted - batch.len(), Ordering::SeqCst);
            fence(Ordering::SeqCst);
            // Requests sent before `wanted` was set did not wake anyone: take them.
            let before = batch.len();
            self.drain(batch, stopping);
            if batch.len() == before {
                std::thread::park_timeout(deadline - now);
            }
            self.gathering.wanted.store(usize::MAX, Ordering::SeqCst);
            self.drain(batch, stopping);
        }
    }

    /// Moves queued requests into `batch`, up to `max_batch`.
    fn drain(&self, batch: &mut Vec<Cmd<T>>, stopping: &mut bool) {
        let mut taken = 0;
        while batch.len() < self.options.max_batch {
            match self.rx.try_recv() {
                Ok(Cmd::Shutdown) => *stopping = true,
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
            taken += 1;
        }
        self.gathering.queued.fetch_sub(taken, Ordering::SeqCst);
    }

    /// Commits one batch: plans it against the streams, writes its record, applies it,
    /// then hands its entries to `on_commit` and acknowledges every request.
    fn process(&mut self, batch: Vec<Cmd<T>>) {
        let size = batch.len() as u64;
        let now = now_ms();
        let mut ops = Vec::with_capacity(batch.len());
        let mut pending = Vec::with_capacity(batch.len());
        {
            let streams = read_lock(&self.streams);
            let mut planned: HashMap<Arc<str>, Planned> = HashMap::new();
            for cmd in batch {
                match cmd {
                    Cmd::Append {
                        channel,
                        value,
                        retention,
                        reply,
                    } => {
                        let Some(stream) = plan(&mut planned, &streams, &channel, true) else {
                            continue;
                        };
                        stream.top += 1;
                        // Keep append times monotonic per stream even if the clock steps back.
                        stream.last_ms = stream.last_ms.max(now);
                        let position = StreamPosition {
                            offset: stream.top,
                            epoch: stream.epoch.clone(),
                        };
                        let op = Op::Append {
                            epoch: stream.epoch.clone(),
                            offset: stream.top,
                            time_ms: stream.last_ms,
                            max_len: retention.max_len as u64,
                            ttl_ms: ttl_ms(retention.ttl),
                            data: value.stored(),
                            channel,
                        };
                        pending.push(Pending::Appended {
                            op: ops.len(),
                            position,
                            value,
                            reply,
                        });
                        ops.push(op);
                    }
                    Cmd::Ensure { channel, reply } => {
                        // Created by this batch already, or before it.
                        let known =
                            planned.contains_key(&channel) || streams.contains_key(&channel);
                        let Some(stream) = plan(&mut planned, &streams, &channel, true) else {
                            continue;
                        };
                        let position = StreamPosition {
                            offset: stream.top,
                            epoch: stream.epoch.clone(),
                        };
                        if !known {
                            ops.push(Op::Create {
                                epoch: stream.epoch.clone(),
                                channel,
                            });
                        }
                        pending.push(Pending::Ensured { position, reply });
                    }
                    Cmd::Remove { channel, reply } => {
                        if let Some(stream) = plan(&mut planned, &streams, &channel, false) {
                            let op = Op::Remove {
                                epoch: stream.epoch.clone(),
                                top: stream.top,
                                channel,
                            };
                            ops.push(op);
                        }
                        pending.push(Pending::Removed { reply });
                    }
                    Cmd::Shutdown => {}
                }
            }
        }
        if let Some(failure) = self.failure.get() {
            // Planned for nothing: the log takes no more writes.
            let err = stopped(failure);
            for request in pending {
                request.fail(&err);
            }
            return;
        }
        if !ops.is_empty() {
            let started = Instant::now();
            let appended = self.wal.append(&ops);
            self.stats
                .commit_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.stats
                .wal_bytes
                .store(self.wal.len(), Ordering::Relaxed);
            if let Err(err) = appended {
                let err = io(err);
                self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%err, requests = pending.len(), "history log: commit failed");
                // The record may be on disk anyway: clear its place so that no restart
                // replays what its requesters were told failed.
                if let Err(clear) = self.wal.clear_tail() {
                    tracing::error!(err = %clear, "history log: cannot clear a failed record; no more writes until restart");
                    let _ = self.failure.set(io(clear));
                }
                for request in pending {
                    request.fail(&err);
                }
                return;
            }
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            self.stats.max_batch.fetch_max(size, Ordering::Relaxed);
        }
        // Durable: now readers may see it.
        let mut due: HashMap<&Arc<str>, Option<u64>> = HashMap::new();
        {
            let mut streams = write_lock(&self.streams);
            for op in &ops {
                if let Some(next) = streams::apply(&mut streams, op, now) {
                    due.insert(op.channel(), next);
                }
                self.changed.insert(op.channel().clone());
            }
        }
        for (channel, next) in due {
            self.schedule.set(channel, next);
        }
        // Deliver everything, in offset order, before acknowledging anything.
        let mut appended = 0;
        for request in &mut pending {
            if let Pending::Appended {
                op,
                position,
                value,
                ..
            } = request
            {
                if let Op::Append { channel, .. } = &ops[*op] {
                    appended += 1;
                    let on_commit = &self.on_commit;
                    if catch_unwind(AssertUnwindSafe(|| on_commit(channel, position, value)))
                        .is_err()
                    {
                        tracing::error!(
                            channel = &**channel,
                            offset = position.offset,
                            "history log: on_commit panicked"
                        );
                    }
                }
            }
        }
        self.stats.appends.fetch_add(appended, Ordering::Relaxed);
        for request in pending {
            request.succeed();
        }
    }

    /// Drops expired entries from the streams whose oldest entry is due.
    fn sweep(&mut self, now: u64) {
        let due = self.schedule.due(now);
        if due.is_empty() {
            return;
        }
        let mut streams = write_lock(&self.streams);
        for channel in due {
            let next = streams.get_mut(&channel).and_then(|s| s.trim(now));
            self.schedule.set(&channel, next);
            self.changed.insert(channel);
        }
    }

    /// One slice of the checkpoint in progress: stores some of the changed streams in
    /// `history.redb`, about [`SLICE_WORK`] worth (all of them if `whole`), in a commit
    /// without `fsync`. The slice that takes the last changed streams also stores the next
    /// generation, durably (which makes the earlier slices durable too), and the write-ahead
    /// file starts over. Batches run between slices, so a checkpoint never holds up appends
    /// for more than a slice; a stream they change again is stored again by a later slice.
    /// After [`MAX_SLICES`] slices the rest goes in one, so a checkpoint always ends.
    fn checkpoint_slice(&mut self, whole: bool) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if self.failure.get().is_some() || (self.changed.is_empty() && self.wal.len() == 0) {
            // Failed, or nothing to store.
            self.round = None;
            return;
        }
        round.slices += 1;
        let whole = whole || round.slices >= MAX_SLICES;
        let started = Instant::now();
        let streams = read_lock(&self.streams);
        let mut slice: Vec<&Arc<str>> = Vec::new();
        let mut work = 0;
        for channel in &self.changed {
            if !whole && work >= SLICE_WORK {
                break;
            }
            if let Some(stream) = streams.get(channel) {
                work += STREAM_WORK
                    + stream
                        .entries
                        .iter()
                        .rev()
                        .take_while(|e| e.offset > stream.saved_top)
                        .count();
            }
            slice.push(channel);
        }
        let last = slice.len() == self.changed.len();
        let next = self.wal.generation() + 1;
        let commit = if last {
            snapshot::Commit::Generation(next)
        } else {
            snapshot::Commit::Slice
        };
        let saved = snapshot::save(
            &self.db,
            slice
                .iter()
                .filter_map(|channel| streams.get_key_value(*channel))
                .map(|(channel, stream)| (&**channel, stream)),
            commit,
            self.options.quick_repair,
        );
        let slice: Vec<Arc<str>> = slice.into_iter().cloned().collect();
        drop(streams);
        if let Err(err) = saved {
            // The commit may or may not be on disk, so it is unknown which generation a
            // restart replays: acknowledging more records could promise what it drops.
            self.stats
                .failed_checkpoints
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(%err, "history log: checkpoint failed; no more writes until restart");
            let _ = self.failure.set(err);
            self.round = None;
            return;
        }
        self.stats.checkpoint_slices.fetch_add(1, Ordering::Relaxed);
        self.stats
            .checkpoint_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Some(round) = self.round.as_mut() {
            round.longest = round.longest.max(started.elapsed());
        }
        {
            // Nothing changed the streams since they were read: only this thread does.
            let mut streams = write_lock(&self.streams);
            for channel in &slice {
                if let Some(stream) = streams.get_mut(channel) {
                    stream.saved_top = stream.top;
                }
                self.changed.remove(channel);
            }
        }
        if last {
            if let Some(round) = self.round.take() {
                tracing::debug!(
                    slices = round.slices,
                    longest_slice_us = round.longest.as_micros() as u64,
                    records_bytes = self.wal.len(),
                    commits = self.stats.commits.load(Ordering::Relaxed),
                    appends = self.stats.appends.load(Ordering::Relaxed),
                    elapsed_us = round.started.elapsed().as_micros() as u64,
                    "history log: checkpoint"
                );
            }
            self.wal.restart(next);
            self.stats.wal_bytes.store(0, Ordering::Relaxed);
            self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
    }
}
