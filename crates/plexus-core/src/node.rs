//! A node: this process's hub, its engine and its namespaces, and the rules that tie them:
//! what a publish keeps, what a subscribe recovers, who hears joins and leaves. Transports talk
//! to a `Node`; it talks to the engine through the [`Engine`] trait only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::engine::{
    BoxFuture, Deliver, Engine, EngineError, HistoryPage, HistoryQuery, HistoryRetention,
    NodeCommand, StreamPosition,
};
use crate::hub::{ClientInfo, Hub, HubError, Subscriber};
use crate::options::{ChannelError, ChannelOptions, Namespaces, RecoveryMode};
use crate::publication::{ClientDescriptor, Membership, Publication};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The outcome of a subscribe.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub channel: Arc<str>,
    /// The stream's top when the channel keeps history and recovers; publications delivered
    /// later with an offset at or below it are already covered by this reply.
    pub position: Option<StreamPosition>,
    /// The client asked to recover from a position.
    pub was_recovering: bool,
    /// Every publication after that position is in `publications` (same epoch, within the
    /// retained window). False means some may be missing: never a silent gap.
    pub recovered: bool,
    pub publications: Vec<Arc<Publication>>,
}

pub struct Node {
    hub: Arc<Hub>,
    engine: Arc<dyn Engine>,
    namespaces: Namespaces,
    /// Whether the engine watches each channel with local members, behind a lock of the
    /// channel's own, so that changes to it are made one at a time and every subscriber reads
    /// history only once the channel is watched (a publication made meanwhile would be in
    /// neither its history nor its deliveries).
    watches: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<bool>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for Node {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Node")
            .field("engine", &self.engine.name())
            .finish_non_exhaustive()
    }
}

fn retention(options: &ChannelOptions) -> Option<HistoryRetention> {
    options.has_history().then_some(HistoryRetention {
        size: options.history_size,
        ttl: options.history_ttl,
    })
}

impl Node {
    /// Builds a node with an engine that may fail to start (it opens files, connects…).
    pub fn try_new<E>(
        namespaces: Namespaces,
        engine: impl FnOnce(Arc<dyn Deliver>) -> Result<Arc<dyn Engine>, E>,
    ) -> Result<Node, E> {
        let hub = Arc::new(Hub::new());
        let engine = engine(hub.clone())?;
        Ok(Node {
            hub,
            engine,
            namespaces,
            watches: Mutex::default(),
        })
    }

    /// Builds a node; `engine` receives the hub to deliver into.
    pub fn new(
        namespaces: Namespaces,
        engine: impl FnOnce(Arc<dyn Deliver>) -> Arc<dyn Engine>,
    ) -> Node {
        let hub = Arc::new(Hub::new());
        let engine = engine(hub.clone());
        Node {
            hub,
            engine,
            namespaces,
            watches: Mutex::default(),
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn options(&self, channel: &str) -> Result<&ChannelOptions, ChannelError> {
        self.namespaces.resolve(channel)
    }

    /// Orders a publication now and returns a future for its position (resolved once stored as
    /// the engine promises). Dropping the future does not cancel the publication.
    pub fn publish(
        &self,
        publication: Publication,
    ) -> Result<BoxFuture<Result<Option<StreamPosition>, EngineError>>, ChannelError> {
        let options = self.options(&publication.channel)?;
        Ok(self.engine.publish(publication, retention(options)))
    }

    /// Subscribes a connection, registers presence, announces the join and, if asked, recovers
    /// what it missed since `recover_from`.
    pub async fn subscribe(
        &self,
        channel: &str,
        subscriber: Subscriber,
        chan_info: Option<bytes::Bytes>,
        recover_from: Option<StreamPosition>,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_tailored(channel, subscriber, None, chan_info, recover_from)
            .await
    }

    /// [`Node::subscribe`], with the subscriber's live publications filtered or chained (see
    /// [`crate::Tailored`]). What it recovers is the caller's to filter or chain: the
    /// [`Subscription`] holds every publication it missed.
    pub async fn subscribe_tailored(
        &self,
        channel: &str,
        subscriber: Subscriber,
        tailored: Option<crate::Tailored>,
        chan_info: Option<bytes::Bytes>,
        recover_from: Option<StreamPosition>,
    ) -> Result<Subscription, SubscribeError> {
        let options = self.options(channel)?.clone();
        let info = subscriber.info.clone();
        // Subscribe locally first, then read history: nothing published in between is missed
        // (a duplicate is possible, and transports drop offsets at or below `position`).
        let (name, _) =
            self.hub
                .subscribe_tailored(channel, subscriber, tailored, options.max_subscribers)?;
        let result = self
            .after_local_subscribe(&name, &options, &info, chan_info, recover_from)
            .await;
        if result.is_err() {
            let (_, now_empty) = self.hub.unsubscribe(&name, info.id);
            if now_empty {
                self.unwatch_if_unused(&name).await;
            }
        }
        result
    }

    /// Has the engine watch `channel` (a local member joined it) unless it does already;
    /// waits for a watch another member asked for. A failed watch is asked again by the next.
    async fn watch(&self, channel: &Arc<str>) -> Result<(), EngineError> {
        let state = lock(&self.watches)
            .entry(channel.clone())
            .or_default()
            .clone();
        let mut watched = state.lock().await;
        if !*watched {
            self.engine.watch(channel, true).await?;
            *watched = true;
        }
        Ok(())
    }

    /// Has the engine stop watching `channel` if it has no local members (the last one left).
    async fn unwatch_if_unused(&self, channel: &str) {
        let Some(state) = lock(&self.watches).get(channel).cloned() else {
            return;
        };
        {
            let mut watched = state.lock().await;
            // Checked under the channel's lock: a member that joined meanwhile keeps it.
            if *watched && !self.hub.has_channel(channel) {
                let _ = self.engine.watch(channel, false).await;
                *watched = false;
            }
        }
        let mut watches = lock(&self.watches);
        // Nobody else holds it (clones are taken under this lock): forget it while unwatched.
        let unused = Arc::strong_count(&state) == 2
            && state.try_lock().is_ok_and(|watched| !*watched)
            && !self.hub.has_channel(channel);
        if unused {
            watches.remove(channel);
        }
    }

    async fn after_local_subscribe(
        &self,
        name: &Arc<str>,
        options: &ChannelOptions,
        info: &ClientInfo,
        chan_info: Option<bytes::Bytes>,
        recover_from: Option<StreamPosition>,
    ) -> Result<Subscription, SubscribeError> {
        self.watch(name).await?;
        let descriptor = info.descriptor(chan_info);
        if options.presence {
            self.engine.add_presence(name, descriptor.clone()).await?;
        }
        if options.join_leave {
            drop(
                self.engine
                    .publish_membership(true, Membership::new(name.clone(), descriptor)),
            );
        }
        let mut subscription = Subscription {
            channel: name.clone(),
            position: None,
            was_recovering: recover_from.is_some(),
            recovered: false,
            publications: Vec::new(),
        };
        if !(options.has_history() && options.recover) {
            return Ok(subscription);
        }
        if let (Some(from), RecoveryMode::Cache) = (&recover_from, options.recovery_mode) {
            let latest = self
                .engine
                .history(
                    name,
                    HistoryQuery {
                        since: None,
                        limit: Some(1),
                        reverse: true,
                    },
                )
                .await?;
            // A client that has the latest already gets nothing more; else the latest, if
            // history still holds it.
            let top = &latest.top;
            let has_it = from.offset > 0 && from.offset == top.offset && *from.epoch == *top.epoch;
            let newest = latest.publications.first().map(|p| p.offset);
            subscription.recovered = has_it || (top.offset > 0 && newest == Some(top.offset));
            if !has_it && subscription.recovered {
                subscription.publications = latest.publications;
            }
            subscription.position = Some(latest.top);
            return Ok(subscription);
        }
        let since = recover_from.as_ref().map(|from| from.offset);
        let page = self
            .engine
            .history(
                name,
                HistoryQuery {
                    since,
                    limit: if since.is_some() { None } else { Some(0) },
                    reverse: false,
                },
            )
            .await?;
        if let Some(from) = recover_from {
            subscription.recovered = recovery_is_complete(&from, &page);
            if subscription.recovered {
                subscription.publications = page.publications;
            }
        }
        subscription.position = Some(page.top);
        Ok(subscription)
    }

    /// Receives a channel's deliveries without being a member: no presence, no join or leave
    /// (long-poll requests). End with [`Node::stop_observing`].
    pub async fn observe(
        &self,
        channel: &str,
        subscriber: Subscriber,
    ) -> Result<Arc<str>, SubscribeError> {
        let options = self.options(channel)?;
        let id = subscriber.info.id;
        let (name, _) = self
            .hub
            .subscribe(channel, subscriber, options.max_subscribers)?;
        if let Err(error) = self.watch(&name).await {
            let (_, now_empty) = self.hub.unsubscribe(&name, id);
            if now_empty {
                self.unwatch_if_unused(&name).await;
            }
            return Err(error.into());
        }
        Ok(name)
    }

    pub async fn stop_observing(&self, channel: &str, id: crate::hub::ConnectionId) {
        let (removed, now_empty) = self.hub.unsubscribe(channel, id);
        if removed && now_empty {
            self.unwatch_if_unused(channel).await;
        }
    }

    /// Removes a subscription, its presence, and announces the leave. Returns whether the
    /// connection was subscribed.
    pub async fn unsubscribe(&self, channel: &str, info: &ClientInfo) -> bool {
        let (removed, now_empty) = self.hub.unsubscribe(channel, info.id);
        if !removed {
            return false;
        }
        if now_empty {
            self.unwatch_if_unused(channel).await;
        }
        if let Ok(options) = self.options(channel) {
            if options.presence {
                let _ = self.engine.remove_presence(channel, &info.client).await;
            }
            if options.join_leave {
                let membership = Membership::new(channel.into(), info.descriptor(None));
                drop(self.engine.publish_membership(false, membership));
            }
        }
        true
    }

    /// Puts `info`'s current connection info in its presence entry of `channel`, with the
    /// channel info it subscribed with, if the channel keeps presence.
    pub async fn refresh_presence(
        &self,
        channel: &str,
        info: &ClientInfo,
        chan_info: Option<Bytes>,
    ) {
        if !self.options(channel).is_ok_and(|options| options.presence) {
            return;
        }
        let descriptor = info.descriptor(chan_info);
        if let Err(error) = self.engine.update_presence(channel, descriptor).await {
            tracing::warn!(%error, channel, "presence not updated with the new info yet");
        }
    }

    pub async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, PublishError> {
        self.options(channel)?;
        Ok(self.engine.history(channel, query).await?)
    }

    pub async fn remove_history(&self, channel: &str) -> Result<(), PublishError> {
        self.options(channel)?;
        Ok(self.engine.remove_history(channel).await?)
    }

    pub async fn presence(
        &self,
        channel: &str,
    ) -> Result<Vec<Arc<ClientDescriptor>>, PublishError> {
        self.options(channel)?;
        Ok(self.engine.presence(channel).await?)
    }

    pub async fn command(&self, command: NodeCommand) -> Result<(), EngineError> {
        self.engine.command(command).await
    }
}

/// Whether a page read since `from` holds every publication after it.
pub fn recovery_is_complete(from: &StreamPosition, page: &HistoryPage) -> bool {
    if page.top.epoch != from.epoch || from.offset > page.top.offset {
        return false;
    }
    if from.offset == page.top.offset {
        return true;
    }
    page.publications.first().map(|first| first.offset) == Some(from.offset + 1)
        && page.publications.last().map(|last| last.offset) == Some(page.top.offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryEngine;
    use crate::outbox::{Delivery, Outbox};
    use crate::MessageKind;

    fn node() -> Node {
        Node::new(Namespaces::default(), |deliver| {
            Arc::new(MemoryEngine::new(deliver))
        })
    }

    fn subscriber(node: &Node, user: &str) -> Subscriber {
        let id = node.hub().next_connection_id();
        Subscriber {
            info: Arc::new(ClientInfo::new(
                id,
                format!("c{id}").into(),
                user.into(),
                None,
                user,
            )),
            outbox: Arc::new(Outbox::new(1 << 20)),
            join_leave: true,
        }
    }

    async fn publish(node: &Node, channel: &str, text: &str) -> Option<StreamPosition> {
        let publication = Publication::new(
            channel.into(),
            MessageKind::Text,
            text.to_owned().into(),
            None,
        );
        node.publish(publication).unwrap().await.unwrap()
    }

    fn texts(deliveries: &[Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .filter_map(|delivery| match delivery {
                Delivery::Publication(p) => Some(String::from_utf8(p.data.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn offsets_history_and_recovery() {
        let node = node();
        let first = publish(&node, "chat:r", "1").await.unwrap();
        assert_eq!(first.offset, 1);
        let alice = subscriber(&node, "alice");
        let subscription = node
            .subscribe("chat:r", alice.clone(), None, None)
            .await
            .unwrap();
        let position = subscription.position.clone().unwrap();
        assert_eq!(position, first);
        assert!(!subscription.was_recovering);
        // Alice leaves; two publications happen; she comes back and recovers both.
        node.unsubscribe("chat:r", &alice.info).await;
        publish(&node, "chat:r", "2").await;
        publish(&node, "chat:r", "3").await;
        let again = subscriber(&node, "alice");
        let recovered = node
            .subscribe("chat:r", again.clone(), None, Some(position.clone()))
            .await
            .unwrap();
        assert!(recovered.was_recovering && recovered.recovered);
        let offsets: Vec<u64> = recovered.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [2, 3]);
        // Wrong epoch: not recovered, nothing pretended.
        let wrong = StreamPosition {
            offset: 1,
            epoch: "other".into(),
        };
        let third = subscriber(&node, "bob");
        let result = node
            .subscribe("chat:r", third, None, Some(wrong))
            .await
            .unwrap();
        assert!(!result.recovered && result.publications.is_empty());
    }

    /// Cache mode: a recovering subscribe gets the latest publication only (none if the client
    /// has it; `recovered: false` if there is none), whatever the client's position.
    #[tokio::test]
    async fn cache_mode_recovers_the_latest_publication() {
        let mut namespaces = Namespaces::default();
        let cache = ChannelOptions {
            recovery_mode: RecoveryMode::Cache,
            ..ChannelOptions::chat()
        };
        namespaces.insert("state", cache);
        let node = Node::new(namespaces, |deliver| Arc::new(MemoryEngine::new(deliver)));
        let anywhere = StreamPosition {
            offset: 0,
            epoch: "".into(),
        };
        let subscribe = |user: &str, from: Option<StreamPosition>| {
            let subscriber = subscriber(&node, user);
            let node = &node;
            async move {
                node.subscribe("state:a", subscriber, None, from)
                    .await
                    .unwrap()
            }
        };
        // Nothing published yet: nothing to give, not recovered, even from the empty
        // stream's own position.
        let empty = subscribe("u0", Some(anywhere.clone())).await;
        assert!(empty.was_recovering && !empty.recovered);
        assert!(empty.publications.is_empty());
        let again = subscribe("u1", empty.position.clone()).await;
        assert!(!again.recovered && again.publications.is_empty());
        for text in ["1", "2", "3"] {
            publish(&node, "state:a", text).await;
        }
        let latest = subscribe("u2", Some(anywhere)).await;
        assert!(latest.was_recovering && latest.recovered);
        let offsets: Vec<u64> = latest.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [3], "only the latest");
        let top = latest.position.clone().unwrap();
        let current = subscribe("u3", Some(top.clone())).await;
        assert!(
            current.recovered && current.publications.is_empty(),
            "it has it"
        );
        // An older position, or another epoch: the latest.
        for from in [
            StreamPosition {
                offset: 1,
                epoch: top.epoch.clone(),
            },
            StreamPosition {
                offset: 3,
                epoch: "other".into(),
            },
        ] {
            let behind = subscribe("u4", Some(from)).await;
            assert!(behind.recovered, "{behind:?}");
            let offsets: Vec<u64> = behind.publications.iter().map(|p| p.offset).collect();
            assert_eq!(offsets, [3]);
        }
        let plain = subscribe("u5", None).await;
        assert!(!plain.was_recovering && plain.publications.is_empty());
        assert_eq!(plain.position, Some(top));
    }

    /// The memory engine with a `watch` that waits to be let through, as a broker's
    /// subscription takes a round trip.
    struct SlowWatch {
        memory: MemoryEngine,
        open: Arc<tokio::sync::Semaphore>,
        /// The next watches fail while set.
        failing: Arc<std::sync::atomic::AtomicBool>,
        /// `(watch, unwatch)` calls.
        calls: Arc<Mutex<(usize, usize)>>,
    }

    impl Engine for SlowWatch {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn publish(
            &self,
            publication: Publication,
            retention: Option<HistoryRetention>,
        ) -> BoxFuture<Result<Option<StreamPosition>, EngineError>> {
            self.memory.publish(publication, retention)
        }
        fn publish_membership(
            &self,
            joined: bool,
            membership: Membership,
        ) -> BoxFuture<Result<(), EngineError>> {
            self.memory.publish_membership(joined, membership)
        }
        fn history(
            &self,
            channel: &str,
            query: HistoryQuery,
        ) -> BoxFuture<Result<HistoryPage, EngineError>> {
            self.memory.history(channel, query)
        }
        fn remove_history(&self, channel: &str) -> BoxFuture<Result<(), EngineError>> {
            self.memory.remove_history(channel)
        }
        fn watch(&self, _: &str, watching: bool) -> BoxFuture<Result<(), EngineError>> {
            {
                let mut calls = lock(&self.calls);
                if watching {
                    calls.0 += 1;
                } else {
                    calls.1 += 1;
                }
            }
            let (open, failing) = (self.open.clone(), self.failing.clone());
            Box::pin(async move {
                let _ = open.acquire().await;
                if failing.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(EngineError::Closed { engine: "slow" });
                }
                Ok(())
            })
        }
        fn add_presence(
            &self,
            channel: &str,
            client: Arc<ClientDescriptor>,
        ) -> BoxFuture<Result<(), EngineError>> {
            self.memory.add_presence(channel, client)
        }
        fn remove_presence(
            &self,
            channel: &str,
            client: &str,
        ) -> BoxFuture<Result<(), EngineError>> {
            self.memory.remove_presence(channel, client)
        }
        fn presence(
            &self,
            channel: &str,
        ) -> BoxFuture<Result<Vec<Arc<ClientDescriptor>>, EngineError>> {
            self.memory.presence(channel)
        }
        fn command(&self, command: NodeCommand) -> BoxFuture<Result<(), EngineError>> {
            self.memory.command(command)
        }
        fn claim(
            &self,
            channel: &str,
            key: &str,
            pending: std::time::Duration,
        ) -> BoxFuture<Result<crate::idempotency::Claim, EngineError>> {
            self.memory.claim(channel, key, pending)
        }
        fn record(
            &self,
            channel: &str,
            key: &str,
            record: bytes::Bytes,
            ttl: std::time::Duration,
        ) -> BoxFuture<Result<(), EngineError>> {
            self.memory.record(channel, key, record, ttl)
        }
        fn release(&self, channel: &str, key: &str) -> BoxFuture<Result<(), EngineError>> {
            self.memory.release(channel, key)
        }
    }

    /// A second subscriber arriving while the first one's `watch` is in flight waits for it
    /// before answering (its history read would otherwise come before the engine delivers).
    fn slow_node(
        open: &Arc<tokio::sync::Semaphore>,
        failing: &Arc<std::sync::atomic::AtomicBool>,
        calls: &Arc<Mutex<(usize, usize)>>,
    ) -> Arc<Node> {
        let (open, failing, calls) = (open.clone(), failing.clone(), calls.clone());
        Arc::new(Node::new(Namespaces::default(), move |deliver| {
            Arc::new(SlowWatch {
                memory: MemoryEngine::new(deliver),
                open,
                failing,
                calls,
            })
        }))
    }

    #[tokio::test]
    async fn later_subscribers_wait_for_the_first_ones_watch() {
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        let calls = Arc::default();
        let node = slow_node(&open, &Arc::default(), &calls);
        let subscribe = |user: &str| {
            let (node, subscriber) = (node.clone(), subscriber(&node, user));
            tokio::spawn(async move { node.subscribe("chat:w", subscriber, None, None).await })
        };
        let first = subscribe("ann");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let second = subscribe("bob");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "the second waits for the first's watch"
        );
        open.add_permits(1);
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        // Once watched, nobody waits, and the engine was asked once.
        assert!(subscribe("cat").await.unwrap().is_ok());
        assert_eq!(*lock(&calls), (1, 0));
    }

    /// A watch that failed is asked again by the next subscriber; the last one to leave has
    /// the engine stop watching, once.
    #[tokio::test]
    async fn a_failed_watch_is_retried_and_the_last_to_leave_unwatches() {
        let open = Arc::new(tokio::sync::Semaphore::new(100));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let calls = Arc::default();
        let node = slow_node(&open, &failing, &calls);
        let ann = subscriber(&node, "ann");
        assert!(node.subscribe("chat:f", ann, None, None).await.is_err());
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        let (bob, cat) = (subscriber(&node, "bob"), subscriber(&node, "cat"));
        node.subscribe("chat:f", bob.clone(), None, None)
            .await
            .unwrap();
        node.subscribe("chat:f", cat.clone(), None, None)
            .await
            .unwrap();
        assert_eq!(
            *lock(&calls),
            (2, 0),
            "asked again after the failure, then not"
        );
        node.unsubscribe("chat:f", &bob.info).await;
        assert_eq!(*lock(&calls), (2, 0), "cat is still there");
        node.unsubscribe("chat:f", &cat.info).await;
        assert_eq!(*lock(&calls), (2, 1));
        assert!(
            lock(&node.watches).is_empty(),
            "nothing kept for the channel"
        );
    }

    #[tokio::test]
    async fn window_exceeded_is_not_recovered() {
        let node = node();
        let start = publish(&node, "chat:w", "0").await.unwrap();
        for i in 0..150 {
            publish(&node, "chat:w", &i.to_string()).await; // history_size is 100
        }
        let subscriber = subscriber(&node, "carol");
        let result = node
            .subscribe("chat:w", subscriber, None, Some(start))
            .await
            .unwrap();
        assert!(result.was_recovering && !result.recovered);
        assert!(result.publications.is_empty());
        assert_eq!(result.position.unwrap().offset, 151);
    }

    #[tokio::test]
    async fn deliveries_presence_and_join_leave() {
        let node = node();
        let ann = subscriber(&node, "ann");
        let ben = subscriber(&node, "ben");
        node.subscribe("chat:p", ann.clone(), None, None)
            .await
            .unwrap();
        node.subscribe("chat:p", ben.clone(), None, None)
            .await
            .unwrap();
        let presence = node.presence("chat:p").await.unwrap();
        let mut users: Vec<&str> = presence.iter().map(|c| &*c.user).collect();
        users.sort_unstable();
        assert_eq!(users, ["ann", "ben"]);
        publish(&node, "chat:p", "hello").await;
        let mut got = Vec::new();
        ann.outbox.drain(usize::MAX, &mut got);
        // ann saw her own join, ben's join, then the publication.
        assert!(matches!(got[0], Delivery::Join(_)));
        assert!(matches!(&got[1], Delivery::Join(m) if &*m.client.user == "ben"));
        assert_eq!(texts(&got), ["hello"]);
        node.unsubscribe("chat:p", &ben.info).await;
        got.clear();
        ann.outbox.drain(usize::MAX, &mut got);
        assert!(matches!(&got[..], [Delivery::Leave(m)] if &*m.client.user == "ben"));
        assert_eq!(node.presence("chat:p").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unknown_namespace_and_no_history() {
        let node = node();
        let publication = Publication::new("nope:x".into(), MessageKind::Text, "x".into(), None);
        assert!(matches!(
            node.publish(publication),
            Err(ChannelError::UnknownNamespace(_))
        ));
        // The default namespace keeps no history: offset 0, no position.
        assert_eq!(publish(&node, "plain", "x").await, None);
    }
}
