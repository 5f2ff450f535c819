//! Everything the engine asks of NATS, one request or a few each: the streams and bucket it
//! sets up, a channel's stream state, appends, history pages, presence, core publishes.
//!
//! # A channel's stream
//!
//! Its history is the messages of subject `{prefix}.hist.{token}` in the stream
//! `{prefix}_history`, each with headers `Plexus-Offset`, `Plexus-Expires` (ms since the Unix
//! epoch) and `Plexus-Keep` (the history size it was published with) and the stored
//! publication as payload. Its *meta* is the key `{token}` of the key-value bucket
//! `{prefix}_meta`: `1 {started} {floor} {epoch}` — the epoch, the offset through which
//! history was removed, and whether anything was ever appended in this epoch.
//!
//! An append names the stream sequence of the subject's last message
//! (`Nats-Expected-Last-Subject-Sequence`), so it succeeds only if nobody appended since the
//! state it was numbered from: offsets are gapless and strictly increasing per channel
//! whichever node publishes. The last message is never removed (trimming keeps the newest
//! `Plexus-Keep`, removal keeps one and raises the floor), so the top offset lives as long as
//! the stream does; a channel marked started whose subject is empty has lost its history
//! (the stream was deleted) and gets a new epoch.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, StorageType};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use plexus_core::{
    new_epoch, HistoryPage, HistoryQuery, HistoryRetention, Publication, StreamPosition,
};
use tokio::sync::watch;

use crate::codec::token;
use plexus_core::idempotency::{self, Claim};

/// The key of an idempotency record: the channel's token and the key's.
fn idempotency_key(channel: &str, key: &str) -> String {
    format!("{}.{}", token(channel), token(key))
}

/// Longest wait for one request to NATS.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after its start calls wait for the engine's first connection (instead of
/// failing at once as they do later while NATS is away).
pub const STARTUP_GRACE: Duration = Duration::from_secs(3);

const OFFSET: &str = "Plexus-Offset";
const EXPIRES: &str = "Plexus-Expires";
const KEEP: &str = "Plexus-Keep";
/// On a channel's core messages with an offset: the epoch of its stream.
pub const EPOCH: &str = "Plexus-Epoch";

/// How often a busy channel's stored messages are trimmed: every this fraction of its
/// history size (history reads hide the surplus meanwhile).
const TRIM_EVERY_FRACTION: u64 = 2;

/// Why NATS did not do something (the `source` of `EngineError::Unavailable`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("not connected to nats: {0}")]
    Disconnected(Arc<str>),
    #[error("nats request failed: {0}")]
    Failed(Arc<str>),
    #[error("no reply from nats within {0:?}")]
    Timeout(Duration),
    #[error("unexpected data in nats: {0}")]
    Corrupt(Arc<str>),
    #[error("too many concurrent appends to one channel")]
    Contention,
}

fn failed(error: impl std::fmt::Display) -> LinkError {
    LinkError::Failed(error.to_string().into())
}

/// Runs one request with [`RESPONSE_TIMEOUT`].
pub async fn bounded<T, E: std::fmt::Display>(
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(RESPONSE_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(failed(error)),
        Err(_) => Err(LinkError::Timeout(RESPONSE_TIMEOUT)),
    }
}

/// As [`bounded`], but leaves the request's own error to the caller.
async fn bounded_kv<T, E>(
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, LinkError> {
    tokio::time::timeout(RESPONSE_TIMEOUT, request)
        .await
        .map_err(|_| LinkError::Timeout(RESPONSE_TIMEOUT))
}

/// Milliseconds since the Unix epoch (this node's clock).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Subjects, stream and bucket names under one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: Arc<str>,
    pub control: String,
    pub history_stream: String,
    pub presence_stream: String,
    pub meta_bucket: String,
    /// Idempotency records (`{channel token}.{key token}`), each kept for
    /// `plexus_core::idempotency::WINDOW`.
    pub idempotency_bucket: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.into(),
            control: format!("{prefix}.control"),
            history_stream: format!("{prefix}_history"),
            presence_stream: format!("{prefix}_presence"),
            meta_bucket: format!("{prefix}_meta"),
            idempotency_bucket: format!("{prefix}_idem"),
        }
    }

    /// The core subject of a channel's publications, joins and leaves.
    pub fn pub_subject(&self, channel: &str) -> String {
        format!("{}.pub.{}", self.prefix, token(channel))
    }

    fn hist_subject(&self, channel: &str) -> String {
        format!("{}.hist.{}", self.prefix, token(channel))
    }

    fn presence_subject(&self, channel: &str, client: &str) -> String {
        format!(
            "{}.presence.{}.{}",
            self.prefix,
            token(channel),
            token(client)
        )
    }

    fn presence_filter(&self, channel: &str) -> String {
        format!("{}.presence.{}.*", self.prefix, token(channel))
    }

    /// A subject nobody subscribes to: a request there comes back at once ("no responders")
    /// once the server has processed everything this connection sent before it.
    fn sync_subject(&self) -> String {
        format!("{}.sync", self.prefix)
    }
}

/// A channel's meta record (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub epoch: Arc<str>,
    pub floor: u64,
    pub started: bool,
}

impl Meta {
    fn fresh() -> Meta {
        Meta {
            epoch: new_epoch(),
            floor: 0,
            started: false,
        }
    }

    fn encode(&self) -> Bytes {
        format!("1 {} {} {}", u8::from(self.started), self.floor, self.epoch).into()
    }

    fn decode(bytes: &[u8]) -> Option<Meta> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(4, ' ');
        if parts.next()? != "1" {
            return None;
        }
        let started = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let floor = parts.next()?.parse().ok()?;
        let epoch = parts.next().filter(|epoch| !epoch.is_empty())?;
        Some(Meta {
            epoch: epoch.into(),
            floor,
            started,
        })
    }
}

/// A message of a channel's history.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub offset: u64,
    pub expires: u64,
    pub keep: u64,
    pub payload: Bytes,
}

impl Stored {
    fn parse(sequence: u64, headers: Option<&HeaderMap>, payload: Bytes) -> Option<Stored> {
        let headers = headers?;
        let number = |name: &str| -> Option<u64> { headers.get(name)?.as_str().parse().ok() };
        Some(Stored {
            sequence,
            offset: number(OFFSET)?,
            expires: number(EXPIRES)?,
            keep: number(KEEP)?,
            payload,
        })
    }
}

/// What is known of a channel's stream: its meta (and the meta's revision in the bucket) and
/// its last message.
#[derive(Debug, Clone)]
pub struct ChannelState {
    pub meta: Meta,
    pub revision: u64,
    pub last: Option<Stored>,
}

impl ChannelState {
    pub fn top(&self) -> u64 {
        self.last.as_ref().map_or(0, |last| last.offset)
    }

    fn last_sequence(&self) -> u64 {
        self.last.as_ref().map_or(0, |last| last.sequence)
    }

    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top(),
            epoch: self.meta.epoch.clone(),
        }
    }
}

/// How an append failed.
pub enum AppendError {
    /// Someone appended since the state it was numbered from.
    Conflict,
    /// The history stream does not exist (NATS lost it).
    NoStream,
    Link(LinkError),
}

/// The connection and what the engine set up in NATS.
pub struct Store {
    pub client: Client,
    js: async_nats::jetstream::Context,
    pub names: Names,
    presence_ttl: Duration,
    meta: RwLock<Option<kv::Store>>,
    idempotency: RwLock<Option<kv::Store>>,
    /// Streams and bucket exist for the current connection.
    set_up: AtomicBool,
    /// Bumped on every (re)connection: cached channel states may be stale.
    generation: AtomicU64,
    /// Whether set up (as `set_up`), for waiting on it.
    ready: watch::Sender<bool>,
    /// Ready once at least.
    started: AtomicBool,
    created: Instant,
}

impl Store {
    pub fn new(client: Client, names: Names, presence_ttl: Duration) -> Store {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(RESPONSE_TIMEOUT)
            .build(client.clone());
        Store {
            client,
            js,
            names,
            presence_ttl,
            meta: RwLock::new(None),
            idempotency: RwLock::new(None),
            set_up: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            ready: watch::channel(false).0,
            started: AtomicBool::new(false),
            created: Instant::now(),
        }
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Connected, with streams and bucket set up.
    pub fn is_ready(&self) -> bool {
        self.connected() && self.set_up.load(Ordering::Acquire)
    }

    /// `Err` at once unless [`Store::is_ready`].
    pub fn usable(&self) -> Result<(), LinkError> {
        if self.is_ready() {
            return Ok(());
        }
        let state = self.client.connection_state();
        Err(LinkError::Disconnected(
            match state {
                State::Connected => "setting up streams".to_owned(),
                other => other.to_string(),
            }
            .into(),
        ))
    }

    /// As [`Store::usable`], but until the engine is first ready (its first connection may
    /// still be on its way) waits for that, up to [`STARTUP_GRACE`] from its start.
    pub async fn usable_soon(&self) -> Result<(), LinkError> {
        if self.is_ready() || self.started.load(Ordering::Acquire) {
            return self.usable();
        }
        let remaining = STARTUP_GRACE.saturating_sub(self.created.elapsed());
        if !remaining.is_zero() {
            let mut ready = self.ready.subscribe();
            let _ = tokio::time::timeout(remaining, ready.wait_for(|ready| *ready)).await;
        }
        self.usable()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The connection was lost or made again: nothing is known to be set up.
    pub fn connection_changed(&self) {
        self.set_up.store(false, Ordering::Release);
        self.ready.send_replace(false);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Creates the streams and the bucket where missing (each node does; the first one
    /// creates them), then waits for the server to have processed every subscription made so
    /// far, and marks the store ready.
    pub async fn setup(&self) -> Result<(), LinkError> {
        let history = stream::Config {
            name: self.names.history_stream.clone(),
            subjects: vec![format!("{}.hist.>", self.names.prefix)],
            storage: StorageType::File,
            ..stream::Config::default()
        };
        bounded(self.js.get_or_create_stream(history)).await?;
        let presence = stream::Config {
            name: self.names.presence_stream.clone(),
            subjects: vec![format!("{}.presence.>", self.names.prefix)],
            storage: StorageType::Memory,
            max_age: self.presence_ttl,
            max_messages_per_subject: 1,
            ..stream::Config::default()
        };
        bounded(self.js.get_or_create_stream(presence)).await?;
        let meta = self.bucket(&self.names.meta_bucket, None).await?;
        *self.meta.write().unwrap_or_else(|e| e.into_inner()) = Some(meta);
        // Idempotency records: kept for the window, then dropped by the server.
        let window = Some(plexus_core::idempotency::WINDOW);
        let idempotency = self.bucket(&self.names.idempotency_bucket, window).await?;
        *self.idempotency.write().unwrap_or_else(|e| e.into_inner()) = Some(idempotency);
        self.sync().await?;
        self.set_up.store(true, Ordering::Release);
        self.started.store(true, Ordering::Release);
        self.ready.send_replace(true);
        Ok(())
    }

    /// A key-value bucket, its stream made here with the key-value conventions (rather than by
    /// `create_key_value`, which needs account fields servers before 2.10 do not send). With
    /// `max_age`, entries are dropped that long after they were written (deletes allowed);
    /// without, they stay and cannot be deleted.
    async fn bucket(
        &self,
        bucket: &str,
        max_age: Option<Duration>,
    ) -> Result<kv::Store, LinkError> {
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            storage: StorageType::File,
            max_messages_per_subject: 1,
            max_age: max_age.unwrap_or_default(),
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: max_age.is_none(),
            allow_direct: true,
            ..stream::Config::default()
        };
        bounded(self.js.get_or_create_stream(config)).await?;
        bounded(self.js.get_key_value(bucket)).await
    }

    /// Waits until the server has processed everything sent before on this connection
    /// (subscriptions included).
    pub async fn sync(&self) -> Result<(), LinkError> {
        let request = self.client.request(self.names.sync_subject(), Bytes::new());
        match tokio::time::timeout(RESPONSE_TIMEOUT, request).await {
            Err(_) => Err(LinkError::Timeout(RESPONSE_TIMEOUT)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => match error.kind() {
                async_nats::client::RequestErrorKind::NoResponders => Ok(()),
                _ => Err(failed(error)),
            },
        }
    }

    fn meta_bucket(&self) -> Result<kv::Store, LinkError> {
        self.meta
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| LinkError::Disconnected("not set up yet".into()))
    }

    fn idempotency_bucket(&self) -> Result<kv::Store, LinkError> {
        self.idempotency
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| LinkError::Disconnected("not set up yet".into()))
    }

    /// Claims an idempotency key (see `Engine::claim`): creates its record, or takes over a
    /// pending one past its time (compare-and-set on its revision), or reads the one held.
    /// (Records live the bucket's `max_age` from their last write.)
    pub async fn claim(
        &self,
        channel: &str,
        key: &str,
        pending: Duration,
    ) -> Result<Claim, LinkError> {
        let bucket = self.idempotency_bucket()?;
        let name = idempotency_key(channel, key);
        for _ in 0..8 {
            let created = bucket.create(name.as_str(), idempotency::pending_record(pending));
            match bounded_kv(created).await? {
                Ok(_) => return Ok(Claim::Won),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(error) => return Err(failed(error)),
            }
            match bounded(bucket.entry(name.as_str())).await? {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    if !idempotency::pending_is_stale(&entry.value) {
                        return Ok(Claim::Held(entry.value));
                    }
                    let record = idempotency::pending_record(pending);
                    let took = bucket.update(name.as_str(), record, entry.revision);
                    if bounded_kv(took).await?.is_ok() {
                        return Ok(Claim::Won);
                    }
                    // Someone else took it over or recorded meanwhile: read again.
                }
                // Released or expired between the two requests: claim again.
                _ => {}
            }
        }
        Err(LinkError::Contention)
    }

    /// Replaces the record of a claimed key.
    pub async fn record(&self, channel: &str, key: &str, record: Bytes) -> Result<(), LinkError> {
        let bucket = self.idempotency_bucket()?;
        bounded(bucket.put(idempotency_key(channel, key), record))
            .await
            .map(drop)
    }

    /// Gives a claim up.
    pub async fn release(&self, channel: &str, key: &str) -> Result<(), LinkError> {
        let bucket = self.idempotency_bucket()?;
        bounded(bucket.delete(idempotency_key(channel, key))).await
    }

    /// A channel's meta and its revision, created (with a new epoch) if it has none.
    pub async fn load_meta(&self, channel: &str) -> Result<(Meta, u64), LinkError> {
        let bucket = self.meta_bucket()?;
        let key = token(channel);
        for _ in 0..8 {
            match bounded(bucket.entry(key.as_str())).await? {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    let meta = Meta::decode(&entry.value).ok_or_else(|| {
                        LinkError::Corrupt(format!("bad meta of channel {channel:?}").into())
                    })?;
                    return Ok((meta, entry.revision));
                }
                _ => {
                    let meta = Meta::fresh();
                    match tokio::time::timeout(
                        RESPONSE_TIMEOUT,
                        bucket.create(key.as_str(), meta.encode()),
                    )
                    .await
                    {
                        Err(_) => return Err(LinkError::Timeout(RESPONSE_TIMEOUT)),
                        Ok(Ok(revision)) => return Ok((meta, revision)),
                        Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
                        Ok(Err(error)) => return Err(failed(error)),
                    }
                }
            }
        }
        Err(LinkError::Contention)
    }

    /// Replaces a channel's meta if its revision is still `revision`: `Some(new revision)`,
    /// or `None` if someone changed it meanwhile.
    pub async fn update_meta(
        &self,
        channel: &str,
        meta: &Meta,
        revision: u64,
    ) -> Result<Option<u64>, LinkError> {
        let bucket = self.meta_bucket()?;
        let update = bucket.update(token(channel), meta.encode(), revision);
        match tokio::time::timeout(RESPONSE_TIMEOUT, update).await {
            Err(_) => Err(LinkError::Timeout(RESPONSE_TIMEOUT)),
            Ok(Ok(revision)) => Ok(Some(revision)),
            Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Ok(Err(error)) => Err(failed(error)),
        }
    }

    async fn last_message(&self, channel: &str) -> Result<Option<Stored>, LinkError> {
        let stream = bounded(self.js.get_stream_no_info(&self.names.history_stream)).await?;
        let subject = self.names.hist_subject(channel);
        let got = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            stream.get_last_raw_message_by_subject(&subject),
        )
        .await
        .map_err(|_| LinkError::Timeout(RESPONSE_TIMEOUT))?;
        match got {
            Ok(message) => Stored::parse(message.sequence, Some(&message.headers), message.payload)
                .map(Some)
                .ok_or_else(|| {
                    LinkError::Corrupt(format!("bad history message in {channel:?}").into())
                }),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(failed(error)),
        }
    }

    /// Where a channel's stream is: its epoch (`None` before its first publish) and the offset
    /// of its last stored publication (0 if none), read without creating anything.
    pub async fn position_now(&self, channel: &str) -> Result<(Option<Arc<str>>, u64), LinkError> {
        let bucket = self.meta_bucket()?;
        let epoch = match bounded(bucket.entry(token(channel))).await? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Meta::decode(&entry.value).map(|meta| meta.epoch)
            }
            _ => None,
        };
        let offset = self
            .last_message(channel)
            .await?
            .map_or(0, |stored| stored.offset);
        Ok((epoch, offset))
    }

    /// A channel's current state: its meta (created if missing; a new epoch if its history
    /// was lost) and its last message.
    pub async fn load_state(&self, channel: &str) -> Result<ChannelState, LinkError> {
        for _ in 0..8 {
            // The meta first: if it says started, the first append had finished before.
            let (meta, revision) = self.load_meta(channel).await?;
            let last = self.last_message(channel).await?;
            if last.is_none() && meta.started {
                tracing::warn!(channel, "history lost in nats: starting a new epoch");
                let fresh = Meta::fresh();
                match self.update_meta(channel, &fresh, revision).await? {
                    Some(revision) => {
                        return Ok(ChannelState {
                            meta: fresh,
                            revision,
                            last: None,
                        })
                    }
                    None => continue,
                }
            }
            return Ok(ChannelState {
                meta,
                revision,
                last,
            });
        }
        Err(LinkError::Contention)
    }

    /// Appends a publication as the one after `state`'s last message; the new message.
    pub async fn append(
        &self,
        channel: &str,
        state: &ChannelState,
        stored: &Bytes,
        retention: HistoryRetention,
    ) -> Result<Stored, AppendError> {
        let offset = state.top() + 1;
        let expires = now_millis().saturating_add(millis(retention.ttl));
        let keep = u64::try_from(retention.size).unwrap_or(u64::MAX).max(1);
        let publish = Publish::build()
            .payload(stored.clone())
            .header(OFFSET, offset.to_string())
            .header(EXPIRES, expires.to_string())
            .header(KEEP, keep.to_string())
            .expected_last_subject_sequence(state.last_sequence());
        let subject = self.names.hist_subject(channel);
        let acked = tokio::time::timeout(RESPONSE_TIMEOUT, async {
            self.js.send_publish(subject, publish).await?.await
        })
        .await
        .map_err(|_| AppendError::Link(LinkError::Timeout(RESPONSE_TIMEOUT)))?;
        match acked {
            Ok(ack) => Ok(Stored {
                sequence: ack.sequence,
                offset,
                expires,
                keep,
                payload: stored.clone(),
            }),
            Err(error) => Err(match error.kind() {
                PublishErrorKind::WrongLastSequence => AppendError::Conflict,
                PublishErrorKind::StreamNotFound => AppendError::NoStream,
                _ => AppendError::Link(failed(error)),
            }),
        }
    }

    /// Drops a channel's stored messages but the newest `keep`, in the background.
    pub fn trim(self: &Arc<Self>, channel: &str, top: u64, keep: u64) {
        let step = (keep / TRIM_EVERY_FRACTION).max(1);
        if top <= keep || !(top - keep).is_multiple_of(step) {
            return;
        }
        let store = self.clone();
        let subject = self.names.hist_subject(channel);
        tokio::spawn(async move {
            if let Err(error) = store
                .purge(&store.names.history_stream, subject, keep)
                .await
            {
                tracing::debug!(%error, "could not trim a channel's history in nats");
            }
        });
    }

    async fn purge(&self, stream: &str, subject: String, keep: u64) -> Result<(), LinkError> {
        let stream = bounded(self.js.get_stream_no_info(stream)).await?;
        let purge = stream.purge().filter(subject);
        if keep == 0 {
            bounded(purge.into_future()).await?;
        } else {
            bounded(purge.keep(keep).into_future()).await?;
        }
        Ok(())
    }

    /// Hides and drops a channel's publications; its top and epoch stay.
    pub async fn remove_history(&self, channel: &str) -> Result<ChannelState, LinkError> {
        let mut state = self.load_state(channel).await?;
        for _ in 0..8 {
            let top = state.top();
            if state.meta.floor >= top {
                break;
            }
            let meta = Meta {
                floor: top,
                ..state.meta.clone()
            };
            match self.update_meta(channel, &meta, state.revision).await? {
                Some(revision) => {
                    state.meta = meta;
                    state.revision = revision;
                    break;
                }
                None => state = self.load_state(channel).await?,
            }
        }
        if state.top() > 0 {
            // The last message stays: it holds the top offset.
            self.purge(
                &self.names.history_stream,
                self.names.hist_subject(channel),
                1,
            )
            .await?;
        }
        Ok(state)
    }

    /// Marks a channel's stream as started (something was appended in its epoch).
    pub async fn mark_started(&self, channel: &str, state: &mut ChannelState) {
        for _ in 0..4 {
            if state.meta.started {
                return;
            }
            let meta = Meta {
                started: true,
                ..state.meta.clone()
            };
            match self.update_meta(channel, &meta, state.revision).await {
                Ok(Some(revision)) => {
                    state.meta = meta;
                    state.revision = revision;
                    return;
                }
                Ok(None) => match self.load_meta(channel).await {
                    Ok((meta, revision)) if meta.epoch == state.meta.epoch => {
                        state.meta = meta;
                        state.revision = revision;
                    }
                    _ => return,
                },
                Err(error) => {
                    tracing::debug!(channel, %error, "could not mark a stream started");
                    return;
                }
            }
        }
    }

    /// Every message of a consumer on `filter` (`last_per_subject`: the newest of each
    /// subject), read by an ephemeral consumer that is deleted afterwards.
    async fn read_all(
        &self,
        stream_name: &str,
        filter: String,
        last_per_subject: bool,
    ) -> Result<Vec<(Option<HeaderMap>, Bytes, u64)>, LinkError> {
        let stream = bounded(self.js.get_stream_no_info(stream_name)).await?;
        let config = pull::Config {
            filter_subject: filter,
            deliver_policy: if last_per_subject {
                DeliverPolicy::LastPerSubject
            } else {
                DeliverPolicy::All
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..pull::Config::default()
        };
        let consumer = bounded(stream.create_consumer(config)).await?;
        let pending = usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX);
        let name = consumer.cached_info().name.clone();
        let read = async {
            let mut out = Vec::with_capacity(pending);
            if pending == 0 {
                return Ok(out);
            }
            let mut batch = consumer
                .fetch()
                .max_messages(pending)
                .messages()
                .await
                .map_err(failed)?;
            while let Some(message) = batch.next().await {
                let message = message.map_err(failed)?;
                let sequence = message.info().map_or(0, |info| info.stream_sequence);
                let message = message.split().0;
                out.push((message.headers, message.payload, sequence));
                if out.len() >= pending {
                    break;
                }
            }
            Ok::<_, LinkError>(out)
        };
        let result = tokio::time::timeout(RESPONSE_TIMEOUT, read)
            .await
            .unwrap_or(Err(LinkError::Timeout(RESPONSE_TIMEOUT)));
        tokio::spawn(async move {
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, stream.delete_consumer(&name)).await;
        });
        result
    }

    /// A page of a channel's history.
    pub async fn history(
        &self,
        channel: &Arc<str>,
        query: HistoryQuery,
    ) -> Result<HistoryPage, LinkError> {
        let state = self.load_state(channel).await?;
        let top = state.position();
        let Some(last) = state.last.as_ref() else {
            return Ok(HistoryPage {
                publications: Vec::new(),
                top,
            });
        };
        let lower = state
            .meta
            .floor
            .max(query.since.unwrap_or(0))
            .max(last.offset.saturating_sub(last.keep));
        if query.limit == Some(0) || lower >= last.offset {
            return Ok(HistoryPage {
                publications: Vec::new(),
                top,
            });
        }
        let now = now_millis();
        // Only the last asked for (the newest, as cache recovery reads): no need to read the
        // subject's other messages.
        let newest_only = query.reverse && query.limit == Some(1);
        let mut entries: Vec<Stored> = if last.offset - lower == 1 || newest_only {
            vec![last.clone()]
        } else {
            self.read_all(
                &self.names.history_stream,
                self.names.hist_subject(channel),
                false,
            )
            .await?
            .into_iter()
            .filter_map(|(headers, payload, sequence)| {
                Stored::parse(sequence, headers.as_ref(), payload)
            })
            .filter(|stored| stored.offset > lower && stored.offset <= last.offset)
            .collect()
        };
        entries.retain(|stored| stored.expires > now);
        entries.sort_by_key(|stored| stored.offset);
        entries.dedup_by_key(|stored| stored.offset);
        if query.reverse {
            entries.reverse();
        }
        if let Some(limit) = query.limit {
            entries.truncate(limit);
        }
        let publications = entries
            .into_iter()
            .map(|stored| {
                Publication::from_stored(channel.clone(), stored.offset, stored.payload)
                    .map(Arc::new)
                    .map_err(|_| {
                        LinkError::Corrupt(format!("bad publication in {channel:?}").into())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HistoryPage { publications, top })
    }

    /// Adds (or refreshes) a client's presence.
    pub async fn add_presence(
        &self,
        channel: &str,
        client: &str,
        descriptor: Bytes,
    ) -> Result<(), LinkError> {
        let expires = now_millis().saturating_add(millis(self.presence_ttl));
        let publish = Publish::build()
            .payload(descriptor)
            .header(EXPIRES, expires.to_string());
        let subject = self.names.presence_subject(channel, client);
        tokio::time::timeout(RESPONSE_TIMEOUT, async {
            self.js.send_publish(subject, publish).await?.await
        })
        .await
        .map_err(|_| LinkError::Timeout(RESPONSE_TIMEOUT))?
        .map_err(failed)?;
        Ok(())
    }

    pub async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), LinkError> {
        self.purge(
            &self.names.presence_stream,
            self.names.presence_subject(channel, client),
            0,
        )
        .await
    }

    /// The descriptors of the clients present in a channel (unexpired).
    pub async fn presence(&self, channel: &str) -> Result<Vec<Bytes>, LinkError> {
        let now = now_millis();
        let entries = self
            .read_all(
                &self.names.presence_stream,
                self.names.presence_filter(channel),
                true,
            )
            .await?;
        Ok(entries
            .into_iter()
            .filter(|(headers, _, _)| {
                headers
                    .as_ref()
                    .and_then(|headers| headers.get(EXPIRES))
                    .and_then(|expires| expires.as_str().parse::<u64>().ok())
                    .is_some_and(|expires| expires > now)
            })
            .map(|(_, payload, _)| payload)
            .collect())
    }

    /// Publishes on a core subject (no acknowledgement beyond the connection's).
    pub async fn publish_core(
        &self,
        subject: String,
        epoch: Option<&str>,
        payload: Bytes,
    ) -> Result<(), LinkError> {
        match epoch {
            Some(epoch) => {
                let mut headers = HeaderMap::new();
                headers.insert(EPOCH, epoch);
                bounded(self.client.publish_with_headers(subject, headers, payload)).await
            }
            None => bounded(self.client.publish(subject, payload)).await,
        }
    }

    /// Deletes the streams and the bucket of this prefix (tests clean up with it).
    pub async fn destroy(&self) -> Result<(), LinkError> {
        for stream in [
            &self.names.history_stream,
            &self.names.presence_stream,
            &format!("KV_{}", self.names.meta_bucket),
            &format!("KV_{}", self.names.idempotency_bucket),
        ] {
            bounded(self.js.delete_stream(stream)).await?;
        }
        Ok(())
    }
}
