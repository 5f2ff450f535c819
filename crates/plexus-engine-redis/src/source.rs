//! Where the engine's connections go: one Redis, or whichever server Redis Sentinel names as
//! the master at the moment of each (re)connection, so a failover is followed by reconnecting.

use std::sync::Arc;

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, IntoConnectionInfo, RedisResult};
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

    /// `sentinels` are `redis://host:port` addresses of sentinels; `url` gives the
    /// credentials and database for the master.
    pub(crate) fn sentinel(sentinels: &[String], master: &str, url: &str) -> RedisResult<Source> {
        let info = url.into_connection_info()?;
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(info.redis_settings().clone());
        let client = SentinelClient::build(
            sentinels.to_vec(),
            master,
            Some(node),
            SentinelServerType::Master,
        )?;
        Ok(Source::Sentinel(Arc::new(Mutex::new(client))))
    }

    /// A client for the server to connect to now.
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        match self {
            Source::Direct(client) => Ok(Client::clone(client)),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }
}
