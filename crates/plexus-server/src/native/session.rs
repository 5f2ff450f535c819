//! One protocol client: connect, subscriptions, commands and pushes.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use plexus_auth::{check_subscription, TokenError};
use plexus_core::{
    user_may_subscribe, ChannelError, ClientInfo, Control, Delivery, HistoryQuery, Outbox,
    Publication, StreamPosition, SubscribeError, Subscriber, Subscription, Tailored,
};
use plexus_protocol::client::{
    self as proto, DisconnectCode, ErrorCode, Format, Incoming, PushBody, Reply, ReplyBody, Request,
};
use tokio::time::Instant;

use super::encode;
use crate::limits::MessageRate;
use crate::proxy::{Answer, Caller, ForwardedHeaders};
use crate::ws::Out;
use crate::Shared;

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Seconds until `at`, at least 1 (the protocol's `ttl`).
fn ttl(at: u64) -> u32 {
    at.saturating_sub(now_unix()).clamp(1, u64::from(u32::MAX)) as u32
}

/// When a token that expires at `at` is enforced: `delay` later, in whole seconds rounded up.
/// The official SDKs send `refresh` and `sub_refresh` when `ttl` runs out, not before, so
/// closing at the expiry itself would race them (Centrifugo waits 25 s too).
fn after_grace(at: u64, delay: Duration) -> u64 {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    at.saturating_add(seconds)
}

/// What a command ends in. Returned once and encoded at once, so a large reply is not boxed.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Reply(ReplyBody),
    Error(ErrorCode),
    /// An error of the application's backend, as it gave it.
    Failed(proto::Error),
    /// A disconnect of the application's backend (a code from 3000 to 4999).
    Close(u16, String),
    NoReply,
    Disconnect(DisconnectCode),
}

impl From<ErrorCode> for Outcome {
    fn from(code: ErrorCode) -> Outcome {
        Outcome::Error(code)
    }
}

/// A channel this client is subscribed to (32 bytes; 48 with its name in a `ChannelMap`).
struct ChannelState {
    /// Highest offset the client has (from the subscribe reply or a push): duplicates at or
    /// below it, possible right after a subscribe, are dropped.
    last_offset: u64,
    /// A publication above the offset the subscription started from has arrived (or there was
    /// none to start from): from here on the channel's order rules out duplicates.
    settled: bool,
    /// Joins and leaves are pushed: the client asked (`join_leave`) or the namespace forces it.
    join_leave: bool,
    /// When the subscription token expires unless refreshed with `sub_refresh`.
    expires_at: ExpiresAt,
    /// Delta compression, a tags filter, channel info: what few subscriptions have. The hub
    /// applies filters and chains publications for deltas (see `plexus_core::Tailored`), so
    /// such a subscription parks like any other.
    extra: Option<Box<SubscriptionExtra>>,
}

/// What few subscriptions ask for; boxed, so that the others do not pay for it.
#[derive(Default)]
struct SubscriptionExtra {
    /// Delta compression was negotiated: publications go as Fossil deltas where the client
    /// holds the previous one (see `encode::delta_publication`).
    delta: bool,
    /// With `delta`, until the subscription is settled: the last publication the client got
    /// in the channel, which it will apply the next delta to. Once settled, the hub's chain
    /// says it (`Delivery::Chained`): the flush lane writes some publications, and the session
    /// never sees them.
    delta_base: Option<Arc<Publication>>,
    /// With `delta`: this subscription's chain in the hub (`Tailored::Chained`), unique in
    /// the process.
    chain: u64,
    /// Only publications whose tags match this are sent (`tf`): live ones by the hub, which
    /// shares it, recovered ones by the session.
    filter: Option<Arc<proto::FilterNode>>,
    /// The channel info the subscription was granted with (token or subscribe proxy), for
    /// the presence entry when the connection's info changes.
    chan_info: Option<Bytes>,
}

/// A new id for a delta subscription's chain in the hub.
fn next_chain() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Tags of a publication without any.
static NO_TAGS: plexus_core::Tags = plexus_core::Tags::new();

impl SubscriptionExtra {
    /// Whether the subscriber is sent `publication` (its tags filter lets it through).
    fn passes(&self, publication: &Publication) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|filter| tags_pass(filter, publication))
    }

    /// What the hub does for this subscription: filters its live publications, or chains
    /// them for deltas.
    fn tailored(&self) -> Option<Tailored> {
        if self.delta {
            return Some(Tailored::Chained(self.chain));
        }
        let filter = self.filter.clone()?;
        Some(Tailored::Filtered(Arc::new(
            move |publication: &Publication| tags_pass(&filter, publication),
        )))
    }
}

fn tags_pass(filter: &proto::FilterNode, publication: &Publication) -> bool {
    filter.matches(publication.tags.as_deref().unwrap_or(&NO_TAGS))
}

/// When something expires (Unix seconds), if it does: 8 bytes, where an `Option<u64>` takes 16.
/// A time of 0, long past, is kept as 1, just as past.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ExpiresAt(Option<NonZeroU64>);

impl ExpiresAt {
    fn new(at: Option<u64>) -> ExpiresAt {
        ExpiresAt(at.map(|at| NonZeroU64::new(at).unwrap_or(NonZeroU64::MIN)))
    }

    fn get(self) -> Option<u64> {
        self.0.map(NonZeroU64::get)
    }
}

/// The channels a client is subscribed to, by name: a vector sorted by name, so that a client
/// with one channel (most have a few) holds one allocation of 48 bytes, where a hash map's
/// smallest table takes over 200.
#[derive(Default)]
struct ChannelMap(Vec<(Arc<str>, ChannelState)>);

impl ChannelMap {
    fn find(&self, channel: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(name, _)| (**name).cmp(channel))
    }

    fn get(&self, channel: &str) -> Option<&ChannelState> {
        self.find(channel).ok().map(|at| &self.0[at].1)
    }

    fn get_mut(&mut self, channel: &str) -> Option<&mut ChannelState> {
        self.find(channel).ok().map(|at| &mut self.0[at].1)
    }

    fn contains_key(&self, channel: &str) -> bool {
        self.find(channel).is_ok()
    }

    /// Adds a channel, or replaces its state.
    fn insert(&mut self, channel: Arc<str>, state: ChannelState) {
        match self.find(&channel) {
            Ok(at) => self.0[at].1 = state,
            Err(at) => {
                // Grown one entry at a time while small: no room kept for channels that most
                // clients never add. Past that, the vector's usual doubling.
                if self.0.len() == self.0.capacity() && self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, (channel, state));
            }
        }
    }

    fn remove(&mut self, channel: &str) -> Option<ChannelState> {
        let at = self.find(channel).ok()?;
        let (_, state) = self.0.remove(at);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(state)
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &ChannelState)> {
        self.0.iter().map(|(name, state)| (name, state))
    }

    fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(name, _)| name)
    }

    fn values(&self) -> impl Iterator<Item = &ChannelState> {
        self.0.iter().map(|(_, state)| state)
    }
}

/// Where a client's replies and pushes go, the format they are written in, and what the
/// backends are told of it.
#[derive(Clone, Copy)]
struct Peer<'a> {
    outbox: &'a Arc<Outbox>,
    format: Format,
    extra: Option<&'a Extra>,
}

impl Peer<'_> {
    /// The client as a backend sees it.
    fn caller<'c>(&self, client: &'c str) -> Caller<'c> {
        Caller {
            client,
            transport: Extra::transport(self.extra),
            protocol: self.format.name(),
        }
    }

    fn headers(&self) -> &[(http::HeaderName, http::HeaderValue)] {
        Extra::headers(self.extra)
    }
}

/// The `meta` claim that marks a guest token (minted by `/app/token` for the built-in apps).
pub(crate) const GUEST_META: &str = "plexus_guest";

struct Connected {
    info: Arc<ClientInfo>,
    /// A guest of the built-in apps: it has a user id and a name, and exactly the permissions of
    /// an anonymous connection.
    guest: bool,
    /// When the connection expires unless refreshed.
    expires_at: ExpiresAt,
    /// The connect proxy made it: the refresh proxy (if any) decides at its expiry.
    proxied: bool,
    channels: ChannelMap,
    /// Commands against `max_messages_per_second`.
    rate: MessageRate,
    /// `rpc` commands waiting for the backend; made at the first.
    rpc: Option<Arc<RpcCalls>>,
}

/// A connection's `rpc` commands waiting for the backend.
#[derive(Default)]
struct RpcCalls {
    in_flight: AtomicU32,
    /// Cancelled when the connection ends: its calls stop waiting.
    gone: tokio_util::sync::CancellationToken,
}

/// The ids a stream transport's client sends its commands with (`POST /emulation`).
pub(crate) struct StreamIds {
    pub(crate) session: String,
    pub(crate) node: String,
    /// `sse` or `http_stream`, as the RPC proxy names it.
    pub(crate) transport: &'static str,
}

/// What few sessions have; boxed, so the many WebSocket sessions without it do not pay for it.
#[derive(Default)]
pub(crate) struct Extra {
    /// On a stream transport (SSE, HTTP streaming), its ids: pushes are unframed and the
    /// connect result carries the ids. `None` on a WebSocket, whose pushes are finished frames.
    pub(crate) stream: Option<StreamIds>,
    /// The client request's headers for the backends (`proxy_http_headers`).
    pub(crate) headers: ForwardedHeaders,
}

impl Extra {
    fn transport(extra: Option<&Extra>) -> &'static str {
        extra
            .and_then(|extra| extra.stream.as_ref())
            .map_or("websocket", |ids| ids.transport)
    }

    fn headers(extra: Option<&Extra>) -> &[(http::HeaderName, http::HeaderValue)] {
        extra.map_or(&[], |extra| &extra.headers)
    }
}

pub(crate) struct ClientSession {
    /// Stream ids and forwarded headers, for the sessions that have them.
    extra: Option<Box<Extra>>,
    /// What the client speaks: JSON or Protobuf.
    format: Format,
    outbox: Arc<Outbox>,
    /// `None` until a successful connect.
    connected: Option<Connected>,
    /// A client that has not connected by then is closed (3502 stale).
    connect_deadline: ShortDeadline,
    /// The connect proxy refused this connection: another connect closes it.
    connect_refused: bool,
}

/// A moment less than 24 days ahead in 4 bytes, where an `Instant` takes 16: milliseconds on a
/// clock that starts with the process and wraps every 49 days, compared by wrapping difference.
#[derive(Debug, Clone, Copy)]
struct ShortDeadline(u32);

impl ShortDeadline {
    /// The clock's start, and whole milliseconds since.
    fn clock() -> (Instant, u64) {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(Instant::now);
        (start, start.elapsed().as_millis() as u64)
    }

    fn after(timeout: Duration) -> ShortDeadline {
        let millis = timeout.as_millis().min(i32::MAX as u128) as u32;
        // Truncated to 32 bits: the clock wraps.
        ShortDeadline((Self::clock().1 as u32).wrapping_add(millis))
    }

    /// Milliseconds left (negative once passed), with the clock's reading.
    fn left(self) -> (i64, (Instant, u64)) {
        let clock = Self::clock();
        (i64::from(self.0.wrapping_sub(clock.1 as u32) as i32), clock)
    }

    fn passed(self) -> bool {
        self.left().0 <= 0
    }

    /// The deadline as an instant: the same one at every call (a timer set to it is not reset
    /// for nothing), or, once passed, the current millisecond.
    fn instant(self) -> Instant {
        let (left, (start, now)) = self.left();
        start + Duration::from_millis(now.saturating_add_signed(left.max(0)))
    }
}

impl ClientSession {
    /// A WebSocket session; `headers` are the upgrade request's for the backends.
    pub(crate) fn new(shared: &Shared, format: Format, headers: ForwardedHeaders) -> ClientSession {
        ClientSession {
            extra: (!headers.is_empty()).then(|| {
                Box::new(Extra {
                    stream: None,
                    headers,
                })
            }),
            format,
            outbox: Arc::new(Outbox::new(shared.config.outbox_limit)),
            connected: None,
            connect_deadline: ShortDeadline::after(shared.config.handshake_timeout),
            connect_refused: false,
        }
    }

    /// Whether the connection's deliveries may be written for it while it waits (see
    /// `ws::direct`): not while a new subscription may still receive a publication its
    /// subscribe reply already carried (only the session can drop it).
    pub(crate) fn may_park(&self) -> bool {
        self.stream().is_none()
            && self
                .connected
                .as_ref()
                .is_none_or(|connected| connected.channels.values().all(|state| state.settled))
    }

    /// A session on a stream transport (`sse`, `http_stream`): its pushes are unframed
    /// (`Out::Message`), never WebSocket frames, and its connect result names `ids`.
    pub(crate) fn new_stream(
        shared: &Shared,
        ids: StreamIds,
        format: Format,
        headers: ForwardedHeaders,
    ) -> ClientSession {
        ClientSession {
            extra: Some(Box::new(Extra {
                stream: Some(ids),
                headers,
            })),
            ..ClientSession::new(shared, format, Vec::new())
        }
    }

    fn stream(&self) -> Option<&StreamIds> {
        self.extra.as_ref().and_then(|extra| extra.stream.as_ref())
    }

    pub(crate) fn format(&self) -> Format {
        self.format
    }

    fn peer(&self) -> Peer<'_> {
        Peer {
            outbox: &self.outbox,
            format: self.format,
            extra: self.extra.as_deref(),
        }
    }

    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The next moment something must happen without input: the connect deadline, or the
    /// connection's expiry.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.connected {
            None => Some(self.connect_deadline.instant()),
            Some(connected) => connected
                .channels
                .values()
                .filter_map(|state| state.expires_at.get())
                .chain(connected.expires_at.get())
                .min()
                .map(|at| {
                    // To the millisecond (the second `at` starts), and at most a year ahead (it
                    // is recomputed long before): an absurd `exp` or `expire_at` must not
                    // overflow the clock.
                    let at = UNIX_EPOCH + Duration::from_secs(at.min(u64::from(u32::MAX)));
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    Instant::now() + left.min(Duration::from_secs(365 * 24 * 3600))
                }),
        }
    }

    /// Called when a deadline may have passed: a client that never connected is closed (3502),
    /// an expired connection is closed (3005),
    /// an expired subscription is ended with an `unsubscribe` push (2501, the SDKs resubscribe
    /// with a fresh token).
    pub(crate) async fn on_deadline(&mut self, shared: &Shared, out: &mut Vec<Out>) {
        let format = self.format;
        let Some(connected) = self.connected.as_mut() else {
            if self.connect_deadline.passed() {
                close(out, DisconnectCode::Stale);
            }
            return;
        };
        let now = now_unix();
        if connected.expires_at.get().is_some_and(|at| at <= now) {
            let refresh = shared.proxies.refresh.as_ref();
            match refresh.filter(|_| connected.proxied) {
                Some(proxy) => {
                    let peer = Peer {
                        outbox: &self.outbox,
                        format,
                        extra: self.extra.as_deref(),
                    };
                    let caller = peer.caller(&connected.info.client);
                    let user = backend_user(connected);
                    let answer = proxy.refresh(caller, user, peer.headers()).await;
                    match refused(answer, "refresh") {
                        Ok(refreshed) => match refreshed.expires_at {
                            Some(0) => connected.expires_at = ExpiresAt::default(),
                            Some(at) if at > now => connected.expires_at = ExpiresAt::new(Some(at)),
                            _ => return close(out, DisconnectCode::Expired),
                        },
                        Err(Refusal::Close(code, reason)) => {
                            return out.push(Out::Close(code, reason));
                        }
                        Err(_) => return close(out, DisconnectCode::Expired),
                    }
                }
                None => return close(out, DisconnectCode::Expired),
            }
        }
        let expired: Vec<Arc<str>> = connected
            .channels
            .iter()
            .filter(|(_, state)| state.expires_at.get().is_some_and(|at| at <= now))
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in expired {
            connected.channels.remove(&channel);
            shared.node.unsubscribe(&channel, &connected.info).await;
            let body = PushBody::Unsubscribe(proto::UnsubscribeCode::Expired.into());
            out.push(push_out(format, &channel, &body));
        }
    }

    pub(crate) async fn on_message(&mut self, shared: &Shared, data: Bytes, out: &mut Vec<Out>) {
        let format = self.format;
        let mut replies: Vec<Vec<u8>> = Vec::new();
        for incoming in format.parse_frame(&data) {
            let outcome = match incoming {
                Ok(Incoming::Pong) => continue,
                Ok(Incoming::Command { id, request }) => {
                    (id, self.command(shared, id, request).await)
                }
                Err(error) if error.is_fatal() => {
                    (0, Outcome::Disconnect(DisconnectCode::BadRequest))
                }
                Err(error) => match error.reply() {
                    Some(reply) => {
                        replies.push(format.encode_reply(&reply));
                        continue;
                    }
                    None => continue,
                },
            };
            match outcome {
                (id, Outcome::Reply(body)) => {
                    replies.push(format.encode_reply(&Reply::result(id, body)))
                }
                (id, Outcome::Error(code)) => {
                    replies.push(format.encode_reply(&Reply::error(id, code)))
                }
                (id, Outcome::Failed(error)) => {
                    replies.push(format.encode_reply(&Reply::error(id, error)))
                }
                (_, Outcome::NoReply) => {}
                (_, Outcome::Disconnect(code)) => {
                    flush(out, format, &mut replies);
                    return close(out, code);
                }
                (_, Outcome::Close(code, reason)) => {
                    flush(out, format, &mut replies);
                    out.push(Out::Close(code, reason));
                    return;
                }
            }
        }
        flush(out, format, &mut replies);
    }

    async fn command(&mut self, shared: &Shared, id: u32, request: Request) -> Outcome {
        let format = self.format;
        if let Request::Connect(request) = request {
            if self.connected.is_some() {
                return Outcome::Disconnect(DisconnectCode::BadRequest);
            }
            return self.connect(shared, request).await;
        }
        let Some(connected) = self.connected.as_mut() else {
            return Outcome::Disconnect(DisconnectCode::BadRequest);
        };
        if !connected.rate.allow(shared.config.max_messages_per_second) {
            shared.metrics.rate_limited.inc();
            return ErrorCode::TooManyRequests.into();
        }
        let peer = Peer {
            outbox: &self.outbox,
            format,
            extra: self.extra.as_deref(),
        };
        match request {
            Request::Connect(_) => unreachable!("handled above"),
            Request::Subscribe(request) => {
                subscribe_command(shared, connected, peer, request).await
            }
            Request::Unsubscribe(request) => {
                if connected
                    .channels
                    .remove(request.channel.as_str())
                    .is_some()
                {
                    shared
                        .node
                        .unsubscribe(&request.channel, &connected.info)
                        .await;
                }
                Outcome::Reply(ReplyBody::Unsubscribe(proto::UnsubscribeResult {}))
            }
            Request::Publish(request) => publish_command(shared, connected, peer, request).await,
            Request::Presence(request) => {
                presence_command(shared, connected, format, &request.channel, false).await
            }
            Request::PresenceStats(request) => {
                presence_command(shared, connected, format, &request.channel, true).await
            }
            Request::History(request) => history_command(shared, format, request).await,
            Request::Ping(_) => Outcome::Reply(ReplyBody::Ping(proto::PingResult {})),
            Request::Send(_) => Outcome::NoReply, // no message handler is configured
            Request::Rpc(request) => rpc_command(shared, connected, peer, id, request),
            Request::Refresh(request) => refresh_command(shared, connected, &request.token).await,
            Request::SubRefresh(request) => sub_refresh_command(shared, connected, request).await,
        }
    }

    async fn connect(&mut self, shared: &Shared, request: proto::ConnectRequest) -> Outcome {
        if self.connect_refused {
            // The backend said no on this connection already: no guessing in a loop.
            return Outcome::Disconnect(DisconnectCode::BadRequest);
        }
        let client_id = crate::new_client_id();
        let mut connect_data = None;
        // An expiry from the backend is the server's to enforce (3005, and the client connects
        // again through the backend); the client is told of expiries only for tokens it can
        // refresh.
        let mut told_expiry = true;
        let (user, conn_info, expires_at, channels, guest) = if let Some(proxy) = shared
            .proxies
            .connect
            .as_ref()
            .filter(|_| request.token.is_empty())
        {
            // No token: the application's backend says who this is.
            let answer = proxy
                .connect(
                    self.peer().caller(&client_id),
                    &request.name,
                    &request.version,
                    request.data.as_ref(),
                    Extra::headers(self.extra.as_deref()),
                )
                .await;
            match refused(answer, "connect") {
                Ok(connected) if connected.expires_at.is_some_and(|at| at <= now_unix()) => {
                    return ErrorCode::Expired.into();
                }
                Ok(connected) => {
                    connect_data = connected.data;
                    told_expiry = false;
                    (
                        connected.user,
                        connected.info,
                        connected.expires_at,
                        connected.channels,
                        false,
                    )
                }
                Err(refusal) => {
                    self.connect_refused = true;
                    return refusal.into();
                }
            }
        } else if request.token.is_empty() {
            if !shared.config.allow_anonymous_connect_without_token {
                return Outcome::Disconnect(DisconnectCode::InvalidToken);
            }
            (String::new(), None, None, Vec::new(), false)
        } else {
            let Some(verifier) = &shared.verifier else {
                return Outcome::Disconnect(DisconnectCode::InvalidToken);
            };
            match crate::jwks::verify_connection(shared, verifier, &request.token, now_unix()).await
            {
                Ok(claims) => {
                    let expires_at = claims.connection_expires_at();
                    let guest = claims
                        .meta
                        .as_ref()
                        .and_then(|meta| meta.get(GUEST_META))
                        .is_some_and(|value| value == &serde_json::Value::Bool(true));
                    (claims.sub, claims.info, expires_at, claims.channels, guest)
                }
                Err(TokenError::Expired) => return ErrorCode::TokenExpired.into(),
                Err(error) => {
                    tracing::debug!(%error, "connect refused");
                    return Outcome::Disconnect(DisconnectCode::InvalidToken);
                }
            }
        };
        let id = shared.node.hub().next_connection_id();
        let name = if request.name.is_empty() {
            plexus_core::DEFAULT_NAME
        } else {
            &request.name
        };
        let info = Arc::new(ClientInfo::new(id, client_id, user.into(), conn_info, name));
        let subscriber = Subscriber {
            info: info.clone(),
            outbox: self.outbox.clone(),
            join_leave: false,
        };
        shared.node.hub().register(subscriber);
        // A client that refreshes its own token gets the grace; a backend's expiry is exact.
        let closes_at = if told_expiry {
            expires_at.map(|at| after_grace(at, shared.config.expired_close_delay))
        } else {
            expires_at
        };
        let mut connected = Connected {
            info: info.clone(),
            guest,
            expires_at: ExpiresAt::new(closes_at),
            proxied: !told_expiry,
            channels: ChannelMap::default(),
            rate: MessageRate::new(shared.config.max_messages_per_second),
            rpc: None,
        };
        // Server-side subscriptions from the token, recovering from positions the client sent.
        let mut subs = std::collections::BTreeMap::new();
        for channel in channels {
            let recover = request
                .subs
                .get(&channel)
                .filter(|sub| sub.recover)
                .map(|sub| StreamPosition {
                    offset: sub.offset,
                    epoch: sub.epoch.as_str().into(),
                });
            match subscribe(
                shared,
                &mut connected,
                self.peer(),
                &channel,
                None,
                recover,
                false,
                // Server-side subscriptions have no request to ask for deltas or filters in.
                None,
            )
            .await
            {
                Ok(result) => {
                    subs.insert(channel, result);
                }
                Err(code) => {
                    tracing::warn!(%channel, code = code.code(), "server-side subscription failed")
                }
            }
        }
        self.connected = Some(connected);
        Outcome::Reply(ReplyBody::Connect(proto::ConnectResult {
            client: info.client.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            expires: told_expiry && expires_at.is_some(),
            ttl: expires_at.filter(|_| told_expiry).map_or(0, ttl),
            subs,
            ping: shared.config.ping_interval.as_secs().max(1) as u32,
            pong: true,
            data: connect_data,
            session: self
                .stream()
                .map_or_else(String::new, |ids| ids.session.clone()),
            node: self
                .stream()
                .map_or_else(String::new, |ids| ids.node.clone()),
        }))
    }

    /// Pushes for this client, from the outbox.
    pub(crate) async fn on_deliveries(
        &mut self,
        shared: &Shared,
        batch: Vec<Delivery>,
        deflate: bool,
        out: &mut Vec<Out>,
    ) {
        let Some(connected) = self.connected.as_mut() else {
            return;
        };
        let extra = self.extra.as_deref();
        let stream = extra.is_some_and(|extra| extra.stream.is_some());
        let format = self.format;
        let outbox = &self.outbox;
        for delivery in batch {
            match delivery {
                Delivery::Publication(publication) => {
                    out.extend(publication_out(
                        connected,
                        publication,
                        None,
                        format,
                        stream,
                        deflate,
                    ));
                }
                Delivery::Chained {
                    publication,
                    previous,
                    chain,
                } => {
                    out.extend(publication_out(
                        connected,
                        publication,
                        Some((previous, chain)),
                        format,
                        stream,
                        deflate,
                    ));
                }
                Delivery::Join(membership) | Delivery::Leave(membership)
                    if !connected
                        .channels
                        .get(&membership.channel)
                        .is_some_and(|state| state.join_leave) => {}
                Delivery::Join(membership) => {
                    out.push(membership_out(&membership, true, format, stream, deflate))
                }
                Delivery::Leave(membership) => {
                    out.push(membership_out(&membership, false, format, stream, deflate))
                }
                Delivery::Control(Control::Disconnect { code, reason }) => {
                    out.push(Out::Close(code, reason.to_string()));
                    return;
                }
                Delivery::Control(Control::Unsubscribe {
                    channel,
                    code,
                    reason,
                }) => {
                    if connected.channels.remove(&channel).is_some() {
                        shared.node.unsubscribe(&channel, &connected.info).await;
                        let body = PushBody::Unsubscribe(proto::Unsubscribe {
                            code: u32::from(code),
                            reason: reason.to_string(),
                        });
                        out.push(push_out(format, &channel, &body));
                    }
                }
                Delivery::Control(Control::Resync { channel }) => {
                    // Unsubscribe with 2500 "insufficient state": the client resubscribes with
                    // its position and learns from `recovered` whether anything was lost (or
                    // that the stream began again).
                    if connected.channels.remove(&channel).is_some() {
                        shared.node.unsubscribe(&channel, &connected.info).await;
                        let body =
                            PushBody::Unsubscribe(proto::UnsubscribeCode::InsufficientState.into());
                        out.push(push_out(format, &channel, &body));
                    }
                }
                Delivery::Control(Control::Subscribe { channel }) => {
                    if connected.channels.contains_key(&channel) {
                        continue;
                    }
                    let peer = Peer {
                        outbox,
                        format,
                        extra,
                    };
                    if let Ok(result) =
                        subscribe(shared, connected, peer, &channel, None, None, false, None).await
                    {
                        let body = PushBody::Subscribe(proto::Subscribe {
                            recoverable: result.recoverable,
                            epoch: result.epoch,
                            offset: result.offset,
                            positioned: result.positioned,
                            data: None,
                        });
                        out.push(push_out(format, &channel, &body));
                    }
                }
                Delivery::Control(Control::Refresh { expire_at, info }) => {
                    if expire_at > 0 && expire_at <= now_unix() {
                        // Already past: closed now, not offered to the refresh proxy.
                        close(out, DisconnectCode::Expired);
                        return;
                    }
                    // The transport sets its timer from `deadline()` after this batch. A client
                    // that refreshes its own token later takes that token's expiry again (as
                    // with Centrifugo's server-side refresh of a bidirectional connection).
                    connected.expires_at = ExpiresAt::new((expire_at > 0).then_some(expire_at));
                    if let Some(info) = info {
                        // Shared with the hub: later publications, joins and leaves show it;
                        // presence is told now.
                        connected.info.set_conn_info(Some(info));
                        for (channel, state) in connected.channels.iter() {
                            let chan_info = state.extra.as_ref().and_then(|e| e.chan_info.clone());
                            shared
                                .node
                                .refresh_presence(channel, &connected.info, chan_info)
                                .await;
                        }
                    }
                }
                Delivery::Control(Control::Reply(message)) => {
                    out.push(Out::Message(encode::message_kind(format), message));
                }
                // A finished WebSocket frame means nothing on a stream transport.
                Delivery::Control(Control::Frame(_) | Control::Rest(_)) if stream => {}
                // (A WebSocket connection takes a `Rest` before the session sees the batch.)
                Delivery::Control(Control::Frame(frame) | Control::Rest(frame)) => {
                    out.push(Out::Frame(frame))
                }
                // The WebSocket connection handles its heartbeats before the session sees them;
                // stream transports keep their own.
                Delivery::Control(
                    Control::Heartbeat | Control::HeartbeatTimeout | Control::Shutdown,
                ) => {}
            }
        }
    }

    /// Leaves every channel and the hub.
    pub(crate) async fn finish(&mut self, shared: &Shared) {
        self.outbox.close();
        if let Some(connected) = self.connected.take() {
            if let Some(rpc) = &connected.rpc {
                // Calls still waiting for the backend are of no use to anyone now.
                rpc.gone.cancel();
            }
            for channel in connected.channels.keys() {
                shared.node.unsubscribe(channel, &connected.info).await;
            }
            shared.node.hub().unregister(connected.info.id);
        }
    }
}

/// A `join` or `leave` push: a shared WebSocket frame, or a shared message on a stream
/// transport.
fn membership_out(
    membership: &plexus_core::Membership,
    joined: bool,
    format: Format,
    stream: bool,
    deflate: bool,
) -> Out {
    if stream {
        Out::Message(
            encode::message_kind(format),
            encode::membership_message(membership, joined, format),
        )
    } else {
        Out::Frame(encode::membership_frame(membership, joined, format, deflate).clone())
    }
}

/// A push of this client's own (not shared with other subscribers).
fn push_out(format: Format, channel: &str, body: &PushBody) -> Out {
    Out::Message(
        encode::message_kind(format),
        format.encode_push(channel, body).into(),
    )
}

fn flush(out: &mut Vec<Out>, format: Format, replies: &mut Vec<Vec<u8>>) {
    if !replies.is_empty() {
        out.push(Out::Message(
            encode::message_kind(format),
            format.join_batch(replies.drain(..)).into(),
        ));
    }
}

fn close(out: &mut Vec<Out>, code: DisconnectCode) {
    out.push(Out::Close(code.close_code(), code.reason().to_owned()));
}

fn channel_error(error: &ChannelError) -> ErrorCode {
    match error {
        ChannelError::UnknownNamespace(_) => ErrorCode::UnknownChannel,
        ChannelError::Empty | ChannelError::TooLong => ErrorCode::BadRequest,
    }
}

async fn subscribe_command(
    shared: &Shared,
    connected: &mut Connected,
    peer: Peer<'_>,
    request: proto::SubscribeRequest,
) -> Outcome {
    let channel = request.channel.as_str();
    let options = match shared.node.options(channel) {
        Ok(options) => options,
        Err(error) => return channel_error(&error).into(),
    };
    if connected.channels.contains_key(channel) {
        return ErrorCode::AlreadySubscribed.into();
    }
    let user = &*connected.info.user;
    // A guest counts as anonymous for every permission (and owns no user-limited channel).
    let anonymous = user.is_empty() || connected.guest;
    if !user_may_subscribe(channel, if connected.guest { "" } else { user }) {
        return ErrorCode::PermissionDenied.into();
    }
    let mut chan_info = None;
    let mut expires_at = None;
    let mut subscribe_data = None;
    // As for connections: an expiry from the backend is the server's to enforce (2501, and the
    // SDK subscribes again through the backend).
    let mut told_expiry = true;
    let proxy = shared
        .proxies
        .subscribe
        .as_ref()
        .filter(|_| options.proxy_subscribe && request.token.is_empty());
    if let Some(proxy) = proxy {
        // No token: the application's backend decides.
        let info = &connected.info;
        let answer = proxy
            .subscribe(
                peer.caller(&info.client),
                backend_user(connected),
                channel,
                request.data.as_ref(),
                peer.headers(),
            )
            .await;
        match refused(answer, "subscribe") {
            Ok(subscribed) if subscribed.expires_at.is_some_and(|at| at <= now_unix()) => {
                return ErrorCode::Expired.into();
            }
            Ok(subscribed) => {
                told_expiry = false;
                chan_info = subscribed.info;
                expires_at = subscribed.expires_at;
                subscribe_data = subscribed.data;
            }
            Err(refusal) => return refusal.into(),
        }
    } else if !request.token.is_empty() {
        let Some(verifier) = &shared.verifier else {
            return ErrorCode::PermissionDenied.into();
        };
        match crate::jwks::verify_subscription(shared, verifier, &request.token, now_unix()).await {
            Ok(claims) => {
                if check_subscription(&claims, user, channel).is_err() {
                    return ErrorCode::PermissionDenied.into();
                }
                expires_at = claims.subscription_expires_at();
                chan_info = claims.info;
            }
            Err(TokenError::Expired) => return ErrorCode::TokenExpired.into(),
            Err(_) => return ErrorCode::PermissionDenied.into(),
        }
    } else if options.private || (anonymous && !options.allow_subscribe_for_anonymous) {
        // Private channels need a subscription token; anonymous users need the namespace's
        // permission.
        return ErrorCode::PermissionDenied.into();
    }
    // A tags filter where the namespace allows one, well formed, and not with deltas (as in
    // Centrifugo: both save bandwidth, and a delta chain cannot skip publications). Checked
    // once the client may subscribe at all, so a refusal says why first.
    let filter = match request.tf {
        None => None,
        Some(filter) => {
            if !options.allow_tags_filter || !request.delta.is_empty() {
                return ErrorCode::BadRequest.into();
            }
            if let Err(error) = filter.validate() {
                tracing::debug!(%error, channel, "tags filter refused");
                return ErrorCode::BadRequest.into();
            }
            Some(Arc::from(filter))
        }
    };
    let recover = (request.recover && options.recover).then(|| StreamPosition {
        offset: request.offset,
        epoch: request.epoch.as_str().into(),
    });
    // Delta compression, when the client asks for a kind the namespace allows; otherwise the
    // reply's `delta: false` tells the client it gets whole publications.
    let delta = request.delta == "fossil" && options.gives_fossil_deltas();
    let extra = (delta || filter.is_some()).then(|| {
        Box::new(SubscriptionExtra {
            delta,
            delta_base: None,
            chain: if delta { next_chain() } else { 0 },
            filter,
            chan_info: None,
        })
    });
    match subscribe(
        shared,
        connected,
        peer,
        channel,
        chan_info,
        recover,
        request.join_leave,
        extra,
    )
    .await
    {
        Ok(result)
            if result.was_recovering
                && !result.recovered
                && !(result.offset == 0 && result.epoch == request.epoch)
                && request.flag & proto::SubscribeRequest::REJECT_UNRECOVERED != 0 =>
        {
            // Asked to fail rather than go on with a gap: undone, and 112. (A stream still
            // empty in the client's epoch has nothing to miss: cache mode answers it
            // `recovered: false`, which must not send the SDK back to its state for ever.)
            connected.channels.remove(channel);
            shared.node.unsubscribe(channel, &connected.info).await;
            ErrorCode::UnrecoverablePosition.into()
        }
        Ok(mut result) => {
            result.data = subscribe_data;
            if let Some(at) = expires_at {
                let ends_at = if told_expiry {
                    after_grace(at, shared.config.expired_sub_close_delay)
                } else {
                    at
                };
                if let Some(state) = connected.channels.get_mut(channel) {
                    state.expires_at = ExpiresAt::new(Some(ends_at));
                }
                if told_expiry {
                    result.expires = true;
                    result.ttl = ttl(at);
                }
            }
            Outcome::Reply(ReplyBody::Subscribe(result))
        }
        Err(code) => code.into(),
    }
}

/// A live publication for this client, if it has not got it yet. `chained`: the hub's
/// [`Delivery::Chained`], the publication it delivered before this one and the chain's id.
/// (Should the channel's offsets go back, its stream began again: the hub sends
/// [`Control::Resync`] first.)
fn publication_out(
    connected: &mut Connected,
    publication: Arc<Publication>,
    chained: Option<(Option<Arc<Publication>>, u64)>,
    format: Format,
    stream: bool,
    deflate: bool,
) -> Option<Out> {
    let state = connected.channels.get_mut(&publication.channel)?;
    let was_settled = state.settled;
    if publication.offset > 0 {
        if publication.offset <= state.last_offset {
            return None; // already in the subscribe reply
        }
        state.last_offset = publication.offset;
        state.settled = true;
    }
    let Some(extra) = state.extra.as_deref_mut() else {
        return Some(whole_out(&publication, format, stream, deflate));
    };
    // The hub applied the filter; this one may have been queued for an earlier subscription
    // to the channel, without it.
    if !extra.passes(&publication) {
        return None;
    }
    if !extra.delta {
        return Some(whole_out(&publication, format, stream, deflate));
    }
    // Until settled, the hub's chain may hold publications this client was not sent (those in
    // its subscribe reply, dropped above): the session's own base is the client's. Once
    // settled, each publication of this subscription's chain comes with the one before it,
    // which the client got, from the session or from the flush lane. (One of another chain
    // was queued for an earlier subscription to the channel.)
    let base = match chained {
        Some((previous, chain)) if was_settled && chain == extra.chain => {
            extra.delta_base = None;
            previous
        }
        _ => extra.delta_base.replace(publication.clone()),
    };
    let push = encode::delta_publication(&publication, base.as_deref(), format, !stream, deflate);
    Some(if stream {
        Out::Message(encode::message_kind(format), push)
    } else {
        Out::Frame(push)
    })
}

/// A publication as every subscriber without deltas gets it.
fn whole_out(publication: &Publication, format: Format, stream: bool, deflate: bool) -> Out {
    if stream {
        Out::Message(
            encode::message_kind(format),
            encode::publication_message(publication, format),
        )
    } else {
        Out::Frame(encode::publication_frame(publication, format, deflate).clone())
    }
}

/// Subscribes and builds the protocol result; shared by client- and server-side subscriptions.
#[allow(clippy::too_many_arguments)]
async fn subscribe(
    shared: &Shared,
    connected: &mut Connected,
    peer: Peer<'_>,
    channel: &str,
    chan_info: Option<Bytes>,
    recover: Option<StreamPosition>,
    asked_for_join_leave: bool,
    mut extra: Option<Box<SubscriptionExtra>>,
) -> Result<proto::SubscribeResult, ErrorCode> {
    let options = shared.node.options(channel).ok();
    let join_leave =
        asked_for_join_leave || options.is_some_and(|options| options.force_push_join_leave);
    let subscriber = Subscriber {
        info: connected.info.clone(),
        outbox: peer.outbox.clone(),
        join_leave,
    };
    let recovering_from = recover.clone();
    if chan_info.is_some() {
        extra.get_or_insert_with(Box::default).chan_info = chan_info.clone();
    }
    let tailored = extra.as_deref().and_then(SubscriptionExtra::tailored);
    let subscription: Subscription = match shared
        .node
        .subscribe_tailored(channel, subscriber, tailored, chan_info, recover)
        .await
    {
        Ok(subscription) => subscription,
        Err(SubscribeError::Channel(error)) => return Err(channel_error(&error)),
        Err(SubscribeError::Hub(plexus_core::HubError::AlreadySubscribed(_))) => {
            return Err(ErrorCode::AlreadySubscribed)
        }
        Err(SubscribeError::Hub(plexus_core::HubError::TooManySubscribers(_))) => {
            return Err(ErrorCode::LimitExceeded)
        }
        Err(SubscribeError::Engine(error)) => {
            tracing::warn!(%error, channel, "subscribe failed in the engine");
            return Err(ErrorCode::Internal);
        }
    };
    let last_offset = subscription
        .publications
        .iter()
        .map(|p| p.offset)
        .chain(subscription.position.as_ref().map(|p| p.offset))
        .max()
        .unwrap_or(0);
    // What the reply carries: with a tags filter, only what passes it.
    let mut publications: Vec<Arc<Publication>> = subscription
        .publications
        .iter()
        .filter(|p| extra.as_ref().is_none_or(|extra| extra.passes(p)))
        .cloned()
        .collect();
    // Recovering the latest only (cache mode) through a filter: the latest that passes, which
    // may be older than the channel's latest.
    let latest_only = options.is_some_and(|options| options.recovers_latest_only());
    if let (Some(extra), Some(from)) = (extra.as_deref(), recovering_from.as_ref()) {
        if extra.filter.is_some()
            && latest_only
            && subscription.recovered
            && publications.is_empty()
        {
            publications.extend(latest_passing(shared, channel, from, extra).await);
        }
    }
    let delta = extra.as_ref().is_some_and(|extra| extra.delta);
    if let Some(extra) = extra.as_mut().filter(|extra| extra.delta) {
        // The client rebuilds the next delta from the last publication of this reply; without
        // one, the next publication goes whole.
        extra.delta_base = publications.last().cloned();
    }
    connected.channels.insert(
        subscription.channel.clone(),
        ChannelState {
            last_offset,
            settled: last_offset == 0,
            join_leave,
            expires_at: ExpiresAt::default(),
            extra,
        },
    );
    let positioned = subscription.position.is_some();
    let (epoch, offset) = subscription
        .position
        .map_or((String::new(), 0), |p| (p.epoch.to_string(), p.offset));
    Ok(proto::SubscribeResult {
        recoverable: positioned,
        positioned,
        epoch,
        offset,
        was_recovering: subscription.was_recovering,
        recovered: subscription.recovered,
        // With deltas, the first whole and each next one a delta from the one before.
        publications: publications
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if delta {
                    let before = i.checked_sub(1).map(|i| &*publications[i]);
                    encode::delta_or_whole(peer.format, p, before)
                } else {
                    encode::publication(peer.format, p)
                }
            })
            .collect(),
        delta,
        ..proto::SubscribeResult::default()
    })
}

/// The newest retained publication of `channel` after the client's position `from` that passes
/// `extra`'s filter, if any.
async fn latest_passing(
    shared: &Shared,
    channel: &str,
    from: &StreamPosition,
    extra: &SubscriptionExtra,
) -> Option<Arc<Publication>> {
    let query = HistoryQuery {
        since: None,
        limit: None,
        reverse: true,
    };
    let page = shared.node.history(channel, query).await.ok()?;
    let same_epoch = *page.top.epoch == *from.epoch;
    page.publications
        .into_iter()
        .take_while(|p| !same_epoch || p.offset > from.offset)
        .find(|p| extra.passes(p))
}

/// How many `rpc` commands of one connection may wait for the backend at once; more get
/// error 111 (too many requests).
const MAX_RPC_IN_FLIGHT: u32 = 32;

/// An `rpc` command, answered by the application's backend (see [`crate::proxy`]) in a task of
/// its own: the connection goes on meanwhile, and the reply comes through the outbox.
fn rpc_command(
    shared: &Shared,
    connected: &mut Connected,
    peer: Peer<'_>,
    id: u32,
    request: proto::RpcRequest,
) -> Outcome {
    let Some(proxy) = shared.proxies.rpc.clone() else {
        return ErrorCode::NotAvailable.into();
    };
    let calls = connected.rpc.get_or_insert_with(Default::default).clone();
    if calls.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_RPC_IN_FLIGHT {
        calls.in_flight.fetch_sub(1, Ordering::Relaxed);
        return ErrorCode::TooManyRequests.into();
    }
    let (client, user) = (
        connected.info.client.clone(),
        Arc::<str>::from(backend_user(connected)),
    );
    let (outbox, format) = (peer.outbox.clone(), peer.format);
    let transport = Extra::transport(peer.extra);
    let headers = peer.headers().to_vec();
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        let caller = Caller {
            client: &client,
            transport,
            protocol: format.name(),
        };
        let call = proxy.rpc(
            caller,
            &user,
            &request.method,
            request.data.as_ref(),
            &headers,
        );
        let answer = tokio::select! {
            answer = call => Some(answer),
            () = calls.gone.cancelled() => None,
            () = shutdown.cancelled() => None,
        };
        calls.in_flight.fetch_sub(1, Ordering::Relaxed);
        let reply = match answer {
            None => return,
            Some(Ok(Answer::Result(data))) => {
                Reply::result(id, ReplyBody::Rpc(proto::RpcResult { data }))
            }
            Some(Ok(Answer::Error(error))) => Reply::error(id, error),
            Some(Ok(Answer::Disconnect { code, reason })) => {
                outbox.push_control(Control::Disconnect {
                    code,
                    reason: reason.into(),
                });
                return;
            }
            Some(Err(error)) => {
                tracing::warn!(%error, method = %request.method, "rpc proxy");
                Reply::error(id, ErrorCode::Internal)
            }
        };
        // A connection gone meanwhile refuses it: nothing to do.
        outbox.push_control(Control::Reply(format.encode_reply(&reply).into()));
    });
    Outcome::NoReply
}

/// The user a backend is told of: none for a guest of the built-in pages (a name without an
/// account, with an anonymous connection's rights).
fn backend_user(connected: &Connected) -> &str {
    if connected.guest {
        ""
    } else {
        &connected.info.user
    }
}

/// A backend's "no": its error, or a disconnect; a backend that failed is an internal error.
enum Refusal {
    Failed(proto::Error),
    Close(u16, String),
    Internal,
}

impl From<Refusal> for Outcome {
    fn from(refusal: Refusal) -> Outcome {
        match refusal {
            Refusal::Failed(error) => Outcome::Failed(error),
            Refusal::Close(code, reason) => Outcome::Close(code, reason),
            Refusal::Internal => ErrorCode::Internal.into(),
        }
    }
}

/// The backend's result, or its refusal.
fn refused<T>(
    answer: Result<Answer<T>, crate::proxy::ProxyError>,
    what: &str,
) -> Result<T, Refusal> {
    match answer {
        Ok(Answer::Result(result)) => Ok(result),
        Ok(Answer::Error(error)) => Err(Refusal::Failed(error)),
        Ok(Answer::Disconnect { code, reason }) => Err(Refusal::Close(code, reason)),
        Err(error) => {
            tracing::warn!(%error, "{what} proxy");
            Err(Refusal::Internal)
        }
    }
}

async fn publish_command(
    shared: &Shared,
    connected: &Connected,
    peer: Peer<'_>,
    request: proto::PublishRequest,
) -> Outcome {
    let options = match shared.node.options(&request.channel) {
        Ok(options) => options,
        Err(error) => return channel_error(&error).into(),
    };
    let proxy = shared
        .proxies
        .publish
        .as_ref()
        .filter(|_| options.proxy_publish);
    if proxy.is_none() && !options.allow_publish_for_client {
        return ErrorCode::PermissionDenied.into();
    }
    let Some(mut data) = request.data else {
        return ErrorCode::BadRequest.into();
    };
    let mut skip_history = false;
    if let Some(proxy) = proxy {
        let info = &connected.info;
        let answer = proxy
            .publish(
                peer.caller(&info.client),
                backend_user(connected),
                &request.channel,
                &data,
                peer.headers(),
            )
            .await;
        match refused(answer, "publish") {
            Ok(published) => {
                data = published.data.unwrap_or(data);
                skip_history = published.skip_history;
            }
            Err(refusal) => return refusal.into(),
        }
    }
    let publication = Publication::new(
        request.channel.as_str().into(),
        encode::published_kind(data.as_bytes()),
        data.into_bytes(),
        Some(connected.info.descriptor(None)),
    );
    let acknowledgement = if skip_history && options.has_history() {
        // What `Node::publish` does, without the retention (as the API's `skip_history`).
        shared.node.engine().publish(publication, None)
    } else {
        match shared.node.publish(publication) {
            Ok(acknowledgement) => acknowledgement,
            Err(error) => return channel_error(&error).into(),
        }
    };
    shared.metrics.publications.inc();
    match acknowledgement.await {
        Ok(_) => Outcome::Reply(ReplyBody::Publish(proto::PublishResult {})),
        Err(error) => {
            tracing::warn!(%error, "publish failed in the engine");
            ErrorCode::Internal.into()
        }
    }
}

async fn presence_command(
    shared: &Shared,
    connected: &Connected,
    format: Format,
    channel: &str,
    stats: bool,
) -> Outcome {
    let options = match shared.node.options(channel) {
        Ok(options) => options,
        Err(error) => return channel_error(&error).into(),
    };
    if !options.presence {
        return ErrorCode::NotAvailable.into();
    }
    if !connected.channels.contains_key(channel) {
        return ErrorCode::PermissionDenied.into();
    }
    let clients = match shared.node.presence(channel).await {
        Ok(clients) => clients,
        Err(_) => return ErrorCode::Internal.into(),
    };
    if stats {
        let users: std::collections::HashSet<&str> = clients.iter().map(|c| &*c.user).collect();
        return Outcome::Reply(ReplyBody::PresenceStats(proto::PresenceStatsResult {
            num_clients: clients.len() as u32,
            num_users: users.len() as u32,
        }));
    }
    Outcome::Reply(ReplyBody::Presence(proto::PresenceResult {
        presence: clients
            .iter()
            .map(|client| {
                (
                    client.client.to_string(),
                    encode::client_info(format, client),
                )
            })
            .collect(),
    }))
}

async fn history_command(
    shared: &Shared,
    format: Format,
    request: proto::HistoryRequest,
) -> Outcome {
    let options = match shared.node.options(&request.channel) {
        Ok(options) => options,
        Err(error) => return channel_error(&error).into(),
    };
    if !options.has_history() {
        return ErrorCode::NotAvailable.into();
    }
    if !options.allow_history_for_client {
        return ErrorCode::PermissionDenied.into();
    }
    match history(
        shared,
        format,
        &request.channel,
        request.limit,
        request.since.as_ref(),
        request.reverse,
    )
    .await
    {
        Ok(result) => Outcome::Reply(ReplyBody::History(result)),
        Err(code) => code.into(),
    }
}

/// Reads history as the protocol and the server API describe it: `limit` 0 returns only the
/// stream position, a negative limit everything retained; a `since` from another epoch is
/// error 112.
pub(crate) async fn history(
    shared: &Shared,
    format: Format,
    channel: &str,
    limit: i32,
    since: Option<&proto::StreamPosition>,
    reverse: bool,
) -> Result<proto::HistoryResult, ErrorCode> {
    let query = HistoryQuery {
        since: since.map(|since| since.offset),
        limit: usize::try_from(limit).ok(),
        reverse,
    };
    let page = match shared.node.history(channel, query).await {
        Ok(page) => page,
        Err(plexus_core::PublishError::Channel(error)) => return Err(channel_error(&error)),
        Err(plexus_core::PublishError::Engine(error)) => {
            tracing::warn!(%error, channel, "history failed in the engine");
            return Err(ErrorCode::Internal);
        }
    };
    if since.is_some_and(|since| *since.epoch != *page.top.epoch) {
        return Err(ErrorCode::UnrecoverablePosition);
    }
    Ok(proto::HistoryResult {
        publications: page
            .publications
            .iter()
            .map(|p| encode::publication(format, p))
            .collect(),
        epoch: page.top.epoch.to_string(),
        offset: page.top.offset,
    })
}

async fn refresh_command(shared: &Shared, connected: &mut Connected, token: &str) -> Outcome {
    let Some(verifier) = &shared.verifier else {
        return Outcome::Disconnect(DisconnectCode::InvalidToken);
    };
    match crate::jwks::verify_connection(shared, verifier, token, now_unix()).await {
        Ok(claims) if claims.sub == *connected.info.user => {
            let expires_at = claims.connection_expires_at();
            let delay = shared.config.expired_close_delay;
            connected.expires_at = ExpiresAt::new(expires_at.map(|at| after_grace(at, delay)));
            Outcome::Reply(ReplyBody::Refresh(proto::RefreshResult {
                client: connected.info.client.to_string(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                expires: expires_at.is_some(),
                ttl: expires_at.map_or(0, ttl),
            }))
        }
        Err(TokenError::Expired) => ErrorCode::TokenExpired.into(),
        Ok(_) | Err(_) => Outcome::Disconnect(DisconnectCode::InvalidToken),
    }
}

async fn sub_refresh_command(
    shared: &Shared,
    connected: &mut Connected,
    request: proto::SubRefreshRequest,
) -> Outcome {
    if !connected.channels.contains_key(request.channel.as_str()) {
        return ErrorCode::PermissionDenied.into();
    }
    let Some(verifier) = &shared.verifier else {
        return ErrorCode::PermissionDenied.into();
    };
    match crate::jwks::verify_subscription(shared, verifier, &request.token, now_unix()).await {
        Ok(claims)
            if check_subscription(&claims, &connected.info.user, &request.channel).is_ok() =>
        {
            let expires_at = claims.subscription_expires_at();
            let delay = shared.config.expired_sub_close_delay;
            if let Some(state) = connected.channels.get_mut(request.channel.as_str()) {
                state.expires_at = ExpiresAt::new(expires_at.map(|at| after_grace(at, delay)));
            }
            Outcome::Reply(ReplyBody::SubRefresh(proto::SubRefreshResult {
                expires: expires_at.is_some(),
                ttl: expires_at.map_or(0, ttl),
            }))
        }
        Err(TokenError::Expired) => ErrorCode::TokenExpired.into(),
        Ok(_) | Err(_) => ErrorCode::PermissionDenied.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(last_offset: u64) -> ChannelState {
        ChannelState {
            last_offset,
            settled: true,
            join_leave: false,
            expires_at: ExpiresAt::default(),
            extra: None,
        }
    }

    #[test]
    fn channel_map_finds_replaces_and_removes_by_name() {
        let mut channels = ChannelMap::default();
        for (i, name) in ["news", "chat:b", "chat:a", "z", "a:1", "m"]
            .iter()
            .enumerate()
        {
            channels.insert((*name).into(), state(i as u64));
        }
        let names: Vec<&str> = channels.keys().map(|name| &**name).collect();
        assert_eq!(names, ["a:1", "chat:a", "chat:b", "m", "news", "z"]);
        assert_eq!(channels.get("chat:a").map(|s| s.last_offset), Some(2));
        assert!(channels.get("chat").is_none());
        channels.get_mut("z").unwrap().last_offset = 40;
        channels.insert("news".into(), state(7)); // replaces
        assert_eq!(channels.values().count(), 6);
        assert_eq!(channels.get("news").map(|s| s.last_offset), Some(7));
        assert_eq!(channels.remove("z").map(|s| s.last_offset), Some(40));
        assert!(channels.remove("z").is_none());
        assert!(!channels.contains_key("z") && channels.contains_key("m"));
        for name in ["a:1", "chat:a", "chat:b", "m", "news"] {
            assert!(channels.remove(name).is_some());
        }
        assert_eq!(channels.iter().count(), 0);
        assert_eq!(channels.0.capacity(), 0, "an empty map holds no allocation");
    }

    #[test]
    fn one_channel_is_one_small_allocation() {
        let mut channels = ChannelMap::default();
        channels.insert("chat:idle".into(), state(0));
        assert_eq!(channels.0.capacity(), 1);
        // 48 bytes: jemalloc's size class for anything from 33 to 48.
        assert_eq!(std::mem::size_of::<(Arc<str>, ChannelState)>(), 48);
        assert!(std::mem::size_of::<ClientSession>() <= 96);
    }

    #[test]
    fn short_deadlines() {
        let soon = ShortDeadline::after(Duration::from_millis(200));
        assert!(!soon.passed());
        let left = soon.instant() - Instant::now();
        assert!(left > Duration::from_millis(100) && left <= Duration::from_millis(200));
        let at = soon.instant();
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(soon.instant(), at, "the same instant at every call");
        let past = ShortDeadline((ShortDeadline::clock().1 as u32).wrapping_sub(5));
        assert!(past.passed());
        assert!(past.instant() <= Instant::now());
        // Across the clock's wrap: still ahead.
        let wrapped = ShortDeadline((ShortDeadline::clock().1 as u32).wrapping_add(u32::MAX / 4));
        assert!(!wrapped.passed());
    }

    #[test]
    fn expiry_in_eight_bytes() {
        assert_eq!(std::mem::size_of::<ExpiresAt>(), 8);
        assert_eq!(ExpiresAt::new(None).get(), None);
        assert_eq!(
            ExpiresAt::new(Some(1_700_000_000)).get(),
            Some(1_700_000_000)
        );
        // 0 is long past; so is 1.
        assert_eq!(ExpiresAt::new(Some(0)).get(), Some(1));
    }
}
