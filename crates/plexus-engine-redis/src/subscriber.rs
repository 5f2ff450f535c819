//! The node's one pub/sub connection: it is always subscribed to `{prefix}:control` and to
//! `{prefix}:pub:{channel}` for every watched channel, and hands every message it receives,
//! decoded, to the hub in arrival order.
//!
//! A supervisor task connects (with backoff), subscribes the control channel, publishes the
//! connection for [`Subscriber::watch`], subscribes every watched channel again, then reads
//! messages and pings every second; when the connection ends or a ping goes unanswered it
//! starts over. Publications sent while it was down are not delivered (history is there to
//! recover them).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use plexus_core::{Deliver, Delivery, Membership};
use redis::aio::{PubSubSink, PubSubStream};
use redis::{Msg, Value};

use crate::source::Source;
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::codec::{decode_command, decode_envelope, Envelope};
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
    sink: Option<PubSubSink>,
    watched: HashMap<Arc<str>, Progress>,
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
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Subscriber {
    /// Starts the supervisor on the current Tokio runtime. `connected` is notified after every
    /// (re)connection, once every watched channel is subscribed.
    pub(crate) fn start(
        source: &Source,
        prefix: &str,
        deliver: Arc<dyn Deliver>,
        health: Arc<Health>,
        connected: Arc<Notify>,
        cancel: &CancellationToken,
    ) -> Arc<Subscriber> {
        let subscriber = Arc::new(Subscriber {
            prefix: prefix.into(),
            pub_prefix: format!("{prefix}:pub:"),
            control: format!("{prefix}:control"),
            state: Mutex::new(State::default()),
            status: watch::channel(Status::Starting).0,
            health,
        });
        tokio::spawn(subscriber.clone().supervise(
            source.clone(),
            deliver,
            connected,
            cancel.clone(),
        ));
        subscriber
    }

    /// The pub/sub channel of a Plexus channel.
    pub fn pubsub_channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.pub_prefix)
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
        let name = self.pubsub_channel(channel);
        if !watching {
            let sink = {
                let mut state = lock(&self.state);
                state.watched.remove(channel);
                state.sink.clone()
            };
            if let Some(mut sink) = sink {
                let _ = tokio::time::timeout(timeout, sink.unsubscribe(&name)).await;
                // Watched again meanwhile: our UNSUBSCRIBE may have come after its SUBSCRIBE.
                if lock(&self.state).watched.contains_key(channel) {
                    let _ = tokio::time::timeout(timeout, sink.subscribe(&name)).await;
                }
            }
            return Ok(());
        }
        self.started(timeout).await?;
        let (sink, listed_now) = {
            let mut state = lock(&self.state);
            let listed_now = !state.watched.contains_key(channel);
            state.watched.entry(channel.into()).or_default();
            (state.sink.clone(), listed_now)
        };
        let result = match sink {
            None => Err(LinkError::Disconnected(self.down_reason())),
            Some(mut sink) => match tokio::time::timeout(timeout, sink.subscribe(&name)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(LinkError::Failed(error.to_string().into())),
                Err(_) => Err(LinkError::Timeout(timeout)),
            },
        };
        if result.is_err() && listed_now {
            // The hub gives up on the channel: do not subscribe it on reconnection.
            lock(&self.state).watched.remove(channel);
        }
        result
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
        let mut first_connection = true;
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.connect(&source) => outcome,
            };
            let error: Arc<str> = match outcome {
                Ok((sink, stream)) => {
                    backoff.reset();
                    connected.notify_one();
                    tracing::info!(prefix = &*self.prefix, "redis subscriber connected");
                    if !std::mem::replace(&mut first_connection, false) {
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
                        for progress in state.watched.values_mut() {
                            progress.waiters.clear();
                        }
                    }
                    self.health.subscriber_ready.store(false, Ordering::Release);
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
    /// connection up.
    async fn connect(&self, source: &Source) -> Result<(PubSubSink, PubSubStream), LinkError> {
        let failed = |error: redis::RedisError| LinkError::Failed(error.to_string().into());
        let pubsub = async { source.client().await?.get_async_pubsub().await };
        let (mut sink, stream) = tokio::time::timeout(CONNECT_TIMEOUT, pubsub)
            .await
            .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))?
            .map_err(failed)?
            .split();
        tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&self.control))
            .await
            .map_err(|_| LinkError::Timeout(RESPONSE_TIMEOUT))?
            .map_err(failed)?;
        // From here on `watch` subscribes by itself; the channels listed before are ours.
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
                Ok(result) => result.map_err(failed),
                Err(_) => Err(LinkError::Timeout(RESPONSE_TIMEOUT)),
            };
            if let Err(error) = result {
                lock(&self.state).sink = None;
                return Err(error);
            }
        }
        self.health.subscriber_ready.store(true, Ordering::Release);
        Ok((sink, stream))
    }

    /// Delivers messages until the connection ends or stops answering pings.
    async fn read(
        &self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        deliver: &dyn Deliver,
    ) -> LinkError {
        let mut ping = tokio::time::interval(IDLE_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.handle(&message, deliver),
                    None => return LinkError::Failed("connection closed".into()),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return LinkError::Failed(error.to_string().into()),
                        Err(_) => return LinkError::Timeout(RESPONSE_TIMEOUT),
                    }
                }
            }
        }
    }

    fn handle(&self, message: &Msg, deliver: &dyn Deliver) {
        let name = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if name == self.control {
            match decode_command(payload) {
                Ok(command) => deliver.command(&command),
                Err(_) => tracing::warn!(channel = name, "undecodable node command"),
            }
            return;
        }
        let Some(channel) = name.strip_prefix(&self.pub_prefix) else {
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
