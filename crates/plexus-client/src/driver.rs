//! The task that owns the connection: connects and reconnects, matches replies to calls,
//! answers pings, routes pushes to subscriptions and renews them with recovery.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use plexus_protocol::client::{
    ConnectRequest, Format, Payload, Publication, Push, PushBody, RefreshRequest, Reply, ReplyBody,
    Request, SubscribeRequest, UnsubscribeRequest, PROTOBUF_SUBPROTOCOL,
};
use plexus_protocol::fossil;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::{Error, Options, State, SubscribeOptions, SubscriptionEvent};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Close code of a connection whose token expired (the SDKs reconnect with a new token).
const EXPIRED: u16 = 3005;
/// Error code of a connect with an expired token.
const TOKEN_EXPIRED: u32 = 109;

/// How long a temporarily refused subscription waits before it is asked again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// What the [`crate::Client`] and its subscriptions ask of the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Call {
        request: Request,
        reply: oneshot::Sender<Result<ReplyBody, Error>>,
    },
    Subscribe {
        channel: String,
        id: u64,
        options: SubscribeOptions,
        events: mpsc::UnboundedSender<SubscriptionEvent>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// From a dropped subscription: `id` tells it from a later one of the same channel.
    Unsubscribe {
        channel: String,
        id: u64,
    },
    Close,
}

pub(crate) fn start(
    url: String,
    options: Options,
) -> (mpsc::UnboundedSender<Command>, watch::Receiver<State>) {
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (state, state_rx) = watch::channel(State::Connecting);
    let driver = Driver {
        url,
        need_token: options.token_source.is_some() && options.token.is_empty(),
        token: options.token.clone(),
        options,
        commands,
        state,
        subs: HashMap::new(),
        queued: Vec::new(),
    };
    tokio::spawn(driver.run());
    (commands_tx, state_rx)
}

/// A subscription as the driver keeps it, across connections.
struct Sub {
    id: u64,
    events: mpsc::UnboundedSender<SubscriptionEvent>,
    /// The stream's epoch and the last offset seen: where a resubscribe recovers from.
    position: Option<(String, u64)>,
    /// The caller of the first subscribe, until the server answers it.
    first: Option<oneshot::Sender<Result<(), Error>>>,
    /// Asked for (or granted) on the current connection.
    requested: bool,
    /// Refused for now (a temporary error): ask again then.
    retry_at: Option<Instant>,
    /// Delta compression and a tags filter, as asked for.
    options: SubscribeOptions,
    /// The server's answer to delta compression on this connection.
    delta_agreed: bool,
    /// With deltas: the data of the last publication, which the next delta applies to.
    delta_base: Option<Vec<u8>>,
}

/// How a connection ended.
enum End {
    Reconnect,
    Closed { code: u32, reason: String },
}

/// What a command sent on the current connection waits for.
enum Pending {
    Connect,
    Call(oneshot::Sender<Result<ReplyBody, Error>>),
    /// The channel and the subscription's id: the answer is for that subscription only.
    Subscribe(String, u64),
    /// A token refresh.
    Refresh,
    /// An unsubscribe: nobody waits for its answer.
    Ignore,
}

/// The current connection's own state.
struct Connection {
    next_id: u32,
    pending: HashMap<u32, Pending>,
    connected: bool,
    /// The server wants `{}` back for its pings.
    pong: bool,
    /// Past this, the connection is dead: no connect reply, or no ping for too long.
    watchdog: Instant,
    /// The server's ping interval (0: it does not ping).
    ping: Duration,
    /// Messages to write, in the format of the connection.
    out: Vec<Vec<u8>>,
    format: Format,
    /// When to ask the token source for a new token (the connection expires).
    refresh_at: Option<Instant>,
    /// The token source's answer, while it is being asked.
    token_fetch: Option<oneshot::Receiver<Result<String, String>>>,
}

impl Connection {
    fn send(&mut self, request: &Request, pending: Pending) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, pending);
        self.out.push(self.format.encode_command(id, request));
    }
}

struct Driver {
    url: String,
    options: Options,
    commands: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<State>,
    subs: HashMap<String, Sub>,
    /// Calls made while not connected.
    queued: Vec<(Request, oneshot::Sender<Result<ReplyBody, Error>>)>,
    /// The token the next connect sends.
    token: String,
    /// Ask [`Options::token_source`] for a new token before the next connect.
    need_token: bool,
}

/// Opens the WebSocket, asking for Protobuf with its subprotocol when that is the format.
async fn open(url: &str, format: Format) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if format == Format::Protobuf {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static(PROTOBUF_SUBPROTOCOL),
        );
    }
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

impl Driver {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let end = if self.need_token && !self.fresh_token().await {
                End::Reconnect
            } else {
                let connect = open(&self.url, self.options.format);
                match tokio::time::timeout(self.options.timeout, connect).await {
                    Ok(Ok(socket)) => self.session(socket, &mut attempt).await,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, url = %self.url, "cannot connect");
                        End::Reconnect
                    }
                    Err(_) => End::Reconnect,
                }
            };
            if let End::Closed { code, reason } = end {
                return self.finish(code, reason);
            }
            self.state.send_if_modified(|state| {
                let changed = *state != State::Connecting;
                *state = State::Connecting;
                changed
            });
            let until = Instant::now() + self.backoff(attempt);
            attempt = attempt.saturating_add(1);
            loop {
                tokio::select! {
                    () = sleep_until(until) => break,
                    command = self.commands.recv() => match command {
                        None => return self.finish(1000, "client dropped".into()),
                        Some(Command::Close) => return self.finish(1000, "closed by the client".into()),
                        Some(command) => self.offline(command),
                    },
                }
            }
        }
    }

    /// Asks the token source for a token to connect with; false if it gave none.
    async fn fresh_token(&mut self) -> bool {
        let Some(source) = self.options.token_source.clone() else {
            return true;
        };
        match tokio::time::timeout(self.options.timeout, source()).await {
            Ok(Ok(token)) => {
                self.token = token;
                self.need_token = false;
                true
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "the token source gave no token");
                false
            }
            Err(_) => {
                tracing::warn!("the token source did not answer in time");
                false
            }
        }
    }

    /// Jittered exponential backoff: a random delay from `min` to `min · 2^attempt` (at most
    /// `max`), so that clients cut at once do not all come back at once, and none sooner
    /// than `min`.
    fn backoff(&self, attempt: u32) -> Duration {
        let min = self.options.min_reconnect_delay;
        let cap = min
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.options.max_reconnect_delay)
            .max(min);
        let spread = (cap - min).as_nanos().min(u128::from(u64::MAX)) as u64;
        let random = getrandom::u64().unwrap_or(spread) % spread.saturating_add(1);
        min + Duration::from_nanos(random)
    }

    /// A command while there is no connection: calls wait for one.
    fn offline(&mut self, command: Command) {
        match command {
            Command::Call { request, reply } => {
                // Callers that gave up (timed out) are forgotten, so retries while the server
                // is away do not pile up.
                self.queued.retain(|(_, reply)| !reply.is_closed());
                self.queued.push((request, reply));
            }
            Command::Subscribe {
                channel,
                id,
                options,
                events,
                reply,
            } => {
                self.add_sub(channel, id, options, events, reply);
            }
            Command::Unsubscribe { channel, id } => {
                self.forget(&channel, id);
            }
            Command::Close => unreachable!("handled by the caller"),
        }
    }

    /// Adds a subscription; `None` if the channel already has one. `Some(true)` when it
    /// replaced one nobody listens to any more (its caller gave up) that was asked for on the
    /// current connection: the server must be told to unsubscribe that one first.
    fn add_sub(
        &mut self,
        channel: String,
        id: u64,
        options: SubscribeOptions,
        events: mpsc::UnboundedSender<SubscriptionEvent>,
        reply: oneshot::Sender<Result<(), Error>>,
    ) -> Option<bool> {
        let mut replaced_requested = false;
        if let Some(old) = self.subs.get(&channel) {
            if !old.events.is_closed() {
                let _ = reply.send(Err(Error::Server {
                    code: 105,
                    message: "already subscribed".into(),
                    temporary: false,
                }));
                return None;
            }
            replaced_requested = old.requested;
        }
        let sub = Sub {
            id,
            events,
            position: None,
            first: Some(reply),
            requested: false,
            retry_at: None,
            options,
            delta_agreed: false,
            delta_base: None,
        };
        self.subs.insert(channel, sub);
        Some(replaced_requested)
    }

    /// Removes the subscription of `channel` if it is subscription `id` (not a later one of
    /// the same channel).
    fn forget(&mut self, channel: &str, id: u64) -> Option<Sub> {
        if self.subs.get(channel).is_some_and(|sub| sub.id == id) {
            self.subs.remove(channel)
        } else {
            None
        }
    }

    /// Closed for good: every waiting caller is told, every subscription ends.
    fn finish(&mut self, code: u32, reason: String) {
        let error = Error::Closed {
            code,
            reason: reason.clone(),
        };
        for (_, reply) in self.queued.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, mut sub) in self.subs.drain() {
            if let Some(first) = sub.first.take() {
                let _ = first.send(Err(error.clone()));
            }
        }
        self.state.send_replace(State::Closed { code, reason });
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Call { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::Subscribe { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::Unsubscribe { .. } | Command::Close => {}
            }
        }
    }

    async fn session(&mut self, socket: Socket, attempt: &mut u32) -> End {
        let (mut sink, mut stream) = socket.split();
        let mut connection = Connection {
            next_id: 1,
            pending: HashMap::new(),
            connected: false,
            pong: false,
            watchdog: Instant::now() + self.options.timeout,
            ping: Duration::ZERO,
            out: Vec::new(),
            format: self.options.format,
            refresh_at: None,
            token_fetch: None,
        };
        let connect = Request::Connect(ConnectRequest {
            token: self.token.clone(),
            name: self.options.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..ConnectRequest::default()
        });
        connection.send(&connect, Pending::Connect);
        let end = loop {
            let mut written = true;
            for frame in connection.out.drain(..) {
                // A peer that stopped reading must not hold the driver past the watchdog (or
                // the call timeout, when the server does not ping).
                let message = match connection.format {
                    Format::Json => {
                        Message::Text(String::from_utf8(frame).expect("JSON is text").into())
                    }
                    Format::Protobuf => Message::Binary(frame.into()),
                };
                let send = sink.send(message);
                let limit = connection
                    .watchdog
                    .min(Instant::now() + self.options.timeout);
                match tokio::time::timeout_at(limit, send).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "lost the connection while writing");
                        written = false;
                        break;
                    }
                    Err(_) => {
                        tracing::debug!("a write did not finish before the watchdog");
                        written = false;
                        break;
                    }
                }
            }
            if !written {
                break End::Reconnect;
            }
            let wake = self
                .subs
                .values()
                .filter_map(|sub| sub.retry_at)
                .chain(connection.refresh_at)
                .fold(connection.watchdog, Instant::min);
            tokio::select! {
                token = async { connection.token_fetch.as_mut().expect("checked").await },
                    if connection.token_fetch.is_some() =>
                {
                    connection.token_fetch = None;
                    match token {
                        Ok(Ok(token)) => {
                            self.token = token.clone();
                            let request = Request::Refresh(RefreshRequest { token });
                            connection.send(&request, Pending::Refresh);
                        }
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "the token source gave no token; trying again");
                            connection.refresh_at = Some(Instant::now() + RESUBSCRIBE_DELAY);
                        }
                        Err(_) => connection.refresh_at = Some(Instant::now() + RESUBSCRIBE_DELAY),
                    }
                }
                message = stream.next() => match message {
                    None | Some(Err(_)) => break End::Reconnect,
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        if connection.connected && !connection.ping.is_zero() {
                            connection.watchdog =
                                Instant::now() + connection.ping + self.options.max_ping_delay;
                        }
                        let data = message.into_data();
                        if let Err(end) = self.on_message(&data, &mut connection, attempt) {
                            break end;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        if frame.as_ref().is_some_and(|frame| u16::from(frame.code) == EXPIRED) {
                            // Connect again with a new token, if there is a source of them.
                            self.need_token = self.options.token_source.is_some();
                        }
                        break closed_by_server(frame);
                    }
                    Some(Ok(_)) => {}
                },
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                        let close = sink.send(Message::Close(Some(frame)));
                        let _ = tokio::time::timeout(self.options.timeout, close).await;
                        let reason = if command.is_none() { "client dropped" } else { "closed by the client" };
                        break End::Closed { code: 1000, reason: reason.into() };
                    }
                    Some(command) => self.online(command, &mut connection),
                },
                () = sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= connection.watchdog {
                        tracing::debug!(connected = connection.connected, "no answer from the server in time");
                        break End::Reconnect;
                    }
                    // Nobody listens to some any more (their callers gave up): forget them.
                    self.subs.retain(|_, sub| sub.retry_at.is_none() || !sub.events.is_closed());
                    for (channel, sub) in &mut self.subs {
                        if sub.retry_at.is_some_and(|at| at <= now) {
                            sub.retry_at = None;
                            resubscribe(channel, sub, &mut connection);
                        }
                    }
                    if connection.refresh_at.is_some_and(|at| at <= now) {
                        connection.refresh_at = None;
                        if let Some(source) = self.options.token_source.clone() {
                            let (answer, fetch) = oneshot::channel();
                            let timeout = self.options.timeout;
                            tokio::spawn(async move {
                                let token = tokio::time::timeout(timeout, source())
                                    .await
                                    .unwrap_or_else(|_| Err("no answer in time".into()));
                                let _ = answer.send(token);
                            });
                            connection.token_fetch = Some(fetch);
                        }
                    }
                }
            }
        };
        // Whatever waited on this connection: calls fail (they may have taken effect),
        // subscriptions are asked for again on the next one.
        for (_, pending) in connection.pending.drain() {
            if let Pending::Call(reply) = pending {
                let _ = reply.send(Err(Error::Disconnected));
            }
        }
        for sub in self.subs.values_mut() {
            sub.requested = false;
            sub.retry_at = None;
        }
        end
    }

    /// A command while connected (or connecting on a socket).
    fn online(&mut self, command: Command, connection: &mut Connection) {
        match command {
            Command::Call { request, reply } if connection.connected => {
                connection.send(&request, Pending::Call(reply));
            }
            Command::Subscribe {
                channel,
                id,
                options,
                events,
                reply,
            } => {
                let added = self.add_sub(channel.clone(), id, options, events, reply);
                if let (Some(replaced_requested), true) = (added, connection.connected) {
                    if replaced_requested {
                        unsubscribe(&channel, connection);
                    }
                    let sub = self.subs.get_mut(&channel).expect("just added");
                    resubscribe(&channel, sub, connection);
                }
            }
            Command::Unsubscribe { channel, id } => {
                if let Some(sub) = self.forget(&channel, id) {
                    if sub.requested && connection.connected {
                        unsubscribe(&channel, connection);
                    }
                }
            }
            command => self.offline(command),
        }
    }

    /// One WebSocket message from the server: replies, pushes, pings.
    fn on_message(
        &mut self,
        data: &[u8],
        connection: &mut Connection,
        attempt: &mut u32,
    ) -> Result<(), End> {
        for reply in connection.format.parse_replies(data) {
            let reply = match reply {
                Ok(reply) => reply,
                Err(error) => {
                    tracing::warn!(%error, "a reply that is not the protocol's; reconnecting");
                    return Err(End::Reconnect);
                }
            };
            if reply.is_server_ping() {
                if connection.pong {
                    let pong = connection.format.client_pong().to_vec();
                    connection.out.push(pong);
                }
                continue;
            }
            if reply.id == 0 {
                if let Some(ReplyBody::Push(push)) = reply.body {
                    self.on_push(push, connection)?;
                }
                continue;
            }
            match connection.pending.remove(&reply.id) {
                Some(Pending::Connect) => self.on_connect(reply, connection, attempt)?,
                Some(Pending::Call(caller)) => {
                    let _ = caller.send(match (reply.error, reply.body) {
                        (Some(error), _) => Err(server_error(error)),
                        (None, Some(body)) => Ok(body),
                        (None, None) => Err(Error::Server {
                            code: 107,
                            message: "an empty reply".into(),
                            temporary: false,
                        }),
                    });
                }
                Some(Pending::Subscribe(channel, id)) => {
                    self.on_subscribed(&channel, id, reply, connection);
                }
                Some(Pending::Refresh) => match (reply.error, reply.body) {
                    (None, Some(ReplyBody::Refresh(result))) => {
                        connection.refresh_at = refresh_time(result.expires, result.ttl);
                    }
                    (Some(error), _) if error.temporary => {
                        connection.refresh_at = Some(Instant::now() + RESUBSCRIBE_DELAY);
                    }
                    (error, _) => {
                        // The server will close the connection when it expires; the next one
                        // gets a new token.
                        tracing::warn!(?error, "token refresh refused");
                    }
                },
                Some(Pending::Ignore) | None => {}
            }
        }
        Ok(())
    }

    fn on_connect(
        &mut self,
        reply: Reply,
        connection: &mut Connection,
        attempt: &mut u32,
    ) -> Result<(), End> {
        let result = match (reply.error, reply.body) {
            (Some(error), _) if error.temporary => return Err(End::Reconnect),
            (Some(error), _)
                if error.code == TOKEN_EXPIRED && self.options.token_source.is_some() =>
            {
                self.need_token = true;
                return Err(End::Reconnect);
            }
            (Some(error), _) => {
                return Err(End::Closed {
                    code: error.code,
                    reason: error.message,
                })
            }
            (None, Some(ReplyBody::Connect(result))) => result,
            _ => return Err(End::Reconnect),
        };
        *attempt = 0;
        connection.connected = true;
        connection.pong = result.pong;
        connection.ping = Duration::from_secs(u64::from(result.ping));
        connection.watchdog = if result.ping > 0 {
            Instant::now() + connection.ping + self.options.max_ping_delay
        } else {
            Instant::now() + Duration::from_secs(365 * 24 * 3600)
        };
        if self.options.token_source.is_some() {
            connection.refresh_at = refresh_time(result.expires, result.ttl);
        }
        self.state.send_replace(State::Connected {
            client: result.client,
        });
        for (channel, sub) in &mut self.subs {
            resubscribe(channel, sub, connection);
        }
        for (request, reply) in std::mem::take(&mut self.queued) {
            // A caller that gave up (timed out) must not have its call made after all.
            if !reply.is_closed() {
                connection.send(&request, Pending::Call(reply));
            }
        }
        Ok(())
    }

    fn on_subscribed(&mut self, channel: &str, id: u64, reply: Reply, connection: &mut Connection) {
        let Some(sub) = self.subs.get_mut(channel).filter(|sub| sub.id == id) else {
            // Dropped meanwhile (a later subscription of the channel asks for itself).
            if reply.error.is_none() && !self.subs.contains_key(channel) {
                unsubscribe(channel, connection);
            }
            return;
        };
        if let Some(error) = reply.error {
            if error.temporary {
                sub.requested = false;
                sub.retry_at = Some(Instant::now() + RESUBSCRIBE_DELAY);
                return;
            }
            match sub.first.take() {
                Some(first) => {
                    let _ = first.send(Err(server_error(error)));
                }
                None => {
                    let _ = sub.events.send(SubscriptionEvent::Unsubscribed {
                        code: error.code,
                        reason: error.message,
                    });
                }
            }
            self.subs.remove(channel);
            return;
        }
        let Some(ReplyBody::Subscribe(result)) = reply.body else {
            return;
        };
        if let Some(first) = sub.first.take() {
            let _ = first.send(Ok(()));
        }
        sub.delta_agreed = result.delta;
        // The server makes deltas only from what this answer, or a later push, carries.
        sub.delta_base = None;
        let mut delivered = sub
            .events
            .send(SubscriptionEvent::Subscribed {
                recovered: result.recovered,
                was_recovering: result.was_recovering,
                delta: result.delta,
            })
            .is_ok();
        let previous = sub.position.take();
        let mut top = result.offset;
        for publication in result.publications {
            let offset = publication.offset;
            let Some(publication) = undelta(sub, publication, connection.format) else {
                // Not rebuilt: ask again from the last publication delivered.
                sub.position = result.recoverable.then_some((result.epoch, top));
                if sub.position.is_none() {
                    sub.position = previous;
                }
                unsubscribe(channel, connection);
                resubscribe(channel, sub, connection);
                return;
            };
            delivered &= sub
                .events
                .send(SubscriptionEvent::Publication(publication))
                .is_ok();
            top = top.max(offset);
        }
        sub.position = result.recoverable.then_some((result.epoch, top));
        if !delivered {
            // Nobody listens any more (the caller gave up waiting, or dropped it).
            self.subs.remove(channel);
            unsubscribe(channel, connection);
        }
    }

    fn on_push(&mut self, push: Push, connection: &mut Connection) -> Result<(), End> {
        if let PushBody::Disconnect(disconnect) = push.body {
            // By code, as for a close frame (the `reconnect` flag is legacy).
            return Err(match disconnect.code {
                3500..=3999 | 4500..=4999 => End::Closed {
                    code: disconnect.code,
                    reason: disconnect.reason,
                },
                _ => End::Reconnect,
            });
        }
        let Some(sub) = self.subs.get_mut(&push.channel) else {
            return Ok(());
        };
        if sub.first.is_some() {
            // Not confirmed yet: pushes now belong to an earlier subscription of the channel;
            // this one starts at its subscribe answer.
            return Ok(());
        }
        let event = match push.body {
            PushBody::Publication(publication) => {
                let offset = publication.offset;
                let Some(publication) = undelta(sub, publication, connection.format) else {
                    // Not rebuilt: ask again from the last publication delivered.
                    unsubscribe(&push.channel, connection);
                    resubscribe(&push.channel, sub, connection);
                    return Ok(());
                };
                if let Some((_, last)) = &mut sub.position {
                    *last = (*last).max(offset);
                }
                SubscriptionEvent::Publication(publication)
            }
            PushBody::Join(join) => SubscriptionEvent::Join(join.info),
            PushBody::Leave(leave) => SubscriptionEvent::Leave(leave.info),
            PushBody::Unsubscribe(unsubscribe) if unsubscribe.code >= 2500 => {
                // The server asks for a new subscription (e.g. it lost deliveries): recover.
                resubscribe(&push.channel, sub, connection);
                return Ok(());
            }
            PushBody::Unsubscribe(unsubscribe) => {
                let _ = sub.events.send(SubscriptionEvent::Unsubscribed {
                    code: unsubscribe.code,
                    reason: unsubscribe.reason,
                });
                self.subs.remove(&push.channel);
                return Ok(());
            }
            _ => return Ok(()),
        };
        if sub.events.send(event).is_err() {
            self.subs.remove(&push.channel);
            unsubscribe(&push.channel, connection);
        }
        Ok(())
    }
}

/// A publication of a subscription with delta compression as published: its data rebuilt from
/// the delta and the previous publication, or (a whole one) taken out of the JSON string a JSON
/// connection gets it in. `None` if it cannot be (a delta that does not apply).
fn undelta(sub: &mut Sub, mut publication: Publication, format: Format) -> Option<Publication> {
    if !sub.delta_agreed {
        return Some(publication);
    }
    let data = publication
        .data
        .take()
        .unwrap_or_else(|| Payload::new(Vec::new()));
    let carried: Vec<u8> = match format {
        Format::Json => serde_json::from_slice::<String>(data.as_bytes())
            .ok()?
            .into_bytes(),
        Format::Protobuf => data.as_bytes().to_vec(),
    };
    let bytes = if publication.delta {
        fossil::apply(sub.delta_base.as_deref().unwrap_or_default(), &carried).ok()?
    } else {
        carried
    };
    publication.data = Some(Payload::new(bytes.clone()));
    publication.delta = false;
    sub.delta_base = Some(bytes);
    Some(publication)
}

/// Tells the server this client no longer wants `channel`.
fn unsubscribe(channel: &str, connection: &mut Connection) {
    let request = Request::Unsubscribe(UnsubscribeRequest {
        channel: channel.to_owned(),
    });
    connection.send(&request, Pending::Ignore);
}

/// When to get a new token for a connection that expires in `ttl` seconds: with a quarter of
/// the time left (at least a second before, where the time allows).
fn refresh_time(expires: bool, ttl: u32) -> Option<Instant> {
    if !expires || ttl == 0 {
        return None;
    }
    let ttl = Duration::from_secs(u64::from(ttl));
    let margin = (ttl / 4).max(Duration::from_secs(1)).min(ttl / 2);
    Some(Instant::now() + ttl - margin)
}

/// Asks for `channel` on this connection, recovering from its last position if it has one.
fn resubscribe(channel: &str, sub: &mut Sub, connection: &mut Connection) {
    let (recover, epoch, offset) = match &sub.position {
        Some((epoch, offset)) => (true, epoch.clone(), *offset),
        None => (false, String::new(), 0),
    };
    let request = Request::Subscribe(SubscribeRequest {
        channel: channel.to_owned(),
        recover,
        epoch,
        offset,
        delta: if sub.options.delta {
            "fossil".into()
        } else {
            String::new()
        },
        tf: sub.options.tags_filter.clone().map(Box::new),
        ..SubscribeRequest::default()
    });
    sub.requested = true;
    connection.send(&request, Pending::Subscribe(channel.to_owned(), sub.id));
}

fn server_error(error: plexus_protocol::client::Error) -> Error {
    Error::Server {
        code: error.code,
        message: error.message,
        temporary: error.temporary,
    }
}

/// The server's close frame: 3500-3999 and 4500-4999 say not to reconnect.
fn closed_by_server(frame: Option<CloseFrame>) -> End {
    let Some(frame) = frame else {
        return End::Reconnect;
    };
    let code = u16::from(frame.code);
    match code {
        3500..=3999 | 4500..=4999 => End::Closed {
            code: u32::from(code),
            reason: frame.reason.to_string(),
        },
        _ => End::Reconnect,
    }
}
