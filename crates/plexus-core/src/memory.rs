//! The memory engine: history and presence in this process, nothing on disk, one node.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::engine::{
    BoxFuture, Deliver, Engine, EngineError, HistoryPage, HistoryQuery, HistoryRetention,
    NodeCommand, StreamPosition,
};
use crate::idempotency::{Claim, LocalClaims};
use crate::outbox::Delivery;
use crate::presence::PresenceMap;
use crate::publication::{ClientDescriptor, Membership, Publication};

/// A fresh random epoch (16 hex digits), from the standard library's per-process random keys.
pub fn new_epoch() -> Arc<str> {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    format!("{:016x}", hasher.finish()).into()
}

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// Retained publications, oldest first, with the time they were published.
    entries: VecDeque<(Instant, Arc<Publication>)>,
}

impl Stream {
    fn trim(&mut self, retention: HistoryRetention, now: Instant) {
        while self.entries.len() > retention.size {
            self.entries.pop_front();
        }
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= retention.ttl)
        {
            self.entries.pop_front();
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }
}

pub struct MemoryEngine {
    deliver: Arc<dyn Deliver>,
    streams: RwLock<HashMap<Arc<str>, Arc<Mutex<Stream>>>>,
    /// Retention last used per channel, so reads can drop expired entries.
    retention: Mutex<HashMap<Arc<str>, HistoryRetention>>,
    presence: PresenceMap,
    claims: LocalClaims,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("MemoryEngine")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<T> {
    Box::pin(std::future::ready(value))
}

impl MemoryEngine {
    pub fn new(deliver: Arc<dyn Deliver>) -> MemoryEngine {
        MemoryEngine {
            deliver,
            streams: RwLock::new(HashMap::new()),
            retention: Mutex::new(HashMap::new()),
            presence: PresenceMap::default(),
            claims: LocalClaims::default(),
        }
    }

    fn stream(&self, channel: &str) -> Arc<Mutex<Stream>> {
        if let Some(stream) = self
            .streams
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(channel)
        {
            return stream.clone();
        }
        self.streams
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(channel.into())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Stream {
                    epoch: new_epoch(),
                    top: 0,
                    entries: VecDeque::new(),
                }))
            })
            .clone()
    }
}

impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn publish(
        &self,
        publication: Publication,
        retention: Option<HistoryRetention>,
    ) -> BoxFuture<Result<Option<StreamPosition>, EngineError>> {
        let Some(retention) = retention else {
            self.deliver
                .deliver(Delivery::Publication(Arc::new(publication)));
            return ready(Ok(None));
        };
        lock(&self.retention).insert(publication.channel.clone(), retention);
        let stream = self.stream(&publication.channel);
        let mut stream = lock(&stream);
        stream.top += 1;
        let publication = Arc::new(publication.with_offset(stream.top));
        let now = Instant::now();
        stream.entries.push_back((now, publication.clone()));
        stream.trim(retention, now);
        let position = stream.position();
        // Delivered under the stream's lock: subscribers see offsets in order.
        self.deliver.deliver(Delivery::Publication(publication));
        ready(Ok(Some(position)))
    }

    fn publish_membership(
        &self,
        joined: bool,
        membership: Membership,
    ) -> BoxFuture<Result<(), EngineError>> {
        let membership = Arc::new(membership);
        self.deliver.deliver(if joined {
            Delivery::Join(membership)
        } else {
            Delivery::Leave(membership)
        });
        ready(Ok(()))
    }

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> BoxFuture<Result<HistoryPage, EngineError>> {
        let retention = lock(&self.retention).get(channel).copied();
        let stream = self.stream(channel);
        let mut stream = lock(&stream);
        if let Some(retention) = retention {
            stream.trim(retention, Instant::now());
        }
        let since = query.since.unwrap_or(0);
        let matching = stream
            .entries
            .iter()
            .map(|(_, publication)| publication)
            .filter(|publication| publication.offset > since);
        let limit = query.limit.unwrap_or(usize::MAX);
        let publications: Vec<_> = if query.reverse {
            matching.rev().take(limit).cloned().collect()
        } else {
            matching.take(limit).cloned().collect()
        };
        ready(Ok(HistoryPage {
            publications,
            top: stream.position(),
        }))
    }

    fn remove_history(&self, channel: &str) -> BoxFuture<Result<(), EngineError>> {
        let stream = self.stream(channel);
        lock(&stream).entries.clear();
        ready(Ok(()))
    }

    fn watch(&self, _channel: &str, _watching: bool) -> BoxFuture<Result<(), EngineError>> {
        ready(Ok(())) // one node: publications are delivered locally anyway
    }

    fn add_presence(
        &self,
        channel: &str,
        client: Arc<ClientDescriptor>,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.presence.add(channel, client);
        ready(Ok(()))
    }

    fn remove_presence(&self, channel: &str, client: &str) -> BoxFuture<Result<(), EngineError>> {
        self.presence.remove(channel, client);
        ready(Ok(()))
    }

    fn presence(
        &self,
        channel: &str,
    ) -> BoxFuture<Result<Vec<Arc<ClientDescriptor>>, EngineError>> {
        ready(Ok(self.presence.clients(channel)))
    }

    fn command(&self, command: NodeCommand) -> BoxFuture<Result<(), EngineError>> {
        self.deliver.command(&command);
        ready(Ok(()))
    }

    fn claim(
        &self,
        channel: &str,
        key: &str,
        ttl: Duration,
    ) -> BoxFuture<Result<Claim, EngineError>> {
        ready(Ok(self.claims.claim(channel, key, ttl)))
    }

    fn record(
        &self,
        channel: &str,
        key: &str,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<Result<(), EngineError>> {
        self.claims.record(channel, key, record, ttl);
        ready(Ok(()))
    }

    fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>> {
        self.claims.release(channel, key);
        ready(Ok(()))
    }
}
