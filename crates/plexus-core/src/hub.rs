use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::outbox::Outbox;
use crate::publication::Publication;

/// Identifies one connection for the life of the process.
pub type ConnectionId = u64;

/// Who a subscriber is, as presence shows it.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: ConnectionId,
    /// The transport it came in on (`websocket`, `tcp`), for presence and metrics.
    pub transport: &'static str,
    /// Display name; the TCP chat's `/nick` changes it.
    name: RwLock<Arc<str>>,
}

impl ClientInfo {
    pub fn new(id: ConnectionId, transport: &'static str, name: &str) -> ClientInfo {
        ClientInfo {
            id,
            transport,
            name: RwLock::new(name.into()),
        }
    }

    pub fn name(&self) -> Arc<str> {
        self.name
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_name(&self, name: &str) {
        *self
            .name
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = name.into();
    }
}

/// A connection's membership in a channel.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub info: Arc<ClientInfo>,
    pub outbox: Arc<Outbox>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("already subscribed to {0}")]
    AlreadySubscribed(String),
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublishReport {
    /// Subscribers whose outbox took the publication.
    pub delivered: usize,
    /// Subscribers left out because their outbox overflowed (they will be disconnected).
    pub dropped_slow: usize,
}

#[derive(Debug)]
struct Channel {
    /// The subscriber list's lock is also the channel's order: publications to one channel are
    /// queued to every subscriber in the same order.
    subscribers: Mutex<Vec<Subscriber>>,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Channel>>>;

const N_SHARDS: usize = 64;

/// Channels, their subscribers, and fan-out.
///
/// The channel table is split into shards so that subscribing in one channel does not block
/// publishing in another; a publish holds only its channel's lock while it queues the
/// publication into each subscriber's [`Outbox`] (a pointer push, no copy of the data).
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Shard]>,
    next_connection_id: AtomicU64,
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

impl Hub {
    pub fn new() -> Hub {
        Hub {
            shards: (0..N_SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            next_connection_id: AtomicU64::new(1),
        }
    }

    pub fn next_connection_id(&self) -> ConnectionId {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    fn shard(&self, channel: &str) -> &Shard {
        let mut hasher = DefaultHasher::new();
        channel.hash(&mut hasher);
        &self.shards[hasher.finish() as usize % N_SHARDS]
    }

    fn channel(&self, channel: &str) -> Option<Arc<Channel>> {
        self.shard(channel)
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(channel)
            .cloned()
    }

    /// Adds a subscriber to a channel and returns the channel's shared name.
    pub fn subscribe(
        &self,
        channel: &str,
        subscriber: Subscriber,
    ) -> Result<Arc<str>, SubscribeError> {
        let mut shard = self
            .shard(channel)
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (name, entry) = match shard.get_key_value(channel) {
            Some((name, entry)) => (name.clone(), entry.clone()),
            None => {
                let name: Arc<str> = channel.into();
                let entry = Arc::new(Channel {
                    subscribers: Mutex::new(Vec::new()),
                });
                shard.insert(name.clone(), entry.clone());
                (name, entry)
            }
        };
        let mut subscribers = lock(&entry.subscribers);
        if subscribers
            .iter()
            .any(|existing| existing.info.id == subscriber.info.id)
        {
            return Err(SubscribeError::AlreadySubscribed(channel.to_owned()));
        }
        subscribers.push(subscriber);
        Ok(name)
    }

    /// Removes a connection from a channel; the channel goes away with its last subscriber.
    pub fn unsubscribe(&self, channel: &str, id: ConnectionId) -> bool {
        let mut shard = self
            .shard(channel)
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Entry::Occupied(entry) = shard.entry(channel.into()) else {
            return false;
        };
        let mut subscribers = lock(&entry.get().subscribers);
        let before = subscribers.len();
        subscribers.retain(|subscriber| subscriber.info.id != id);
        let removed = subscribers.len() != before;
        let now_empty = subscribers.is_empty();
        drop(subscribers);
        if now_empty {
            entry.remove();
        }
        removed
    }

    /// Queues a publication to every subscriber of its channel.
    pub fn publish(&self, publication: Publication) -> PublishReport {
        let Some(channel) = self.channel(&publication.channel) else {
            return PublishReport::default();
        };
        let publication = Arc::new(publication);
        let mut report = PublishReport::default();
        let mut subscribers = lock(&channel.subscribers);
        subscribers.retain(|subscriber| {
            if subscriber.outbox.push(publication.clone()) {
                report.delivered += 1;
                true
            } else {
                report.dropped_slow += 1;
                false
            }
        });
        report
    }

    /// Who is subscribed to a channel, in order of arrival.
    pub fn presence(&self, channel: &str) -> Vec<Arc<ClientInfo>> {
        self.channel(channel).map_or_else(Vec::new, |channel| {
            lock(&channel.subscribers)
                .iter()
                .map(|subscriber| subscriber.info.clone())
                .collect()
        })
    }

    /// Number of channels with at least one subscriber.
    pub fn n_channels(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MessageKind, OutboxState};

    fn subscriber(hub: &Hub, limit: usize) -> Subscriber {
        let id = hub.next_connection_id();
        Subscriber {
            info: Arc::new(ClientInfo::new(id, "test", &format!("client{id}"))),
            outbox: Arc::new(Outbox::new(limit)),
        }
    }

    fn publish(hub: &Hub, channel: &str, data: &str) -> PublishReport {
        hub.publish(Publication::new(
            channel.into(),
            MessageKind::Text,
            data.to_owned().into(),
            None,
        ))
    }

    fn received(subscriber: &Subscriber) -> Vec<String> {
        let mut out = Vec::new();
        subscriber.outbox.drain(usize::MAX, &mut out);
        out.iter()
            .map(|p| String::from_utf8(p.data.to_vec()).unwrap())
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
        hub.subscribe("chat:x", a.clone()).unwrap();
        hub.subscribe("chat:x", b.clone()).unwrap();
        hub.subscribe("chat:y", c.clone()).unwrap();
        assert_eq!(publish(&hub, "chat:x", "1").delivered, 2);
        publish(&hub, "chat:x", "2");
        publish(&hub, "chat:y", "3");
        assert_eq!(publish(&hub, "chat:nobody", "4").delivered, 0);
        assert_eq!(received(&a), ["1", "2"]);
        assert_eq!(received(&b), ["1", "2"]);
        assert_eq!(received(&c), ["3"]);
    }

    #[test]
    fn subscribe_twice_unsubscribe_and_cleanup() {
        let hub = Hub::new();
        let a = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", a.clone()).unwrap();
        assert_eq!(
            hub.subscribe("chat:x", a.clone()),
            Err(SubscribeError::AlreadySubscribed("chat:x".into()))
        );
        assert_eq!(hub.presence("chat:x").len(), 1);
        assert_eq!(hub.n_channels(), 1);
        assert!(hub.unsubscribe("chat:x", a.info.id));
        assert!(!hub.unsubscribe("chat:x", a.info.id));
        assert_eq!(hub.n_channels(), 0);
        assert!(hub.presence("chat:x").is_empty());
    }

    #[test]
    fn slow_subscriber_is_dropped_and_others_keep_receiving() {
        let hub = Hub::new();
        let slow = subscriber(&hub, 200);
        let fast = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", slow.clone()).unwrap();
        hub.subscribe("chat:x", fast.clone()).unwrap();
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
    fn presence_shows_name_changes() {
        let hub = Hub::new();
        let a = subscriber(&hub, 1 << 20);
        hub.subscribe("chat:x", a.clone()).unwrap();
        a.info.set_name("alice");
        assert_eq!(&*hub.presence("chat:x")[0].name(), "alice");
    }
}
