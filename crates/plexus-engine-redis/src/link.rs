//! One pub/sub connection as a subscriber uses it, in either of Redis's two kinds:
//!
//! - **classic** (`SUBSCRIBE`): redis-rs's pub/sub connection. With Redis Cluster every node
//!   forwards every classic publication to every other node over the cluster bus.
//! - **sharded** (`SSUBSCRIBE`, Redis 7): a RESP3 connection whose messages arrive as pushes.
//!   A shard channel lives on the master of its slot and is never forwarded over the bus, so
//!   a cluster's publication rate grows with its masters. The master drops its subscribers
//!   (with an `sunsubscribe` push) when the channel's slot moves away.
//!
//! On the sharded connection each subscribe or unsubscribe command names one channel: redis-rs
//! takes the first confirmation of a command for its reply, so a command naming several would
//! leave the others to be taken for the replies of the next commands.

use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use futures_util::StreamExt;

use crate::writer::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

/// The commands of a connection (cheap to clone: both kinds are handles to one connection).
#[derive(Clone)]
pub(crate) enum Link {
    Classic(PubSubSink),
    Sharded(MultiplexedConnection),
}

/// What arrives on a connection.
pub(crate) enum Incoming {
    Classic(PubSubStream),
    Sharded(mpsc::UnboundedReceiver<redis::PushInfo>),
}

/// Something that arrived.
pub(crate) enum Event {
    Message {
        channel: String,
        payload: Vec<u8>,
    },
    /// Redis dropped the subscription of this channel by itself (sharded: its slot moved).
    Dropped(String),
    Closed,
}

/// One push or reply's data as bytes.
fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes.clone()),
        Value::SimpleString(text) => Some(text.clone().into_bytes()),
        _ => None,
    }
}

impl Link {
    /// Opens a connection of the kind asked for through `client`.
    pub(crate) async fn open(client: &Client, sharded: bool) -> RedisResult<(Link, Incoming)> {
        if !sharded {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            return Ok((Link::Classic(sink), Incoming::Classic(stream)));
        }
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(resp3))?;
        let (pushes, incoming) = mpsc::unbounded_channel();
        // Our own bounds, as the writers' (redis-rs's defaults are far shorter).
        let config = AsyncConnectionConfig::new()
            .set_push_sender(pushes)
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok((Link::Sharded(connection), Incoming::Sharded(incoming)))
    }

    /// Subscribes `names` (one command each on a sharded connection, pipelined). Channels
    /// redirected one by one (a shard channel whose slot is not this node's: `MOVED`, `ASK`)
    /// are returned rather than failing the rest; any other error fails the call.
    pub(crate) async fn subscribe(&mut self, names: &[String]) -> RedisResult<Vec<String>> {
        match self {
            Link::Classic(sink) => sink.subscribe(names).await.map(|()| Vec::new()),
            Link::Sharded(connection) => {
                let mut pipeline = redis::pipe();
                pipeline.ignore_errors();
                for name in names {
                    pipeline.cmd("SSUBSCRIBE").arg(name);
                }
                let replies: Vec<RedisResult<Value>> = pipeline.query_async(connection).await?;
                let mut redirected = Vec::new();
                for (name, reply) in names.iter().zip(replies) {
                    match reply {
                        Ok(_) => {}
                        Err(error) if error.redirect_node().is_some() => {
                            redirected.push(name.clone());
                        }
                        Err(error) => return Err(error),
                    }
                }
                Ok(redirected)
            }
        }
    }

    pub(crate) async fn unsubscribe(&mut self, name: &str) -> RedisResult<()> {
        match self {
            Link::Classic(sink) => sink.unsubscribe(name).await,
            Link::Sharded(connection) => redis::cmd("SUNSUBSCRIBE")
                .arg(name)
                .query_async::<Value>(connection)
                .await
                .map(drop),
        }
    }

    pub(crate) async fn ping(&mut self) -> RedisResult<()> {
        match self {
            Link::Classic(sink) => sink.ping::<Value>().await.map(drop),
            Link::Sharded(connection) => redis::cmd("PING")
                .query_async::<Value>(connection)
                .await
                .map(drop),
        }
    }
}

impl Incoming {
    /// The next message (or dropped subscription), or `Closed` when the connection ends.
    pub(crate) async fn next(&mut self) -> Event {
        match self {
            Incoming::Classic(stream) => match stream.next().await {
                Some(message) => Event::Message {
                    channel: message.get_channel_name().to_owned(),
                    payload: message.get_payload_bytes().to_vec(),
                },
                None => Event::Closed,
            },
            Incoming::Sharded(pushes) => loop {
                let Some(push) = pushes.recv().await else {
                    return Event::Closed;
                };
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        let (Some(channel), Some(payload)) = (
                            push.data.first().and_then(bytes),
                            push.data.get(1).and_then(bytes),
                        ) else {
                            continue;
                        };
                        return Event::Message {
                            channel: String::from_utf8_lossy(&channel).into_owned(),
                            payload,
                        };
                    }
                    PushKind::SUnsubscribe => {
                        if let Some(channel) = push.data.first().and_then(bytes) {
                            return Event::Dropped(String::from_utf8_lossy(&channel).into_owned());
                        }
                    }
                    PushKind::Disconnection => return Event::Closed,
                    // Confirmations of our own commands (also taken as their replies).
                    _ => {}
                }
            },
        }
    }
}
