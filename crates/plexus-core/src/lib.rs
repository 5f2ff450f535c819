//! The Plexus hub: who is subscribed to which channel, and getting each publication to all of
//! them.
//!
//! - [`Hub`] keeps channels and their subscribers and fans publications out.
//! - [`Publication`] is one message in one channel; it caches each wire encoding the first time a
//!   transport asks for it, so a broadcast is encoded once per encoding, not once per subscriber.
//! - [`Outbox`] is a connection's bounded queue of publications waiting to be written.
//!
//! This crate does **no network I/O** and knows no socket, transport or wire format: transports
//! (in `plexus-server`) own sockets, drain outboxes and encode. It only uses synchronisation
//! primitives, so it is tested without a network.

mod hub;
mod outbox;
mod publication;

pub use hub::{ClientInfo, ConnectionId, Hub, PublishReport, SubscribeError, Subscriber};
pub use outbox::{Outbox, OutboxState};
pub use plexus_protocol::ws::MessageKind;
pub use publication::{Encoding, Publication};
