//! The Redis engine: history, presence and delivery shared by every node connected to one
//! Redis, so several Plexus nodes serve the same channels.
//!
//! # Keys (under a prefix, `plexus` by default)
//!
//! | key | type | what |
//! |---|---|---|
//! | `{prefix}:stream:{channel}` | stream | history: entry `{offset}-0` with fields `d` (the stored publication, `Publication::to_stored`) and `x` (expiry, ms since the Unix epoch); trimmed to `history_size` (`MAXLEN`), expires `history_ttl` after the last publish |
//! | `{prefix}:meta:{channel}` | hash | `epoch` and `top` (the last offset); expires [`RedisOptions::history_meta_ttl`] after the last publish |
//! | `{prefix}:presence:{channel}` | sorted set | client id scored by when its presence expires (ms) |
//! | `{prefix}:presence-info:{channel}` | hash | client id → its descriptor ([`codec`]) |
//! | `{prefix}:idem:{channel}:{key in hex}` | string | an API idempotency key's record (`plexus_core::idempotency`): pending (30 s), then the first publish's position (5 min) |
//! | `{prefix}:pub:{channel}` | pub/sub | publications, joins and leaves ([`codec`]'s envelope); with Redis Cluster's sharded pub/sub a shard channel with the channel as its hash tag |
//! | `{prefix}:control` | pub/sub | [`NodeCommand`]s ([`codec`]) |
//!
//! A publish with history is one Lua script (see `scripts`): it creates the epoch if the
//! stream has none, increments `top`, appends, trims, refreshes the expiries and `PUBLISH`es
//! the offset-stamped envelope, all atomically, so the order of offsets is the order of
//! delivery on every node. Without history it is a plain `PUBLISH` (offset 0). History reads
//! skip entries whose own expiry has passed (Redis's clock, `TIME`).
//!
//! # Connections
//!
//! - **Writers** (`writer`): [`RedisOptions::shards`] connections; a channel's commands all
//!   go through the connection its name hashes to, queued *in the call* and pipelined in
//!   order, which gives `publish` its ordering at call time.
//! - **Subscriber** (`subscriber`): one pub/sub connection; `watch` subscribes a channel,
//!   and every message received is delivered to the hub in arrival order.
//!
//! Both reconnect by themselves with backoff (50 ms doubling to 2 s), the subscriber
//! resubscribes every watched channel and the control channel, and while Redis is unreachable
//! calls fail with [`EngineError::Unavailable`] within [`RedisOptions::timeout`] (at once when
//! the connection is known to be down). [`RedisEngine::is_ready`] says whether every
//! connection is up.
//!
//! # Presence
//!
//! Each client's presence expires after [`RedisOptions::presence_ttl`] unless refreshed: the
//! engine refreshes the presence it added every [`RedisOptions::presence_refresh`] and right
//! after reconnecting, so a node that dies leaves no presence behind for long.
//!
//! With Sentinel, `rediss://` sentinel addresses and a `rediss://` URL (for the master) each
//! turn on TLS, with the same CA and client certificate.
//!
//! # Redis Cluster
//!
//! With [`RedisOptions::cluster`] (seed nodes), every key of a channel carries the channel as
//! its hash tag, `{prefix}:stream:{{channel}}` and so on, so a channel's keys share a slot and
//! its scripts run on the master that holds it. There is one writer per master (`cluster`):
//! a call goes to the master of its channel's slot, by a slot map read with `CLUSTER SLOTS`
//! and read again when a node answers `MOVED`/`ASK`/`CLUSTERDOWN`/`TRYAGAIN` or is lost (a
//! call answered `MOVED`, `ASK` or `TRYAGAIN` is sent on, at most 5 times; see `cluster`). Pub/sub is Redis's classic kind: each channel is
//! subscribed on the master that holds it (one pub/sub connection per master), where its
//! publications are published, so they do not cross the cluster bus; node commands go
//! through one more connection, to any node. A channel whose name starts with `}` would have
//! no hash tag (its keys would land in different slots): its calls fail as unavailable
//! without reaching Redis.

mod cluster;
pub mod codec;
mod link;
mod scripts;
mod source;
mod subscriber;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use plexus_core::idempotency::{self, Claim};
use plexus_core::{
    new_epoch, BoxFuture, ClientDescriptor, Deliver, Engine, EngineError, HistoryPage,
    HistoryQuery, HistoryRetention, Membership, NodeCommand, PresenceMap, Publication,
    StreamPosition,
};
use redis::{Client, Cmd, Script, TlsCertificates, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::scripts::Scripts;
use crate::source::Source;
use crate::subscriber::{Role, Subscriber, Subscribers};
use crate::writer::{Health, Writers};

/// Why a call found Redis unavailable: the `source` of [`EngineError::Unavailable`].
pub use crate::writer::LinkError;

const NAME: &str = "redis";

/// How long a publish waits for its publication to come back through this node's
/// subscription (when the channel has local subscribers) before it resolves anyway, so a
/// publisher that waits for its acknowledgement has seen it delivered.
const LOCAL_DELIVERY_WAIT: Duration = Duration::from_secs(1);

/// How soon a presence refresh that failed is tried again.
const RETRY_REFRESH: Duration = Duration::from_secs(1);

/// Where Redis is and how the engine uses it.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS.
    pub url: String,
    /// With `rediss://`: the PEM certificate(s) the server's certificate must chain to,
    /// instead of the system's and Mozilla's roots (a private CA, a self-signed server).
    pub tls_ca: Option<Vec<u8>>,
    /// With `rediss://`: this client's certificate and key (PEM), for a server that requires
    /// client certificates (`tls-auth-clients yes`).
    pub tls_client: Option<(Vec<u8>, Vec<u8>)>,
    /// Redis Sentinel: the sentinels' `redis://host:port` addresses and the monitored master's
    /// name. Each connection asks them for the current master (so a failover is followed);
    /// `url` then only gives the password and database.
    pub sentinel: Option<(Vec<String>, String)>,
    /// Redis Cluster: `host:port` addresses of some of its nodes, asked for the slot map;
    /// `url` then gives only the password and, with `rediss://`, TLS for every node.
    pub cluster: Option<Vec<String>>,
    /// With Redis Cluster (7 or later): sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`), whose
    /// publications stay on their channel's master instead of crossing the cluster bus to
    /// every node. Every node of an installation must agree on it.
    pub sharded_pubsub: bool,
    /// Prefix of every key and pub/sub channel, so several installations share one Redis.
    pub prefix: String,
    /// Writer connections; a channel always uses the same one.
    pub shards: usize,
    /// How long a client's presence lasts unless refreshed.
    pub presence_ttl: Duration,
    /// How often the engine refreshes the presence it added.
    pub presence_refresh: Duration,
    /// How long a stream's epoch and top outlive its last publish.
    pub history_meta_ttl: Duration,
    /// Longest wait for one call before it fails as unavailable.
    pub timeout: Duration,
}

impl RedisOptions {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> RedisOptions {
        RedisOptions {
            url: url.into(),
            tls_ca: None,
            tls_client: None,
            sentinel: None,
            cluster: None,
            sharded_pubsub: false,
            prefix: prefix.into(),
            shards: 4,
            presence_ttl: Duration::from_secs(60),
            presence_refresh: Duration::from_secs(25),
            history_meta_ttl: Duration::from_secs(90 * 24 * 3600),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Options the engine cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum RedisEngineError {
    #[error("invalid redis url: {0}")]
    Url(#[source] redis::RedisError),
    #[error("the redis key prefix must not be empty")]
    EmptyPrefix,
    #[error(
        "with redis cluster the key prefix must not contain '{{' or '}}' (they make hash tags)"
    )]
    ClusterPrefix,
    #[error("redis cluster node {0:?} is not host:port")]
    ClusterNode(String),
    #[error("redis cluster has only database 0: the redis url must not name another")]
    ClusterDatabase,
    #[error("redis cluster and redis sentinel cannot be used together")]
    ClusterAndSentinel,
    #[error("sharded pub/sub needs redis cluster")]
    ShardedWithoutCluster,
}

/// The engine. Dropping it stops its tasks and closes its connections.
pub struct RedisEngine {
    inner: Arc<Inner>,
    cancel: CancellationToken,
}

struct Inner {
    options: RedisOptions,
    /// Keys carry the channel as a hash tag (Redis Cluster).
    tagged_keys: bool,
    scripts: Scripts,
    writers: Writers,
    subscriber: Subscribers,
    health: Arc<Health>,
    /// Presence this node added, refreshed in the broker while its clients stay.
    presence: PresenceMap,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RedisEngine")
            .field("prefix", &self.inner.options.prefix)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisEngine {
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

fn bad_reply(error: impl std::fmt::Display) -> EngineError {
    unavailable(LinkError::Reply(error.to_string()))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `EVALSHA` of a script with its keys; arguments follow.
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

/// A cluster node's address: `host:port`, also written `redis://host:port` or
/// `rediss://host:port` (TLS comes from the engine's URL either way).
fn cluster_node(address: &str) -> Result<(String, u16), RedisEngineError> {
    let bare = address.trim();
    let bare = bare
        .strip_prefix("rediss://")
        .or_else(|| bare.strip_prefix("redis://"))
        .unwrap_or(bare)
        .trim_end_matches('/');
    match bare.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(['@', '/']) => {
            match port.parse::<u16>() {
                // `[::1]:7000`: the brackets only delimit an IPv6 address.
                Ok(port) if port != 0 => Ok((
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port,
                )),
                _ => Err(RedisEngineError::ClusterNode(address.to_owned())),
            }
        }
        _ => Err(RedisEngineError::ClusterNode(address.to_owned())),
    }
}

impl RedisEngine {
    /// Starts the engine's connections on the current Tokio runtime (it panics outside one);
    /// they connect in the background, and calls made meanwhile wait for the first attempt.
    /// Fails only on bad options: a Redis that is down is waited for, not an error.
    pub fn new(
        options: RedisOptions,
        deliver: Arc<dyn Deliver>,
    ) -> Result<RedisEngine, RedisEngineError> {
        if options.prefix.is_empty() {
            return Err(RedisEngineError::EmptyPrefix);
        }
        let tls =
            (options.tls_ca.is_some() || options.tls_client.is_some()).then(|| TlsCertificates {
                client_tls: options
                    .tls_client
                    .as_ref()
                    .map(|(cert, key)| redis::ClientTlsConfig {
                        client_cert: cert.clone(),
                        client_key: key.clone(),
                    }),
                root_cert: options.tls_ca.clone(),
            });
        if options.sharded_pubsub && options.cluster.is_none() {
            return Err(RedisEngineError::ShardedWithoutCluster);
        }
        let cancel = CancellationToken::new();
        let connected = Arc::new(Notify::new());
        let (source, health, writers, shards) = match &options.cluster {
            Some(seeds) => {
                if options.sentinel.is_some() {
                    return Err(RedisEngineError::ClusterAndSentinel);
                }
                if options.prefix.contains(['{', '}']) {
                    return Err(RedisEngineError::ClusterPrefix);
                }
                let seeds = seeds
                    .iter()
                    .map(|seed| cluster_node(seed))
                    .collect::<Result<Vec<_>, _>>()?;
                if seeds.is_empty() {
                    return Err(RedisEngineError::ClusterNode(String::new()));
                }
                let info = source::connection_info(&options.url).map_err(RedisEngineError::Url)?;
                if info.redis_settings().db() != 0 {
                    return Err(RedisEngineError::ClusterDatabase);
                }
                let template = cluster::NodeTemplate { info, tls };
                let clients = seeds
                    .iter()
                    .map(|(host, port)| template.client(host, *port))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(RedisEngineError::Url)?;
                let rotation = source::Rotation::new(clients);
                // Writers: down until the slot map is known; pub/sub: the control connection
                // (the masters' connections count themselves).
                let health = Arc::new(Health::new(1, 1));
                let shards = cluster::Shards::new(
                    &options.prefix,
                    deliver.clone(),
                    health.clone(),
                    connected.clone(),
                    options.timeout,
                    options.sharded_pubsub,
                );
                let router = cluster::Router::start(
                    template,
                    seeds,
                    rotation.clone(),
                    shards.clone(),
                    health.clone(),
                    &cancel,
                );
                (
                    Source::Rotating(rotation),
                    health,
                    Writers::Cluster(router),
                    Some(shards),
                )
            }
            None => {
                let source = match (&options.sentinel, tls) {
                    (Some((sentinels, master)), tls) => {
                        Source::sentinel(sentinels, master, &options.url, tls)
                    }
                    (None, tls) => source::connection_info(&options.url).and_then(|info| {
                        match tls {
                            Some(tls) => Client::build_with_tls(info, tls),
                            None => Client::open(info),
                        }
                        .map(Source::direct)
                    }),
                }
                .map_err(RedisEngineError::Url)?;
                let shards = options.shards.max(1);
                let health = Arc::new(Health::new(shards, 1));
                let writers = Writers::start(&source, shards, health.clone(), &cancel);
                (source, health, writers, None)
            }
        };
        let scripts = Scripts::new();
        let control = Subscriber::start(
            &source,
            &options.prefix,
            deliver,
            health.clone(),
            connected.clone(),
            &cancel,
            Role {
                control: true,
                takes_over: false,
                sharded: false,
            },
            None,
        );
        let subscriber = match shards {
            None => Subscribers::Single(control),
            Some(shards) => Subscribers::Cluster { control, shards },
        };
        let inner = Arc::new(Inner {
            tagged_keys: options.cluster.is_some(),
            options,
            scripts,
            writers,
            subscriber,
            health,
            presence: PresenceMap::default(),
        });
        tokio::spawn(refresh_presence(inner.clone(), connected, cancel.clone()));
        Ok(RedisEngine { inner, cancel })
    }

    /// Whether every connection to Redis is up (writers connected, subscriber subscribed).
    pub fn is_ready(&self) -> bool {
        self.inner.health.is_ready()
    }

    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }
}

impl Inner {
    fn key(&self, kind: &str, channel: &str) -> String {
        if self.tagged_keys {
            format!("{}:{kind}:{{{channel}}}", self.options.prefix)
        } else {
            format!("{}:{kind}:{channel}", self.options.prefix)
        }
    }

    /// Queues `cmd` now on `channel`'s writer; the future is its reply.
    fn call(
        &self,
        channel: &str,
        cmd: Cmd,
    ) -> impl Future<Output = Result<Value, EngineError>> + Send + 'static {
        let receiver = self.writers.send(channel, cmd);
        let timeout = self.options.timeout;
        async move {
            let receiver = receiver.ok_or(EngineError::Closed { engine: NAME })?;
            match tokio::time::timeout(timeout, receiver).await {
                Ok(Ok(Ok(value))) => Ok(value),
                Ok(Ok(Err(error))) => Err(unavailable(error)),
                Ok(Err(_)) => Err(EngineError::Closed { engine: NAME }),
                Err(_) => Err(unavailable(LinkError::Timeout(timeout))),
            }
        }
    }

    /// The record of an idempotency key: the channel's key of kind `idem`, then the key in
    /// hex (no `:` in it, so channel and key cannot run into each other).
    fn idempotency_key(&self, channel: &str, key: &str) -> String {
        let mut name = self.key("idem", channel);
        name.push(':');
        for byte in key.bytes() {
            name.push_str(&format!("{byte:02x}"));
        }
        name
    }

    fn add_presence_cmd(&self, channel: &str, client: &ClientDescriptor) -> Cmd {
        let mut cmd = evalsha(
            &self.scripts.presence_add,
            &[
                &self.key("presence", channel),
                &self.key("presence-info", channel),
            ],
        );
        cmd.arg(&*client.client)
            .arg(&codec::encode_descriptor(client)[..])
            .arg(millis(self.options.presence_ttl));
        cmd
    }
}

/// Refreshes this node's presence periodically and after every reconnection.
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
            .map(|(channel, client)| inner.call(channel, inner.add_presence_cmd(channel, client)))
            .collect();
        let mut failed = 0;
        for reply in replies {
            failed += usize::from(reply.await.is_err());
        }
        wait = inner.options.presence_refresh;
        if failed > 0 {
            // Redis is (partly) away: try again soon rather than let presence expire.
            tracing::warn!(failed, "could not refresh presence in redis");
            wait = wait.min(RETRY_REFRESH);
        }
    }
}

impl RedisEngine {
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
        let reply = inner.call(channel, inner.add_presence_cmd(channel, &client));
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

impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        NAME
    }

    fn ready(&self) -> bool {
        self.is_ready()
    }

    /// With Redis Cluster: the redirections calls followed (a resharding or a failover).
    fn metrics(&self) -> Vec<plexus_core::EngineMetric> {
        let Writers::Cluster(router) = &self.inner.writers else {
            return Vec::new();
        };
        let count =
            |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed) as f64;
        let redirections = &router.redirections;
        vec![
            plexus_core::EngineMetric::counter(
                "redis_cluster_moved",
                "Calls answered MOVED by a Redis Cluster node and sent on to the master named",
                count(&redirections.moved),
            ),
            plexus_core::EngineMetric::counter(
                "redis_cluster_asked",
                "Calls answered ASK (their slot moving) and sent on, after ASKING, to the master named",
                count(&redirections.asked),
            ),
            plexus_core::EngineMetric::counter(
                "redis_cluster_tried_again",
                "Calls answered TRYAGAIN (their keys split mid-move) and sent again 100 ms later",
                count(&redirections.tried_again),
            ),
        ]
    }

    fn publish(
        &self,
        publication: Publication,
        retention: Option<HistoryRetention>,
    ) -> BoxFuture<Result<Option<StreamPosition>, EngineError>> {
        let inner = &self.inner;
        let channel = publication.channel.clone();
        let stored = publication.to_stored();
        let pubsub = inner.subscriber.pubsub_channel(&channel);
        let Some(retention) = retention else {
            let mut cmd = redis::cmd(inner.subscriber.publish_command());
            cmd.arg(pubsub)
                .arg(&codec::publication_envelope(0, &stored)[..]);
            let reply = inner.call(&channel, cmd);
            return Box::pin(async move { reply.await.map(|_| None) });
        };
        let mut cmd = evalsha(
            &inner.scripts.publish,
            &[&inner.key("stream", &channel), &inner.key("meta", &channel)],
        );
        cmd.arg(pubsub)
            .arg(&stored[..])
            .arg(retention.size)
            .arg(millis(retention.ttl))
            .arg(millis(inner.options.history_meta_ttl))
            .arg(&*new_epoch())
            .arg(inner.subscriber.publish_command());
        let reply = inner.call(&channel, cmd);
        let inner = inner.clone();
        Box::pin(async move {
            let (offset, epoch): (u64, String) =
                redis::from_redis_value(reply.await?).map_err(bad_reply)?;
            if let Some(delivered) = inner.subscriber.delivery_of(&channel, offset) {
                let _ = tokio::time::timeout(LOCAL_DELIVERY_WAIT, delivered).await;
            }
            Ok(Some(StreamPosition {
                offset,
                epoch: epoch.into(),
            }))
        })
    }

    fn publish_membership(
        &self,
        joined: bool,
        membership: Membership,
    ) -> BoxFuture<Result<(), EngineError>> {
        let inner = &self.inner;
        let mut cmd = redis::cmd(inner.subscriber.publish_command());
        cmd.arg(inner.subscriber.pubsub_channel(&membership.channel))
            .arg(&codec::membership_envelope(joined, &membership.client)[..]);
        let reply = inner.call(&membership.channel, cmd);
        Box::pin(async move { reply.await.map(drop) })
    }

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> BoxFuture<Result<HistoryPage, EngineError>> {
        let inner = &self.inner;
        let mut cmd = evalsha(
            &inner.scripts.history,
            &[&inner.key("stream", channel), &inner.key("meta", channel)],
        );
        let limit = query
            .limit
            .map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
        cmd.arg(&*new_epoch())
            .arg(query.since.map_or(1, |since| since.saturating_add(1)))
            .arg(limit)
            .arg(if query.reverse { "1" } else { "0" })
            .arg(millis(inner.options.history_meta_ttl));
        let reply = inner.call(channel, cmd);
        let channel: Arc<str> = channel.into();
        Box::pin(async move {
            let (top, epoch, entries): (u64, String, Vec<Vec<u8>>) =
                redis::from_redis_value(reply.await?).map_err(bad_reply)?;
            if entries.len() % 2 != 0 {
                return Err(bad_reply("odd history entries"));
            }
            let publications = entries
                .chunks_exact(2)
                .map(|entry| {
                    let offset = std::str::from_utf8(&entry[0])
                        .ok()
                        .and_then(|offset| offset.parse().ok())
                        .ok_or_else(|| bad_reply("bad offset in history"))?;
                    let stored = bytes::Bytes::copy_from_slice(&entry[1]);
                    Ok(Arc::new(Publication::from_stored(
                        channel.clone(),
                        offset,
                        stored,
                    )?))
                })
                .collect::<Result<Vec<_>, EngineError>>()?;
            Ok(HistoryPage {
                publications,
                top: StreamPosition {
                    offset: top,
                    epoch: epoch.into(),
                },
            })
        })
    }

    fn remove_history(&self, channel: &str) -> BoxFuture<Result<(), EngineError>> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.inner.key("stream", channel));
        let reply = self.inner.call(channel, cmd);
        Box::pin(async move { reply.await.map(drop) })
    }

    fn watch(&self, channel: &str, watching: bool) -> BoxFuture<Result<(), EngineError>> {
        let inner = self.inner.clone();
        let timeout = self.inner.options.timeout;
        let channel = channel.to_owned();
        Box::pin(async move {
            inner
                .subscriber
                .watch(&channel, watching, timeout)
                .await
                .map_err(unavailable)
        })
    }

    fn update_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        // Refreshed from here on whether or not this write lands.
        self.write_presence(channel, client, false)
    }

    fn add_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.write_presence(channel, client, true)
    }

    fn remove_presence(&self, channel: &str, client: &str) -> BoxFuture<Result<(), EngineError>> {
        let inner = &self.inner;
        inner.presence.remove(channel, client);
        let mut cmd = evalsha(
            &inner.scripts.presence_remove,
            &[
                &inner.key("presence", channel),
                &inner.key("presence-info", channel),
            ],
        );
        cmd.arg(client);
        let reply = inner.call(channel, cmd);
        Box::pin(async move { reply.await.map(drop) })
    }

    fn presence(
        &self,
        channel: &str,
    ) -> BoxFuture<Result<Vec<Arc<ClientDescriptor>>, EngineError>> {
        let inner = &self.inner;
        let cmd = evalsha(
            &inner.scripts.presence_get,
            &[
                &inner.key("presence", channel),
                &inner.key("presence-info", channel),
            ],
        );
        let reply = inner.call(channel, cmd);
        Box::pin(async move {
            let descriptors: Vec<Vec<u8>> =
                redis::from_redis_value(reply.await?).map_err(bad_reply)?;
            descriptors
                .into_iter()
                .map(|descriptor| {
                    codec::decode_descriptor(descriptor.into())
                        .map(Arc::new)
                        .map_err(EngineError::from)
                })
                .collect()
        })
    }

    fn command(&self, command: NodeCommand) -> BoxFuture<Result<(), EngineError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // Our own subscription to the control channel must exist for this node to get it.
            let _ = inner.subscriber.started(inner.options.timeout).await;
            let control = inner.subscriber.control_channel();
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(control).arg(&codec::encode_command(&command)[..]);
            inner.call(control, cmd).await.map(drop)
        })
    }

    fn claim(
        &self,
        channel: &str,
        key: &str,
        pending: Duration,
    ) -> BoxFuture<Result<Claim, EngineError>> {
        let inner = &self.inner;
        let mut cmd = evalsha(
            &inner.scripts.claim,
            &[&inner.idempotency_key(channel, key)],
        );
        cmd.arg(&idempotency::pending_record(pending)[..])
            .arg(millis(pending));
        let reply = inner.call(channel, cmd);
        Box::pin(async move {
            let held: Option<Vec<u8>> = redis::from_redis_value(reply.await?).map_err(bad_reply)?;
            Ok(held.map_or(Claim::Won, |record| Claim::Held(record.into())))
        })
    }

    fn record(
        &self,
        channel: &str,
        key: &str,
        record: bytes::Bytes,
        ttl: Duration,
    ) -> BoxFuture<Result<(), EngineError>> {
        let inner = &self.inner;
        let mut cmd = redis::cmd("SET");
        cmd.arg(inner.idempotency_key(channel, key))
            .arg(&record[..])
            .arg("PX")
            .arg(millis(ttl));
        let reply = inner.call(channel, cmd);
        Box::pin(async move { reply.await.map(drop) })
    }

    fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>> {
        let inner = &self.inner;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(inner.idempotency_key(channel, key));
        let reply = inner.call(channel, cmd);
        Box::pin(async move { reply.await.map(drop) })
    }
}
