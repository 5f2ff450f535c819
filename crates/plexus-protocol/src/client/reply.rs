//! Server to client: replies, pushes, the server's ping, and batching.

use serde::de::Error as _;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Deserializer, Serialize};

use super::types::{
    null_default, Connect, ConnectResult, Disconnect, Error, HistoryResult, Join, Leave, Message,
    PingResult, PresenceResult, PresenceStatsResult, Publication, PublishResult, Refresh,
    RefreshResult, RpcResult, SubRefreshResult, Subscribe, SubscribeResult, Unsubscribe,
    UnsubscribeResult,
};
use super::{compact_json, one_of};

/// The server's ping: the empty reply. Clients that were told `pong: true` answer with `{}`.
pub const SERVER_PING: &[u8] = b"{}";

/// One message from the server: the answer to a command (`id` set), a push (`id` 0), or the
/// server's ping (everything empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// The id of the command answered; 0 for pushes and pings.
    pub id: u32,
    pub error: Option<Error>,
    pub body: Option<ReplyBody>,
}

impl Reply {
    /// A successful answer to command `id`.
    pub fn result(id: u32, body: impl Into<ReplyBody>) -> Self {
        Reply {
            id,
            error: None,
            body: Some(body.into()),
        }
    }

    /// An error answer to command `id`; takes an [`Error`] or an
    /// [`ErrorCode`](super::ErrorCode).
    pub fn error(id: u32, error: impl Into<Error>) -> Self {
        Reply {
            id,
            error: Some(error.into()),
            body: None,
        }
    }

    /// A push.
    pub fn push(push: Push) -> Self {
        Reply::result(0, push)
    }

    /// The server's ping, `{}`.
    pub fn server_ping() -> Self {
        Reply::default()
    }

    /// Whether this is the empty reply, the server's ping.
    pub fn is_server_ping(&self) -> bool {
        *self == Reply::default()
    }
}

/// The result a reply carries: exactly one of the `Reply` message's result fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    Push(Push),
    Connect(ConnectResult),
    Subscribe(SubscribeResult),
    Unsubscribe(UnsubscribeResult),
    Publish(PublishResult),
    Presence(PresenceResult),
    PresenceStats(PresenceStatsResult),
    History(HistoryResult),
    Ping(PingResult),
    Rpc(RpcResult),
    Refresh(RefreshResult),
    SubRefresh(SubRefreshResult),
}

impl ReplyBody {
    /// The field name in the reply, e.g. `push` or `presence_stats`.
    pub const fn name(&self) -> &'static str {
        match self {
            ReplyBody::Push(_) => "push",
            ReplyBody::Connect(_) => "connect",
            ReplyBody::Subscribe(_) => "subscribe",
            ReplyBody::Unsubscribe(_) => "unsubscribe",
            ReplyBody::Publish(_) => "publish",
            ReplyBody::Presence(_) => "presence",
            ReplyBody::PresenceStats(_) => "presence_stats",
            ReplyBody::History(_) => "history",
            ReplyBody::Ping(_) => "ping",
            ReplyBody::Rpc(_) => "rpc",
            ReplyBody::Refresh(_) => "refresh",
            ReplyBody::SubRefresh(_) => "sub_refresh",
        }
    }

    fn serialize_entry<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        let key = self.name();
        match self {
            ReplyBody::Push(b) => map.serialize_entry(key, b),
            ReplyBody::Connect(b) => map.serialize_entry(key, b),
            ReplyBody::Subscribe(b) => map.serialize_entry(key, b),
            ReplyBody::Unsubscribe(b) => map.serialize_entry(key, b),
            ReplyBody::Publish(b) => map.serialize_entry(key, b),
            ReplyBody::Presence(b) => map.serialize_entry(key, b),
            ReplyBody::PresenceStats(b) => map.serialize_entry(key, b),
            ReplyBody::History(b) => map.serialize_entry(key, b),
            ReplyBody::Ping(b) => map.serialize_entry(key, b),
            ReplyBody::Rpc(b) => map.serialize_entry(key, b),
            ReplyBody::Refresh(b) => map.serialize_entry(key, b),
            ReplyBody::SubRefresh(b) => map.serialize_entry(key, b),
        }
    }
}

/// An asynchronous message from the server, about `channel` (empty for connection-wide pushes:
/// message, connect, disconnect, refresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub channel: String,
    pub body: PushBody,
}

impl Push {
    pub fn new(channel: impl Into<String>, body: impl Into<PushBody>) -> Self {
        Push {
            channel: channel.into(),
            body: body.into(),
        }
    }
}

/// What a push carries: exactly one of the `Push` message's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushBody {
    /// Field `pub`.
    Publication(Publication),
    Join(Join),
    Leave(Leave),
    Unsubscribe(Unsubscribe),
    Message(Message),
    Subscribe(Subscribe),
    Connect(Connect),
    Disconnect(Disconnect),
    Refresh(Refresh),
}

impl PushBody {
    /// The field name in the push, e.g. `pub` or `join`.
    pub const fn name(&self) -> &'static str {
        match self {
            PushBody::Publication(_) => "pub",
            PushBody::Join(_) => "join",
            PushBody::Leave(_) => "leave",
            PushBody::Unsubscribe(_) => "unsubscribe",
            PushBody::Message(_) => "message",
            PushBody::Subscribe(_) => "subscribe",
            PushBody::Connect(_) => "connect",
            PushBody::Disconnect(_) => "disconnect",
            PushBody::Refresh(_) => "refresh",
        }
    }

    fn serialize_entry<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        let key = self.name();
        match self {
            PushBody::Publication(b) => map.serialize_entry(key, b),
            PushBody::Join(b) => map.serialize_entry(key, b),
            PushBody::Leave(b) => map.serialize_entry(key, b),
            PushBody::Unsubscribe(b) => map.serialize_entry(key, b),
            PushBody::Message(b) => map.serialize_entry(key, b),
            PushBody::Subscribe(b) => map.serialize_entry(key, b),
            PushBody::Connect(b) => map.serialize_entry(key, b),
            PushBody::Disconnect(b) => map.serialize_entry(key, b),
            PushBody::Refresh(b) => map.serialize_entry(key, b),
        }
    }
}

macro_rules! into_body {
    ($target:ident: $($variant:ident($ty:ty)),* $(,)?) => {
        $(
            impl From<$ty> for $target {
                fn from(body: $ty) -> Self {
                    $target::$variant(body)
                }
            }
        )*
    };
}

into_body!(ReplyBody:
    Push(Push),
    Connect(ConnectResult),
    Subscribe(SubscribeResult),
    Unsubscribe(UnsubscribeResult),
    Publish(PublishResult),
    Presence(PresenceResult),
    PresenceStats(PresenceStatsResult),
    History(HistoryResult),
    Ping(PingResult),
    Rpc(RpcResult),
    Refresh(RefreshResult),
    SubRefresh(SubRefreshResult),
);

into_body!(PushBody:
    Publication(Publication),
    Join(Join),
    Leave(Leave),
    Unsubscribe(Unsubscribe),
    Message(Message),
    Subscribe(Subscribe),
    Connect(Connect),
    Disconnect(Disconnect),
    Refresh(Refresh),
);

/// A push as written, borrowing its parts so [`encode_push`] copies nothing.
struct PushOut<'a> {
    channel: &'a str,
    body: &'a PushBody,
}

impl Serialize for PushOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if !self.channel.is_empty() {
            map.serialize_entry("channel", self.channel)?;
        }
        self.body.serialize_entry(&mut map)?;
        map.end()
    }
}

impl Serialize for Push {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PushOut {
            channel: &self.channel,
            body: &self.body,
        }
        .serialize(serializer)
    }
}

/// A reply holding only a push, as written.
struct PushReplyOut<'a>(PushOut<'a>);

impl Serialize for PushReplyOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("push", &self.0)?;
        map.end()
    }
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if self.id != 0 {
            map.serialize_entry("id", &self.id)?;
        }
        if let Some(error) = &self.error {
            map.serialize_entry("error", error)?;
        }
        if let Some(body) = &self.body {
            body.serialize_entry(&mut map)?;
        }
        map.end()
    }
}

/// The `Push` message as read.
#[derive(Deserialize)]
struct PushIn {
    #[serde(default, deserialize_with = "null_default")]
    channel: String,
    #[serde(default, rename = "pub")]
    publication: Option<Publication>,
    #[serde(default)]
    join: Option<Join>,
    #[serde(default)]
    leave: Option<Leave>,
    #[serde(default)]
    unsubscribe: Option<Unsubscribe>,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    subscribe: Option<Subscribe>,
    #[serde(default)]
    connect: Option<Connect>,
    #[serde(default)]
    disconnect: Option<Disconnect>,
    #[serde(default)]
    refresh: Option<Refresh>,
}

impl<'de> Deserialize<'de> for Push {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let p = PushIn::deserialize(deserializer)?;
        let body = one_of([
            p.publication.map(PushBody::Publication),
            p.join.map(PushBody::Join),
            p.leave.map(PushBody::Leave),
            p.unsubscribe.map(PushBody::Unsubscribe),
            p.message.map(PushBody::Message),
            p.subscribe.map(PushBody::Subscribe),
            p.connect.map(PushBody::Connect),
            p.disconnect.map(PushBody::Disconnect),
            p.refresh.map(PushBody::Refresh),
        ])
        .map_err(|n| D::Error::custom(format!("push with {n} bodies")))?
        .ok_or_else(|| D::Error::custom("push without a known body"))?;
        Ok(Push {
            channel: p.channel,
            body,
        })
    }
}

/// The `Reply` message as read.
#[derive(Deserialize)]
struct ReplyIn {
    #[serde(default, deserialize_with = "null_default")]
    id: u32,
    #[serde(default)]
    error: Option<Error>,
    #[serde(default)]
    push: Option<Push>,
    #[serde(default)]
    connect: Option<ConnectResult>,
    #[serde(default)]
    subscribe: Option<SubscribeResult>,
    #[serde(default)]
    unsubscribe: Option<UnsubscribeResult>,
    #[serde(default)]
    publish: Option<PublishResult>,
    #[serde(default)]
    presence: Option<PresenceResult>,
    #[serde(default)]
    presence_stats: Option<PresenceStatsResult>,
    #[serde(default)]
    history: Option<HistoryResult>,
    #[serde(default)]
    ping: Option<PingResult>,
    #[serde(default)]
    rpc: Option<RpcResult>,
    #[serde(default)]
    refresh: Option<RefreshResult>,
    #[serde(default)]
    sub_refresh: Option<SubRefreshResult>,
}

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let r = ReplyIn::deserialize(deserializer)?;
        let body = one_of([
            r.push.map(ReplyBody::Push),
            r.connect.map(ReplyBody::Connect),
            r.subscribe.map(ReplyBody::Subscribe),
            r.unsubscribe.map(ReplyBody::Unsubscribe),
            r.publish.map(ReplyBody::Publish),
            r.presence.map(ReplyBody::Presence),
            r.presence_stats.map(ReplyBody::PresenceStats),
            r.history.map(ReplyBody::History),
            r.ping.map(ReplyBody::Ping),
            r.rpc.map(ReplyBody::Rpc),
            r.refresh.map(ReplyBody::Refresh),
            r.sub_refresh.map(ReplyBody::SubRefresh),
        ])
        .map_err(|n| D::Error::custom(format!("reply with {n} results")))?;
        Ok(Reply {
            id: r.id,
            error: r.error,
            body,
        })
    }
}

/// Encodes a reply as compact JSON, one object, no trailing newline.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    compact_json(reply)
}

/// Encodes the reply `{"push":{...}}` for a push about `channel` without building a [`Reply`]:
/// encode once, send the same bytes to every subscriber.
pub fn encode_push(channel: &str, body: &PushBody) -> Vec<u8> {
    compact_json(&PushReplyOut(PushOut { channel, body }))
}

/// Joins encoded replies into one WebSocket message, separated by `\n` (no trailing newline), the
/// batching the SDKs read. Accepts `&[&[u8]]`, `&[Vec<u8>]`, an iterator of `Bytes`, and so on.
pub fn join_batch<I, B>(replies: I) -> Vec<u8>
where
    I: IntoIterator<Item = B>,
    B: AsRef<[u8]>,
{
    let mut out = Vec::new();
    for (i, reply) in replies.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(reply.as_ref());
    }
    out
}

/// Parses a message from the server (one or more replies separated by `\n`), as a client would.
pub fn parse_replies(text: &str) -> Vec<Result<Reply, serde_json::Error>> {
    text.split('\n')
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(serde_json::from_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::client::{ClientInfo, DisconnectCode, ErrorCode, Payload, UnsubscribeCode};

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    fn raw(s: &str) -> Option<Payload> {
        Some(Payload::json(s).unwrap())
    }

    /// Encodes, checks the exact text, then checks that parsing gives the reply back.
    fn check(reply: Reply, expected: &str) {
        assert_eq!(text(encode_reply(&reply)), expected);
        let parsed = parse_replies(expected);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].as_ref().unwrap(), &reply);
    }

    #[test]
    fn connect_result() {
        check(
            Reply::result(
                1,
                ConnectResult {
                    client: "abc".into(),
                    version: "0.1.0".into(),
                    ping: 25,
                    pong: true,
                    ..Default::default()
                },
            ),
            r#"{"id":1,"connect":{"client":"abc","version":"0.1.0","ping":25,"pong":true}}"#,
        );
    }

    #[test]
    fn publication_push() {
        let body = PushBody::Publication(Publication {
            data: raw(r#"{"text":"hi"}"#),
            offset: 7,
            ..Default::default()
        });
        let expected = r#"{"push":{"channel":"chat:a","pub":{"data":{"text":"hi"},"offset":7}}}"#;
        assert_eq!(text(encode_push("chat:a", &body)), expected);
        check(Reply::push(Push::new("chat:a", body)), expected);
    }

    #[test]
    fn error_reply() {
        check(
            Reply::error(5, ErrorCode::PermissionDenied),
            r#"{"id":5,"error":{"code":103,"message":"permission denied"}}"#,
        );
        check(
            Reply::error(6, ErrorCode::Internal),
            r#"{"id":6,"error":{"code":100,"message":"internal server error","temporary":true}}"#,
        );
    }

    #[test]
    fn server_ping_is_empty() {
        assert_eq!(encode_reply(&Reply::server_ping()), SERVER_PING);
        assert!(Reply::server_ping().is_server_ping());
        check(Reply::server_ping(), "{}");
    }

    #[test]
    fn empty_results_are_empty_objects() {
        check(
            Reply::result(2, PublishResult {}),
            r#"{"id":2,"publish":{}}"#,
        );
        check(
            Reply::result(3, UnsubscribeResult {}),
            r#"{"id":3,"unsubscribe":{}}"#,
        );
        check(Reply::result(4, PingResult {}), r#"{"id":4,"ping":{}}"#);
    }

    #[test]
    fn other_results_and_pushes() {
        let info = ClientInfo {
            user: "u".into(),
            client: "c".into(),
            conn_info: raw(r#"{"n":1}"#),
            chan_info: None,
        };
        check(
            Reply::result(
                7,
                SubscribeResult {
                    recoverable: true,
                    epoch: "e".into(),
                    publications: vec![Publication {
                        data: raw("1"),
                        info: Some(info.clone()),
                        offset: 4,
                        tags: BTreeMap::from([("k".into(), "v".into())]),
                        delta: false,
                    }],
                    recovered: true,
                    offset: 4,
                    positioned: true,
                    ..Default::default()
                },
            ),
            concat!(
                r#"{"id":7,"subscribe":{"recoverable":true,"epoch":"e","publications":[{"data":1,"#,
                r#""info":{"user":"u","client":"c","conn_info":{"n":1}},"offset":4,"tags":{"k":"v"}}],"#,
                r#""recovered":true,"offset":4,"positioned":true}}"#
            ),
        );
        check(
            Reply::result(
                8,
                PresenceResult {
                    presence: BTreeMap::from([("c".into(), info.clone())]),
                },
            ),
            r#"{"id":8,"presence":{"presence":{"c":{"user":"u","client":"c","conn_info":{"n":1}}}}}"#,
        );
        check(
            Reply::result(
                9,
                PresenceStatsResult {
                    num_clients: 2,
                    num_users: 1,
                },
            ),
            r#"{"id":9,"presence_stats":{"num_clients":2,"num_users":1}}"#,
        );
        check(
            Reply::result(
                10,
                HistoryResult {
                    publications: vec![],
                    epoch: "e".into(),
                    offset: 12,
                },
            ),
            r#"{"id":10,"history":{"epoch":"e","offset":12}}"#,
        );
        check(
            Reply::result(11, RpcResult { data: raw("[1]") }),
            r#"{"id":11,"rpc":{"data":[1]}}"#,
        );
        check(
            Reply::push(Push::new("chat:a", Join { info: info.clone() })),
            r#"{"push":{"channel":"chat:a","join":{"info":{"user":"u","client":"c","conn_info":{"n":1}}}}}"#,
        );
        check(
            Reply::push(Push::new(
                "chat:a",
                Unsubscribe::from(UnsubscribeCode::Server),
            )),
            r#"{"push":{"channel":"chat:a","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}"#,
        );
        check(
            Reply::push(Push::new(
                "",
                Disconnect::from(DisconnectCode::InvalidToken),
            )),
            r#"{"push":{"disconnect":{"code":3500,"reason":"invalid token"}}}"#,
        );
        check(
            Reply::push(Push::new(
                "",
                Message {
                    data: raw(r#""hello""#),
                },
            )),
            r#"{"push":{"message":{"data":"hello"}}}"#,
        );
    }

    #[test]
    fn batches_join_with_newlines() {
        let a = encode_reply(&Reply::result(1, PingResult {}));
        let b = encode_reply(&Reply::server_ping());
        let joined = join_batch([a.as_slice(), b.as_slice()]);
        assert_eq!(text(joined.clone()), "{\"id\":1,\"ping\":{}}\n{}");
        assert_eq!(join_batch(std::slice::from_ref(&a)), a);
        assert!(join_batch(Vec::<Vec<u8>>::new()).is_empty());
        let parsed = parse_replies(std::str::from_utf8(&joined).unwrap());
        assert_eq!(parsed.len(), 2);
        assert!(parsed[1].as_ref().unwrap().is_server_ping());
    }

    #[test]
    fn replies_with_two_results_are_refused() {
        assert!(serde_json::from_str::<Reply>(r#"{"id":1,"ping":{},"publish":{}}"#).is_err());
        assert!(serde_json::from_str::<Reply>(r#"{"push":{"channel":"a"}}"#).is_err());
    }
}
