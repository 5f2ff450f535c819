//! The engine trait: what the hub needs from whatever stores history and carries publications
//! between nodes. The memory engine lives in this crate; the embedded (durable), Redis and NATS
//! engines are crates of their own that depend on this one only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::outbox::Delivery;
use crate::publication::{ClientDescriptor, CorruptPublication, Membership, Publication};

/// A boxed future that owns what it needs.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A place in a channel's stream: the offset of a publication and the stream's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    pub offset: u64,
    /// Changes only when the stream's history is lost; a position from another epoch cannot
    /// be recovered from.
    pub epoch: Arc<str>,
}

/// A number an engine reports for `/metrics` (the server names it `plexus_{name}`).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineMetric {
    /// Lower-case words joined by `_`, e.g. `history_commits`; a counter gets `_total` there.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    pub value: f64,
}

/// Whether an [`EngineMetric`] only ever grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

impl EngineMetric {
    pub fn counter(name: &'static str, help: &'static str, value: f64) -> EngineMetric {
        EngineMetric {
            name,
            help,
            kind: MetricKind::Counter,
            value,
        }
    }

    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> EngineMetric {
        EngineMetric {
            name,
            help,
            kind: MetricKind::Gauge,
            value,
        }
    }
}

/// How much history a channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRetention {
    /// Newest publications kept.
    pub size: usize,
    /// How long each publication is kept.
    pub ttl: Duration,
}

/// Which part of a channel's history to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only publications with a greater offset; `None` for all that is retained.
    pub since: Option<u64>,
    /// At most this many (the oldest first, or the newest first with `reverse`).
    pub limit: Option<usize>,
    pub reverse: bool,
}

/// Publications read from history, and the stream's current top.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub publications: Vec<Arc<Publication>>,
    pub top: StreamPosition,
}

/// A command for connections on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCommand {
    /// Disconnect every connection of a user (or one client of it).
    Disconnect {
        user: Arc<str>,
        client: Option<Arc<str>>,
        code: u16,
        reason: Arc<str>,
    },
    /// Unsubscribe a user's connections from a channel.
    Unsubscribe { user: Arc<str>, channel: Arc<str> },
    /// Subscribe a user's connections to a channel.
    Subscribe { user: Arc<str>, channel: Arc<str> },
    /// Set when every connection of a user (or one client of it) expires: Unix seconds, 0
    /// for never.
    /// With `info`, the connections' info (raw JSON) changes too.
    Refresh {
        user: Arc<str>,
        client: Option<Arc<str>>,
        expire_at: u64,
        info: Option<Bytes>,
    },
    /// A frame of commands for an SSE or HTTP-streaming session of node `node`, sent through
    /// another node's `/emulation`: only that node acts on it (the hub passes it on to the
    /// server's handler, see [`crate::Hub::on_other_commands`]).
    Emulation {
        node: Arc<str>,
        session: Arc<str>,
        data: bytes::Bytes,
    },
    /// A node's heartbeat: who it is and its counts, every few seconds (for `info`). Passed on
    /// to the server's handler like [`NodeCommand::Emulation`].
    Stats(NodeStats),
    /// A question for every node, this one included (e.g. its channels, for the `channels`
    /// API), from node `from`; each answers with a [`NodeCommand::SurveyReply`]. What `op`
    /// means and what `data` holds is the server's. Passed on to the server's handler.
    Survey {
        from: Arc<str>,
        id: u64,
        op: Arc<str>,
        data: bytes::Bytes,
    },
    /// Node `from`'s answer to the survey `id` of node `to`. Passed on to the server's handler.
    SurveyReply {
        to: Arc<str>,
        id: u64,
        from: Arc<str>,
        data: bytes::Bytes,
    },
}

/// What a node tells the others about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub node: Arc<str>,
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub num_clients: u32,
    pub num_users: u32,
    pub num_channels: u32,
    pub num_subs: u32,
    /// Seconds since the node started.
    pub uptime: u64,
}

/// Why an engine could not do something.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{engine} engine is unavailable")]
    Unavailable {
        engine: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{engine} engine is shut down")]
    Closed { engine: &'static str },
    #[error(transparent)]
    Corrupt(#[from] CorruptPublication),
}

/// Where an engine hands what it carries: the local hub.
pub trait Deliver: Send + Sync + 'static {
    /// A publication, join or leave for the local subscribers of its channel, in stream order.
    fn deliver(&self, delivery: Delivery);
    /// A command for the local connections it concerns.
    fn command(&self, command: &NodeCommand);
    /// Deliveries may have been lost (the engine's link to other nodes was down): every local
    /// subscriber must resynchronise its position. Engines that cannot lose deliveries never
    /// call it.
    fn interrupted(&self) {}
}

/// Storage of history and presence, and transport of publications between nodes.
///
/// Contract every engine keeps (checked by one conformance suite):
/// - `publish` orders the publication in its channel when it is called, before the returned
///   future is polled, so a caller may publish several times and drop the futures without
///   losing or reordering anything (Redis Cluster: except around a slot's move to another
///   master, see `plexus-engine-redis`);
/// - with `retention`, the publication gets the next offset of its channel's stream and is kept
///   in history; without, it gets offset 0 and is only delivered;
/// - it is delivered to [`Deliver::deliver`] on every node, in offset order, after it is stored
///   as durably as the engine promises; the future then resolves with its position.
pub trait Engine: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Whether the engine can serve calls now (a broker engine: connected); for readiness checks.
    fn ready(&self) -> bool {
        true
    }

    /// What the engine counts of its own work (commits, connections), read at each scrape.
    fn metrics(&self) -> Vec<EngineMetric> {
        Vec::new()
    }

    fn publish(
        &self,
        publication: Publication,
        retention: Option<HistoryRetention>,
    ) -> BoxFuture<Result<Option<StreamPosition>, EngineError>>;

    /// Tells every node's subscribers of the channel that a client joined (or left).
    fn publish_membership(
        &self,
        joined: bool,
        membership: Membership,
    ) -> BoxFuture<Result<(), EngineError>>;

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> BoxFuture<Result<HistoryPage, EngineError>>;

    /// Drops a channel's publications; its epoch and top offset stay.
    fn remove_history(&self, channel: &str) -> BoxFuture<Result<(), EngineError>>;

    /// This node now has subscribers in `channel` (a broker subscribes to it) or no longer has.
    fn watch(&self, channel: &str, watching: bool) -> BoxFuture<Result<(), EngineError>>;

    fn add_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>>;

    /// Replaces a present client's entry (its info changed). Unlike `add_presence`, a failure
    /// must not take the client out of presence: engines that keep presence alive by
    /// refreshing it keep refreshing the new entry.
    fn update_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.add_presence(channel, client)
    }

    fn remove_presence(&self, channel: &str, client: &str) -> BoxFuture<Result<(), EngineError>>;

    fn presence(&self, channel: &str)
        -> BoxFuture<Result<Vec<Arc<ClientDescriptor>>, EngineError>>;

    /// Sends a command to every node, this one included.
    fn command(&self, command: NodeCommand) -> BoxFuture<Result<(), EngineError>>;

    /// Idempotent publishing ([`crate::idempotency`]): claims `key` in `channel`, atomically
    /// and for every node, if nobody holds it or the holder's claim is pending past its time;
    /// its record is then [`crate::idempotency::pending_record`] for `pending`. Else returns
    /// the holder's record.
    fn claim(
        &self,
        channel: &str,
        key: &str,
        pending: Duration,
    ) -> BoxFuture<Result<crate::idempotency::Claim, EngineError>>;

    /// Sets the record of a key this caller claimed, kept `ttl` from now (at least), whether
    /// or not its claim is still there.
    fn record(
        &self,
        channel: &str,
        key: &str,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<Result<(), EngineError>>;

    /// Gives up a claim (the publish failed), so that the next claim wins.
    fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>>;
}
