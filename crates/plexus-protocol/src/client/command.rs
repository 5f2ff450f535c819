//! Client to server: commands, the client's pong, and [`parse_frame`].

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::codes::{DisconnectCode, ErrorCode};
use super::reply::Reply;
use super::types::{
    null_default, ConnectRequest, HistoryRequest, PingRequest, PresenceRequest,
    PresenceStatsRequest, PublishRequest, RefreshRequest, RpcRequest, SendRequest,
    SubRefreshRequest, SubscribeRequest, UnsubscribeRequest,
};
use super::{compact_json, one_of};

/// The request a command carries: exactly one of the `Command` message's request fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Connect(ConnectRequest),
    Subscribe(SubscribeRequest),
    Unsubscribe(UnsubscribeRequest),
    Publish(PublishRequest),
    Presence(PresenceRequest),
    PresenceStats(PresenceStatsRequest),
    History(HistoryRequest),
    Ping(PingRequest),
    Send(SendRequest),
    Rpc(RpcRequest),
    Refresh(RefreshRequest),
    SubRefresh(SubRefreshRequest),
}

impl Request {
    /// The request's field name in a command (and of its result in the reply), e.g. `sub_refresh`.
    pub const fn method(&self) -> &'static str {
        match self {
            Request::Connect(_) => "connect",
            Request::Subscribe(_) => "subscribe",
            Request::Unsubscribe(_) => "unsubscribe",
            Request::Publish(_) => "publish",
            Request::Presence(_) => "presence",
            Request::PresenceStats(_) => "presence_stats",
            Request::History(_) => "history",
            Request::Ping(_) => "ping",
            Request::Send(_) => "send",
            Request::Rpc(_) => "rpc",
            Request::Refresh(_) => "refresh",
            Request::SubRefresh(_) => "sub_refresh",
        }
    }

    /// Whether the server answers with a reply; only `send` has none, so only `send` may come
    /// without a command id.
    pub const fn expects_reply(&self) -> bool {
        !matches!(self, Request::Send(_))
    }

    /// The channel the request is about, if it names one.
    pub fn channel(&self) -> Option<&str> {
        match self {
            Request::Subscribe(r) => Some(&r.channel),
            Request::Unsubscribe(r) => Some(&r.channel),
            Request::Publish(r) => Some(&r.channel),
            Request::Presence(r) => Some(&r.channel),
            Request::PresenceStats(r) => Some(&r.channel),
            Request::History(r) => Some(&r.channel),
            Request::SubRefresh(r) => Some(&r.channel),
            Request::Connect(_)
            | Request::Ping(_)
            | Request::Send(_)
            | Request::Rpc(_)
            | Request::Refresh(_) => None,
        }
    }

    fn serialize_entry<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        let key = self.method();
        match self {
            Request::Connect(r) => map.serialize_entry(key, r),
            Request::Subscribe(r) => map.serialize_entry(key, r),
            Request::Unsubscribe(r) => map.serialize_entry(key, r),
            Request::Publish(r) => map.serialize_entry(key, r),
            Request::Presence(r) => map.serialize_entry(key, r),
            Request::PresenceStats(r) => map.serialize_entry(key, r),
            Request::History(r) => map.serialize_entry(key, r),
            Request::Ping(r) => map.serialize_entry(key, r),
            Request::Send(r) => map.serialize_entry(key, r),
            Request::Rpc(r) => map.serialize_entry(key, r),
            Request::Refresh(r) => map.serialize_entry(key, r),
            Request::SubRefresh(r) => map.serialize_entry(key, r),
        }
    }
}

/// One JSON object a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The client's answer to a server ping: an object with no id and no request, normally `{}`.
    Pong,
    /// A command. `id` is 0 only for a `send` request, which has no reply.
    Command { id: u32, request: Request },
}

/// What was wrong with one object of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseErrorKind {
    /// Not JSON, not an object, or a field of the wrong type.
    #[error("malformed command")]
    Malformed,
    /// A command id but no known request field (an unknown method is ignored like any unknown
    /// field, so it lands here too).
    #[error("command without a known request")]
    NoRequest,
    /// More than one request field in one command.
    #[error("command with more than one request")]
    MultipleRequests,
    /// A request other than `send` without a command id, so its reply could not be matched.
    #[error("command id required")]
    MissingId,
}

/// One object of a frame that is not a valid command.
///
/// Every kind is a "bad request" ([`ErrorCode::BadRequest`], 107). Following Centrifugo, all but
/// one are *fatal*: the server should stop handling the frame and disconnect with
/// [`DisconnectCode::BadRequest`] (3501). The exception is a command with an id and more than one
/// request, which Centrifugo would not even notice (it takes the first); Plexus refuses it with an
/// error reply and keeps the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct ParseError {
    /// The command id, when the object was valid JSON with a valid non-zero `id`.
    pub id: Option<u32>,
    pub kind: ParseErrorKind,
    /// A human-readable detail for logs (never sent to the client).
    pub detail: String,
}

impl ParseError {
    /// Bytes that are not a command at all (no id known): fatal.
    pub(super) fn malformed(detail: String) -> ParseError {
        ParseError {
            id: None,
            kind: ParseErrorKind::Malformed,
            detail,
        }
    }

    /// The reply error code: always 107, bad request.
    pub const fn error_code(&self) -> ErrorCode {
        ErrorCode::BadRequest
    }

    /// Whether the connection should be closed (with [`Self::disconnect`]) rather than answered.
    pub const fn is_fatal(&self) -> bool {
        match self.kind {
            ParseErrorKind::MultipleRequests => self.id.is_none(),
            ParseErrorKind::Malformed | ParseErrorKind::NoRequest | ParseErrorKind::MissingId => {
                true
            }
        }
    }

    /// The disconnect to close the connection with, when fatal: 3501, bad request.
    pub const fn disconnect(&self) -> Option<DisconnectCode> {
        if self.is_fatal() {
            Some(DisconnectCode::BadRequest)
        } else {
            None
        }
    }

    /// The error reply to send, when not fatal.
    pub fn reply(&self) -> Option<Reply> {
        match self.id {
            Some(id) if !self.is_fatal() => Some(Reply::error(id, self.error_code())),
            _ => None,
        }
    }
}

/// The `Command` message as read: every request field optional, unknown fields ignored.
#[derive(Deserialize)]
struct CommandIn {
    #[serde(default, deserialize_with = "null_default")]
    id: u32,
    #[serde(default)]
    connect: Option<ConnectRequest>,
    #[serde(default)]
    subscribe: Option<SubscribeRequest>,
    #[serde(default)]
    unsubscribe: Option<UnsubscribeRequest>,
    #[serde(default)]
    publish: Option<PublishRequest>,
    #[serde(default)]
    presence: Option<PresenceRequest>,
    #[serde(default)]
    presence_stats: Option<PresenceStatsRequest>,
    #[serde(default)]
    history: Option<HistoryRequest>,
    #[serde(default)]
    ping: Option<PingRequest>,
    #[serde(default)]
    send: Option<SendRequest>,
    #[serde(default)]
    rpc: Option<RpcRequest>,
    #[serde(default)]
    refresh: Option<RefreshRequest>,
    #[serde(default)]
    sub_refresh: Option<SubRefreshRequest>,
}

/// Reads only the id of an object that failed to parse as a command.
#[derive(Deserialize)]
struct IdProbe {
    #[serde(default)]
    id: Option<u32>,
}

/// Parses one JSON object (one line of a frame).
pub fn parse_command(line: &str) -> Result<Incoming, ParseError> {
    let command: CommandIn = serde_json::from_str(line).map_err(|e| ParseError {
        id: serde_json::from_str::<IdProbe>(line)
            .ok()
            .and_then(|probe| probe.id)
            .filter(|&id| id != 0),
        kind: ParseErrorKind::Malformed,
        detail: e.to_string(),
    })?;
    let requests = one_of([
        command.connect.map(Request::Connect),
        command.subscribe.map(Request::Subscribe),
        command.unsubscribe.map(Request::Unsubscribe),
        command.publish.map(Request::Publish),
        command.presence.map(Request::Presence),
        command.presence_stats.map(Request::PresenceStats),
        command.history.map(Request::History),
        command.ping.map(Request::Ping),
        command.send.map(Request::Send),
        command.rpc.map(Request::Rpc),
        command.refresh.map(Request::Refresh),
        command.sub_refresh.map(Request::SubRefresh),
    ]);
    classify(command.id, requests)
}

/// What a decoded command is, in either encoding: `requests` is its one request field, or
/// `Err(count)` when it had several.
pub(super) fn classify(
    id: u32,
    requests: Result<Option<Request>, usize>,
) -> Result<Incoming, ParseError> {
    let error = |kind, detail: String| ParseError {
        id: (id != 0).then_some(id),
        kind,
        detail,
    };
    let request = requests.map_err(|count| {
        error(
            ParseErrorKind::MultipleRequests,
            format!("{count} request fields in one command"),
        )
    })?;
    match request {
        None if id == 0 => Ok(Incoming::Pong),
        None => Err(error(
            ParseErrorKind::NoRequest,
            "no known request field".to_owned(),
        )),
        Some(request) if id == 0 && request.expects_reply() => Err(error(
            ParseErrorKind::MissingId,
            format!("{} without a command id", request.method()),
        )),
        Some(request) => Ok(Incoming::Command { id, request }),
    }
}

/// Parses one WebSocket text message: JSON objects separated by `\n`.
///
/// Blank lines (a trailing newline, `\r\n` endings) are skipped. Each object gives one result, in
/// order; the caller handles them in order and stops at the first fatal error
/// ([`ParseError::is_fatal`]), as Centrifugo does.
pub fn parse_frame(text: &str) -> Vec<Result<Incoming, ParseError>> {
    text.split('\n')
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(parse_command)
        .collect()
}

/// A command as written, for [`encode_command`].
struct CommandOut<'a> {
    id: u32,
    request: &'a Request,
}

impl Serialize for CommandOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if self.id != 0 {
            map.serialize_entry("id", &self.id)?;
        }
        self.request.serialize_entry(&mut map)?;
        map.end()
    }
}

/// Encodes a command as a client would send it (for tests, benchmarks and Rust clients).
pub fn encode_command(id: u32, request: &Request) -> Vec<u8> {
    compact_json(&CommandOut { id, request })
}

/// The client's pong, as a client sends it.
pub const CLIENT_PONG: &[u8] = b"{}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Error, Payload};

    fn one(text: &str) -> Result<Incoming, ParseError> {
        let mut all = parse_frame(text);
        assert_eq!(all.len(), 1, "{text}");
        all.remove(0)
    }

    fn command(text: &str) -> (u32, Request) {
        match one(text) {
            Ok(Incoming::Command { id, request }) => (id, request),
            other => panic!("{text}: {other:?}"),
        }
    }

    fn round_trip(text: &str) {
        let (id, request) = command(text);
        assert_eq!(
            String::from_utf8(encode_command(id, &request)).unwrap(),
            text
        );
    }

    #[test]
    fn connect() {
        let (id, request) = command(r#"{"id":1,"connect":{"token":"t","name":"js"}}"#);
        assert_eq!(id, 1);
        assert_eq!(
            request,
            Request::Connect(ConnectRequest {
                token: "t".into(),
                name: "js".into(),
                ..Default::default()
            })
        );
        round_trip(r#"{"id":1,"connect":{"token":"t","name":"js"}}"#);
    }

    #[test]
    fn subscribe_with_recovery() {
        let text =
            r#"{"id":2,"subscribe":{"channel":"chat:a","recover":true,"epoch":"xyz","offset":5}}"#;
        let (id, request) = command(text);
        assert_eq!(id, 2);
        assert_eq!(
            request,
            Request::Subscribe(SubscribeRequest {
                channel: "chat:a".into(),
                recover: true,
                epoch: "xyz".into(),
                offset: 5,
                ..Default::default()
            })
        );
        assert_eq!(request.channel(), Some("chat:a"));
        round_trip(text);
    }

    #[test]
    fn publish_data_stays_byte_identical() {
        let text = r#"{"id":3,"publish":{"channel":"chat:a","data":{"text":"hi"}}}"#;
        let (_, request) = command(text);
        let Request::Publish(publish) = &request else {
            panic!("{request:?}")
        };
        assert_eq!(
            publish.data.as_ref().unwrap().as_bytes(),
            br#"{"text":"hi"}"#
        );
        round_trip(text);

        // Whitespace and key order inside data are kept as sent.
        let (_, request) =
            command(r#"{"id":3,"publish":{"channel":"c","data":{ "b" : 1,"a":[ ]}}}"#);
        let Request::Publish(publish) = request else {
            panic!()
        };
        assert_eq!(publish.data.unwrap().as_bytes(), br#"{ "b" : 1,"a":[ ]}"#);
    }

    #[test]
    fn every_request_round_trips() {
        for text in [
            r#"{"id":1,"unsubscribe":{"channel":"c"}}"#,
            r#"{"id":1,"presence":{"channel":"c"}}"#,
            r#"{"id":1,"presence_stats":{"channel":"c"}}"#,
            r#"{"id":1,"history":{"channel":"c","limit":10,"since":{"offset":3,"epoch":"e"},"reverse":true}}"#,
            r#"{"id":1,"ping":{}}"#,
            r#"{"send":{"data":"x"}}"#,
            r#"{"id":1,"rpc":{"data":[1],"method":"m"}}"#,
            r#"{"id":1,"refresh":{"token":"t"}}"#,
            r#"{"id":1,"sub_refresh":{"channel":"c","token":"t"}}"#,
            r#"{"id":1,"connect":{"subs":{"a":{"recover":true,"offset":1}}}}"#,
        ] {
            round_trip(text);
        }
    }

    #[test]
    fn batch_of_three_with_trailing_newline() {
        let frame = concat!(
            r#"{"id":1,"connect":{}}"#,
            "\n",
            r#"{"id":2,"subscribe":{"channel":"a"}}"#,
            "\r\n\n",
            r#"{"id":3,"publish":{"channel":"a","data":1}}"#,
            "\n"
        );
        let ids: Vec<_> = parse_frame(frame)
            .into_iter()
            .map(|r| match r.unwrap() {
                Incoming::Command { id, request } => (id, request.method()),
                Incoming::Pong => panic!("pong"),
            })
            .collect();
        assert_eq!(ids, [(1, "connect"), (2, "subscribe"), (3, "publish")]);
        assert!(parse_frame("").is_empty());
        assert!(parse_frame("\n\n").is_empty());
    }

    #[test]
    fn empty_object_is_a_pong() {
        assert_eq!(one("{}"), Ok(Incoming::Pong));
        assert_eq!(one(" {} \n"), Ok(Incoming::Pong));
        assert_eq!(one(r#"{"id":0}"#), Ok(Incoming::Pong));
        let frame = parse_frame("{}\n{\"id\":4,\"ping\":{}}");
        assert_eq!(frame[0], Ok(Incoming::Pong));
        assert!(matches!(frame[1], Ok(Incoming::Command { id: 4, .. })));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let (id, request) =
            command(r#"{"id":7,"future":{"x":1},"subscribe":{"channel":"a","later":true}}"#);
        assert_eq!(id, 7);
        assert_eq!(
            request,
            Request::Subscribe(SubscribeRequest {
                channel: "a".into(),
                ..Default::default()
            })
        );
    }

    #[test]
    fn two_requests_are_refused_with_an_error_reply() {
        let err =
            one(r#"{"id":9,"subscribe":{"channel":"a"},"publish":{"channel":"a"}}"#).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::MultipleRequests);
        assert_eq!(err.id, Some(9));
        assert!(!err.is_fatal());
        assert_eq!(err.disconnect(), None);
        assert_eq!(
            err.reply(),
            Some(Reply {
                id: 9,
                error: Some(Error {
                    code: 107,
                    message: "bad request".into(),
                    temporary: false
                }),
                body: None
            })
        );
        // Without an id there is nothing to answer.
        let err = one(r#"{"send":{},"ping":{}}"#).unwrap_err();
        assert!(err.is_fatal());
    }

    #[test]
    fn bad_json_is_fatal() {
        for text in [
            "{",
            "not json",
            "[1,2]",
            "null",
            "5",
            r#"{"id":1,"connect":{}} x"#,
            r#"{"id":"1","connect":{}}"#,
            r#"{"id":-1,"connect":{}}"#,
            r#"{"id":1,"subscribe":"chat"}"#,
        ] {
            let err = one(text).unwrap_err();
            assert_eq!(err.kind, ParseErrorKind::Malformed, "{text}");
            assert!(err.is_fatal());
            assert_eq!(err.disconnect(), Some(DisconnectCode::BadRequest));
            assert_eq!(err.error_code(), ErrorCode::BadRequest);
            assert_eq!(err.reply(), None);
        }
        // The id is still read when the JSON itself is valid.
        let err = one(r#"{"id":12,"subscribe":{"channel":5}}"#).unwrap_err();
        assert_eq!((err.kind, err.id), (ParseErrorKind::Malformed, Some(12)));
        // One bad line does not hide the others.
        let frame = parse_frame("{\"id\":1,\"ping\":{}}\n{oops\n{}");
        assert!(frame[0].is_ok() && frame[1].is_err() && frame[2].is_ok());
    }

    #[test]
    fn no_request_and_missing_id_are_fatal() {
        let err = one(r#"{"id":5}"#).unwrap_err();
        assert_eq!((err.kind, err.id), (ParseErrorKind::NoRequest, Some(5)));
        assert!(err.is_fatal());
        let err = one(r#"{"id":5,"unknown_method":{}}"#).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::NoRequest);
        let err = one(r#"{"subscribe":{"channel":"a"}}"#).unwrap_err();
        assert_eq!((err.kind, err.id), (ParseErrorKind::MissingId, None));
        assert_eq!(err.disconnect(), Some(DisconnectCode::BadRequest));
        // send needs no id.
        assert_eq!(
            one(r#"{"send":{"data":{"a":1}}}"#),
            Ok(Incoming::Command {
                id: 0,
                request: Request::Send(SendRequest {
                    data: Some(Payload::json(r#"{"a":1}"#).unwrap())
                })
            })
        );
    }

    #[test]
    fn nulls_read_as_absent() {
        let (id, request) =
            command(r#"{"id":1,"connect":{"token":null,"data":null,"subs":null},"publish":null}"#);
        assert_eq!(id, 1);
        assert_eq!(request, Request::Connect(ConnectRequest::default()));
    }
}
