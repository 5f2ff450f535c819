//! The messages of the protocol, one struct per protocol message.
//!
//! Field names are the protocol's (snake_case) and fields are in the protocol's order, which is
//! the order they are written in. Every field follows the same JSON rules:
//!
//! - written only when it differs from its default (no `""`, `0`, `false`, `{}`, `[]` or `null`);
//! - missing or `null` when read means the default;
//! - unknown fields are ignored when read.
//!
//! Only the envelopes ([`Command`](super::Request), [`Reply`](super::Reply),
//! [`Push`](super::Push)) are written by hand; these are plain derives.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::payload::Payload;

/// `skip_serializing_if` for every field: leave out default values.
pub(super) fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// `deserialize_with` for every field: `null` reads as the default, like a missing field (also
/// for other JSON the server reads in Centrifugo's style, the proxies' answers).
pub fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Declares a protocol message with the field rules of this module.
macro_rules! message {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                #[serde(deserialize_with = "null_default", skip_serializing_if = "is_default")]
                pub $field: $ty,
            )*
        }
    };
}

message! {
    /// A reply's error.
    pub struct Error {
        pub code: u32,
        pub message: String,
        /// The client may retry.
        pub temporary: bool,
    }
}

message! {
    /// Who a publication, join or leave comes from, or who is present.
    pub struct ClientInfo {
        pub user: String,
        /// The client (connection) id.
        pub client: String,
        /// Connection info from the connection token or connect proxy.
        pub conn_info: Option<Payload>,
        /// Channel info from the subscription token or subscribe proxy.
        pub chan_info: Option<Payload>,
    }
}

message! {
    /// One message in a channel.
    pub struct Publication {
        pub data: Option<Payload>,
        /// The publisher, when the publication came from a client.
        pub info: Option<ClientInfo>,
        /// Position in the channel stream (channels with history).
        pub offset: u64,
        pub tags: BTreeMap<String, String>,
        /// `data` is a delta against the previous publication.
        pub delta: bool,
    }
}

message! {
    /// Push: someone subscribed to the channel.
    pub struct Join {
        pub info: ClientInfo,
    }
}

message! {
    /// Push: someone unsubscribed from the channel.
    pub struct Leave {
        pub info: ClientInfo,
    }
}

message! {
    /// Push: the server unsubscribed this client from the channel (see
    /// [`UnsubscribeCode`](super::UnsubscribeCode)).
    pub struct Unsubscribe {
        pub code: u32,
        pub reason: String,
    }
}

message! {
    /// Push: the server subscribed this client to the channel (server-side subscription).
    pub struct Subscribe {
        pub recoverable: bool,
        pub epoch: String,
        pub offset: u64,
        pub positioned: bool,
        pub data: Option<Payload>,
    }
}

message! {
    /// Push: an asynchronous message to this client, outside any channel.
    pub struct Message {
        pub data: Option<Payload>,
    }
}

message! {
    /// Push: the connection was established (unidirectional transports).
    pub struct Connect {
        pub client: String,
        pub version: String,
        pub data: Option<Payload>,
        pub subs: BTreeMap<String, SubscribeResult>,
        pub expires: bool,
        pub ttl: u32,
        pub ping: u32,
        pub pong: bool,
        pub session: String,
        pub node: String,
    }
}

message! {
    /// Push: the server is about to close the connection (see
    /// [`DisconnectCode`](super::DisconnectCode)).
    pub struct Disconnect {
        pub code: u32,
        pub reason: String,
        /// Legacy hint; protocol v2 clients decide from `code`.
        pub reconnect: bool,
    }
}

message! {
    /// Push: the connection was refreshed by the server.
    pub struct Refresh {
        pub expires: bool,
        pub ttl: u32,
    }
}

message! {
    /// Request: authenticate the connection. Must be the first command.
    pub struct ConnectRequest {
        pub token: String,
        pub data: Option<Payload>,
        /// Server-side subscriptions to recover, by channel.
        pub subs: BTreeMap<String, SubscribeRequest>,
        /// The SDK's name, e.g. `js`.
        pub name: String,
        /// The SDK's version.
        pub version: String,
    }
}

message! {
    /// Result of [`ConnectRequest`].
    pub struct ConnectResult {
        /// The client (connection) id given by the server.
        pub client: String,
        /// The server's version.
        pub version: String,
        pub expires: bool,
        /// Seconds until the connection expires, when `expires`.
        pub ttl: u32,
        pub data: Option<Payload>,
        /// Server-side subscriptions, by channel.
        pub subs: BTreeMap<String, SubscribeResult>,
        /// Seconds between server pings (0: no pings).
        pub ping: u32,
        /// The client must answer server pings with a pong.
        pub pong: bool,
        pub session: String,
        pub node: String,
    }
}

message! {
    /// Request: refresh the connection with a new token.
    pub struct RefreshRequest {
        pub token: String,
    }
}

message! {
    /// Result of [`RefreshRequest`].
    pub struct RefreshResult {
        pub client: String,
        pub version: String,
        pub expires: bool,
        pub ttl: u32,
    }
}

message! {
    /// Request: subscribe to a channel.
    pub struct SubscribeRequest {
        pub channel: String,
        pub token: String,
        /// Recover missed publications since `epoch`/`offset`.
        pub recover: bool,
        pub epoch: String,
        pub offset: u64,
        pub data: Option<Payload>,
        pub positioned: bool,
        pub recoverable: bool,
        /// Ask for join/leave pushes.
        pub join_leave: bool,
        /// Delta compression wanted, e.g. `fossil`.
        pub delta: String,
        /// Only publications whose tags match are wanted (see [`FilterNode::matches`]).
        pub tf: Option<Box<FilterNode>>,
        /// Bits of [`SubscribeRequest::REJECT_UNRECOVERED`] and the like (centrifuge-js 5.8
        /// sends them); unknown bits are ignored.
        pub flag: i64,
    }
}

impl SubscribeRequest {
    /// Channel compaction: pushes may name the channel by a number instead. Not given:
    /// Plexus's pushes always name the channel, which every SDK reads.
    pub const CHANNEL_COMPACTION: i64 = 1;
    /// A recovering subscribe that cannot recover everything fails with 112 instead of
    /// succeeding with `recovered: false` (centrifuge-js with `getState` then reloads the
    /// application's state and subscribes from its new position).
    pub const REJECT_UNRECOVERED: i64 = 2;
}

message! {
    /// A tags filter (Centrifugo's publication filtering): a comparison of one tag when `op`
    /// is empty, else `and`, `or` or `not` of `nodes`.
    pub struct FilterNode {
        /// `""` (a comparison), `and`, `or` or `not`.
        pub op: String,
        /// The tag a comparison looks at.
        pub key: String,
        /// `eq`, `neq`, `in`, `nin`, `ex`, `nex`, `sw`, `ew`, `ct`, `gt`, `gte`, `lt`, `lte`.
        pub cmp: String,
        pub val: String,
        /// The values of `in` and `nin`.
        pub vals: Vec<String>,
        pub nodes: Vec<FilterNode>,
    }
}

message! {
    /// Result of [`SubscribeRequest`].
    pub struct SubscribeResult {
        pub expires: bool,
        pub ttl: u32,
        pub recoverable: bool,
        pub epoch: String,
        /// Recovered publications, oldest first.
        pub publications: Vec<Publication>,
        pub recovered: bool,
        pub offset: u64,
        pub positioned: bool,
        pub data: Option<Payload>,
        pub was_recovering: bool,
        pub delta: bool,
    }
}

message! {
    /// Request: refresh a subscription with a new token.
    pub struct SubRefreshRequest {
        pub channel: String,
        pub token: String,
    }
}

message! {
    /// Result of [`SubRefreshRequest`].
    pub struct SubRefreshResult {
        pub expires: bool,
        pub ttl: u32,
    }
}

message! {
    /// Request: unsubscribe from a channel.
    pub struct UnsubscribeRequest {
        pub channel: String,
    }
}

message! {
    /// Result of [`UnsubscribeRequest`] (empty).
    pub struct UnsubscribeResult {}
}

message! {
    /// Request: publish into a channel.
    pub struct PublishRequest {
        pub channel: String,
        pub data: Option<Payload>,
    }
}

message! {
    /// Result of [`PublishRequest`] (empty).
    pub struct PublishResult {}
}

message! {
    /// Request: who is in a channel.
    pub struct PresenceRequest {
        pub channel: String,
    }
}

message! {
    /// Result of [`PresenceRequest`].
    pub struct PresenceResult {
        /// By client (connection) id.
        pub presence: BTreeMap<String, ClientInfo>,
    }
}

message! {
    /// Request: how many are in a channel.
    pub struct PresenceStatsRequest {
        pub channel: String,
    }
}

message! {
    /// Result of [`PresenceStatsRequest`].
    pub struct PresenceStatsResult {
        pub num_clients: u32,
        pub num_users: u32,
    }
}

message! {
    /// A position in a channel stream.
    pub struct StreamPosition {
        pub offset: u64,
        pub epoch: String,
    }
}

message! {
    /// Request: a channel's history.
    pub struct HistoryRequest {
        pub channel: String,
        /// How many publications at most (0: none, only the stream position; -1: all kept).
        pub limit: i32,
        /// Start after this position (`None`: from the start, or the end when `reverse`).
        pub since: Option<StreamPosition>,
        pub reverse: bool,
    }
}

message! {
    /// Result of [`HistoryRequest`].
    pub struct HistoryResult {
        pub publications: Vec<Publication>,
        pub epoch: String,
        pub offset: u64,
    }
}

message! {
    /// Request: a client-initiated ping (empty).
    pub struct PingRequest {}
}

message! {
    /// Result of [`PingRequest`] (empty).
    pub struct PingResult {}
}

message! {
    /// Request: a remote procedure call.
    pub struct RpcRequest {
        pub data: Option<Payload>,
        pub method: String,
    }
}

message! {
    /// Result of [`RpcRequest`].
    pub struct RpcResult {
        pub data: Option<Payload>,
    }
}

message! {
    /// Request: an asynchronous message to the server; it has no reply and needs no id.
    pub struct SendRequest {
        pub data: Option<Payload>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_left_out_and_nulls_read_as_defaults() {
        assert_eq!(
            serde_json::to_string(&SubscribeResult::default()).unwrap(),
            "{}"
        );
        let parsed: SubscribeRequest = serde_json::from_str(
            r#"{"channel":"a","token":null,"offset":null,"data":null,"recover":null}"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            SubscribeRequest {
                channel: "a".into(),
                ..Default::default()
            }
        );
        let since: HistoryRequest =
            serde_json::from_str(r#"{"channel":"a","since":{},"limit":-1}"#).unwrap();
        assert_eq!(since.since, Some(StreamPosition::default()));
        assert_eq!(
            serde_json::to_string(&since).unwrap(),
            r#"{"channel":"a","limit":-1,"since":{}}"#
        );
    }

    #[test]
    fn wrong_types_are_refused() {
        assert!(serde_json::from_str::<SubscribeRequest>(r#"{"channel":5}"#).is_err());
        assert!(serde_json::from_str::<SubscribeRequest>(r#"{"offset":-1}"#).is_err());
        assert!(serde_json::from_str::<SubscribeRequest>(r#"{"offset":"5"}"#).is_err());
    }

    #[test]
    fn offsets_are_plain_numbers() {
        let p = Publication {
            offset: u64::MAX,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"offset":18446744073709551615}"#
        );
    }
}
