//! Where the engine's connections go: one Redis, or whichever server Redis Sentinel names as
//! the master at the moment of each (re)connection, so a failover is followed by reconnecting,
//! or (the node-command connection with Redis Cluster) the cluster's nodes in turn: the masters
//! of the last slot map, then the seeds.
//! Sentinels and the master each speak TLS when their URLs say `rediss://`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisResult, TlsCertificates, TlsMode,
};
use tokio::sync::Mutex;

/// The TCP settings of every connection: `TCP_NODELAY` on (redis-rs 1.x leaves Nagle's
/// algorithm on, which holds back the tail of a pipeline that does not fill a segment until
/// Redis acknowledges the rest: up to its delayed-ACK time).
pub(crate) fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// The connection info of `url`, with [`tcp_settings`].
pub(crate) fn connection_info(url: &str) -> RedisResult<redis::ConnectionInfo> {
    Ok(url.into_connection_info()?.set_tcp_settings(tcp_settings()))
}

#[derive(Clone)]
pub(crate) enum Source {
    Direct(Arc<Client>),
    /// Asks the sentinels for the master each time.
    Sentinel(Arc<Mutex<SentinelClient>>),
    /// Any node of a Redis Cluster will do (pub/sub reaches every node): the next one each
    /// time, so a node that is down is passed over at the next reconnection.
    Rotating(Arc<Rotation>),
}

/// Nodes taken in turn; the list can be replaced (by the cluster's router, as the map
/// changes).
pub(crate) struct Rotation {
    clients: std::sync::Mutex<Vec<Client>>,
    next: AtomicUsize,
}

impl Rotation {
    pub(crate) fn new(clients: Vec<Client>) -> Arc<Rotation> {
        assert!(!clients.is_empty(), "no redis nodes to connect to");
        Arc::new(Rotation {
            clients: std::sync::Mutex::new(clients),
            next: AtomicUsize::new(0),
        })
    }

    /// Replaces the list (an empty one is ignored).
    pub(crate) fn set(&self, clients: Vec<Client>) {
        if !clients.is_empty() {
            *self.lock() = clients;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next(&self) -> Client {
        let clients = self.lock();
        clients[self.next.fetch_add(1, Ordering::Relaxed) % clients.len()].clone()
    }
}

impl Source {
    pub(crate) fn direct(client: Client) -> Source {
        Source::Direct(Arc::new(client))
    }

    /// `sentinels` are `redis://host:port` (or `rediss://`) addresses of sentinels; `url`
    /// gives the credentials and database for the master, and TLS with `rediss://`. `tls`
    /// (a CA, a client certificate) applies to every TLS connection, sentinels' and master's.
    pub(crate) fn sentinel(
        sentinels: &[String],
        master: &str,
        url: &str,
        tls: Option<TlsCertificates>,
    ) -> RedisResult<Source> {
        let is_tls = |addr: &ConnectionAddr| matches!(addr, ConnectionAddr::TcpTls { .. });
        let info = url.into_connection_info()?;
        let addrs = sentinels
            .iter()
            .map(|sentinel| Ok(sentinel.as_str().into_connection_info()?.addr().clone()))
            .collect::<RedisResult<Vec<_>>>()?;
        let tls_sentinels = addrs.iter().filter(|addr| is_tls(addr)).count();
        if tls_sentinels != 0 && tls_sentinels != addrs.len() {
            return Err((
                ErrorKind::InvalidClientConfig,
                "sentinels must all use TLS (rediss://) or none",
            )
                .into());
        }
        let redis = info.redis_settings();
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
            .set_client_to_redis_tcp_settings(tcp_settings())
            .set_client_to_sentinel_tcp_settings(tcp_settings())
            .set_client_to_redis_db(redis.db())
            .set_client_to_redis_protocol(redis.protocol());
        if let Some(username) = redis.username() {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = redis.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if is_tls(info.addr()) {
            builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(tls) = &tls {
                builder = builder.set_client_to_redis_certificates(tls.clone());
            }
        }
        if tls_sentinels > 0 {
            builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(tls) = tls {
                builder = builder.set_client_to_sentinel_certificates(tls);
            }
        }
        Ok(Source::Sentinel(Arc::new(Mutex::new(builder.build()?))))
    }

    /// A client for the server to connect to now.
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        match self {
            Source::Direct(client) => Ok(Client::clone(client)),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
            Source::Rotating(rotation) => Ok(rotation.next()),
        }
    }
}
