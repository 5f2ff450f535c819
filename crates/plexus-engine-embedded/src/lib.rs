//! The embedded engine, Plexus's default: history durable on disk, everything else in process.
//!
//! - [`log`]: a per-channel, append-only publication log with group commit: concurrent appends
//!   share one write-ahead record and one `fdatasync`, and each is acknowledged only once
//!   durable. Reads are served from memory; a [redb](https://docs.rs/redb) file holds the
//!   checkpoints.
//! - [`EmbeddedEngine`]: the `plexus_core::Engine` on top of it. Publications in channels with
//!   history go through the log and are delivered to subscribers from the log's commit callback,
//!   so subscribers see them in offset order and only once they would survive a crash (`kill -9`
//!   included). Presence, join/leave and channels without history are handled in memory, as one
//!   node needs nothing else.
//! - The outcomes of idempotent publishes (the API's `idempotency_key`) are kept in memory and,
//!   for a restart, in the log too: as entries of a stream of their own ([`keys_stream`]) that
//!   the log keeps for the record's window, checkpoints and replays like any other.
//!
//! It does not do cross-node delivery: for several nodes use a broker engine (Redis, NATS).

pub mod log;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use plexus_core::idempotency::{self, LocalClaims};

use plexus_core::{
    BoxFuture, ClientDescriptor, Deliver, Delivery, Engine, EngineError, EngineMetric, HistoryPage,
    HistoryQuery, HistoryRetention, Membership, MemoryEngine, MessageKind, NodeCommand,
    Publication, StreamPosition, MAX_CHANNEL_LEN,
};

pub use log::{DurableLog, Entry, LogError, LogOptions, LogStats, OnCommit, Payload, Retention};

const NAME: &str = "embedded";

/// Durable history in a [`DurableLog`]; the rest delegated to a [`MemoryEngine`].
pub struct EmbeddedEngine {
    /// Each append carries its publication to `on_commit`, which delivers it.
    log: DurableLog<Arc<Publication>>,
    memory: MemoryEngine,
    /// Idempotency records, as read from [`keys_stream`] at open and recorded since.
    claims: LocalClaims,
    /// [`keys_stream`].
    keys: Arc<str>,
}

/// The log's stream of idempotency records: a name longer than any channel's
/// ([`MAX_CHANNEL_LEN`]), so that no publication can go into it.
fn keys_stream() -> Arc<str> {
    let name = format!(
        "{:~<1$}",
        "~plexus/idempotency-records",
        MAX_CHANNEL_LEN + 1
    );
    name.into()
}

/// An idempotency record as an entry of [`keys_stream`]: when it ends (Unix milliseconds, u64
/// big-endian), the channel and the key (each a u32 big-endian length and its bytes), then the
/// record.
fn key_entry(ends_ms: u64, channel: &str, key: &str, record: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + channel.len() + key.len() + record.len());
    out.put_u64(ends_ms);
    for part in [channel, key] {
        out.put_u32(part.len() as u32);
        out.put_slice(part.as_bytes());
    }
    out.put_slice(record);
    out.freeze()
}

/// When a [`key_entry`] ends, its channel, key and record; `None` if it is not one.
fn parse_key_entry(mut entry: Bytes) -> Option<(u64, String, String, Bytes)> {
    let ends_ms = (entry.remaining() >= 8).then(|| entry.get_u64())?;
    let mut part = || {
        let len = (entry.remaining() >= 4).then(|| entry.get_u32() as usize)?;
        let bytes = (entry.remaining() >= len).then(|| entry.split_to(len))?;
        String::from_utf8(bytes.to_vec()).ok()
    };
    let (channel, key) = (part()?, part()?);
    Some((ends_ms, channel, key, entry))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

impl std::fmt::Debug for EmbeddedEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EmbeddedEngine")
            .finish_non_exhaustive()
    }
}

fn unavailable(error: LogError) -> EngineError {
    match error {
        LogError::Closed => EngineError::Closed { engine: NAME },
        other => EngineError::Unavailable {
            engine: NAME,
            source: Box::new(other),
        },
    }
}

/// The log stores a publication in its storage form, encoded on the writer thread.
impl log::Payload for Arc<Publication> {
    fn stored(&self) -> Bytes {
        self.to_stored()
    }
}

fn position(position: log::StreamPosition) -> StreamPosition {
    StreamPosition {
        offset: position.offset,
        epoch: position.epoch,
    }
}

impl EmbeddedEngine {
    /// Opens (or creates) the history under `dir` and delivers committed publications to
    /// `deliver`.
    pub fn open(dir: &Path, deliver: Arc<dyn Deliver>) -> Result<EmbeddedEngine, LogError> {
        let on_commit_deliver = deliver.clone();
        let keys = keys_stream();
        let records = keys.clone();
        let on_commit: OnCommit<Arc<Publication>> =
            Arc::new(move |channel, position, publication| {
                if **channel == *records {
                    return; // an idempotency record: nobody subscribes to it
                }
                // Made by the publisher and not shared yet, so the offset is set in place (no
                // copy): the writer thread allocates nothing to deliver it.
                Arc::make_mut(publication).offset = position.offset;
                on_commit_deliver.deliver(Delivery::Publication(publication.clone()))
            });
        let log = DurableLog::open(dir, on_commit)?;
        // The records kept before, each for the rest of its window.
        let claims = LocalClaims::default();
        let now = now_ms();
        for entry in log.existing(&keys).unwrap_or_default() {
            let Ok(stored) = Publication::from_stored(keys.clone(), entry.offset, entry.data)
            else {
                continue;
            };
            let Some((ends, channel, key, record)) = parse_key_entry(stored.data) else {
                continue;
            };
            if ends > now {
                // At most a window, should the clock have gone back since.
                let left = Duration::from_millis(ends - now).min(idempotency::WINDOW);
                claims.record(&channel, &key, record, left);
            }
        }
        Ok(EmbeddedEngine {
            log,
            memory: MemoryEngine::new(deliver),
            claims,
            keys,
        })
    }

    pub fn stats(&self) -> LogStats {
        self.log.stats()
    }
}

impl Engine for EmbeddedEngine {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Not ready once a storage failure stopped the log from taking writes.
    fn ready(&self) -> bool {
        self.log.accepts_writes()
    }

    fn metrics(&self) -> Vec<EngineMetric> {
        let stats = self.log.stats();
        let seconds = |micros: u64| micros as f64 / 1e6;
        vec![
            EngineMetric::counter(
                "history_appends",
                "Entries made durable in history: publications, and idempotent publishes' results",
                stats.appends as f64,
            ),
            EngineMetric::counter(
                "history_commits",
                "Write-ahead records committed, each one fdatasync",
                stats.commits as f64,
            ),
            EngineMetric::counter(
                "history_commit_seconds",
                "Time spent writing write-ahead records and waiting for fdatasync",
                seconds(stats.commit_micros),
            ),
            EngineMetric::counter(
                "history_commit_failures",
                "Commits that failed (their publishers got an error)",
                stats.failed_commits as f64,
            ),
            EngineMetric::gauge(
                "history_largest_batch",
                "The most publications committed in one record",
                stats.max_batch as f64,
            ),
            EngineMetric::gauge(
                "history_wal_bytes",
                "Bytes of write-ahead records since the last checkpoint",
                stats.wal_bytes as f64,
            ),
            EngineMetric::gauge(
                "history_streams",
                "Channels with a history stream",
                // Not the stream of idempotency records.
                stats
                    .streams
                    .saturating_sub(u64::from(self.log.has_stream(&self.keys)))
                    as f64,
            ),
            EngineMetric::counter(
                "history_checkpoints",
                "Checkpoints stored in history.redb",
                stats.checkpoints as f64,
            ),
            EngineMetric::counter(
                "history_checkpoint_seconds",
                "Time spent storing checkpoints",
                seconds(stats.checkpoint_micros),
            ),
            EngineMetric::counter(
                "history_checkpoint_failures",
                "Checkpoints that failed (the log then takes no more writes)",
                stats.failed_checkpoints as f64,
            ),
        ]
    }

    fn publish(
        &self,
        publication: Publication,
        retention: Option<HistoryRetention>,
    ) -> BoxFuture<Result<Option<StreamPosition>, EngineError>> {
        let Some(retention) = retention else {
            return self.memory.publish(publication, None);
        };
        let appended = self.log.append(
            publication.channel.clone(),
            Arc::new(publication),
            Retention {
                max_len: retention.size,
                ttl: retention.ttl,
            },
        );
        Box::pin(async move {
            appended
                .await
                .map(|appended| Some(position(appended)))
                .map_err(unavailable)
        })
    }

    fn publish_membership(
        &self,
        joined: bool,
        membership: Membership,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.memory.publish_membership(joined, membership)
    }

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> BoxFuture<Result<HistoryPage, EngineError>> {
        let result = self
            .log
            .read(channel, query.since, query.limit, query.reverse)
            .map_err(unavailable)
            .and_then(|(entries, top)| {
                let channel: Arc<str> = channel.into();
                let publications = entries
                    .into_iter()
                    .map(|entry| {
                        Publication::from_stored(channel.clone(), entry.offset, entry.data)
                            .map(Arc::new)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(HistoryPage {
                    publications,
                    top: position(top),
                })
            });
        Box::pin(std::future::ready(result))
    }

    fn remove_history(&self, channel: &str) -> BoxFuture<Result<(), EngineError>> {
        Box::pin(std::future::ready(
            self.log.remove(channel).map_err(unavailable),
        ))
    }

    fn watch(&self, channel: &str, watching: bool) -> BoxFuture<Result<(), EngineError>> {
        self.memory.watch(channel, watching)
    }

    fn add_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.memory.add_presence(channel, client)
    }

    fn remove_presence(&self, channel: &str, client: &str) -> BoxFuture<Result<(), EngineError>> {
        self.memory.remove_presence(channel, client)
    }

    fn presence(
        &self,
        channel: &str,
    ) -> BoxFuture<Result<Vec<Arc<ClientDescriptor>>, EngineError>> {
        self.memory.presence(channel)
    }

    fn command(&self, command: NodeCommand) -> BoxFuture<Result<(), EngineError>> {
        self.memory.command(command)
    }

    // Claims are kept in memory (a restart ends them, as it ends the publish they stand for);
    // records in memory and, for a restart, in the log.
    fn claim(
        &self,
        channel: &str,
        key: &str,
        ttl: Duration,
    ) -> BoxFuture<Result<plexus_core::idempotency::Claim, EngineError>> {
        Box::pin(std::future::ready(Ok(self.claims.claim(channel, key, ttl))))
    }

    fn record(
        &self,
        channel: &str,
        key: &str,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.claims.record(channel, key, record.clone(), ttl);
        let ends_ms = now_ms().saturating_add(ttl.as_millis() as u64);
        let entry = Publication::new(
            self.keys.clone(),
            MessageKind::Binary,
            key_entry(ends_ms, channel, key, &record),
            None,
        );
        // The log drops entries by age: kept as long as the longest window, and each read
        // back only until its own end. Queued now and committed with the next batch, without
        // waiting for it: the caller answers as soon as the publication itself is durable, and
        // only a crash within that commit (one `fdatasync`) forgets the key.
        let appended = self.log.append(
            entry.channel.clone(),
            Arc::new(entry),
            Retention {
                max_len: usize::MAX,
                ttl: ttl.max(idempotency::WINDOW),
            },
        );
        drop(appended);
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>> {
        self.claims.release(channel, key);
        Box::pin(std::future::ready(Ok(())))
    }
}
