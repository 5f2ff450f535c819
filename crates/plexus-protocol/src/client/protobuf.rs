//! The Protobuf encoding of the client protocol: the same messages as the JSON encoding, as
//! Centrifugo's `client.proto` numbers them.
//!
//! # Wire format
//!
//! A WebSocket *binary* message holds one or more messages, each prefixed with its length as a
//! varint (Protobuf's "length-delimited" stream). The client sends `Command` messages, the server
//! `Reply` messages; a push is a `Reply` whose `push` field is set. The server's ping is the
//! empty `Reply` (the single byte `0`: a zero length), the client's pong the empty `Command`.
//! HTTP streaming uses the same stream of replies in its response body.
//!
//! Payloads (`data`, `conn_info`, `chan_info`) are any bytes ([`Payload`]); empty bytes mean an
//! absent field, as Protobuf cannot tell them apart.
//!
//! The field numbers are protocol facts (the SDKs encode them); the message definitions below
//! are written for Plexus and list the fields Plexus reads and writes. Fields Plexus does not
//! know (map subscriptions, `time`, ...) are skipped when read, as Protobuf does.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;

use super::command::{classify, Incoming, ParseError, Request};
use super::payload::Payload;
use super::reply::{Push, PushBody, Reply, ReplyBody};
use super::types;

/// The messages as Protobuf sees them (prost derives their encoding from the tags).
mod wire {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Error {
        #[prost(uint32, tag = "1")]
        pub code: u32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(bool, tag = "3")]
        pub temporary: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EmulationRequest {
        #[prost(string, tag = "1")]
        pub node: String,
        #[prost(string, tag = "2")]
        pub session: String,
        #[prost(bytes = "bytes", tag = "3")]
        pub data: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Command {
        #[prost(uint32, tag = "1")]
        pub id: u32,
        #[prost(message, optional, tag = "4")]
        pub connect: Option<ConnectRequest>,
        #[prost(message, optional, tag = "5")]
        pub subscribe: Option<SubscribeRequest>,
        #[prost(message, optional, tag = "6")]
        pub unsubscribe: Option<UnsubscribeRequest>,
        #[prost(message, optional, tag = "7")]
        pub publish: Option<PublishRequest>,
        #[prost(message, optional, tag = "8")]
        pub presence: Option<PresenceRequest>,
        #[prost(message, optional, tag = "9")]
        pub presence_stats: Option<PresenceStatsRequest>,
        #[prost(message, optional, tag = "10")]
        pub history: Option<HistoryRequest>,
        #[prost(message, optional, tag = "11")]
        pub ping: Option<PingRequest>,
        #[prost(message, optional, tag = "12")]
        pub send: Option<SendRequest>,
        #[prost(message, optional, tag = "13")]
        pub rpc: Option<RpcRequest>,
        #[prost(message, optional, tag = "14")]
        pub refresh: Option<RefreshRequest>,
        #[prost(message, optional, tag = "15")]
        pub sub_refresh: Option<SubRefreshRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Reply {
        #[prost(uint32, tag = "1")]
        pub id: u32,
        #[prost(message, optional, tag = "2")]
        pub error: Option<Error>,
        #[prost(message, optional, tag = "4")]
        pub push: Option<Push>,
        #[prost(message, optional, tag = "5")]
        pub connect: Option<ConnectResult>,
        #[prost(message, optional, tag = "6")]
        pub subscribe: Option<SubscribeResult>,
        #[prost(message, optional, tag = "7")]
        pub unsubscribe: Option<UnsubscribeResult>,
        #[prost(message, optional, tag = "8")]
        pub publish: Option<PublishResult>,
        #[prost(message, optional, tag = "9")]
        pub presence: Option<PresenceResult>,
        #[prost(message, optional, tag = "10")]
        pub presence_stats: Option<PresenceStatsResult>,
        #[prost(message, optional, tag = "11")]
        pub history: Option<HistoryResult>,
        #[prost(message, optional, tag = "12")]
        pub ping: Option<PingResult>,
        #[prost(message, optional, tag = "13")]
        pub rpc: Option<RpcResult>,
        #[prost(message, optional, tag = "14")]
        pub refresh: Option<RefreshResult>,
        #[prost(message, optional, tag = "15")]
        pub sub_refresh: Option<SubRefreshResult>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Push {
        #[prost(string, tag = "2")]
        pub channel: String,
        #[prost(message, optional, tag = "4")]
        pub publication: Option<Publication>,
        #[prost(message, optional, tag = "5")]
        pub join: Option<Join>,
        #[prost(message, optional, tag = "6")]
        pub leave: Option<Leave>,
        #[prost(message, optional, tag = "7")]
        pub unsubscribe: Option<Unsubscribe>,
        #[prost(message, optional, tag = "8")]
        pub message: Option<Message>,
        #[prost(message, optional, tag = "9")]
        pub subscribe: Option<Subscribe>,
        #[prost(message, optional, tag = "10")]
        pub connect: Option<Connect>,
        #[prost(message, optional, tag = "11")]
        pub disconnect: Option<Disconnect>,
        #[prost(message, optional, tag = "12")]
        pub refresh: Option<Refresh>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ClientInfo {
        #[prost(string, tag = "1")]
        pub user: String,
        #[prost(string, tag = "2")]
        pub client: String,
        #[prost(bytes = "bytes", tag = "3")]
        pub conn_info: Bytes,
        #[prost(bytes = "bytes", tag = "4")]
        pub chan_info: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Publication {
        #[prost(bytes = "bytes", tag = "4")]
        pub data: Bytes,
        #[prost(message, optional, tag = "5")]
        pub info: Option<ClientInfo>,
        #[prost(uint64, tag = "6")]
        pub offset: u64,
        #[prost(btree_map = "string, string", tag = "7")]
        pub tags: BTreeMap<String, String>,
        #[prost(bool, tag = "8")]
        pub delta: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Join {
        #[prost(message, optional, tag = "1")]
        pub info: Option<ClientInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Leave {
        #[prost(message, optional, tag = "1")]
        pub info: Option<ClientInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Unsubscribe {
        #[prost(uint32, tag = "2")]
        pub code: u32,
        #[prost(string, tag = "3")]
        pub reason: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Subscribe {
        #[prost(bool, tag = "1")]
        pub recoverable: bool,
        #[prost(string, tag = "4")]
        pub epoch: String,
        #[prost(uint64, tag = "5")]
        pub offset: u64,
        #[prost(bool, tag = "6")]
        pub positioned: bool,
        #[prost(bytes = "bytes", tag = "7")]
        pub data: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        #[prost(bytes = "bytes", tag = "1")]
        pub data: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Connect {
        #[prost(string, tag = "1")]
        pub client: String,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(bytes = "bytes", tag = "3")]
        pub data: Bytes,
        #[prost(btree_map = "string, message", tag = "4")]
        pub subs: BTreeMap<String, SubscribeResult>,
        #[prost(bool, tag = "5")]
        pub expires: bool,
        #[prost(uint32, tag = "6")]
        pub ttl: u32,
        #[prost(uint32, tag = "7")]
        pub ping: u32,
        #[prost(bool, tag = "8")]
        pub pong: bool,
        #[prost(string, tag = "9")]
        pub session: String,
        #[prost(string, tag = "10")]
        pub node: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Disconnect {
        #[prost(uint32, tag = "1")]
        pub code: u32,
        #[prost(string, tag = "2")]
        pub reason: String,
        #[prost(bool, tag = "3")]
        pub reconnect: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Refresh {
        #[prost(bool, tag = "1")]
        pub expires: bool,
        #[prost(uint32, tag = "2")]
        pub ttl: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConnectRequest {
        #[prost(string, tag = "1")]
        pub token: String,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: Bytes,
        #[prost(btree_map = "string, message", tag = "3")]
        pub subs: BTreeMap<String, SubscribeRequest>,
        #[prost(string, tag = "4")]
        pub name: String,
        #[prost(string, tag = "5")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConnectResult {
        #[prost(string, tag = "1")]
        pub client: String,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(bool, tag = "3")]
        pub expires: bool,
        #[prost(uint32, tag = "4")]
        pub ttl: u32,
        #[prost(bytes = "bytes", tag = "5")]
        pub data: Bytes,
        #[prost(btree_map = "string, message", tag = "6")]
        pub subs: BTreeMap<String, SubscribeResult>,
        #[prost(uint32, tag = "7")]
        pub ping: u32,
        #[prost(bool, tag = "8")]
        pub pong: bool,
        #[prost(string, tag = "9")]
        pub session: String,
        #[prost(string, tag = "10")]
        pub node: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RefreshRequest {
        #[prost(string, tag = "1")]
        pub token: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RefreshResult {
        #[prost(string, tag = "1")]
        pub client: String,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(bool, tag = "3")]
        pub expires: bool,
        #[prost(uint32, tag = "4")]
        pub ttl: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
        #[prost(string, tag = "2")]
        pub token: String,
        #[prost(bool, tag = "3")]
        pub recover: bool,
        #[prost(string, tag = "6")]
        pub epoch: String,
        #[prost(uint64, tag = "7")]
        pub offset: u64,
        #[prost(bytes = "bytes", tag = "8")]
        pub data: Bytes,
        #[prost(bool, tag = "9")]
        pub positioned: bool,
        #[prost(bool, tag = "10")]
        pub recoverable: bool,
        #[prost(bool, tag = "11")]
        pub join_leave: bool,
        #[prost(string, tag = "12")]
        pub delta: String,
        #[prost(message, optional, tag = "13")]
        pub tf: Option<FilterNode>,
        #[prost(int64, tag = "14")]
        pub flag: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FilterNode {
        #[prost(string, tag = "1")]
        pub op: String,
        #[prost(string, tag = "2")]
        pub key: String,
        #[prost(string, tag = "3")]
        pub cmp: String,
        #[prost(string, tag = "4")]
        pub val: String,
        #[prost(string, repeated, tag = "5")]
        pub vals: Vec<String>,
        #[prost(message, repeated, tag = "6")]
        pub nodes: Vec<FilterNode>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeResult {
        #[prost(bool, tag = "1")]
        pub expires: bool,
        #[prost(uint32, tag = "2")]
        pub ttl: u32,
        #[prost(bool, tag = "3")]
        pub recoverable: bool,
        #[prost(string, tag = "6")]
        pub epoch: String,
        #[prost(message, repeated, tag = "7")]
        pub publications: Vec<Publication>,
        #[prost(bool, tag = "8")]
        pub recovered: bool,
        #[prost(uint64, tag = "9")]
        pub offset: u64,
        #[prost(bool, tag = "10")]
        pub positioned: bool,
        #[prost(bytes = "bytes", tag = "11")]
        pub data: Bytes,
        #[prost(bool, tag = "12")]
        pub was_recovering: bool,
        #[prost(bool, tag = "13")]
        pub delta: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubRefreshRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
        #[prost(string, tag = "2")]
        pub token: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubRefreshResult {
        #[prost(bool, tag = "1")]
        pub expires: bool,
        #[prost(uint32, tag = "2")]
        pub ttl: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UnsubscribeRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UnsubscribeResult {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublishRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublishResult {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PresenceRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PresenceResult {
        #[prost(btree_map = "string, message", tag = "1")]
        pub presence: BTreeMap<String, ClientInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PresenceStatsRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PresenceStatsResult {
        #[prost(uint32, tag = "1")]
        pub num_clients: u32,
        #[prost(uint32, tag = "2")]
        pub num_users: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StreamPosition {
        #[prost(uint64, tag = "1")]
        pub offset: u64,
        #[prost(string, tag = "2")]
        pub epoch: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistoryRequest {
        #[prost(string, tag = "1")]
        pub channel: String,
        #[prost(int32, tag = "7")]
        pub limit: i32,
        #[prost(message, optional, tag = "8")]
        pub since: Option<StreamPosition>,
        #[prost(bool, tag = "9")]
        pub reverse: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistoryResult {
        #[prost(message, repeated, tag = "1")]
        pub publications: Vec<Publication>,
        #[prost(string, tag = "2")]
        pub epoch: String,
        #[prost(uint64, tag = "3")]
        pub offset: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PingRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PingResult {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcRequest {
        #[prost(bytes = "bytes", tag = "1")]
        pub data: Bytes,
        #[prost(string, tag = "2")]
        pub method: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcResult {
        #[prost(bytes = "bytes", tag = "1")]
        pub data: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SendRequest {
        #[prost(bytes = "bytes", tag = "1")]
        pub data: Bytes,
    }
}

/// A protocol message with a Protobuf form.
trait Msg: Sized {
    type Wire: Default;
    fn to_wire(&self) -> Self::Wire;
    fn from_wire(wire: Self::Wire) -> Self;
}

/// A boxed message (a large one in an optional field) is the message.
impl<T: Msg> Msg for Box<T> {
    type Wire = T::Wire;
    fn to_wire(&self) -> Self::Wire {
        (**self).to_wire()
    }
    fn from_wire(wire: Self::Wire) -> Self {
        Box::new(T::from_wire(wire))
    }
}

/// A field of a protocol message, held as `W` in the Protobuf form.
trait Field<W>: Sized {
    fn to_field(&self) -> W;
    fn from_field(wire: W) -> Self;
}

macro_rules! same_field {
    ($($ty:ty),*) => {
        $(
            impl Field<$ty> for $ty {
                fn to_field(&self) -> $ty {
                    self.clone()
                }
                fn from_field(wire: $ty) -> $ty {
                    wire
                }
            }
        )*
    };
}

same_field!(u32, u64, i32, i64, bool, String, Vec<String>, BTreeMap<String, String>);

impl Field<Bytes> for Option<Payload> {
    fn to_field(&self) -> Bytes {
        self.as_ref()
            .map_or_else(Bytes::new, |payload| payload.bytes().clone())
    }
    fn from_field(wire: Bytes) -> Self {
        (!wire.is_empty()).then(|| Payload::new(wire))
    }
}

/// A message field the protocol always has (a missing one reads as the default).
impl<T: Msg> Field<Option<T::Wire>> for T {
    fn to_field(&self) -> Option<T::Wire> {
        Some(self.to_wire())
    }
    fn from_field(wire: Option<T::Wire>) -> Self {
        T::from_wire(wire.unwrap_or_default())
    }
}

impl<T: Msg> Field<Option<T::Wire>> for Option<T> {
    fn to_field(&self) -> Option<T::Wire> {
        self.as_ref().map(T::to_wire)
    }
    fn from_field(wire: Option<T::Wire>) -> Self {
        wire.map(T::from_wire)
    }
}

impl<T: Msg> Field<Vec<T::Wire>> for Vec<T> {
    fn to_field(&self) -> Vec<T::Wire> {
        self.iter().map(T::to_wire).collect()
    }
    fn from_field(wire: Vec<T::Wire>) -> Self {
        wire.into_iter().map(T::from_wire).collect()
    }
}

impl<T: Msg> Field<BTreeMap<String, T::Wire>> for BTreeMap<String, T> {
    fn to_field(&self) -> BTreeMap<String, T::Wire> {
        self.iter()
            .map(|(key, value)| (key.clone(), value.to_wire()))
            .collect()
    }
    fn from_field(wire: BTreeMap<String, T::Wire>) -> Self {
        wire.into_iter()
            .map(|(key, value)| (key, T::from_wire(value)))
            .collect()
    }
}

/// `Msg` for protocol messages whose fields all have a Protobuf form of the same name.
macro_rules! messages {
    ($($name:ident { $($field:ident),* $(,)? })*) => {
        $(
            impl Msg for types::$name {
                type Wire = wire::$name;
                fn to_wire(&self) -> wire::$name {
                    wire::$name { $($field: Field::to_field(&self.$field),)* }
                }
                #[allow(unused_variables)] // the empty messages
                fn from_wire(wire: wire::$name) -> Self {
                    types::$name { $($field: Field::from_field(wire.$field),)* }
                }
            }
        )*
    };
}

messages! {
    Error { code, message, temporary }
    ClientInfo { user, client, conn_info, chan_info }
    Publication { data, info, offset, tags, delta }
    Join { info }
    Leave { info }
    Unsubscribe { code, reason }
    Subscribe { recoverable, epoch, offset, positioned, data }
    Message { data }
    Connect { client, version, data, subs, expires, ttl, ping, pong, session, node }
    Disconnect { code, reason, reconnect }
    Refresh { expires, ttl }
    ConnectRequest { token, data, subs, name, version }
    ConnectResult { client, version, expires, ttl, data, subs, ping, pong, session, node }
    RefreshRequest { token }
    RefreshResult { client, version, expires, ttl }
    SubscribeRequest {
        channel, token, recover, epoch, offset, data, positioned, recoverable, join_leave, delta,
        tf, flag
    }
    FilterNode { op, key, cmp, val, vals, nodes }
    SubscribeResult {
        expires, ttl, recoverable, epoch, publications, recovered, offset, positioned, data,
        was_recovering, delta
    }
    SubRefreshRequest { channel, token }
    SubRefreshResult { expires, ttl }
    UnsubscribeRequest { channel }
    UnsubscribeResult {}
    PublishRequest { channel, data }
    PublishResult {}
    PresenceRequest { channel }
    PresenceResult { presence }
    PresenceStatsRequest { channel }
    PresenceStatsResult { num_clients, num_users }
    StreamPosition { offset, epoch }
    HistoryRequest { channel, limit, since, reverse }
    HistoryResult { publications, epoch, offset }
    PingRequest {}
    PingResult {}
    RpcRequest { data, method }
    RpcResult { data }
    SendRequest { data }
}

/// The variants of a "one of" (a command's request, a reply's result, a push's body) and the
/// fields of the Protobuf message that hold them: `$set` puts a variant in its field, `$get`
/// takes every field that is set.
macro_rules! one_of_fields {
    ($set:ident, $get:ident, $enum:ident, $wire:ident { $($variant:ident => $field:ident),* $(,)? }) => {
        fn $set(body: &$enum, wire: &mut wire::$wire) {
            match body {
                $($enum::$variant(body) => wire.$field = Some(body.to_wire()),)*
            }
        }

        fn $get(wire: &mut wire::$wire) -> Vec<$enum> {
            let mut found = Vec::new();
            $(
                if let Some(body) = wire.$field.take() {
                    found.push($enum::$variant(Msg::from_wire(body)));
                }
            )*
            found
        }
    };
}

one_of_fields!(set_request, take_requests, Request, Command {
    Connect => connect,
    Subscribe => subscribe,
    Unsubscribe => unsubscribe,
    Publish => publish,
    Presence => presence,
    PresenceStats => presence_stats,
    History => history,
    Ping => ping,
    Send => send,
    Rpc => rpc,
    Refresh => refresh,
    SubRefresh => sub_refresh,
});

one_of_fields!(set_result, take_results, ReplyBody, Reply {
    Push => push,
    Connect => connect,
    Subscribe => subscribe,
    Unsubscribe => unsubscribe,
    Publish => publish,
    Presence => presence,
    PresenceStats => presence_stats,
    History => history,
    Ping => ping,
    Rpc => rpc,
    Refresh => refresh,
    SubRefresh => sub_refresh,
});

one_of_fields!(set_push, take_pushes, PushBody, Push {
    Publication => publication,
    Join => join,
    Leave => leave,
    Unsubscribe => unsubscribe,
    Message => message,
    Subscribe => subscribe,
    Connect => connect,
    Disconnect => disconnect,
    Refresh => refresh,
});

/// At most one: `Err(count)` when several.
fn at_most_one<T>(mut found: Vec<T>) -> Result<Option<T>, usize> {
    match found.len() {
        0 | 1 => Ok(found.pop()),
        count => Err(count),
    }
}

fn push_wire(channel: &str, body: &PushBody) -> wire::Push {
    let mut push = wire::Push {
        channel: channel.to_owned(),
        ..wire::Push::default()
    };
    set_push(body, &mut push);
    push
}

impl Msg for Push {
    type Wire = wire::Push;
    fn to_wire(&self) -> wire::Push {
        push_wire(&self.channel, &self.body)
    }
    fn from_wire(mut wire: wire::Push) -> Self {
        // A push without a body Plexus knows reads as an empty message: a client ignores it.
        let body = take_pushes(&mut wire)
            .into_iter()
            .next()
            .unwrap_or(PushBody::Message(types::Message::default()));
        Push {
            channel: wire.channel,
            body,
        }
    }
}

/// Parses one binary WebSocket message (or an HTTP request body): length-delimited `Command`s.
///
/// Each command gives one result, in order, as in the JSON encoding (see
/// [`parse_frame`](super::parse_frame)). Bytes that are not a command end the list with a
/// malformed error, which is fatal.
pub fn parse_frame(mut data: &[u8]) -> Vec<Result<Incoming, ParseError>> {
    let mut all = Vec::new();
    while !data.is_empty() {
        match wire::Command::decode_length_delimited(&mut data) {
            Ok(mut command) => {
                let requests = at_most_one(take_requests(&mut command));
                all.push(classify(command.id, requests));
            }
            Err(error) => {
                all.push(Err(ParseError::malformed(error.to_string())));
                break;
            }
        }
    }
    all
}

/// Encodes a reply, length-delimited: replies are joined by concatenation.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut wire = wire::Reply {
        id: reply.id,
        error: reply.error.as_ref().map(Msg::to_wire),
        ..wire::Reply::default()
    };
    if let Some(body) = &reply.body {
        set_result(body, &mut wire);
    }
    wire.encode_length_delimited_to_vec()
}

/// Encodes the reply holding a push about `channel`, length-delimited; encode once, send the
/// same bytes to every subscriber.
pub fn encode_push(channel: &str, body: &PushBody) -> Vec<u8> {
    wire::Reply {
        push: Some(push_wire(channel, body)),
        ..wire::Reply::default()
    }
    .encode_length_delimited_to_vec()
}

/// Encodes a command as a client sends it, length-delimited (for tests and Rust clients).
pub fn encode_command(id: u32, request: &Request) -> Vec<u8> {
    let mut wire = wire::Command {
        id,
        ..wire::Command::default()
    };
    set_request(request, &mut wire);
    wire.encode_length_delimited_to_vec()
}

/// Why bytes from the server could not be read as replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad protobuf reply: {0}")]
pub struct DecodeError(String);

/// Parses a message from the server (length-delimited replies), as a client would.
pub fn parse_replies(mut data: &[u8]) -> Vec<Result<Reply, DecodeError>> {
    let mut all = Vec::new();
    while !data.is_empty() {
        match wire::Reply::decode_length_delimited(&mut data) {
            Ok(mut wire) => all.push(
                at_most_one(take_results(&mut wire))
                    .map(|body| Reply {
                        id: wire.id,
                        error: wire.error.map(Msg::from_wire),
                        body,
                    })
                    .map_err(|count| DecodeError(format!("reply with {count} results"))),
            ),
            Err(error) => {
                all.push(Err(DecodeError(error.to_string())));
                break;
            }
        }
    }
    all
}

/// A command sent through `POST /emulation` for an HTTP-streaming session (Protobuf form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulationRequest {
    pub node: String,
    pub session: String,
    /// Length-delimited commands, as in a WebSocket message.
    pub data: Bytes,
}

impl EmulationRequest {
    pub fn decode(body: &[u8]) -> Result<EmulationRequest, DecodeError> {
        let wire =
            wire::EmulationRequest::decode(body).map_err(|error| DecodeError(error.to_string()))?;
        Ok(EmulationRequest {
            node: wire.node,
            session: wire.session,
            data: wire.data,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        wire::EmulationRequest {
            node: self.node.clone(),
            session: self.session.clone(),
            data: self.data.clone(),
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ErrorCode, Format, ParseErrorKind};

    fn one(data: &[u8]) -> Result<Incoming, ParseError> {
        let mut all = parse_frame(data);
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[test]
    fn known_bytes_of_a_command() {
        // {id: 1, publish: {channel: "a", data: [0xff]}} as protoc writes it.
        let bytes = [10, 0x08, 1, 0x3a, 6, 0x0a, 1, b'a', 0x12, 1, 0xff];
        assert_eq!(
            one(&bytes),
            Ok(Incoming::Command {
                id: 1,
                request: Request::Publish(types::PublishRequest {
                    channel: "a".into(),
                    data: Some(Payload::new(vec![0xff])),
                }),
            })
        );
        let again = encode_command(
            1,
            &Request::Publish(types::PublishRequest {
                channel: "a".into(),
                data: Some(Payload::new(vec![0xff])),
            }),
        );
        assert_eq!(again, bytes);
    }

    #[test]
    fn ping_and_pong_are_single_zero_bytes() {
        assert_eq!(encode_reply(&Reply::server_ping()), [0]);
        assert_eq!(one(&[0]), Ok(Incoming::Pong));
        assert_eq!(Format::Protobuf.server_ping(), [0]);
    }

    #[test]
    fn commands_round_trip_in_one_message() {
        let subscribe = Request::Subscribe(types::SubscribeRequest {
            channel: "news".into(),
            recover: true,
            epoch: "e".into(),
            offset: u64::MAX,
            join_leave: true,
            ..Default::default()
        });
        let history = Request::History(types::HistoryRequest {
            channel: "news".into(),
            limit: -1,
            since: Some(types::StreamPosition {
                offset: 3,
                epoch: "e".into(),
            }),
            reverse: true,
        });
        let mut frame = encode_command(2, &subscribe);
        frame.extend(encode_command(3, &history));
        frame.push(0); // a pong
        let all: Vec<_> = parse_frame(&frame).into_iter().collect();
        assert_eq!(
            all,
            vec![
                Ok(Incoming::Command {
                    id: 2,
                    request: subscribe
                }),
                Ok(Incoming::Command {
                    id: 3,
                    request: history
                }),
                Ok(Incoming::Pong),
            ]
        );
    }

    #[test]
    fn replies_round_trip() {
        let info = types::ClientInfo {
            user: "u".into(),
            client: "c".into(),
            conn_info: Some(Payload::new(vec![1, 2])),
            chan_info: None,
        };
        let publication = types::Publication {
            data: Some(Payload::new(&b"\x00binary"[..])),
            info: Some(info.clone()),
            offset: 7,
            ..Default::default()
        };
        let replies = [
            Reply::result(
                1,
                types::ConnectResult {
                    client: "c".into(),
                    ping: 25,
                    pong: true,
                    subs: [(
                        "s".to_owned(),
                        types::SubscribeResult {
                            publications: vec![publication.clone()],
                            recoverable: true,
                            epoch: "e".into(),
                            offset: 7,
                            ..Default::default()
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
            ),
            Reply::result(
                2,
                types::PresenceResult {
                    presence: [("c".to_owned(), info.clone())].into(),
                },
            ),
            Reply::error(3, ErrorCode::TooManyRequests),
            Reply::push(Push::new("ch", publication)),
            Reply::push(Push::new("ch", types::Join { info })),
            Reply::server_ping(),
        ];
        let mut frame = Vec::new();
        for reply in &replies {
            frame.extend(encode_reply(reply));
        }
        let parsed: Vec<Reply> = parse_replies(&frame)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(parsed, replies);
        let Reply { body, .. } = &replies[3];
        let Some(ReplyBody::Push(push)) = body else {
            unreachable!()
        };
        assert_eq!(
            encode_push(&push.channel, &push.body),
            encode_reply(&replies[3])
        );
    }

    #[test]
    fn bad_input_is_a_fatal_bad_request() {
        // A length past the end.
        let all = parse_frame(&[5, 8]);
        assert_eq!(all.len(), 1);
        let error = all[0].clone().unwrap_err();
        assert_eq!(error.kind, ParseErrorKind::Malformed);
        assert!(error.is_fatal());
        // A command with an id and no request; then one without an id.
        let no_request = [2, 0x08, 4];
        assert_eq!(
            one(&no_request).unwrap_err().kind,
            ParseErrorKind::NoRequest
        );
        let no_id = encode_command(0, &Request::Ping(types::PingRequest {}));
        assert_eq!(one(&no_id).unwrap_err().kind, ParseErrorKind::MissingId);
        // Two requests in one command: an error reply, not fatal.
        let mut two = wire::Command {
            id: 9,
            ping: Some(wire::PingRequest {}),
            presence: Some(wire::PresenceRequest::default()),
            ..Default::default()
        };
        let error = one(&two.encode_length_delimited_to_vec()).unwrap_err();
        assert_eq!(error.kind, ParseErrorKind::MultipleRequests);
        assert!(!error.is_fatal());
        two.presence = None;
        assert!(one(&two.encode_length_delimited_to_vec()).is_ok());
    }

    #[test]
    fn emulation_requests_round_trip() {
        let request = EmulationRequest {
            node: "n".into(),
            session: "s".into(),
            data: Bytes::from(encode_command(1, &Request::Ping(types::PingRequest {}))),
        };
        assert_eq!(EmulationRequest::decode(&request.encode()), Ok(request));
        assert!(EmulationRequest::decode(&[0xff]).is_err());
    }
}
