//! Where the engine's connections go: one Redis, or whichever server Redis Sentinel names as
//! the master at the moment of each (re)connection, so a failover is followed by reconnecting.
//! Sentinels and the master each speak TLS when their URLs say `rediss://`.

use std::sync::Arc;

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisResult, TlsCertificates, TlsMode,
};
use tokio::sync::Mutex;

#[derive(Clone)]
pub(crate) enum Source {
    Direct(Arc<Client>),
    /// Asks the sentinels for the master each time.
    Sentinel(Arc<Mutex<SentinelClient>>),
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
        }
    }
}
