use std::borrow::Borrow;
use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;

use crate::engine::{Deliver, NodeCommand};
use crate::outbox::{Control, Delivery, Outbox, OutboxState};
use crate::publication::{ClientDescriptor, Publication};

/// Identifies one connection in this process.
pub type ConnectionId = u64;

/// A connected client, as this node knows it.
///
/// One per connection, kept as long as it is open (88 bytes): what does not concern every
/// connection is kept out of line or shared.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: ConnectionId,
    /// Client id, unique across nodes: what the protocol and presence call `client`.
    pub client: Arc<str>,
    /// User id from the token; empty for anonymous connections (one shared empty string).
    pub user: Arc<str>,
    /// What may change: the name and the connection info. One lock for both keeps this at
    /// 72 bytes.
    changing: Mutex<Changing>,
}

#[derive(Debug)]
struct Changing {
    /// Display name; the TCP chat's `/nick` changes it.
    name: Arc<str>,
    /// Connection info (raw JSON) from the token, or from the server API's `refresh`: boxed,
    /// since most connections have none.
    conn_info: Option<Box<Bytes>>,
}

/// The name protocol clients get when they give none: one allocation, not one per connection.
pub const DEFAULT_NAME: &str = "client";

fn default_name() -> Arc<str> {
    static NAME: OnceLock<Arc<str>> = OnceLock::new();
    NAME.get_or_init(|| Arc::from(DEFAULT_NAME)).clone()
}

/// The user id of every anonymous connection: one allocation, not one per connection.
fn anonymous_user() -> Arc<str> {
    static EMPTY: OnceLock<Arc<str>> = OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

impl ClientInfo {
    pub fn new(
        id: ConnectionId,
        client: Arc<str>,
        user: Arc<str>,
        conn_info: Option<Bytes>,
        name: &str,
    ) -> ClientInfo {
        ClientInfo {
            id,
            client,
            user: if user.is_empty() {
                anonymous_user()
            } else {
                user
            },
            changing: Mutex::new(Changing {
                name: if name == DEFAULT_NAME {
                    default_name()
                } else {
                    name.into()
                },
                conn_info: conn_info.map(Box::new),
            }),
        }
    }

    /// Connection info (raw JSON) from the token, or as the server API last set it.
    pub fn conn_info(&self) -> Option<Bytes> {
        lock(&self.changing).conn_info.as_deref().cloned()
    }

    /// Replaces the connection info (the server API's `refresh` with `info`): what others see
    /// of this connection from now on.
    pub fn set_conn_info(&self, conn_info: Option<Bytes>) {
        lock(&self.changing).conn_info = conn_info.map(Box::new);
    }

    pub fn name(&self) -> Arc<str> {
        lock(&self.changing).name.clone()
    }

    pub fn set_name(&self, name: &str) {
        lock(&self.changing).name = name.into();
    }

    /// How other clients see this one.
    pub fn descriptor(&self, chan_info: Option<Bytes>) -> Arc<ClientDescriptor> {
        Arc::new(ClientDescriptor {
            user: self.user.clone(),
            client: self.client.clone(),
            conn_info: self.conn_info(),
            chan_info,
        })
    }
}

/// A connection's membership in a channel, and its registration in the hub.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub info: Arc<ClientInfo>,
    pub outbox: Arc<Outbox>,
    /// Wants the channel's joins and leaves. Most subscribers do not (raw and TCP clients never
    /// do), and leaving them out keeps a join from costing one delivery per room member.
    pub join_leave: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("already subscribed to {0}")]
    AlreadySubscribed(String),
    #[error("channel {0} has reached its subscriber limit")]
    TooManySubscribers(String),
}

/// A connection that commands can reach, in the hub's registry: a set found by connection id
/// (16 bytes an entry, the id is in `info`).
#[derive(Debug)]
struct Registered {
    info: Arc<ClientInfo>,
    outbox: Arc<Outbox>,
}

impl Hash for Registered {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `ConnectionId` hashes, so that `Borrow<ConnectionId>` finds it.
        self.info.id.hash(state);
    }
}

impl PartialEq for Registered {
    fn eq(&self, other: &Registered) -> bool {
        self.info.id == other.info.id
    }
}

impl Eq for Registered {}

impl Borrow<ConnectionId> for Registered {
    fn borrow(&self) -> &ConnectionId {
        &self.info.id
    }
}

/// What a fan-out did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FanOutReport {
    /// Subscribers whose outbox took the delivery.
    pub delivered: usize,
    /// Subscribers left out because their outbox overflowed (they will be disconnected).
    pub dropped_slow: usize,
}

/// Decides whether a subscriber is sent a publication (a protocol client's tags filter).
pub type PublicationFilter = Arc<dyn Fn(&Publication) -> bool + Send + Sync>;

/// How the hub treats a subscriber's publications when not every one goes to it as it is.
///
/// The hub applies this while fanning out, under the channel's lock and so in the channel's
/// order: a filtered subscriber is never woken for what it does not get, and a chained one is
/// handed what its transport needs to write each publication alone. Either way the connection
/// can stay parked and be written for by its [`crate::DirectWriter`].
pub enum Tailored {
    /// Only the publications that pass.
    Filtered(PublicationFilter),
    /// Each publication as a [`Delivery::Chained`] carrying this chain's id (the caller's,
    /// to tell this subscription's deliveries from those of an earlier one still queued),
    /// with the one delivered to this subscriber before it (delta compression: the transport
    /// sends the difference). Starts empty.
    Chained(u64),
}

/// What the hub keeps for a tailored subscriber.
enum Tailoring {
    Filtered(PublicationFilter),
    Chained {
        chain: u64,
        /// The publication last delivered.
        previous: Option<Arc<Publication>>,
    },
}

/// Hashes a [`ConnectionId`] (a counter) with one multiplication: a fan-out in a channel with
/// a tailored subscriber looks every subscriber up.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ById<T> = HashMap<ConnectionId, T, std::hash::BuildHasherDefault<IdHasher>>;

/// A channel's subscribers, and the tailoring of the few that have one.
#[derive(Default)]
struct Members {
    list: Vec<Subscriber>,
    /// The offset of the last publication fanned out: one at or below it means the channel's
    /// stream began again (a new epoch, as when a broker's keys expired), and every subscriber
    /// is told to resynchronise ([`Control::Resync`]) before it is delivered.
    last_offset: u64,
    /// By connection: only channels with a tailored subscriber pay for the table.
    tailored: Option<Box<ById<Tailoring>>>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Members")
            .field("list", &self.list)
            .field("tailored", &self.tailored.as_ref().map_or(0, |t| t.len()))
            .finish()
    }
}

impl Members {
    fn untailor(&mut self, id: ConnectionId) {
        if let Some(tailored) = self.tailored.as_mut() {
            tailored.remove(&id);
            if tailored.is_empty() {
                self.tailored = None;
            }
        }
    }
}

#[derive(Debug)]
struct Channel {
    /// The subscriber list's lock is also the channel's order: deliveries to one channel are
    /// queued to every subscriber in the same order.
    subscribers: Mutex<Members>,
    /// Subscribers a fan-out dropped (cut as too slow, or closing) that have not unsubscribed
    /// yet: they are still members until they do (presence, the leave, the engine's watch).
    dropped: Mutex<Vec<ConnectionId>>,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Channel>>>;

const N_SHARDS: usize = 64;

/// Local channels, their subscribers, fan-out, and the connections of this node.
///
/// The channel table is split into shards so that subscribing in one channel does not block
/// delivering in another; a delivery holds only its channel's lock while it queues an `Arc` into
/// each subscriber's [`Outbox`] (no copy of the data, no socket touched).
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Shard]>,
    /// Connections with a user id, which commands address. Every command names a user (the
    /// server API requires one), so anonymous connections are never addressed: they are only
    /// counted, which keeps them out of this set and its memory.
    connections: RwLock<HashSet<Registered>>,
    anonymous: AtomicUsize,
    next_connection_id: AtomicU64,
    delivered: AtomicU64,
    dropped_slow: AtomicU64,
    other_commands: OnceLock<OtherCommands>,
}

/// What the hub does with the [`NodeCommand`]s that are not for its connections.
pub type CommandHandler = Arc<dyn Fn(&NodeCommand) + Send + Sync>;

struct OtherCommands(CommandHandler);

impl std::fmt::Debug for OtherCommands {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("OtherCommands")
    }
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            shards: (0..N_SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            connections: RwLock::new(HashSet::new()),
            anonymous: AtomicUsize::new(0),
            next_connection_id: AtomicU64::new(1),
            delivered: AtomicU64::new(0),
            dropped_slow: AtomicU64::new(0),
            other_commands: OnceLock::new(),
        }
    }

    /// Sets, once, who receives the [`NodeCommand`]s the hub does not handle itself
    /// ([`NodeCommand::Emulation`], [`NodeCommand::Stats`], [`NodeCommand::Survey`],
    /// [`NodeCommand::SurveyReply`]): the server, which owns what they concern. Without a
    /// handler they are dropped. Returns false if a handler was already set.
    pub fn on_other_commands(&self, handler: CommandHandler) -> bool {
        self.other_commands.set(OtherCommands(handler)).is_ok()
    }

    pub fn next_connection_id(&self) -> ConnectionId {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes a connection reachable by [`NodeCommand`]s (disconnect, server-side subscribe), or
    /// only counts it if it is anonymous. Undo with exactly one [`Hub::unregister`].
    pub fn register(&self, connection: Subscriber) {
        if connection.info.user.is_empty() {
            self.anonymous.fetch_add(1, Ordering::Relaxed);
            return;
        }
        write(&self.connections).insert(Registered {
            info: connection.info,
            outbox: connection.outbox,
        });
    }

    pub fn unregister(&self, id: ConnectionId) {
        if !write(&self.connections).remove(&id) {
            // Not in the set: it was registered as anonymous.
            let _ = self
                .anonymous
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    pub fn n_connections(&self) -> usize {
        read(&self.connections).len() + self.anonymous.load(Ordering::Relaxed)
    }

    /// Registered connections of `user` (and, if given, with client id `client`); none for the
    /// empty (anonymous) user.
    pub fn connections_of(&self, user: &str, client: Option<&str>) -> Vec<Subscriber> {
        if user.is_empty() {
            return Vec::new();
        }
        read(&self.connections)
            .iter()
            .filter(|connection| {
                &*connection.info.user == user
                    && client.is_none_or(|client| &*connection.info.client == client)
            })
            .map(|connection| Subscriber {
                info: connection.info.clone(),
                outbox: connection.outbox.clone(),
                join_leave: false,
            })
            .collect()
    }

    fn shard(&self, channel: &str) -> &Shard {
        let mut hasher = DefaultHasher::new();
        channel.hash(&mut hasher);
        &self.shards[hasher.finish() as usize % N_SHARDS]
    }

    fn channel(&self, channel: &str) -> Option<Arc<Channel>> {
        read(self.shard(channel)).get(channel).cloned()
    }

    /// Adds a subscriber to a channel. Returns the channel's shared name and whether it is the
    /// channel's first subscriber on this node. `max_subscribers` 0 means no limit.
    pub fn subscribe(
        &self,
        channel: &str,
        subscriber: Subscriber,
        max_subscribers: usize,
    ) -> Result<(Arc<str>, bool), HubError> {
        self.subscribe_tailored(channel, subscriber, None, max_subscribers)
    }

    /// [`Hub::subscribe`], with the subscriber's publications filtered or chained (joins,
    /// leaves and commands go as they are).
    pub fn subscribe_tailored(
        &self,
        channel: &str,
        subscriber: Subscriber,
        tailored: Option<Tailored>,
        max_subscribers: usize,
    ) -> Result<(Arc<str>, bool), HubError> {
        let mut shard = write(self.shard(channel));
        let (name, entry) = match shard.get_key_value(channel) {
            Some((name, entry)) => (name.clone(), entry.clone()),
            None => {
                let name: Arc<str> = channel.into();
                let entry = Arc::new(Channel {
                    subscribers: Mutex::default(),
                    dropped: Mutex::new(Vec::new()),
                });
                shard.insert(name.clone(), entry.clone());
                (name, entry)
            }
        };
        let mut members = lock(&entry.subscribers);
        if members
            .list
            .iter()
            .any(|existing| existing.info.id == subscriber.info.id)
        {
            return Err(HubError::AlreadySubscribed(channel.to_owned()));
        }
        if max_subscribers > 0 && members.list.len() >= max_subscribers {
            return Err(HubError::TooManySubscribers(channel.to_owned()));
        }
        if let Some(tailored) = tailored {
            let tailoring = match tailored {
                Tailored::Filtered(filter) => Tailoring::Filtered(filter),
                Tailored::Chained(chain) => Tailoring::Chained {
                    chain,
                    previous: None,
                },
            };
            members
                .tailored
                .get_or_insert_with(Box::default)
                .insert(subscriber.info.id, tailoring);
        }
        members.list.push(subscriber);
        Ok((name, members.list.len() == 1))
    }

    /// Removes a connection from a channel; the channel goes away with its last subscriber.
    /// Returns (whether it was subscribed, whether the channel is now empty on this node).
    pub fn unsubscribe(&self, channel: &str, id: ConnectionId) -> (bool, bool) {
        let mut shard = write(self.shard(channel));
        let Entry::Occupied(entry) = shard.entry(channel.into()) else {
            return (false, false);
        };
        let mut members = lock(&entry.get().subscribers);
        let before = members.list.len();
        members.list.retain(|subscriber| subscriber.info.id != id);
        members.untailor(id);
        let mut removed = members.list.len() != before;
        let mut dropped = lock(&entry.get().dropped);
        if !removed {
            let before = dropped.len();
            dropped.retain(|dropped| *dropped != id);
            removed = dropped.len() != before;
        }
        let now_empty = members.list.is_empty() && dropped.is_empty();
        drop((members, dropped));
        if now_empty {
            entry.remove();
        }
        (removed, removed && now_empty)
    }

    /// Queues a delivery to every local subscriber of its channel.
    pub fn fan_out(&self, channel: &str, delivery: Delivery) -> FanOutReport {
        let Some(channel) = self.channel(channel) else {
            return FanOutReport::default();
        };
        let mut report = FanOutReport::default();
        let membership = matches!(delivery, Delivery::Join(_) | Delivery::Leave(_));
        let mut members = lock(&channel.subscribers);
        let Members {
            list,
            last_offset,
            tailored,
        } = &mut *members;
        let began_again = match &delivery {
            Delivery::Publication(publication) if publication.offset > 0 => {
                let again = publication.offset <= *last_offset;
                *last_offset = publication.offset;
                again.then(|| publication.channel.clone())
            }
            _ => None,
        };
        // Only a publication is tailored, and only in a channel with a tailored subscriber.
        let mut tailoring = match (&delivery, tailored.as_deref_mut()) {
            (Delivery::Publication(publication), Some(table)) => Some((publication, table)),
            _ => None,
        };
        let mut gone = Vec::new();
        list.retain(|subscriber| {
            if membership && !subscriber.join_leave {
                return true;
            }
            if let Some(channel) = &began_again {
                subscriber.outbox.push_control(Control::Resync {
                    channel: channel.clone(),
                });
            }
            let mut own = None;
            if let Some((publication, table)) = tailoring.as_mut() {
                match table.get_mut(&subscriber.info.id) {
                    Some(Tailoring::Filtered(filter)) if !filter(publication) => return true,
                    None | Some(Tailoring::Filtered(_)) => {}
                    Some(Tailoring::Chained { chain, previous }) => {
                        own = Some(Delivery::Chained {
                            publication: (*publication).clone(),
                            previous: previous.replace((*publication).clone()),
                            chain: *chain,
                        });
                    }
                }
            }
            match subscriber
                .outbox
                .push(own.unwrap_or_else(|| delivery.clone()))
            {
                Ok(()) => {
                    report.delivered += 1;
                    true
                }
                Err(OutboxState::Overflowed) => {
                    report.dropped_slow += 1;
                    gone.push(subscriber.info.id);
                    false
                }
                // Closing: it unsubscribes itself shortly; a closed outbox is not a slow one.
                Err(_) => {
                    gone.push(subscriber.info.id);
                    false
                }
            }
        });
        if !gone.is_empty() {
            for &id in &gone {
                members.untailor(id);
            }
            lock(&channel.dropped).extend(gone);
        }
        drop(members);
        self.delivered
            .fetch_add(report.delivered as u64, Ordering::Relaxed);
        self.dropped_slow
            .fetch_add(report.dropped_slow as u64, Ordering::Relaxed);
        report
    }

    /// Deliveries queued and subscribers dropped as too slow, since start.
    pub fn fan_out_totals(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.dropped_slow.load(Ordering::Relaxed),
        )
    }

    /// Whether a channel has local subscribers.
    pub fn has_channel(&self, channel: &str) -> bool {
        self.channel(channel).is_some()
    }

    /// Local subscribers of a channel, in order of arrival.
    pub fn presence(&self, channel: &str) -> Vec<Arc<ClientInfo>> {
        self.channel(channel).map_or_else(Vec::new, |channel| {
            lock(&channel.subscribers)
                .list
                .iter()
                .map(|subscriber| subscriber.info.clone())
                .collect()
        })
    }

    /// Number of channels with at least one local subscriber.
    pub fn n_channels(&self) -> usize {
        self.shards.iter().map(|shard| read(shard).len()).sum()
    }

    /// Names of channels with local subscribers, and how many each has.
    pub fn channels(&self) -> Vec<(Arc<str>, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (name, channel) in read(shard).iter() {
                out.push((name.clone(), lock(&channel.subscribers).list.len()));
            }
        }
        out
    }
}

impl Deliver for Hub {
    fn deliver(&self, delivery: Delivery) {
        let (channel, delivery) = match delivery {
            Delivery::Publication(publication) => (
                publication.channel.clone(),
                Delivery::Publication(publication),
            ),
            // Chaining is the hub's, per subscriber.
            Delivery::Chained { publication, .. } => (
                publication.channel.clone(),
                Delivery::Publication(publication),
            ),
            Delivery::Join(membership) => (membership.channel.clone(), Delivery::Join(membership)),
            Delivery::Leave(membership) => {
                (membership.channel.clone(), Delivery::Leave(membership))
            }
            Delivery::Control(_) => return, // controls go to one connection, not a channel
        };
        self.fan_out(&channel, delivery);
    }

    fn interrupted(&self) {
        for shard in self.shards.iter() {
            let channels: Vec<(Arc<str>, Arc<Channel>)> = read(shard)
                .iter()
                .map(|(name, channel)| (name.clone(), channel.clone()))
                .collect();
            for (name, channel) in channels {
                for subscriber in lock(&channel.subscribers).list.iter() {
                    subscriber.outbox.push_control(Control::Resync {
                        channel: name.clone(),
                    });
                }
            }
        }
    }

    fn command(&self, command: &NodeCommand) {
        let (user, client, control) = match command {
            NodeCommand::Disconnect {
                user,
                client,
                code,
                reason,
            } => (
                user,
                client.as_deref(),
                Control::Disconnect {
                    code: *code,
                    reason: reason.clone(),
                },
            ),
            NodeCommand::Refresh {
                user,
                client,
                expire_at,
                info,
            } => (
                user,
                client.as_deref(),
                Control::Refresh {
                    expire_at: *expire_at,
                    info: info.clone(),
                },
            ),
            NodeCommand::Unsubscribe { user, channel } => (
                user,
                None,
                Control::Unsubscribe {
                    channel: channel.clone(),
                    code: 2000,
                    reason: "server unsubscribe".into(),
                },
            ),
            NodeCommand::Subscribe { user, channel } => (
                user,
                None,
                Control::Subscribe {
                    channel: channel.clone(),
                },
            ),
            NodeCommand::Emulation { .. }
            | NodeCommand::Stats(_)
            | NodeCommand::Survey { .. }
            | NodeCommand::SurveyReply { .. } => {
                if let Some(OtherCommands(handler)) = self.other_commands.get() {
                    handler(command);
                }
                return;
            }
        };
        for connection in self.connections_of(user, client) {
            connection.outbox.push_control(control.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MessageKind, Publication};

    fn subscriber(hub: &Hub, limit: usize) -> Subscriber {
        let id = hub.next_connection_id();
        Subscriber {
            info: Arc::new(ClientInfo::new(
                id,
                format!("c{id}").into(),
                format!("u{id}").into(),
                None,
                &format!("client{id}"),
            )),
            outbox: Arc::new(Outbox::new(limit)),
            join_leave: false,
        }
    }

    fn publish(hub: &Hub, channel: &str, data: &str) -> FanOutReport {
        let publication = Publication::new(
            channel.into(),
            MessageKind::Text,
            data.to_owned().into(),
            None,
        );
        hub.fan_out(channel, Delivery::Publication(Arc::new(publication)))
    }

    fn received(subscriber: &Subscriber) -> Vec<String> {
        let mut out = Vec::new();
        subscriber.outbox.drain(usize::MAX, &mut out);
        out.iter()
            .map(|delivery| match delivery {
                Delivery::Publication(p) => String::from_utf8(p.data.to_vec()).unwrap(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn fan_out_in_order_to_the_channel_only() {
        let hub = Hub::new();
        let (a, b, c) = (
            subscriber(&hub, 1 << 20),
            subscriber(&hub, 1 << 20),
            subscriber(&hub, 1 << 20),
        );
        assert!(
            hub.subscribe("chat:x", a.clone(), 0).unwrap().1,
            "first subscriber"
        );
        assert!(!hub.subscribe("chat:x", b.clone(), 0).unwrap().1);
        hub.subscribe("chat:y", c.clone(), 0).unwrap();
        assert_eq!(publish(&hub, "chat:x", "1").delivered, 2);
        publish(&hub, "chat:x", "2");
        publish(&hub, "chat:y", "3");
        assert_eq!(publish(&hub, "chat:nobody", "4").delivered, 0);
        assert_eq!(received(&a), ["1", "2"]);
        assert_eq!(received(&b), ["1", "2"]);
        assert_eq!(received(&c), ["3"]);
    }

    #[test]
    fn subscribe_twice_limits_unsubscribe_and_cleanup() {
        let hub = Hub::new();
        let a = subscriber(&hub, 1 << 20);
        let b = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", a.clone(), 1).unwrap();
        assert_eq!(
            hub.subscribe("chat:x", a.clone(), 0),
            Err(HubError::AlreadySubscribed("chat:x".into()))
        );
        assert_eq!(
            hub.subscribe("chat:x", b.clone(), 1),
            Err(HubError::TooManySubscribers("chat:x".into()))
        );
        assert_eq!(hub.presence("chat:x").len(), 1);
        assert_eq!(hub.n_channels(), 1);
        assert_eq!(hub.unsubscribe("chat:x", a.info.id), (true, true));
        assert_eq!(hub.unsubscribe("chat:x", a.info.id), (false, false));
        assert_eq!(hub.n_channels(), 0);
    }

    #[test]
    fn slow_subscriber_is_dropped_and_others_keep_receiving() {
        let hub = Hub::new();
        let slow = subscriber(&hub, 200);
        let fast = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", slow.clone(), 0).unwrap();
        hub.subscribe("chat:x", fast.clone(), 0).unwrap();
        let mut dropped = 0;
        for i in 0..10 {
            dropped += publish(&hub, "chat:x", &format!("{i:0>50}")).dropped_slow;
            received(&fast);
        }
        assert_eq!(dropped, 1);
        assert_eq!(slow.outbox.state(), OutboxState::Overflowed);
        assert_eq!(hub.presence("chat:x").len(), 1);
    }

    #[test]
    fn commands_reach_the_users_connections() {
        let hub = Hub::new();
        let a = subscriber(&hub, 1 << 20);
        let b = subscriber(&hub, 1 << 20);
        hub.register(a.clone());
        hub.register(b.clone());
        hub.command(&NodeCommand::Disconnect {
            user: a.info.user.clone(),
            client: None,
            code: 3503,
            reason: "force disconnect".into(),
        });
        let mut out = Vec::new();
        a.outbox.drain(usize::MAX, &mut out);
        assert!(matches!(
            &out[..],
            [Delivery::Control(Control::Disconnect { code: 3503, .. })]
        ));
        assert!(b.outbox.is_empty());
        hub.unregister(a.info.id);
        assert_eq!(hub.n_connections(), 1);
    }

    #[test]
    fn anonymous_connections_are_counted_not_addressed() {
        let hub = Hub::new();
        let named = subscriber(&hub, 1 << 20);
        let id = hub.next_connection_id();
        let anonymous = Subscriber {
            info: Arc::new(ClientInfo::new(id, "c".into(), "".into(), None, "a")),
            ..subscriber(&hub, 1 << 20)
        };
        hub.register(named.clone());
        hub.register(anonymous.clone());
        assert_eq!(hub.n_connections(), 2);
        assert!(hub.connections_of("", None).is_empty());
        assert_eq!(hub.connections_of(&named.info.user, None).len(), 1);
        hub.unregister(anonymous.info.id);
        assert_eq!(hub.n_connections(), 1);
        hub.unregister(named.info.id);
        assert_eq!(hub.n_connections(), 0);
        hub.unregister(named.info.id); // once too often: no underflow
        assert_eq!(hub.n_connections(), 0);
    }

    #[test]
    fn client_info_keeps_what_it_was_given() {
        let info = ClientInfo::new(
            7,
            "c7".into(),
            "".into(),
            Some(Bytes::from_static(b"{}")),
            "ann",
        );
        assert!(
            Arc::ptr_eq(&info.user, &anonymous_user()),
            "one shared empty user"
        );
        assert_eq!(info.conn_info().as_deref(), Some(&b"{}"[..]));
        assert_eq!(&*info.name(), "ann");
        info.set_name("bob");
        assert_eq!(&*info.name(), "bob");
        let descriptor = info.descriptor(None);
        assert_eq!(descriptor.conn_info.as_deref(), Some(&b"{}"[..]));
        assert_eq!(&*descriptor.client, "c7");
        assert!(std::mem::size_of::<ClientInfo>() <= 88);
    }

    #[test]
    fn joins_and_leaves_reach_only_those_who_want_them() {
        let hub = Hub::new();
        let quiet = subscriber(&hub, 1 << 20);
        let curious = Subscriber {
            join_leave: true,
            ..subscriber(&hub, 1 << 20)
        };
        hub.subscribe("chat:x", quiet.clone(), 0).unwrap();
        hub.subscribe("chat:x", curious.clone(), 0).unwrap();
        let membership = Arc::new(crate::Membership::new(
            "chat:x".into(),
            quiet.info.descriptor(None),
        ));
        let report = hub.fan_out("chat:x", Delivery::Join(membership));
        assert_eq!(report.delivered, 1);
        assert!(quiet.outbox.is_empty());
        assert!(!curious.outbox.is_empty());
    }

    #[test]
    fn a_filtered_subscriber_gets_only_the_publications_that_pass() {
        let hub = Hub::new();
        let plain = subscriber(&hub, 1 << 20);
        let picky = Subscriber {
            join_leave: true,
            ..subscriber(&hub, 1 << 20)
        };
        let even: PublicationFilter =
            Arc::new(|p: &Publication| p.data.len().is_multiple_of(2) && !p.data.is_empty());
        hub.subscribe("chat:x", plain.clone(), 0).unwrap();
        hub.subscribe_tailored("chat:x", picky.clone(), Some(Tailored::Filtered(even)), 0)
            .unwrap();
        for data in ["1", "22", "333", "4444"] {
            publish(&hub, "chat:x", data);
        }
        assert_eq!(received(&plain), ["1", "22", "333", "4444"]);
        assert_eq!(received(&picky), ["22", "4444"]);
        // Joins are not publications: not filtered.
        let membership = Arc::new(crate::Membership::new(
            "chat:x".into(),
            plain.info.descriptor(None),
        ));
        assert_eq!(
            hub.fan_out("chat:x", Delivery::Join(membership)).delivered,
            1
        );
        assert_eq!(received(&picky).len(), 1);
        // Subscribed again without a filter, it gets everything: the filter went with it.
        assert_eq!(hub.unsubscribe("chat:x", picky.info.id), (true, false));
        hub.subscribe("chat:x", picky.clone(), 0).unwrap();
        publish(&hub, "chat:x", "5");
        assert_eq!(received(&picky), ["5"]);
        let channel = hub.channel("chat:x").unwrap();
        assert!(lock(&channel.subscribers).tailored.is_none(), "table freed");
    }

    #[test]
    fn a_chained_subscriber_gets_each_publication_with_the_one_before() {
        let hub = Hub::new();
        let plain = subscriber(&hub, 1 << 20);
        let chained = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", plain.clone(), 0).unwrap();
        hub.subscribe_tailored("chat:x", chained.clone(), Some(Tailored::Chained(7)), 0)
            .unwrap();
        for data in ["1", "2", "3"] {
            publish(&hub, "chat:x", data);
        }
        let data = |p: &Publication| String::from_utf8(p.data.to_vec()).unwrap();
        let chain = |subscriber: &Subscriber| {
            let mut out = Vec::new();
            subscriber.outbox.drain(usize::MAX, &mut out);
            out.into_iter()
                .map(|delivery| match delivery {
                    Delivery::Chained {
                        publication,
                        previous,
                        chain,
                    } => (data(&publication), previous.as_deref().map(data), chain),
                    other => panic!("not chained: {other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            chain(&chained),
            [
                ("1".into(), None, 7),
                ("2".into(), Some("1".into()), 7),
                ("3".into(), Some("2".into()), 7)
            ]
        );
        assert_eq!(received(&plain), ["1", "2", "3"], "others as ever");
        // A new subscription starts a new chain.
        hub.unsubscribe("chat:x", chained.info.id);
        hub.subscribe_tailored("chat:x", chained.clone(), Some(Tailored::Chained(8)), 0)
            .unwrap();
        publish(&hub, "chat:x", "4");
        assert_eq!(chain(&chained), [("4".into(), None, 8)]);
    }

    #[test]
    fn offsets_that_go_back_ask_every_subscriber_to_resync_first() {
        let hub = Hub::new();
        let a = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", a.clone(), 0).unwrap();
        let at = |offset: u64| {
            let mut publication = Publication::new(
                "chat:x".into(),
                MessageKind::Text,
                offset.to_string().into(),
                None,
            );
            publication.offset = offset;
            hub.fan_out("chat:x", Delivery::Publication(Arc::new(publication)));
        };
        at(1);
        at(2);
        assert_eq!(received(&a), ["1", "2"]);
        at(1); // the stream began again
        at(2);
        let got = received(&a);
        assert!(got[0].contains("Resync"), "{got:?}");
        assert_eq!(got[1..], ["1", "2"]);
    }

    #[test]
    fn an_interruption_asks_every_subscriber_to_resync() {
        let hub = Hub::new();
        let a = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", a.clone(), 0).unwrap();
        hub.subscribe("chat:y", a.clone(), 0).unwrap();
        hub.interrupted();
        let mut out = Vec::new();
        a.outbox.drain(usize::MAX, &mut out);
        let mut channels: Vec<String> = out
            .iter()
            .map(|delivery| match delivery {
                Delivery::Control(Control::Resync { channel }) => channel.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        channels.sort();
        assert_eq!(channels, ["chat:x", "chat:y"]);
    }
}
