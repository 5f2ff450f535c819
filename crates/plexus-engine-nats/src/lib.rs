//! The NATS engine: history, presence and delivery shared by every node connected to one NATS
//! (with JetStream), so several Plexus nodes serve the same channels.
//!
//! # What it keeps in NATS (under a prefix, `plexus` by default)
//!
//! | name | kind | what |
//! |---|---|---|
//! | `{prefix}.pub.{token}` | core subject | publications, joins and leaves of a channel ([`codec`]'s envelope) |
//! | `{prefix}.control` | core subject | [`NodeCommand`]s ([`codec`]) |
//! | `{prefix}_history` | stream (file), subjects `{prefix}.hist.>` | history: one subject per channel, offsets in headers (see `store`) |
//! | `{prefix}_meta` | key-value bucket | per channel: epoch, removed-through offset, started flag; kept forever |
//! | `{prefix}_idem` | key-value bucket | per channel and API idempotency key (`{token}.{key token}`): pending, then the first publish's position; entries live 5 minutes from their last write (`plexus_core::idempotency::WINDOW`), a pending one past its deadline is taken over |
//! | `{prefix}_presence` | stream (memory), subjects `{prefix}.presence.{token}.{client token}` | one message per present client (its descriptor), at most one per subject, dropped after [`NatsOptions::presence_ttl`] |
//!
//! `{token}` is the channel name in URL-safe base64 ([`codec::token`]), so any channel name is
//! one subject token.
//!
//! # A publish
//!
//! With history it is a JetStream append to the channel's history subject that names the
//! last message it follows (`Nats-Expected-Last-Subject-Sequence`) and carries the next
//! offset; if another node appended first, the append is refused and retried from the new
//! state, so offsets are gapless and increasing whichever node publishes. Once stored, the
//! offset-stamped envelope goes out on the channel's core subject, and every node delivers it
//! in offset order (a publication overtaken by another node's waits briefly for it, then the
//! gap is filled from history). Without history it is one core publish (offset 0).
//! Retention: each message carries its history size and expiry; reads return the newest
//! `size` unexpired ones, and older messages are purged from the stream as the channel goes
//! on (the newest always stays: it holds the top offset).
//!
//! # Connections
//!
//! One NATS connection, which reconnects by itself (50 ms doubling to 2 s) and subscribes
//! again; after every (re)connection the engine makes sure its streams and bucket exist,
//! refreshes its presence and only then reports ready ([`NatsEngine::is_ready`]).
//! - **Writers** (`writer`): [`NatsOptions::shards`] tasks; a channel's operations all go
//!   through the one its name hashes to, queued *in the call* and run in order, which gives
//!   `publish` its ordering at call time.
//! - **Subscriber** (`subscriber`): a subscription per watched channel and one to the control
//!   subject.
//!
//! While NATS is unreachable calls fail with [`EngineError::Unavailable`] at once (or within
//! [`NatsOptions::timeout`] when the connection is not yet known to be lost).
//!
//! # Presence
//!
//! Each client's presence expires after [`NatsOptions::presence_ttl`] unless refreshed: the
//! engine refreshes the presence it added every [`NatsOptions::presence_refresh`] and right
//! after reconnecting, so a node that dies leaves no presence behind for long.

pub mod codec;
mod store;
mod subscriber;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::rustls;
use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::{ConnectOptions, Event, ServerAddr};
use futures_util::FutureExt;
use plexus_core::idempotency::Claim;
use plexus_core::{
    BoxFuture, ClientDescriptor, Deliver, Engine, EngineError, HistoryPage, HistoryQuery,
    HistoryRetention, Membership, NodeCommand, PresenceMap, Publication, StreamPosition,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

pub use crate::store::LinkError;
use crate::store::{Names, Store};
use crate::subscriber::Subscriber;
use crate::writer::{Operation, Writers};

const NAME: &str = "nats";

/// How long a publish waits for its publication to come back through this node's
/// subscription (when the channel has local subscribers) before it resolves anyway, so a
/// publisher that waits for its acknowledgement has seen it delivered.
const LOCAL_DELIVERY_WAIT: Duration = Duration::from_secs(1);
/// How soon a presence refresh or a setup that failed is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Longest wait for a TCP connection and the server's greeting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the connection is pinged (two unanswered pings: reconnect).
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Where NATS is and how the engine uses it.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://[user:password@]host:port`, or several separated by commas; `tls://…` for TLS.
    pub url: String,
    /// For TLS: the PEM certificate(s) the server's certificate must chain to, instead of
    /// the system's roots (a private CA, a self-signed server).
    pub tls_ca: Option<Vec<u8>>,
    /// For TLS: this client's certificate and key (PEM), for a server that verifies clients.
    pub tls_client: Option<(Vec<u8>, Vec<u8>)>,
    /// Prefix of every subject, stream and bucket (letters, digits, `-` and `_`), so several
    /// installations share one NATS.
    pub prefix: String,
    /// Writer tasks; a channel always uses the same one.
    pub shards: usize,
    /// How long a client's presence lasts unless refreshed (the presence stream's max age;
    /// the first node to create the stream sets it).
    pub presence_ttl: Duration,
    /// How often the engine refreshes the presence it added.
    pub presence_refresh: Duration,
    /// Longest wait for one call before it fails as unavailable.
    pub timeout: Duration,
}

impl NatsOptions {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> NatsOptions {
        NatsOptions {
            url: url.into(),
            tls_ca: None,
            tls_client: None,
            prefix: prefix.into(),
            shards: 4,
            presence_ttl: Duration::from_secs(60),
            presence_refresh: Duration::from_secs(25),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Options the engine cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum NatsEngineError {
    /// Not echoed: a URL may hold a password.
    #[error("invalid nats url (expected nats://host:port)")]
    Url,
    #[error("the nats prefix must be letters, digits, '-' or '_', and not empty")]
    Prefix,
    #[error("cannot start the nats client: {0}")]
    Client(String),
    #[error("the nats TLS certificate authority holds no usable PEM certificate")]
    TlsCa,
    #[error("the nats TLS client certificate or key is not usable: {0}")]
    TlsClient(String),
}

/// A TLS client configuration trusting `ca` (PEM) or else Mozilla's roots, and presenting
/// `client` (certificate and key, PEM) if given.
fn tls_config(
    ca: Option<&[u8]>,
    client: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<rustls::ClientConfig, NatsEngineError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate.map_err(|_| NatsEngineError::TlsCa)?;
                roots.add(certificate).map_err(|_| NatsEngineError::TlsCa)?;
            }
            if roots.is_empty() {
                return Err(NatsEngineError::TlsCa);
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| NatsEngineError::TlsClient(error.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|error| NatsEngineError::TlsClient(error.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| NatsEngineError::TlsClient(error.to_string()))
        }
    }
}

/// Whether `prefix` can name subjects, streams and buckets.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The engine. Dropping it stops its tasks and closes its connection.
pub struct NatsEngine {
    inner: Arc<Inner>,
    cancel: CancellationToken,
}

struct Inner {
    options: NatsOptions,
    store: Arc<Store>,
    writers: Writers,
    subscriber: Arc<Subscriber>,
    /// Presence this node added, refreshed in the broker while its clients stay.
    presence: PresenceMap,
}

impl std::fmt::Debug for NatsEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NatsEngine")
            .field("prefix", &self.inner.options.prefix)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Drop for NatsEngine {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn unavailable(error: LinkError) -> EngineError {
    EngineError::Unavailable {
        engine: NAME,
        source: Box::new(error),
    }
}

/// `50 ms` doubling to `2 s` between reconnection attempts.
fn reconnect_delay(attempts: usize) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(6);
    (Duration::from_millis(50) * 2u32.pow(exponent)).min(Duration::from_secs(2))
}

impl NatsEngine {
    /// Starts the engine on the current Tokio runtime (it panics outside one); it connects in
    /// the background, and calls made meanwhile fail as unavailable. Fails only on bad
    /// options: a NATS that is down is waited for, not an error.
    pub fn new(
        options: NatsOptions,
        deliver: Arc<dyn Deliver>,
    ) -> Result<NatsEngine, NatsEngineError> {
        if !valid_prefix(&options.prefix) {
            return Err(NatsEngineError::Prefix);
        }
        let servers = options
            .url
            .split(',')
            .map(|url| url.trim().parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| NatsEngineError::Url)?;
        if servers.is_empty() {
            return Err(NatsEngineError::Url);
        }
        let tls = (options.tls_ca.is_some() || options.tls_client.is_some())
            .then(|| tls_config(options.tls_ca.as_deref(), options.tls_client.as_ref()))
            .transpose()?;
        let (events, event_receiver) = mpsc::unbounded_channel();
        let mut connect = ConnectOptions::new();
        if let Some(tls) = tls {
            connect = connect.tls_client_config(tls);
        }
        let connect = connect
            .name(format!("plexus ({})", options.prefix))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(store::RESPONSE_TIMEOUT))
            .ping_interval(PING_INTERVAL)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let _ = events.send(event);
                async {}
            })
            .connect(servers);
        // With `retry_on_initial_connect` the client is made without waiting: it connects in
        // a task of its own.
        let client = connect
            .now_or_never()
            .ok_or_else(|| NatsEngineError::Client("the client did not start at once".into()))?
            .map_err(|error| NatsEngineError::Client(error.to_string()))?;
        let cancel = CancellationToken::new();
        let store = Arc::new(Store::new(
            client,
            Names::new(&options.prefix),
            options.presence_ttl,
        ));
        let writers = Writers::start(store.clone(), options.shards, &cancel);
        let subscriber = Subscriber::new(store.clone(), deliver, &cancel);
        tokio::spawn(subscriber.clone().run_control());
        let inner = Arc::new(Inner {
            options,
            store,
            writers,
            subscriber,
            presence: PresenceMap::default(),
        });
        let connected = Arc::new(Notify::new());
        tokio::spawn(supervise(
            inner.clone(),
            event_receiver,
            connected.clone(),
            cancel.clone(),
        ));
        tokio::spawn(refresh_presence(inner.clone(), connected, cancel.clone()));
        Ok(NatsEngine { inner, cancel })
    }

    /// Whether the engine is connected to NATS with its streams and bucket in place.
    pub fn is_ready(&self) -> bool {
        self.inner.store.is_ready()
    }

    pub fn options(&self) -> &NatsOptions {
        &self.inner.options
    }

    /// Deletes this prefix's streams and bucket from NATS (history, meta and presence of every
    /// channel, for every node using the prefix). For tests and decommissioning.
    pub async fn destroy(&self) -> Result<(), EngineError> {
        self.inner.store.destroy().await.map_err(unavailable)
    }
}

/// Sets up streams and bucket after every (re)connection, then marks the engine ready.
async fn supervise(
    inner: Arc<Inner>,
    mut events: mpsc::UnboundedReceiver<Event>,
    connected: Arc<Notify>,
    cancel: CancellationToken,
) {
    let store = &inner.store;
    // Whether the connection was lost since the last setup.
    let mut lost = false;
    loop {
        let retry = if store.connected() && !store.is_ready() {
            match store.setup().await {
                Ok(()) => {
                    tracing::info!(prefix = &*store.names.prefix, "nats engine ready");
                    inner.subscriber.control_subscribed();
                    connected.notify_one();
                    if std::mem::take(&mut lost) {
                        // Publications sent while this node was not listening were missed
                        // (NATS may even have restarted empty: new epochs): every subscriber
                        // here resynchronises through history and recovery.
                        inner.subscriber.interrupted();
                    }
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot set up nats streams");
                    Some(RETRY)
                }
            }
        } else {
            None
        };
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            () = tokio::time::sleep(retry.unwrap_or(Duration::MAX)), if retry.is_some() => continue,
        };
        match event {
            // The first connection may have been set up already (when it came before its
            // event was read); a reconnection never was.
            Event::Connected if lost => store.connection_changed(),
            Event::Disconnected => {
                lost = true;
                store.connection_changed();
                inner.subscriber.connection_lost();
                tracing::warn!(prefix = &*store.names.prefix, "nats connection lost");
            }
            _ => {}
        }
    }
}

/// Refreshes this node's presence periodically and after every (re)connection.
async fn refresh_presence(inner: Arc<Inner>, connected: Arc<Notify>, cancel: CancellationToken) {
    let mut wait = inner.options.presence_refresh;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = connected.notified() => {}
        }
        let replies: Vec<_> = inner
            .presence
            .entries()
            .iter()
            .map(|(channel, client)| inner.call(channel, add_presence(client)))
            .collect();
        let mut failed = 0;
        for reply in replies {
            failed += usize::from(reply.await.is_err());
        }
        wait = inner.options.presence_refresh;
        if failed > 0 {
            tracing::warn!(failed, "could not refresh presence in nats");
            wait = wait.min(RETRY);
        }
    }
}

fn add_presence(client: &ClientDescriptor) -> Operation {
    Operation::AddPresence {
        client: client.client.clone(),
        descriptor: codec::encode_descriptor(client),
    }
}

impl Inner {
    /// Queues `operation` now on `channel`'s writer; the future is its outcome.
    fn call(
        &self,
        channel: &str,
        operation: Operation,
    ) -> impl Future<Output = Result<Option<StreamPosition>, EngineError>> + Send + 'static {
        let receiver = self.writers.send(channel, operation);
        let timeout = self.options.timeout;
        async move {
            let receiver = receiver.ok_or(EngineError::Closed { engine: NAME })?;
            match tokio::time::timeout(timeout, receiver).await {
                Ok(Ok(Ok(position))) => Ok(position),
                Ok(Ok(Err(error))) => Err(unavailable(error)),
                Ok(Err(_)) => Err(EngineError::Closed { engine: NAME }),
                Err(_) => Err(unavailable(LinkError::Timeout(timeout))),
            }
        }
    }

    /// Runs a direct request (not through a writer), failing at once while not ready.
    fn request<T: Send + 'static>(
        &self,
        request: impl Future<Output = Result<T, LinkError>> + Send + 'static,
    ) -> BoxFuture<Result<T, EngineError>> {
        let store = self.store.clone();
        let timeout = self.options.timeout;
        Box::pin(async move {
            store.usable_soon().await.map_err(unavailable)?;
            match tokio::time::timeout(timeout, request).await {
                Ok(result) => result.map_err(unavailable),
                Err(_) => Err(unavailable(LinkError::Timeout(timeout))),
            }
        })
    }
}

impl NatsEngine {
    /// Writes a client's presence entry and keeps it in the entries this node refreshes. A
    /// failed write takes it out of those again only if `forget_on_failure` (a subscribe that
    /// fails with it); an update keeps being refreshed.
    fn write_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
        forget_on_failure: bool,
    ) -> BoxFuture<Result<(), EngineError>> {
        let inner = self.inner.clone();
        let reply = inner.call(channel, add_presence(&client));
        let channel: Arc<str> = channel.into();
        inner.presence.add(&channel, client.clone());
        Box::pin(async move {
            let result = reply.await.map(drop);
            if result.is_err() && forget_on_failure {
                // Not present: nothing to refresh (unless it was added again meanwhile).
                inner.presence.forget(&channel, &client);
            }
            result
        })
    }
}

impl Engine for NatsEngine {
    fn name(&self) -> &'static str {
        NAME
    }

    fn ready(&self) -> bool {
        self.is_ready()
    }

    fn publish(
        &self,
        publication: Publication,
        retention: Option<HistoryRetention>,
    ) -> BoxFuture<Result<Option<StreamPosition>, EngineError>> {
        let inner = &self.inner;
        let channel = publication.channel.clone();
        let reply = inner.call(
            &channel,
            Operation::Publish {
                stored: publication.to_stored(),
                retention,
            },
        );
        let subscriber = inner.subscriber.clone();
        Box::pin(async move {
            let position = reply.await?;
            if let Some(position) = &position {
                if let Some(delivered) = subscriber.delivery_of(&channel, position.offset) {
                    let _ = tokio::time::timeout(LOCAL_DELIVERY_WAIT, delivered).await;
                }
            }
            Ok(position)
        })
    }

    fn publish_membership(
        &self,
        joined: bool,
        membership: Membership,
    ) -> BoxFuture<Result<(), EngineError>> {
        let envelope = codec::membership_envelope(joined, &membership.client);
        let reply = self
            .inner
            .call(&membership.channel, Operation::Core { envelope });
        Box::pin(async move { reply.await.map(drop) })
    }

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> BoxFuture<Result<HistoryPage, EngineError>> {
        let store = self.inner.store.clone();
        let channel: Arc<str> = channel.into();
        self.inner
            .request(async move { store.history(&channel, query).await })
    }

    fn remove_history(&self, channel: &str) -> BoxFuture<Result<(), EngineError>> {
        let reply = self.inner.call(channel, Operation::RemoveHistory);
        Box::pin(async move { reply.await.map(drop) })
    }

    fn watch(&self, channel: &str, watching: bool) -> BoxFuture<Result<(), EngineError>> {
        let subscriber = self.inner.subscriber.clone();
        let timeout = self.inner.options.timeout;
        let channel = channel.to_owned();
        Box::pin(async move {
            match tokio::time::timeout(timeout, subscriber.watch(&channel, watching)).await {
                Ok(result) => result.map_err(unavailable),
                Err(_) => Err(unavailable(LinkError::Timeout(timeout))),
            }
        })
    }

    fn add_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.write_presence(channel, client, true)
    }

    fn update_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        // Refreshed from here on whether or not this write lands.
        self.write_presence(channel, client, false)
    }

    fn remove_presence(&self, channel: &str, client: &str) -> BoxFuture<Result<(), EngineError>> {
        let inner = &self.inner;
        inner.presence.remove(channel, client);
        let reply = inner.call(
            channel,
            Operation::RemovePresence {
                client: client.into(),
            },
        );
        Box::pin(async move { reply.await.map(drop) })
    }

    fn presence(
        &self,
        channel: &str,
    ) -> BoxFuture<Result<Vec<Arc<ClientDescriptor>>, EngineError>> {
        let store = self.inner.store.clone();
        let channel = channel.to_owned();
        let descriptors = self
            .inner
            .request(async move { store.presence(&channel).await });
        Box::pin(async move {
            descriptors
                .await?
                .into_iter()
                .map(|descriptor| {
                    codec::decode_descriptor(descriptor)
                        .map(Arc::new)
                        .map_err(EngineError::from)
                })
                .collect()
        })
    }

    fn command(&self, command: NodeCommand) -> BoxFuture<Result<(), EngineError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // Our own subscription to the control subject must exist for this node to get it.
            let _ = inner
                .subscriber
                .control_started(inner.options.timeout)
                .await;
            inner.store.usable_soon().await.map_err(unavailable)?;
            let subject = inner.store.names.control.clone();
            inner
                .store
                .publish_core(subject, None, codec::encode_command(&command))
                .await
                .map_err(unavailable)
        })
    }

    fn claim(
        &self,
        channel: &str,
        key: &str,
        pending: std::time::Duration,
    ) -> BoxFuture<Result<Claim, EngineError>> {
        let store = self.inner.store.clone();
        let (channel, key) = (channel.to_owned(), key.to_owned());
        self.inner
            .request(async move { store.claim(&channel, &key, pending).await })
    }

    fn record(
        &self,
        channel: &str,
        key: &str,
        record: bytes::Bytes,
        // The bucket keeps every record for `idempotency::WINDOW` from its write.
        _ttl: std::time::Duration,
    ) -> BoxFuture<Result<(), EngineError>> {
        let store = self.inner.store.clone();
        let (channel, key) = (channel.to_owned(), key.to_owned());
        self.inner
            .request(async move { store.record(&channel, &key, record).await })
    }

    fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>> {
        let store = self.inner.store.clone();
        let (channel, key) = (channel.to_owned(), key.to_owned());
        self.inner
            .request(async move { store.release(&channel, &key).await })
    }
}
