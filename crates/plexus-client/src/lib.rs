//! A Rust client of the Plexus native protocol (the Centrifugo client protocol v2 over
//! WebSocket, in JSON or Protobuf: [`Options::format`]), for services and tests: connect with a
//! token, subscribe, publish, read history and presence.
//!
//! What it does by itself, as the official SDKs do:
//! - reconnects after a lost connection, with full-jitter exponential backoff, unless the
//!   server closed with a code that says not to (3500-3999, 4500-4999) or refused the token;
//! - answers the server's pings and reconnects when they stop coming (a dead peer);
//! - resubscribes after a reconnect with recovery from the last position it saw, so a
//!   subscription gets every publication it missed, or learns that it could not
//!   ([`SubscriptionEvent::Subscribed`] with `recovered: false`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), plexus_client::Error> {
//! use plexus_client::{Client, Options, SubscriptionEvent};
//!
//! let client = Client::connect("ws://127.0.0.1:8000/connection/websocket", Options::token("JWT"));
//! let mut news = client.subscribe("chat:news").await?;
//! client.publish("chat:news", &serde_json::json!({"text": "hello"})).await?;
//! while let Some(event) = news.next().await {
//!     if let SubscriptionEvent::Publication(publication) = event {
//!         println!("{:?}", publication.data);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! One task (the driver, `driver.rs`) owns the socket and every piece of state; the
//! [`Client`] and each [`Subscription`] talk to it through channels.

mod driver;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use plexus_protocol::client::{
    ClientInfo, FilterNode, Format, HistoryResult, Payload, PresenceResult, PresenceStatsResult,
    Publication, RawJson,
};
use plexus_protocol::client::{
    HistoryRequest, PresenceRequest, PresenceStatsRequest, PublishRequest, ReplyBody, Request,
};
use tokio::sync::{mpsc, oneshot, watch};

use driver::Command;

/// Gets a fresh connection token (from the application's backend, say); an error is logged
/// and the client tries again later.
pub type TokenSource = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>
        + Send
        + Sync,
>;

/// How the client connects and reconnects.
#[derive(Clone)]
pub struct Options {
    /// The connection token (a JWT); empty for an anonymous connection, where the server
    /// allows them. With [`Options::token_source`] it is only the first one.
    pub token: String,
    /// Where fresh tokens come from when the one in use expires: asked before the server's
    /// deadline (the connection is refreshed in place, with the same client id), and before
    /// reconnecting after the server refused an expired token. Without it, an expiring
    /// connection ends when its token does.
    pub token_source: Option<TokenSource>,
    /// The client's name, as the server sees it.
    pub name: String,
    /// Reconnect delays: the n-th attempt after a loss waits a random time from
    /// `min_reconnect_delay` to `min_reconnect_delay · 2ⁿ`, at most `max_reconnect_delay`.
    pub min_reconnect_delay: Duration,
    pub max_reconnect_delay: Duration,
    /// How long a call waits for a connection and for its reply; also the limit of each
    /// connection attempt.
    pub timeout: Duration,
    /// How long after the expected server ping the connection counts as dead.
    pub max_ping_delay: Duration,
    /// The protocol's encoding: JSON (the default), or Protobuf, whose payloads may be any
    /// bytes ([`Client::publish_payload`]).
    pub format: Format,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("token", &"<redacted>")
            .field("token_source", &self.token_source.is_some())
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            token: String::new(),
            token_source: None,
            name: "plexus-client-rust".to_owned(),
            min_reconnect_delay: Duration::from_millis(200),
            max_reconnect_delay: Duration::from_secs(20),
            timeout: Duration::from_secs(10),
            max_ping_delay: Duration::from_secs(10),
            format: Format::Json,
        }
    }
}

impl Options {
    /// The defaults, with a connection token.
    pub fn token(token: impl Into<String>) -> Options {
        Options {
            token: token.into(),
            ..Options::default()
        }
    }

    /// The defaults, with tokens from `source` (asked for the first one too).
    pub fn token_source<F, Fut>(source: F) -> Options
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
    {
        Options {
            token_source: Some(Arc::new(move || Box::pin(source()))),
            ..Options::default()
        }
    }
}

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Connected; `client` is the id the server gave this connection.
    Connected { client: String },
    /// For good: [`Client::close`], a server close that says not to reconnect, or a refused
    /// connect. `code` is the close code, or the error code of a refused connect.
    Closed { code: u32, reason: String },
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server answered with an error (e.g. 103 permission denied, 111 too many requests).
    #[error("server error {code}: {message}")]
    Server {
        code: u32,
        message: String,
        /// The SDKs retry such errors.
        temporary: bool,
    },
    /// The connection was lost after the command was sent: whether it took effect is unknown.
    #[error("the connection was lost before the reply")]
    Disconnected,
    /// No connection, or no reply, within [`Options::timeout`].
    #[error("no reply within the timeout")]
    Timeout,
    /// The client is closed ([`State::Closed`]).
    #[error("the client is closed ({code}: {reason})")]
    Closed { code: u32, reason: String },
}

/// What happens to a subscription, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionEvent {
    /// Subscribed: first, and again after each reconnect. After a reconnect
    /// `was_recovering` is true, and `recovered` says whether every publication missed
    /// meanwhile follows this event (false: some were lost, reload what depends on them).
    Subscribed {
        recovered: bool,
        was_recovering: bool,
        /// Publications come as deltas ([`SubscribeOptions::delta`] in a namespace that
        /// allows them); they are rebuilt before they are handed over, so this changes nothing
        /// for the caller but the bytes on the wire.
        delta: bool,
    },
    Publication(Publication),
    /// Someone subscribed (channels with join/leave).
    Join(ClientInfo),
    Leave(ClientInfo),
    /// The server ended the subscription for good (or refused it again after a reconnect);
    /// no event follows.
    Unsubscribed {
        code: u32,
        reason: String,
    },
}

/// How [`Client::subscribe_with`] subscribes.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Delta compression (`delta: "fossil"`): where the namespace allows it, each publication
    /// travels as a Fossil delta from the one before and is rebuilt here; elsewhere
    /// publications come whole. Not with `tags_filter`.
    pub delta: bool,
    /// Only publications whose tags match (where the namespace allows tags filters; elsewhere
    /// the subscribe is refused with 107).
    pub tags_filter: Option<FilterNode>,
}

/// A connection to a Plexus (or Centrifugo) server that stays up by itself. Cheap to clone;
/// the connection closes when the last clone is dropped or [`Client::close`] is called.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<State>,
    timeout: Duration,
    format: Format,
}

impl Client {
    /// Starts connecting to `url` (`ws://…/connection/websocket` or `wss://…`) in the
    /// background; calls made meanwhile wait for the connection. Needs a Tokio runtime.
    pub fn connect(url: impl Into<String>, options: Options) -> Client {
        let (timeout, format) = (options.timeout, options.format);
        let (commands, state) = driver::start(url.into(), options);
        Client {
            commands,
            state,
            timeout,
            format,
        }
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Waits until connected; returns the client id the server gave.
    pub async fn connected(&self) -> Result<String, Error> {
        let mut state = self.state.clone();
        let wait = async move {
            state
                .wait_for(|state| !matches!(state, State::Connecting))
                .await
                .map(|state| state.clone())
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(closed_error()),
            Ok(Ok(State::Connected { client })) => Ok(client),
            Ok(Ok(State::Closed { code, reason })) => Err(Error::Closed { code, reason }),
            Ok(Ok(State::Connecting)) => unreachable!("waited for another state"),
        }
    }

    /// Subscribes to `channel`; resolves once the server accepted. The subscription is
    /// renewed after every reconnect until it is dropped or unsubscribed.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, Error> {
        self.subscribe_with(channel, SubscribeOptions::default())
            .await
    }

    /// [`Client::subscribe`] with options: delta compression, a tags filter.
    pub async fn subscribe_with(
        &self,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.send(Command::Subscribe {
            channel: channel.to_owned(),
            id,
            options,
            events: events_tx,
            reply,
        })?;
        let answer = self.wait(answer).await;
        if !matches!(answer, Ok(Ok(()))) {
            // Gave up (or refused): the driver must not keep it, nor the server.
            let _ = self.commands.send(Command::Unsubscribe {
                channel: channel.to_owned(),
                id,
            });
        }
        answer??;
        Ok(Subscription {
            channel: channel.to_owned(),
            id,
            events,
            commands: self.commands.clone(),
        })
    }

    /// Publishes `data` (any JSON) into `channel`; resolves once the server acknowledged
    /// (with history: once it is stored).
    pub async fn publish<T: serde::Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
    ) -> Result<(), Error> {
        let data = RawJson::from_value(data).map_err(|error| Error::Server {
            code: 107,
            message: format!("data is not JSON: {error}"),
            temporary: false,
        })?;
        self.publish_payload(channel, data.into()).await
    }

    /// Publishes `data` as it is: any bytes with [`Format::Protobuf`], one JSON value's text
    /// with JSON (anything else is refused here with error 107).
    pub async fn publish_payload(&self, channel: &str, data: Payload) -> Result<(), Error> {
        if self.format == Format::Json && data.as_json().is_none() {
            return Err(Error::Server {
                code: 107,
                message: "a JSON connection publishes JSON only".to_owned(),
                temporary: false,
            });
        }
        let request = Request::Publish(PublishRequest {
            channel: channel.to_owned(),
            data: Some(data),
        });
        self.call(request).await.map(|_| ())
    }

    /// The newest `limit` publications of `channel` (all retained with -1, none with 0: only
    /// the stream's position), oldest first.
    pub async fn history(&self, channel: &str, limit: i32) -> Result<HistoryResult, Error> {
        let request = Request::History(HistoryRequest {
            channel: channel.to_owned(),
            limit,
            ..HistoryRequest::default()
        });
        match self.call(request).await? {
            ReplyBody::History(result) => Ok(result),
            other => Err(unexpected(&other)),
        }
    }

    /// Who is subscribed to `channel`, by client id.
    pub async fn presence(&self, channel: &str) -> Result<PresenceResult, Error> {
        let request = Request::Presence(PresenceRequest {
            channel: channel.to_owned(),
        });
        match self.call(request).await? {
            ReplyBody::Presence(result) => Ok(result),
            other => Err(unexpected(&other)),
        }
    }

    /// How many clients and distinct users are subscribed to `channel`.
    pub async fn presence_stats(&self, channel: &str) -> Result<PresenceStatsResult, Error> {
        let request = Request::PresenceStats(PresenceStatsRequest {
            channel: channel.to_owned(),
        });
        match self.call(request).await? {
            ReplyBody::PresenceStats(result) => Ok(result),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the connection (code 1000) and stops reconnecting; pending calls fail with
    /// [`Error::Closed`]. Resolves once the socket is closed.
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close);
        let mut state = self.state.clone();
        let _ = tokio::time::timeout(
            self.timeout,
            state.wait_for(|state| matches!(state, State::Closed { .. })),
        )
        .await;
    }

    async fn call(&self, request: Request) -> Result<ReplyBody, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Call { request, reply })?;
        self.wait(answer).await?
    }

    fn send(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).map_err(|_| self.closed())
    }

    async fn wait<T>(&self, answer: oneshot::Receiver<T>) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(self.closed()),
            Ok(Ok(value)) => Ok(value),
        }
    }

    fn closed(&self) -> Error {
        match self.state() {
            State::Closed { code, reason } => Error::Closed { code, reason },
            _ => closed_error(),
        }
    }
}

fn closed_error() -> Error {
    Error::Closed {
        code: 1000,
        reason: "closed".into(),
    }
}

fn unexpected(body: &ReplyBody) -> Error {
    Error::Server {
        code: 107,
        message: format!("unexpected {} reply", body.name()),
        temporary: false,
    }
}

/// A channel's events ([`SubscriptionEvent`]). Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    /// Tells this subscription from a later one of the same channel.
    id: u64,
    events: mpsc::UnboundedReceiver<SubscriptionEvent>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the subscription ended for good (after
    /// [`SubscriptionEvent::Unsubscribed`]) or the client closed.
    pub async fn next(&mut self) -> Option<SubscriptionEvent> {
        self.events.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
            id: self.id,
        });
    }
}
