//! One function per API method: a request in, a result or an [`ErrorCode`] out.
//!
//! Requests ignore fields they do not know (as Centrifugo's do), so `session`, `info`… are
//! accepted and have no effect.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use plexus_core::idempotency::{self, Failure, OnceError, MAX_KEY_LEN};
use plexus_core::{
    BoxFuture, ChannelError, ChannelOptions, Control, EngineError, MessageKind, NodeCommand,
    Publication, StreamPosition, Tags,
};
use plexus_protocol::client::{
    self as proto, null_default, DisconnectCode, ErrorCode, Format, RawJson, UnsubscribeCode,
};
use serde::{Deserialize, Serialize};

use super::{required, Validate};
use crate::native::{encode, session};
use crate::Shared;

/// `{}`: the result of methods that only act.
#[derive(Debug, Serialize)]
pub(super) struct Empty {}

fn channel_error(error: ChannelError) -> ErrorCode {
    match error {
        ChannelError::UnknownNamespace(_) => ErrorCode::UnknownChannel,
        ChannelError::Empty | ChannelError::TooLong => ErrorCode::BadRequest,
    }
}

fn options<'a>(shared: &'a Shared, channel: &str) -> Result<&'a ChannelOptions, ErrorCode> {
    shared.node.options(channel).map_err(channel_error)
}

fn engine_error(error: &EngineError, what: &str) -> ErrorCode {
    tracing::warn!(%error, "API {what} failed in the engine");
    ErrorCode::Internal
}

// ---- publish, broadcast ----

/// What an API publish carries: `data`, any JSON value, published as its text (raw subscribers
/// receive exactly this text); or `b64data`, any bytes in standard base64 (Protobuf clients get
/// them as they are, JSON clients as that base64 in a string unless they are JSON text).
/// (Fields of the request itself: serde cannot flatten a raw JSON value.)
struct Data<'a> {
    data: &'a Option<RawJson>,
    b64data: &'a Option<String>,
}

impl Data<'_> {
    fn check(&self) -> Result<(), String> {
        match (self.data, self.b64data) {
            (Some(_), Some(_)) => Err("data and b64data: one of them, not both".into()),
            (None, None) => Err("data or b64data required".into()),
            (None, Some(b64)) => BASE64
                .decode(b64)
                .map(|_| ())
                .map_err(|error| format!("b64data is not base64: {error}")),
            (Some(_), None) => Ok(()),
        }
    }

    /// The bytes to publish and how raw clients get them: text when UTF-8, else binary.
    fn bytes(&self) -> (MessageKind, Bytes) {
        let bytes = match (self.data, self.b64data) {
            (Some(data), _) => Bytes::copy_from_slice(data.as_bytes()),
            (None, Some(b64)) => Bytes::from(BASE64.decode(b64).unwrap_or_default()),
            (None, None) => Bytes::new(),
        };
        (encode::published_kind(&bytes), bytes)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct PublishRequest {
    channel: String,
    data: Option<RawJson>,
    b64data: Option<String>,
    /// Deliver without keeping it in history (no offset).
    #[serde(default)]
    skip_history: bool,
    /// String metadata delivered (and kept) with the publication.
    #[serde(default, deserialize_with = "null_default")]
    tags: Tags,
    /// A retry with the same key within the window gets the first publish's result and
    /// publishes nothing.
    #[serde(default, deserialize_with = "null_default")]
    idempotency_key: String,
}

/// An idempotency key is short: engines keep it in their keys and subjects.
fn check_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "idempotency_key is longer than {MAX_KEY_LEN} bytes"
        ));
    }
    Ok(())
}

impl Validate for PublishRequest {
    fn validate(&self) -> Result<(), String> {
        required("channel", &self.channel)?;
        check_key(&self.idempotency_key)?;
        self.data().check()
    }
}

impl PublishRequest {
    fn data(&self) -> Data<'_> {
        Data {
            data: &self.data,
            b64data: &self.b64data,
        }
    }
}

/// Where a publication landed; both left out when the channel keeps no history.
#[derive(Debug, Serialize)]
pub(super) struct PublishResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
}

type Acknowledgement = BoxFuture<Result<Option<StreamPosition>, EngineError>>;

/// Orders a publication now (so several keep their order) and returns its acknowledgement.
fn start_publish(
    shared: &Shared,
    channel: &str,
    (kind, data): &(MessageKind, Bytes),
    tags: &Tags,
    skip_history: bool,
) -> Result<Acknowledgement, ErrorCode> {
    let options = options(shared, channel)?;
    let publication =
        Publication::new(channel.into(), *kind, data.clone(), None).with_tags(tags.clone());
    let acknowledgement = if skip_history && options.has_history() {
        // What `Node::publish` does, without the retention.
        shared.node.engine().publish(publication, None)
    } else {
        shared.node.publish(publication).map_err(channel_error)?
    };
    shared.metrics.publications.inc();
    Ok(acknowledgement)
}

/// Waits until the engine stored (and delivered) the publication.
async fn finish_publish(acknowledgement: Acknowledgement) -> Result<PublishResult, ErrorCode> {
    let position = acknowledgement
        .await
        .map_err(|error| engine_error(&error, "publish"))?;
    Ok(published(position))
}

fn published(position: Option<StreamPosition>) -> PublishResult {
    PublishResult {
        offset: position.as_ref().map(|p| p.offset),
        epoch: position.map(|p| p.epoch.to_string()),
    }
}

type Once = tokio::task::JoinHandle<Result<PublishResult, ErrorCode>>;

/// Starts publishing unless `key` was used in `channel` within the window (then answers as the
/// first publish did); ordered once the key is claimed. Runs in a task of its own: a client
/// that gives up (closes its request) must not leave the key claimed and never recorded.
fn start_once(
    shared: &Arc<Shared>,
    channel: &str,
    key: &str,
    data: &(MessageKind, Bytes),
    tags: &Tags,
    skip_history: bool,
) -> Result<Once, ErrorCode> {
    options(shared, channel)?;
    let (shared, channel, key) = (shared.clone(), channel.to_owned(), key.to_owned());
    let (data, tags) = (data.clone(), tags.clone());
    let task = tokio::spawn(async move {
        let publish = || async {
            let acknowledgement = start_publish(&shared, &channel, &data, &tags, skip_history)
                .map_err(Failure::Refused)?;
            // Failed once ordered: it may have been published (a timeout, a lost
            // connection, an engine stopping with the publication sent).
            acknowledgement
                .await
                .map_err(|error| Failure::Unknown(engine_error(&error, "publish")))
        };
        let engine = &**shared.node.engine();
        match idempotency::publish_once(engine, &channel, &key, publish).await {
            Ok(position) => Ok(published(position)),
            Err(OnceError::Publish(code)) => Err(code),
            Err(OnceError::Engine(error)) => Err(engine_error(&error, "publish")),
            Err(OnceError::InProgress) => {
                tracing::warn!(%channel, "API publish: its idempotency key's first publish is unfinished or its outcome unknown");
                Err(ErrorCode::Internal)
            }
        }
    });
    Ok(task)
}

async fn finish_once(started: Result<Once, ErrorCode>) -> Result<PublishResult, ErrorCode> {
    started?.await.unwrap_or(Err(ErrorCode::Internal))
}

pub(super) async fn publish(
    shared: &Arc<Shared>,
    request: PublishRequest,
) -> Result<PublishResult, ErrorCode> {
    let data = request.data().bytes();
    let (channel, tags) = (&request.channel, &request.tags);
    if !request.idempotency_key.is_empty() {
        let key = &request.idempotency_key;
        let started = start_once(shared, channel, key, &data, tags, request.skip_history);
        return finish_once(started).await;
    }
    let acknowledgement = start_publish(shared, channel, &data, tags, request.skip_history)?;
    finish_publish(acknowledgement).await
}

#[derive(Debug, Deserialize)]
pub(super) struct BroadcastRequest {
    channels: Vec<String>,
    data: Option<RawJson>,
    b64data: Option<String>,
    #[serde(default)]
    skip_history: bool,
    #[serde(default, deserialize_with = "null_default")]
    tags: Tags,
    /// As publish's, for each channel.
    #[serde(default, deserialize_with = "null_default")]
    idempotency_key: String,
}

impl Validate for BroadcastRequest {
    fn validate(&self) -> Result<(), String> {
        if self.channels.is_empty() {
            return Err("channels required".into());
        }
        check_key(&self.idempotency_key)?;
        self.channels
            .iter()
            .try_for_each(|channel| required("channel", channel))?;
        Data {
            data: &self.data,
            b64data: &self.b64data,
        }
        .check()
    }
}

#[derive(Debug, Serialize)]
pub(super) struct BroadcastResult {
    responses: Vec<super::Reply>,
}

/// Publishes to every channel (all ordered first, then awaited); one response per channel.
pub(super) async fn broadcast(
    shared: &Arc<Shared>,
    request: BroadcastRequest,
) -> Result<BroadcastResult, ErrorCode> {
    let data = Data {
        data: &request.data,
        b64data: &request.b64data,
    }
    .bytes();
    if !request.idempotency_key.is_empty() {
        // Each channel claims the key for itself, all at once.
        let (key, tags) = (&request.idempotency_key, &request.tags);
        let started: Vec<_> = request
            .channels
            .iter()
            .map(|channel| start_once(shared, channel, key, &data, tags, request.skip_history))
            .collect();
        let mut responses = Vec::with_capacity(started.len());
        for once in started {
            responses.push(match finish_once(once).await {
                Ok(result) => super::Reply::result(&result),
                Err(code) => super::Reply::Error(code.into()),
            });
        }
        return Ok(BroadcastResult { responses });
    }
    let started: Vec<_> = request
        .channels
        .iter()
        .map(|channel| start_publish(shared, channel, &data, &request.tags, request.skip_history))
        .collect();
    let mut responses = Vec::with_capacity(started.len());
    for acknowledgement in started {
        let outcome = match acknowledgement {
            Ok(acknowledgement) => finish_publish(acknowledgement).await,
            Err(code) => Err(code),
        };
        responses.push(match outcome {
            Ok(result) => super::Reply::result(&result),
            Err(code) => super::Reply::Error(code.into()),
        });
    }
    Ok(BroadcastResult { responses })
}

// ---- commands for a user's connections ----

#[derive(Debug, Deserialize)]
pub(super) struct UserChannelRequest {
    user: String,
    channel: String,
    /// Only this client (connection) of the user.
    #[serde(default)]
    client: String,
}

impl Validate for UserChannelRequest {
    fn validate(&self) -> Result<(), String> {
        required("user", &self.user)?;
        required("channel", &self.channel)
    }
}

async fn node_command(shared: &Shared, command: NodeCommand) -> Result<Empty, ErrorCode> {
    shared
        .node
        .command(command)
        .await
        .map_err(|error| engine_error(&error, "command"))?;
    Ok(Empty {})
}

/// A control for one client of a user. [`NodeCommand`] subscribe and unsubscribe address all of
/// a user's connections, so a request naming a client reaches that client on this node only.
fn client_control(shared: &Shared, user: &str, client: &str, control: Control) -> Empty {
    for connection in shared.node.hub().connections_of(user, Some(client)) {
        connection.outbox.push_control(control.clone());
    }
    Empty {}
}

pub(super) async fn subscribe(
    shared: &Shared,
    request: UserChannelRequest,
) -> Result<Empty, ErrorCode> {
    options(shared, &request.channel)?;
    let channel: Arc<str> = request.channel.into();
    if !request.client.is_empty() {
        let control = Control::Subscribe { channel };
        return Ok(client_control(
            shared,
            &request.user,
            &request.client,
            control,
        ));
    }
    let user = request.user.into();
    node_command(shared, NodeCommand::Subscribe { user, channel }).await
}

pub(super) async fn unsubscribe(
    shared: &Shared,
    request: UserChannelRequest,
) -> Result<Empty, ErrorCode> {
    options(shared, &request.channel)?;
    let channel: Arc<str> = request.channel.into();
    if !request.client.is_empty() {
        let code = UnsubscribeCode::Server;
        let control = Control::Unsubscribe {
            channel,
            code: code.code() as u16,
            reason: code.reason().into(),
        };
        return Ok(client_control(
            shared,
            &request.user,
            &request.client,
            control,
        ));
    }
    let user = request.user.into();
    node_command(shared, NodeCommand::Unsubscribe { user, channel }).await
}

#[derive(Debug, Deserialize)]
struct DisconnectWith {
    code: u32,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct DisconnectRequest {
    user: String,
    #[serde(default)]
    client: String,
    /// Default: 3503 "force disconnect" (do not reconnect).
    disconnect: Option<DisconnectWith>,
}

/// Longest close reason a WebSocket close frame can carry.
const MAX_REASON: usize = 123;

impl Validate for DisconnectRequest {
    fn validate(&self) -> Result<(), String> {
        required("user", &self.user)?;
        match &self.disconnect {
            Some(with) if !(3000..=4999).contains(&with.code) => {
                Err("disconnect code must be from 3000 to 4999".into())
            }
            Some(with) if with.reason.len() > MAX_REASON => Err(format!(
                "disconnect reason is longer than {MAX_REASON} bytes"
            )),
            _ => Ok(()),
        }
    }
}

fn disconnect_command(user: String, client: String, code: u16, reason: &str) -> NodeCommand {
    NodeCommand::Disconnect {
        user: user.into(),
        client: (!client.is_empty()).then(|| client.into()),
        code,
        reason: reason.into(),
    }
}

pub(super) async fn disconnect(
    shared: &Shared,
    request: DisconnectRequest,
) -> Result<Empty, ErrorCode> {
    let (code, reason) = match &request.disconnect {
        // Checked in `validate`: 3000..=4999 fits a u16.
        Some(with) => (with.code as u16, with.reason.as_str()),
        None => {
            let code = DisconnectCode::ForceNoReconnect;
            (code.close_code(), code.reason())
        }
    };
    let command = disconnect_command(request.user, request.client, code, reason);
    node_command(shared, command).await
}

#[derive(Debug, Deserialize)]
pub(super) struct RefreshRequest {
    user: String,
    #[serde(default)]
    client: String,
    /// The connections expired: they are disconnected with 3005.
    #[serde(default)]
    expired: bool,
    /// When the connections expire from now on (Unix seconds); absent or 0: never.
    #[serde(default)]
    expire_at: u64,
    /// New connection info (any JSON): what presence, joins, leaves and the connections' own
    /// publications show of them from now on.
    #[serde(default)]
    info: Option<RawJson>,
}

impl Validate for RefreshRequest {
    fn validate(&self) -> Result<(), String> {
        required("user", &self.user)
    }
}

/// `expired: true` disconnects with 3005; otherwise the connections of the user (or the one
/// client) on every node expire at `expire_at` (3005 then), or never without it: how a
/// backend extends the sessions of clients that cannot refresh themselves (unidirectional
/// transports, connections from the connect proxy).
pub(super) async fn refresh(shared: &Shared, request: RefreshRequest) -> Result<Empty, ErrorCode> {
    if !request.expired {
        let command = NodeCommand::Refresh {
            user: request.user.into(),
            client: (!request.client.is_empty()).then(|| request.client.into()),
            expire_at: request.expire_at,
            info: request
                .info
                .map(|info| Bytes::copy_from_slice(info.as_bytes())),
        };
        return node_command(shared, command).await;
    }
    let code = DisconnectCode::Expired;
    let command = disconnect_command(
        request.user,
        request.client,
        code.close_code(),
        code.reason(),
    );
    node_command(shared, command).await
}

// ---- presence, history ----

#[derive(Debug, Deserialize)]
pub(super) struct ChannelRequest {
    channel: String,
}

impl Validate for ChannelRequest {
    fn validate(&self) -> Result<(), String> {
        required("channel", &self.channel)
    }
}

#[derive(Debug, Serialize)]
pub(super) struct PresenceResult {
    presence: BTreeMap<String, proto::ClientInfo>,
}

#[derive(Debug, Serialize)]
pub(super) struct PresenceStatsResult {
    num_clients: u32,
    num_users: u32,
}

async fn presence_of(
    shared: &Shared,
    channel: &str,
) -> Result<Vec<Arc<plexus_core::ClientDescriptor>>, ErrorCode> {
    if !options(shared, channel)?.presence {
        return Err(ErrorCode::NotAvailable);
    }
    match shared.node.presence(channel).await {
        Ok(clients) => Ok(clients),
        Err(plexus_core::PublishError::Channel(error)) => Err(channel_error(error)),
        Err(plexus_core::PublishError::Engine(error)) => Err(engine_error(&error, "presence")),
    }
}

pub(super) async fn presence(
    shared: &Shared,
    request: ChannelRequest,
) -> Result<PresenceResult, ErrorCode> {
    let clients = presence_of(shared, &request.channel).await?;
    Ok(PresenceResult {
        presence: clients
            .iter()
            .map(|client| {
                (
                    client.client.to_string(),
                    encode::client_info(Format::Json, client),
                )
            })
            .collect(),
    })
}

pub(super) async fn presence_stats(
    shared: &Shared,
    request: ChannelRequest,
) -> Result<PresenceStatsResult, ErrorCode> {
    let clients = presence_of(shared, &request.channel).await?;
    let users: HashSet<&str> = clients.iter().map(|client| &*client.user).collect();
    Ok(PresenceStatsResult {
        num_clients: clients.len() as u32,
        num_users: users.len() as u32,
    })
}

#[derive(Debug, Deserialize)]
pub(super) struct HistoryRequest {
    channel: String,
    /// 0 (the default): only the stream position; -1: everything kept.
    #[serde(default)]
    limit: i32,
    since: Option<proto::StreamPosition>,
    #[serde(default)]
    reverse: bool,
}

impl Validate for HistoryRequest {
    fn validate(&self) -> Result<(), String> {
        required("channel", &self.channel)
    }
}

#[derive(Debug, Serialize)]
pub(super) struct HistoryResult {
    publications: Vec<proto::Publication>,
    epoch: String,
    offset: u64,
}

fn with_history(shared: &Shared, channel: &str) -> Result<(), ErrorCode> {
    if options(shared, channel)?.has_history() {
        Ok(())
    } else {
        Err(ErrorCode::NotAvailable)
    }
}

/// History with the native protocol's rules (same limit and epoch handling).
pub(super) async fn history(
    shared: &Shared,
    request: HistoryRequest,
) -> Result<HistoryResult, ErrorCode> {
    with_history(shared, &request.channel)?;
    let page = session::history(
        shared,
        Format::Json,
        &request.channel,
        request.limit,
        request.since.as_ref(),
        request.reverse,
    )
    .await?;
    Ok(HistoryResult {
        publications: page.publications,
        epoch: page.epoch,
        offset: page.offset,
    })
}

pub(super) async fn history_remove(
    shared: &Shared,
    request: ChannelRequest,
) -> Result<Empty, ErrorCode> {
    with_history(shared, &request.channel)?;
    match shared.node.remove_history(&request.channel).await {
        Ok(()) => Ok(Empty {}),
        Err(plexus_core::PublishError::Channel(error)) => Err(channel_error(error)),
        Err(plexus_core::PublishError::Engine(error)) => {
            Err(engine_error(&error, "history_remove"))
        }
    }
}
