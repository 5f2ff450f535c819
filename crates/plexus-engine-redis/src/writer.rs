//! Command writers: one task and one connection per shard of channels (one Redis), or per
//! master (Redis Cluster, routed by `cluster::Router`).
//!
//! A call hashes its channel to a shard (or finds its slot's master) and queues its command on
//! that writer's unbounded queue *in the call*, so commands of one channel reach Redis in call
//! order (with Redis Cluster, a redirected call is sent on by the router, and its slot's later
//! calls wait behind it: see `cluster::Redirections`). The shard's task
//! takes every queued command (up to [`MAX_BATCH`]), sends them as one pipeline over its own
//! multiplexed connection, waits for the replies (at most [`RESPONSE_TIMEOUT`]) and answers
//! each caller through its oneshot; then the next batch. A batch in flight is the only one, so
//! the order of a shard's queue is the order Redis executes it in.
//!
//! The task connects by itself (with backoff), loads the scripts on every new connection,
//! pings while idle so a dead connection is noticed before a caller needs it, and while it has
//! no connection answers every command at once with an error: callers never wait long.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, Value};

use crate::cluster::Router;
use crate::source::Source;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::scripts::Scripts;

/// Commands sent in one pipeline at most.
pub const MAX_BATCH: usize = 256;
/// Longest wait for a TCP connection and its setup (scripts loaded).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the replies to one pipeline.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection idle this long is pinged.
pub const IDLE_PING: Duration = Duration::from_secs(1);

/// Why Redis did not answer a command (the `source` of `EngineError::Unavailable`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("not connected to redis: {0}")]
    Disconnected(Arc<str>),
    #[error("redis connection failed: {0}")]
    Failed(Arc<str>),
    #[error("no reply from redis within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Server(String),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

/// Exponential backoff between connection attempts: 50 ms doubling to 2 s.
#[derive(Debug)]
pub struct Backoff {
    delay: Duration,
    next: Instant,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            delay: Backoff::MIN,
            next: Instant::now(),
        }
    }
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    pub fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    pub fn next_attempt(&self) -> Instant {
        self.next
    }

    pub fn failed(&mut self) {
        self.next = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(Backoff::MAX);
    }

    pub fn reset(&mut self) {
        self.delay = Backoff::MIN;
        self.next = Instant::now();
    }
}

/// Whether every connection is up: counted by the writers and the subscriber.
#[derive(Debug)]
pub struct Health {
    /// Writers without a connection (with Redis Cluster, plus one until the slot map is known).
    pub writers_down: AtomicUsize,
    /// Pub/sub connections down (each starts down).
    pub subscribers_down: AtomicUsize,
    /// Bumped when the subscriber loses its connection: Redis may be gone, so every writer
    /// checks its own connection at once instead of at its next idle ping.
    suspect: watch::Sender<u64>,
}

impl Health {
    pub fn new(writers: usize, subscribers: usize) -> Health {
        Health {
            writers_down: AtomicUsize::new(writers),
            subscribers_down: AtomicUsize::new(subscribers),
            suspect: watch::channel(0).0,
        }
    }

    /// Asks every writer to check its connection now.
    pub fn suspect_connections(&self) {
        self.suspect.send_modify(|generation| *generation += 1);
    }

    pub fn is_ready(&self) -> bool {
        self.writers_down.load(Ordering::Acquire) == 0
            && self.subscribers_down.load(Ordering::Acquire) == 0
    }
}

pub(crate) struct Request {
    pub cmd: Cmd,
    pub reply: oneshot::Sender<Result<Value, LinkError>>,
    /// Redis Cluster: the slot of the call's keys, and the redirections it followed.
    pub route: Route,
}

/// How a Redis Cluster call got where it is.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Route {
    pub slot: u16,
    /// `MOVED` and `ASK` redirections followed so far (at most [`MAX_REDIRECTS`]).
    pub redirects: u8,
    /// `TRYAGAIN` answers met so far (at most [`MAX_TRIES`]).
    pub tries: u8,
    /// Sent after `ASKING`: an `ASK` redirection to the master importing the slot.
    pub asking: bool,
}

/// Most `MOVED` and `ASK` redirections one Redis Cluster call follows before it fails as
/// unavailable.
pub(crate) const MAX_REDIRECTS: u8 = 5;

/// Most `TRYAGAIN` answers one Redis Cluster call takes (each sent again 100 ms later):
/// about 2 s for a slot's keys to be moved together, or for a channel's first keys to be
/// written while its slot moves (the importing master refuses a script whose keys do not all
/// exist yet until the move is done).
pub(crate) const MAX_TRIES: u8 = 20;

/// Where Redis Cluster told a call to go instead of failing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Redirect {
    /// `MOVED slot host:port`: the slot is served there now (the map is read again).
    Moved(String, u16),
    /// `ASK slot host:port`: the slot is being moved there, and the call's keys already are;
    /// send it there once, after `ASKING`.
    Ask(String, u16),
    /// `TRYAGAIN`: the call's keys are split between two masters while the slot moves; send it
    /// again shortly.
    TryAgain,
}

impl Redirect {
    /// The redirection an error reply asks for, if any.
    pub(crate) fn of(code: &str, details: Option<&str>) -> Option<Redirect> {
        let address = || {
            let (_slot, address) = details?.trim().split_once(' ')?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        };
        match code {
            "MOVED" => address().map(|(host, port)| Redirect::Moved(host, port)),
            "ASK" => address().map(|(host, port)| Redirect::Ask(host, port)),
            "TRYAGAIN" => Some(Redirect::TryAgain),
            _ => None,
        }
    }
}

/// What a cluster master's writer shares with the router.
#[derive(Clone)]
pub(crate) struct ClusterLink {
    /// Rung when a reply or a lost connection says the slot map may have changed.
    pub stale_map: Arc<Notify>,
    /// Calls Redis redirected, for the router to send on.
    pub redirections: Arc<crate::cluster::Redirections>,
    /// The master this writer writes to.
    pub address: crate::cluster::Address,
}

/// The queues of the writers.
pub enum Writers {
    /// One Redis: channels hashed over a fixed number of shards.
    Hashed(Vec<mpsc::UnboundedSender<Request>>),
    /// Redis Cluster: one writer per master, found by the channel's slot.
    Cluster(Arc<Router>),
}

impl Writers {
    /// Starts `shards` writer tasks on the current Tokio runtime.
    pub(crate) fn start(
        source: &Source,
        shards: usize,
        health: Arc<Health>,
        cancel: &CancellationToken,
    ) -> Writers {
        let queues = (0..shards.max(1))
            .map(|shard| {
                let (queue, requests) = mpsc::unbounded_channel();
                let writer = Writer::new(
                    format!("shard {shard}").into(),
                    source.clone(),
                    health.clone(),
                    None,
                );
                tokio::spawn(writer.run(requests, cancel.clone()));
                queue
            })
            .collect();
        Writers::Hashed(queues)
    }

    /// Queues `cmd` now on the writer of `channel`; the receiver gets its reply (or `Err` if
    /// the writer is gone).
    pub fn send(
        &self,
        channel: &str,
        cmd: Cmd,
    ) -> Option<oneshot::Receiver<Result<Value, LinkError>>> {
        let (reply, receiver) = oneshot::channel();
        let request = Request {
            cmd,
            reply,
            route: Route::default(),
        };
        match self {
            Writers::Hashed(queues) => {
                let mut hasher = std::hash::DefaultHasher::new();
                channel.hash(&mut hasher);
                let shard = (hasher.finish() % queues.len() as u64) as usize;
                queues[shard].send(request).ok()?;
            }
            Writers::Cluster(router) => router.send(channel, request),
        }
        Some(receiver)
    }
}

/// One connection's writer: a shard's, or a cluster master's.
pub(crate) struct Writer {
    /// For logs: the shard or the master's address.
    name: Arc<str>,
    source: Source,
    health: Arc<Health>,
    connection: Option<MultiplexedConnection>,
    backoff: Backoff,
    last_error: Arc<str>,
    /// Redis Cluster: where redirected calls and signs of a changed map go.
    cluster: Option<ClusterLink>,
}

/// Error codes by which Redis Cluster says a key is served elsewhere or not at the moment.
const CLUSTER_CHANGED: [&str; 4] = ["MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"];

impl Writer {
    /// A writer not connected yet (counted down in `health` by whoever starts it).
    pub(crate) fn new(
        name: Arc<str>,
        source: Source,
        health: Arc<Health>,
        cluster: Option<ClusterLink>,
    ) -> Writer {
        Writer {
            name,
            source,
            health,
            connection: None,
            backoff: Backoff::default(),
            last_error: "not connected yet".into(),
            cluster,
        }
    }

    /// Serves `requests` until `cancel`; a writer stopped while down no longer counts as down,
    /// and what is still queued (or comes after) is answered as unavailable.
    pub(crate) async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        cancel: CancellationToken,
    ) {
        self.serve(&mut requests, cancel).await;
        if self.connection.is_none() {
            self.health.writers_down.fetch_sub(1, Ordering::AcqRel);
        }
        requests.close();
        let why: Arc<str> = format!("redis writer {} stopped", self.name).into();
        while let Ok(request) = requests.try_recv() {
            let _ = request
                .reply
                .send(Err(LinkError::Disconnected(why.clone())));
        }
    }

    async fn serve(
        &mut self,
        requests: &mut mpsc::UnboundedReceiver<Request>,
        cancel: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut suspect = self.health.suspect.subscribe();
        loop {
            if self.connection.is_none() && self.backoff.due() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    () = self.connect() => {}
                }
            }
            let wake = match self.connection {
                Some(_) => Instant::now() + IDLE_PING,
                None => self.backoff.next_attempt(),
            };
            let first = tokio::select! {
                // A stopped writer takes nothing more from its queue.
                biased;
                _ = cancel.cancelled() => return,
                request = requests.recv() => match request {
                    Some(request) => request,
                    None => return, // the engine is gone
                },
                () = tokio::time::sleep_until(wake) => {
                    self.ping().await;
                    continue;
                }
                Ok(()) = suspect.changed() => {
                    self.ping().await;
                    continue;
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.execute(&mut batch).await;
        }
    }

    async fn connect(&mut self) {
        let attempt = async {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let mut connection = self
                .source
                .client()
                .await?
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let mut load = redis::pipe();
            for source in Scripts::sources() {
                load.cmd("SCRIPT").arg("LOAD").arg(source);
            }
            load.query_async::<Vec<String>>(&mut connection).await?;
            Ok::<_, redis::RedisError>(connection)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(connection)) => {
                if self.connection.replace(connection).is_none() {
                    self.health.writers_down.fetch_sub(1, Ordering::AcqRel);
                }
                self.backoff.reset();
                tracing::debug!(writer = %self.name, "redis writer connected");
            }
            Ok(Err(error)) => self.lost(error.to_string().into()),
            Err(_) => self.lost(LinkError::Timeout(CONNECT_TIMEOUT).to_string().into()),
        }
    }

    /// The connection is gone (or could not be made): back off and count it down.
    fn lost(&mut self, error: Arc<str>) {
        if self.connection.take().is_some() {
            self.health.writers_down.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(writer = %self.name, %error, "redis writer connection lost");
        } else {
            tracing::debug!(writer = %self.name, %error, "redis writer cannot connect");
        }
        if let Some(cluster) = &self.cluster {
            // A cluster node that is gone may have been replaced by another master.
            cluster.stale_map.notify_one();
        }
        self.last_error = error;
        self.backoff.failed();
    }

    async fn ping(&mut self) {
        let Some(connection) = &mut self.connection else {
            return;
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(
            RESPONSE_TIMEOUT,
            ping.query_async::<Value>(&mut *connection),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => self.lost(error.to_string().into()),
            Err(_) => self.lost(LinkError::Timeout(RESPONSE_TIMEOUT).to_string().into()),
        }
    }

    async fn execute(&mut self, batch: &mut Vec<Request>) {
        let Some(connection) = &mut self.connection else {
            let error = LinkError::Disconnected(self.last_error.clone());
            for request in batch.drain(..) {
                let _ = request.reply.send(Err(error.clone()));
            }
            return;
        };
        let mut pipeline = redis::pipe();
        let mut calls = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            if request.route.asking {
                // Applies to the next command on this connection only: its own.
                pipeline.cmd("ASKING");
            }
            pipeline.add_command(request.cmd);
            calls.push((request.reply, request.route));
        }
        let count = calls.len() + calls.iter().filter(|(_, route)| route.asking).count();
        let sent = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            connection.send_packed_commands(&pipeline, 0, count),
        )
        .await;
        let (replies, routes): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
        let error = match sent {
            Ok(Ok(values)) if values.len() == count => {
                let mut scripts_missing = false;
                let mut read_only = false;
                let mut map_changed = false;
                let mut values = values.into_iter();
                let mut commands = pipeline.cmd_iter();
                for (reply, route) in replies.into_iter().zip(routes) {
                    if route.asking {
                        values.next(); // `ASKING`'s OK
                        commands.next();
                    }
                    let (Some(value), Some(cmd)) = (values.next(), commands.next()) else {
                        break; // counted above: not reached
                    };
                    let result = match value {
                        Value::ServerError(error) => {
                            let redirect = Redirect::of(error.code(), error.details());
                            map_changed |= CLUSTER_CHANGED.contains(&error.code());
                            if let (Some(redirect), Some(cluster)) = (redirect, &self.cluster) {
                                // Followed whether or not the caller still waits: a call is
                                // ordered when it is made (an engine's promise).
                                let route = match redirect {
                                    // After `ASKING`, again to this master the same way.
                                    Redirect::TryAgain if route.tries < MAX_TRIES => Some(Route {
                                        tries: route.tries + 1,
                                        ..route
                                    }),
                                    Redirect::Moved(..) | Redirect::Ask(..)
                                        if route.redirects < MAX_REDIRECTS =>
                                    {
                                        Some(Route {
                                            redirects: route.redirects + 1,
                                            asking: matches!(redirect, Redirect::Ask(..)),
                                            ..route
                                        })
                                    }
                                    _ => None,
                                };
                                if let Some(route) = route {
                                    let request = Request {
                                        cmd: cmd.clone(),
                                        reply,
                                        route,
                                    };
                                    cluster
                                        .redirections
                                        .push(request, redirect, &cluster.address);
                                    continue;
                                }
                            }
                            scripts_missing |= error.code() == "NOSCRIPT";
                            read_only |= error.code() == "READONLY";
                            Err(LinkError::Server(error.to_string()))
                        }
                        value => Ok(value),
                    };
                    let _ = reply.send(result);
                }
                if let (true, Some(cluster)) = (map_changed, &self.cluster) {
                    // The next calls go where the new map says.
                    cluster.stale_map.notify_one();
                }
                if scripts_missing {
                    // Someone flushed the script cache: those calls failed (in order, nothing
                    // was reordered); load the scripts again on a fresh connection.
                    self.lost("the scripts were flushed from redis".into());
                } else if read_only {
                    // A failover made this server a replica: connect again (through
                    // Sentinel, to the new master).
                    self.lost("redis is a read-only replica now".into());
                }
                return;
            }
            Ok(Ok(values)) => {
                LinkError::Reply(format!("{} replies to a pipeline of {count}", values.len()))
            }
            Ok(Err(error)) => LinkError::Failed(error.to_string().into()),
            Err(_) => LinkError::Timeout(RESPONSE_TIMEOUT),
        };
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
        // The connection's state is unknown (replies may still come): start over.
        self.lost(error.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::Redirect;

    #[test]
    fn redirections_are_read_from_error_replies() {
        assert_eq!(
            Redirect::of("MOVED", Some("3999 127.0.0.1:6381")),
            Some(Redirect::Moved("127.0.0.1".into(), 6381))
        );
        assert_eq!(
            Redirect::of("ASK", Some("3999 10.0.0.7:7000")),
            Some(Redirect::Ask("10.0.0.7".into(), 7000))
        );
        assert_eq!(
            Redirect::of("ASK", Some("3999 ::1:7000")),
            Some(Redirect::Ask("::1".into(), 7000)),
            "an IPv6 host"
        );
        assert_eq!(
            Redirect::of(
                "TRYAGAIN",
                Some("Multiple keys request during rehashing of slot")
            ),
            Some(Redirect::TryAgain)
        );
        assert_eq!(Redirect::of("MOVED", Some("3999")), None, "no address");
        assert_eq!(
            Redirect::of("MOVED", Some("3999 host:port")),
            None,
            "bad port"
        );
        assert_eq!(Redirect::of("CLUSTERDOWN", Some("down")), None);
        assert_eq!(Redirect::of("ERR", None), None);
    }
}
