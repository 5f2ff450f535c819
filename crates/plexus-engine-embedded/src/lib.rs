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
//!
//! It does not do cross-node delivery: for several nodes use a broker engine (Redis, NATS).

pub mod log;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use plexus_core::{
    BoxFuture, ClientDescriptor, Deliver, Delivery, Engine, EngineError, EngineMetric, HistoryPage,
    HistoryQuery, HistoryRetention, Membership, MemoryEngine, NodeCommand, Publication,
    StreamPosition,
};

pub use log::{DurableLog, Entry, LogError, LogOptions, LogStats, OnCommit, Payload, Retention};

const NAME: &str = "embedded";

/// Durable history in a [`DurableLog`]; the rest delegated to a [`MemoryEngine`].
pub struct EmbeddedEngine {
    /// Each append carries its publication to `on_commit`, which delivers it.
    log: DurableLog<Arc<Publication>>,
    memory: MemoryEngine,
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
        let on_commit: OnCommit<Arc<Publication>> =
            Arc::new(move |_channel, position, publication| {
                // Made by the publisher and not shared yet, so the offset is set in place (no
                // copy): the writer thread allocates nothing to deliver it.
                Arc::make_mut(publication).offset = position.offset;
                on_commit_deliver.deliver(Delivery::Publication(publication.clone()))
            });
        let log = DurableLog::open(dir, on_commit)?;
        Ok(EmbeddedEngine {
            log,
            memory: MemoryEngine::new(deliver),
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
                "Publications made durable in history",
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
                stats.streams as f64,
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

    // Idempotency records are kept in memory, as presence is: a restart forgets them.
    fn claim(
        &self,
        channel: &str,
        key: &str,
        ttl: std::time::Duration,
    ) -> BoxFuture<Result<plexus_core::idempotency::Claim, EngineError>> {
        self.memory.claim(channel, key, ttl)
    }

    fn record(
        &self,
        channel: &str,
        key: &str,
        record: bytes::Bytes,
        ttl: std::time::Duration,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.memory.record(channel, key, record, ttl)
    }

    fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>> {
        self.memory.release(channel, key)
    }
}
