//! A pub/sub connection: subscribed to `{prefix}:control` (the node's one, or with Redis
//! Cluster the one that reads commands) and to `{prefix}:pub:{channel}` for every channel it
//! watches, it hands every message it receives, decoded, to the hub in arrival order. With one
//! Redis a node has one; with Redis Cluster, one more per master for the channels that master
//! holds (`cluster::Shards`).
//!
//! A supervisor task connects (with backoff), subscribes the control channel, publishes the
//! connection for [`Subscriber::watch`], subscribes every watched channel again, then reads
//! messages and pings every second; when the connection ends or a ping goes unanswered it
//! starts over. Publications sent while it was down are not delivered (history is there to
//! recover them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plexus_core::{Deliver, Delivery, Membership};

use crate::source::Source;
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::cluster::Shards;
use crate::codec::{decode_command, decode_envelope, Envelope};
use crate::link::{Event, Incoming, Link};
use crate::writer::{Backoff, Health, LinkError, CONNECT_TIMEOUT, IDLE_PING, RESPONSE_TIMEOUT};

/// Channels subscribed in one command at most when subscribing again.
const SUBSCRIBE_CHUNK: usize = 1000;

/// Where the connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The first attempt to connect has not finished.
    Starting,
    Up,
    Down(Arc<str>),
}

/// Local delivery progress of a watched channel, for publishers waiting to see their own
/// publication delivered here.
#[derive(Default)]
struct Progress {
    delivered: u64,
    waiters: Vec<(u64, oneshot::Sender<()>)>,
}

#[derive(Default)]
struct State {
    sink: Option<Link>,
    watched: HashMap<Arc<str>, Progress>,
    /// Shard channels this connection asked to unsubscribe and whose confirmation has not
    /// been read yet: Redis drops the others by itself (their slot moved).
    unsubscribing: HashMap<String, usize>,
}

/// The node's pub/sub connections.
pub(crate) enum Subscribers {
    /// One Redis (or Sentinel's master): one connection for everything.
    Single(Arc<Subscriber>),
    /// Redis Cluster: one connection (to any node) for node commands, and one per master for
    /// the channels it holds.
    Cluster {
        control: Arc<Subscriber>,
        shards: Arc<Shards>,
    },
}

impl Subscribers {
    fn control(&self) -> &Subscriber {
        match self {
            Subscribers::Single(subscriber) => subscriber,
            Subscribers::Cluster { control, .. } => control,
        }
    }

    /// Sharded pub/sub (Redis Cluster's masters' connections).
    fn sharded(&self) -> bool {
        matches!(self, Subscribers::Cluster { shards, .. } if shards.sharded())
    }

    /// The pub/sub channel of a Plexus channel.
    pub fn pubsub_channel(&self, channel: &str) -> String {
        self.control().pubsub_channel_as(channel, self.sharded())
    }

    /// The command that publishes to [`Subscribers::pubsub_channel`].
    pub fn publish_command(&self) -> &'static str {
        if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    pub fn control_channel(&self) -> &str {
        self.control().control_channel()
    }

    /// Waits (at most `timeout`) for the first attempt of the connection that reads node
    /// commands; `Err` unless it is up.
    pub async fn started(&self, timeout: Duration) -> Result<(), LinkError> {
        self.control().started(timeout).await
    }

    /// Subscribes to (or unsubscribes from) a channel's publications.
    pub async fn watch(
        &self,
        channel: &str,
        watching: bool,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        match self {
            Subscribers::Single(subscriber) => subscriber.watch(channel, watching, timeout).await,
            Subscribers::Cluster { shards, .. } => shards.watch(channel, watching, timeout).await,
        }
    }

    /// See [`Subscriber::delivery_of`].
    pub fn delivery_of(&self, channel: &str, offset: u64) -> Option<oneshot::Receiver<()>> {
        match self {
            Subscribers::Single(subscriber) => subscriber.delivery_of(channel, offset),
            Subscribers::Cluster { shards, .. } => shards.delivery_of(channel, offset),
        }
    }
}

/// What a subscriber is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    /// Subscribes the control channel (node commands).
    pub control: bool,
    /// Takes over channels from another connection (see [`Subscriber::list`]).
    pub takes_over: bool,
    /// Sharded pub/sub (`SSUBSCRIBE`, channels named with a hash tag), else classic.
    pub sharded: bool,
}

/// The subscriber's shared state, used by the engine's calls.
pub struct Subscriber {
    prefix: Arc<str>,
    /// `{prefix}:pub:`
    pub_prefix: String,
    control: String,
    state: Mutex<State>,
    status: watch::Sender<Status>,
    health: Arc<Health>,
    /// Counted up in `health` now (counted down until then).
    up: AtomicBool,
    /// Subscribes the control channel.
    control_too: bool,
    /// Took over channels another connection watched and is not connected yet: its next
    /// connection, even the first, may have missed publications.
    owes_interrupt: AtomicBool,
    /// A connection has been up (its sink published) before.
    was_up: AtomicBool,
    /// Sharded pub/sub (see [`Role::sharded`]).
    sharded: bool,
    /// Rung when Redis says a channel is not where the slot map says (the map is stale).
    stale: Option<Arc<Notify>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Subscriber {
    /// Starts the supervisor on the current Tokio runtime, counted down in `health` until it
    /// is up (the caller has counted it). `connected` is notified after every (re)connection,
    /// once every watched channel is subscribed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        source: &Source,
        prefix: &str,
        deliver: Arc<dyn Deliver>,
        health: Arc<Health>,
        connected: Arc<Notify>,
        cancel: &CancellationToken,
        role: Role,
        stale: Option<Arc<Notify>>,
    ) -> Arc<Subscriber> {
        let subscriber = Arc::new(Subscriber {
            prefix: prefix.into(),
            pub_prefix: format!("{prefix}:pub:"),
            control: format!("{prefix}:control"),
            state: Mutex::new(State::default()),
            status: watch::channel(Status::Starting).0,
            health,
            up: AtomicBool::new(false),
            control_too: role.control,
            owes_interrupt: AtomicBool::new(role.takes_over),
            was_up: AtomicBool::new(false),
            sharded: role.sharded,
            stale,
        });
        let supervisor = subscriber.clone();
        let cancel = cancel.clone();
        let source = source.clone();
        tokio::spawn(async move {
            supervisor
                .clone()
                .supervise(source, deliver, connected, cancel)
                .await;
            // Stopped: nobody reads the connection any more, and it is no longer counted.
            lock(&supervisor.state).sink = None;
            supervisor
                .status
                .send_replace(Status::Down("stopped".into()));
            if !supervisor.up.swap(true, Ordering::AcqRel) {
                supervisor
                    .health
                    .subscribers_down
                    .fetch_sub(1, Ordering::AcqRel);
            }
        });
        subscriber
    }

    fn mark_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            let down = &self.health.subscribers_down;
            if up {
                down.fetch_sub(1, Ordering::AcqRel);
            } else {
                down.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Lists `channel` as watched here (its owner, `cluster::Shards`, holds its own lock);
    /// [`Subscriber::settle`] then subscribes it. `taken_over`: it was watched by another
    /// connection, so publications may have been missed, and if this one is not connected
    /// its next connection says so (`Deliver::interrupted`).
    /// Says whether it was not listed before.
    pub(crate) fn list(&self, channel: &Arc<str>, taken_over: bool) -> bool {
        let mut state = lock(&self.state);
        let listed_now = !state.watched.contains_key(channel);
        state.watched.entry(channel.clone()).or_default();
        if taken_over && state.sink.is_none() {
            // Under the lock: the connection lists the channels after this, and then sees it.
            self.owes_interrupt.store(true, Ordering::Release);
        }
        listed_now
    }

    /// No longer lists `channel`; [`Subscriber::settle`] then unsubscribes it.
    pub(crate) fn unlist(&self, channel: &str) {
        lock(&self.state).watched.remove(channel);
    }

    /// Whether the connection is up (its sink published).
    pub(crate) fn connected(&self) -> bool {
        lock(&self.state).sink.is_some()
    }

    /// Brings the connection's subscription of `channel` in line with the list, again while
    /// the list changes under it (every change is followed by a settle, and the connection
    /// runs its commands in order, so the last settle leaves the right state). Without a
    /// connection there is nothing to do: the next one subscribes what is listed then. `Err`
    /// if a command failed (the connection is then lost, and its next one does the same).
    pub(crate) async fn settle(&self, channel: &str, timeout: Duration) -> Result<(), LinkError> {
        let name = self.pubsub_channel(channel);
        let mut done: Option<bool> = None;
        loop {
            let (listed, sink) = {
                let mut state = lock(&self.state);
                let listed = state.watched.contains_key(channel);
                let sink = state.sink.clone();
                if sink.is_some() && done != Some(listed) && !listed && self.sharded {
                    // Counted with the connection it is sent on (a new one starts at none).
                    *state.unsubscribing.entry(name.clone()).or_default() += 1;
                }
                (listed, sink)
            };
            let Some(mut sink) = sink else {
                return Ok(());
            };
            if done == Some(listed) {
                return Ok(());
            }
            let sent = if listed {
                let names = [name.clone()];
                tokio::time::timeout(timeout, sink.subscribe(&names)).await
            } else {
                let unsubscribed = tokio::time::timeout(timeout, sink.unsubscribe(&name)).await;
                if !matches!(unsubscribed, Ok(Ok(()))) {
                    // Not confirmed (the connection is then lost anyway).
                    self.confirmed_unsubscribe(&name);
                }
                unsubscribed.map(|result| result.map(|()| Vec::new()))
            };
            match sent {
                Ok(Ok(redirected)) if redirected.is_empty() => done = Some(listed),
                Ok(Ok(_)) => {
                    self.map_is_stale();
                    let why = "the redis cluster moved this channel's slot to another master";
                    return Err(LinkError::Failed(why.into()));
                }
                Ok(Err(error)) => return Err(LinkError::Failed(error.to_string().into())),
                Err(_) => return Err(LinkError::Timeout(timeout)),
            }
        }
    }

    /// Its next connection says publications may have been missed (`Deliver::interrupted`).
    pub(crate) fn owe_interrupt(&self) {
        self.owes_interrupt.store(true, Ordering::Release);
    }

    /// Says publications of channels this connection took over may have been missed: now if
    /// it is connected (their subscriptions settled), else at its next connection.
    pub(crate) fn took_over(&self, deliver: &dyn Deliver) {
        {
            let state = lock(&self.state);
            if state.sink.is_none() {
                self.owes_interrupt.store(true, Ordering::Release);
                return;
            }
        }
        deliver.interrupted();
    }

    /// The pub/sub channel of a Plexus channel; a shard channel carries the channel as its
    /// hash tag, so it lives in the slot of the channel's keys.
    pub fn pubsub_channel(&self, channel: &str) -> String {
        self.pubsub_channel_as(channel, self.sharded)
    }

    fn pubsub_channel_as(&self, channel: &str, sharded: bool) -> String {
        if sharded {
            format!("{}{{{channel}}}", self.pub_prefix)
        } else {
            format!("{}{channel}", self.pub_prefix)
        }
    }

    /// The Plexus channel of a pub/sub channel of ours.
    fn channel_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let channel = name.strip_prefix(&self.pub_prefix)?;
        if self.sharded {
            channel.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(channel)
        }
    }

    /// Takes one of our own unsubscribes of `name` as confirmed; says whether there was one.
    fn confirmed_unsubscribe(&self, name: &str) -> bool {
        let mut state = lock(&self.state);
        let Some(count) = state.unsubscribing.get_mut(name) else {
            return false;
        };
        *count -= 1;
        if *count == 0 {
            state.unsubscribing.remove(name);
        }
        true
    }

    /// Redis answered as if a channel's slot were another master's: have the map read again.
    fn map_is_stale(&self) {
        if let Some(stale) = &self.stale {
            stale.notify_one();
        }
    }

    pub fn control_channel(&self) -> &str {
        &self.control
    }

    /// Waits (at most `timeout`) for the first connection attempt to finish; `Err` unless the
    /// connection is up.
    pub async fn started(&self, timeout: Duration) -> Result<(), LinkError> {
        let mut status = self.status.subscribe();
        let waited = tokio::time::timeout(
            timeout,
            status.wait_for(|status| *status != Status::Starting),
        )
        .await;
        match waited {
            Err(_) => Err(LinkError::Timeout(timeout)),
            Ok(Err(_)) => Err(LinkError::Disconnected("shut down".into())),
            Ok(Ok(status)) => match &*status {
                Status::Up => Ok(()),
                Status::Down(error) => Err(LinkError::Disconnected(error.clone())),
                Status::Starting => unreachable!("waited for another status"),
            },
        }
    }

    /// Subscribes to (or unsubscribes from) a channel's publications.
    pub async fn watch(
        &self,
        channel: &str,
        watching: bool,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        if !watching {
            self.unlist(channel);
            let _ = self.settle(channel, timeout).await;
            return Ok(());
        }
        self.started(timeout).await?;
        let listed_now = self.list(&channel.into(), false);
        let result = self.subscribe_listed(channel, timeout).await;
        if result.is_err() && listed_now {
            // The hub gives up on the channel: do not subscribe it on reconnection.
            self.unlist(channel);
        }
        result
    }

    /// Subscribes a channel just listed: `Err` if the connection is down (its next one
    /// subscribes what is listed then) or the command failed.
    pub(crate) async fn subscribe_listed(
        &self,
        channel: &str,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        if !self.connected() {
            return Err(LinkError::Disconnected(self.down_reason()));
        }
        self.settle(channel, timeout).await
    }

    fn down_reason(&self) -> Arc<str> {
        match &*self.status.borrow() {
            Status::Down(error) => error.clone(),
            _ => "reconnecting".into(),
        }
    }

    /// A receiver that completes once the publication at `offset` of `channel` has been
    /// delivered here, or `None` if there is nothing to wait for (not watched, not connected,
    /// or already delivered).
    pub fn delivery_of(&self, channel: &str, offset: u64) -> Option<oneshot::Receiver<()>> {
        let mut state = lock(&self.state);
        state.sink.as_ref()?;
        let progress = state.watched.get_mut(channel)?;
        if progress.delivered >= offset {
            return None;
        }
        let (sender, receiver) = oneshot::channel();
        progress.waiters.push((offset, sender));
        Some(receiver)
    }

    fn delivered(&self, channel: &str, offset: u64) {
        let mut state = lock(&self.state);
        if let Some(progress) = state.watched.get_mut(channel) {
            progress.delivered = offset;
            progress
                .waiters
                .retain(|(waiting_for, _)| *waiting_for > offset);
            // Dropping a waiter's sender wakes it; give up on those nobody awaits any more.
            progress.waiters.retain(|(_, sender)| !sender.is_closed());
        }
    }

    async fn supervise(
        self: Arc<Subscriber>,
        source: Source,
        deliver: Arc<dyn Deliver>,
        connected: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.connect(&source) => outcome,
            };
            let error: Arc<str> = match outcome {
                Ok((sink, stream, reconnected)) => {
                    backoff.reset();
                    connected.notify_one();
                    tracing::info!(prefix = &*self.prefix, "redis subscriber connected");
                    let owed = self.owes_interrupt.swap(false, Ordering::AcqRel);
                    if reconnected || owed {
                        // Publications sent while this node was not listening were missed, and
                        // Redis may even have restarted empty (a new epoch): every subscriber
                        // here resynchronises through history and recovery.
                        deliver.interrupted();
                    }
                    let ended = tokio::select! {
                        _ = cancel.cancelled() => return,
                        ended = self.read(sink, stream, &*deliver) => ended,
                    };
                    {
                        let mut state = lock(&self.state);
                        state.sink = None;
                        state.unsubscribing.clear();
                        for progress in state.watched.values_mut() {
                            progress.waiters.clear();
                        }
                    }
                    self.mark_up(false);
                    self.health.suspect_connections();
                    tracing::warn!(prefix = &*self.prefix, error = %ended, "redis subscriber disconnected");
                    ended.to_string().into()
                }
                Err(error) => {
                    tracing::debug!(prefix = &*self.prefix, %error, "redis subscriber cannot connect");
                    error.to_string().into()
                }
            };
            self.status.send_replace(Status::Down(error));
            backoff.failed();
            tokio::select! {
                _ = cancel.cancelled() => return,
                () = tokio::time::sleep_until(backoff.next_attempt()) => {}
            }
        }
    }

    /// Connects, subscribes the control channel and every watched channel, and marks the
    /// connection up; says whether an earlier connection had been up (so publications may
    /// have been missed since).
    async fn connect(&self, source: &Source) -> Result<(Link, Incoming, bool), LinkError> {
        let failed = |error: redis::RedisError| LinkError::Failed(error.to_string().into());
        let open = async { Link::open(&source.client().await?, self.sharded).await };
        let (mut sink, stream) = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))?
            .map_err(failed)?;
        if self.control_too {
            let control = [self.control.clone()];
            tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&control))
                .await
                .map_err(|_| LinkError::Timeout(RESPONSE_TIMEOUT))?
                .map_err(failed)?;
        }
        // From here on `watch` subscribes by itself; the channels listed before are ours.
        let reconnected = self.was_up.swap(true, Ordering::AcqRel);
        let listed: Vec<String> = {
            let mut state = lock(&self.state);
            state.sink = Some(sink.clone());
            state
                .watched
                .keys()
                .map(|channel| self.pubsub_channel(channel))
                .collect()
        };
        self.status.send_replace(Status::Up);
        for chunk in listed.chunks(SUBSCRIBE_CHUNK) {
            let subscribed = tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(chunk)).await;
            let result = match subscribed {
                Ok(Ok(redirected)) => {
                    // Shard channels whose slot moved: subscribed where the new map puts them
                    // (which then says deliveries may have been missed).
                    if !redirected.is_empty() {
                        tracing::info!(
                            channels = redirected.len(),
                            "redis redirected shard channels to another master"
                        );
                        self.map_is_stale();
                    }
                    Ok(())
                }
                Ok(Err(error)) => Err(failed(error)),
                Err(_) => Err(LinkError::Timeout(RESPONSE_TIMEOUT)),
            };
            if let Err(error) = result {
                lock(&self.state).sink = None;
                return Err(error);
            }
        }
        self.mark_up(true);
        Ok((sink, stream, reconnected))
    }

    /// Delivers messages until the connection ends or stops answering pings.
    async fn read(&self, mut sink: Link, mut stream: Incoming, deliver: &dyn Deliver) -> LinkError {
        let mut ping = tokio::time::interval(IDLE_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Event::Message { channel, payload } => self.handle(&channel, &payload, deliver),
                    Event::Dropped(name) => {
                        if !self.confirmed_unsubscribe(&name) {
                            // Redis dropped it by itself: its slot moved to another master.
                            // That push was also taken for the reply of a command in flight,
                            // so the connection's replies may be out of step: start over once
                            // the map is read again; the subscribers recover.
                            self.map_is_stale();
                            return LinkError::Failed("redis dropped a shard channel: its slot moved".into());
                        }
                    }
                    Event::Closed => return LinkError::Failed("connection closed".into()),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => return LinkError::Failed(error.to_string().into()),
                        Err(_) => return LinkError::Timeout(RESPONSE_TIMEOUT),
                    }
                }
            }
        }
    }

    fn handle(&self, name: &str, payload: &[u8], deliver: &dyn Deliver) {
        if name == self.control {
            match decode_command(payload) {
                Ok(command) => deliver.command(&command),
                Err(_) => tracing::warn!(channel = name, "undecodable node command"),
            }
            return;
        }
        let Some(channel) = self.channel_of(name) else {
            return;
        };
        let channel: Arc<str> = channel.into();
        match decode_envelope(channel.clone(), payload) {
            Ok(Envelope::Publication(publication)) => {
                let offset = publication.offset;
                deliver.deliver(Delivery::Publication(Arc::new(*publication)));
                if offset > 0 {
                    self.delivered(&channel, offset);
                }
            }
            Ok(Envelope::Join(client)) => {
                deliver.deliver(Delivery::Join(Arc::new(Membership::new(channel, client))))
            }
            Ok(Envelope::Leave(client)) => {
                deliver.deliver(Delivery::Leave(Arc::new(Membership::new(channel, client))))
            }
            Err(_) => tracing::warn!(channel = &*channel, "undecodable message"),
        }
    }
}
