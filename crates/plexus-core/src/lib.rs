//! The Plexus core: channels, subscriptions, fan-out, history and presence rules, and the
//! engine trait.
//!
//! - [`Node`] is what transports talk to: publish, subscribe (with recovery), unsubscribe,
//!   history, presence, commands. It applies the channel's [`ChannelOptions`] and uses an
//!   [`Engine`] for storage and cross-node delivery.
//! - [`Hub`] keeps this node's channels and subscribers and fans deliveries out.
//! - [`Publication`] and [`Membership`] cache each wire encoding the first time a transport asks
//!   for it, so a broadcast is encoded once per encoding, not once per subscriber.
//! - [`Outbox`] is a connection's bounded queue of [`Delivery`]s.
//! - [`MemoryEngine`] keeps history and presence in this process.
//!
//! This crate does **no network I/O** and knows no socket, transport, wire format or concrete
//! storage beyond memory: transports (in `plexus-server`) own sockets and encode; other engines
//! are crates that implement [`Engine`].

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod engine;
pub mod envelope;
mod hub;
pub mod idempotency;
mod memory;
mod node;
mod options;
mod outbox;
mod presence;
mod publication;

pub use engine::{
    BoxFuture, Deliver, Engine, EngineError, EngineMetric, HistoryPage, HistoryQuery,
    HistoryRetention, MetricKind, NodeCommand, NodeStats, StreamPosition,
};
pub use hub::{
    ClientInfo, CommandHandler, ConnectionId, FanOutReport, Hub, HubError, PublicationFilter,
    Subscriber, Tailored, DEFAULT_NAME,
};
pub use memory::{new_epoch, MemoryEngine};
pub use node::{recovery_is_complete, Node, PublishError, SubscribeError, Subscription};
pub use options::{
    allowed_users, user_may_subscribe, ChannelError, ChannelOptions, Namespaces, RecoveryMode,
    MAX_CHANNEL_LEN,
};
pub use outbox::{Control, Delivery, DirectWriter, Outbox, OutboxState};
pub use plexus_protocol::ws::MessageKind;
pub use presence::PresenceMap;
pub use publication::{
    ClientDescriptor, CorruptPublication, Encoding, Membership, Publication, Tags,
};
