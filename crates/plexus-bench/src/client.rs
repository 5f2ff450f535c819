//! Opening one client: a TCP socket bound to a 127.0.0.x source, the WebSocket handshake, and for
//! the native protocol `connect` (and `subscribe`) answered; why an attempt failed; closing.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use plexus_protocol::client::{
    encode_command, ConnectRequest, FilterNode, Format, Payload, PushBody, RawJson, ReplyBody,
    Request, SubscribeRequest,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::seq::{parse_stamp, Stamp};
use crate::target::{Sources, Target};
use crate::BenchError;

pub type Ws = WebSocketStream<TcpStream>;

/// How a client talks to the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// Raw WebSocket (`/echo`, `/chat/{room}`): connected once the handshake is done.
    Raw,
    /// The native protocol (`/connection/websocket`): `connect` with `token`, then `subscribe` to
    /// `channel` when there is one; connected once the server answered both.
    Native {
        token: String,
        channel: Option<String>,
        /// Sent with the subscribe as its tags filter (`tf`), to measure filtered delivery.
        tags_filter: Option<Box<FilterNode>>,
        /// Subscribe with delta compression (`delta: "fossil"`): publications come as Fossil
        /// deltas from the one before, which the subscriber applies.
        delta: bool,
        /// JSON, or Protobuf (binary messages, subprotocol `centrifuge-protobuf`): only
        /// `fanout`'s subscribers speak Protobuf; its publisher stays on JSON.
        format: Format,
    },
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Raw => "raw",
            Protocol::Native { .. } => "native",
        }
    }
}

/// Everything needed to open clients to one endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub target: Target,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Source addresses to bind, for IPv4 loopback targets.
    pub sources: Option<Sources>,
    /// Limit for the TCP connect, and again for the handshake (and the native replies).
    pub timeout: Duration,
    /// `SO_RCVBUF` for client sockets, set before connecting (`None`: the kernel's default and
    /// autotuning). A small one makes a slow reader's backlog reach the server sooner.
    pub recv_buffer: Option<u32>,
}

/// Why a client could not be opened, or why it ended.
#[derive(Debug)]
pub enum OpenError {
    /// This process ran out of file descriptors (EMFILE, ENFILE).
    FdLimit(io::Error),
    Io(io::Error),
    Timeout(&'static str),
    /// The server answered the upgrade with this status.
    Http(u16),
    /// The server closed with this code and reason.
    Closed(u16, String),
    /// The native protocol answered a command with an error.
    Reply {
        method: &'static str,
        code: u32,
        message: String,
    },
    Ws(String),
}

impl OpenError {
    pub fn is_fd_limit(&self) -> bool {
        matches!(self, OpenError::FdLimit(_))
    }

    /// A short reason, the key failures are counted under.
    pub fn reason(&self) -> String {
        match self {
            OpenError::FdLimit(error) => io_reason(error),
            OpenError::Io(error) => io_reason(error),
            OpenError::Timeout(what) => format!("timeout ({what})"),
            OpenError::Http(status) => format!("HTTP {status}"),
            OpenError::Closed(code, reason) if reason.is_empty() => format!("closed {code}"),
            OpenError::Closed(code, reason) => format!("closed {code} {reason}"),
            OpenError::Reply {
                method,
                code,
                message,
            } => {
                format!("{method} error {code}: {message}")
            }
            OpenError::Ws(message) => message.clone(),
        }
    }

    pub(crate) fn from_io(error: io::Error) -> OpenError {
        if is_fd_limit(&error) {
            OpenError::FdLimit(error)
        } else {
            OpenError::Io(error)
        }
    }

    pub fn from_ws(error: tungstenite::Error) -> OpenError {
        match error {
            tungstenite::Error::Io(error) => OpenError::from_io(error),
            tungstenite::Error::Http(response) => OpenError::Http(response.status().as_u16()),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                OpenError::Ws("connection closed".into())
            }
            tungstenite::Error::Protocol(error) => OpenError::Ws(format!("protocol: {error}")),
            other => OpenError::Ws(other.to_string()),
        }
    }
}

/// EMFILE (24) or ENFILE (23), the same numbers on Linux, the BSDs and macOS.
pub fn is_fd_limit(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

/// A short name for an I/O error.
pub fn io_reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(24) => return "too many open files (EMFILE)".into(),
        Some(23) => return "too many open files in the system (ENFILE)".into(),
        _ => {}
    }
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        io::ErrorKind::AddrNotAvailable => "address not available (out of local ports?)".into(),
        io::ErrorKind::AddrInUse => "address in use (out of local ports?)".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::UnexpectedEof => "connection closed".into(),
        _ => error.to_string(),
    }
}

/// Failures counted by reason.
#[derive(Debug, Default)]
pub struct Failures(Mutex<BTreeMap<String, u64>>);

impl Failures {
    pub fn add(&self, reason: String) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Small buffers: thousands of idle clients must not cost 256 KiB each.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

impl Endpoint {
    /// Opens client number `index` (which picks its source address).
    pub async fn open(&self, index: u64) -> Result<Ws, OpenError> {
        let stream = self.connect(index).await?;
        let request = self
            .target
            .url
            .as_str()
            .into_client_request()
            .map_err(OpenError::from_ws)?;
        let (mut ws, _) = tokio::time::timeout(
            self.timeout,
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())),
        )
        .await
        .map_err(|_| OpenError::Timeout("WebSocket handshake"))?
        .map_err(OpenError::from_ws)?;
        if let Protocol::Native {
            token,
            channel,
            tags_filter,
            format,
            delta,
        } = &self.protocol
        {
            if *format != Format::Json {
                return Err(OpenError::Ws(
                    "only fanout subscribers speak Protobuf here".into(),
                ));
            }
            tokio::time::timeout(
                self.timeout,
                native_handshake(
                    &mut ws,
                    token,
                    channel.as_deref(),
                    tags_filter.as_deref(),
                    *delta,
                ),
            )
            .await
            .map_err(|_| OpenError::Timeout("native connect"))??;
        }
        Ok(ws)
    }

    /// The TCP connection of client number `index`, from its source address, within the
    /// timeout.
    pub(crate) async fn connect(&self, index: u64) -> Result<TcpStream, OpenError> {
        let source = match self.sources {
            Some(sources) if Sources::applies_to(&self.addr) => {
                Some(IpAddr::V4(sources.nth(index)))
            }
            _ => None,
        };
        tokio::time::timeout(
            self.timeout,
            connect_tcp(self.addr, source, self.recv_buffer),
        )
        .await
        .map_err(|_| OpenError::Timeout("TCP connect"))?
    }
}

async fn connect_tcp(
    addr: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> Result<TcpStream, OpenError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(OpenError::from_io)?;
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(OpenError::from_io)?;
    }
    if let Some(size) = recv_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(OpenError::from_io)?;
    }
    let stream = socket.connect(addr).await.map_err(OpenError::from_io)?;
    stream.set_nodelay(true).map_err(OpenError::from_io)?;
    Ok(stream)
}

/// The text of a native command.
pub fn native_command(id: u32, request: Request) -> String {
    String::from_utf8(encode_command(id, &request)).expect("commands are JSON text")
}

/// The native `publish` of `data` (JSON text) into `channel`.
pub fn native_publish(id: u32, channel: &str, data: String) -> String {
    let data = Payload::from(RawJson::from_string(data).expect("stamps are JSON"));
    native_command(
        id,
        Request::Publish(plexus_protocol::client::PublishRequest {
            channel: channel.to_owned(),
            data: Some(data),
        }),
    )
}

/// The native client's first message, in `format`: `connect` (id 1) with `token`, and
/// `subscribe` (id 2) to `channel` when there is one.
pub(crate) fn native_hello(
    format: Format,
    token: &str,
    channel: Option<&str>,
    tags_filter: Option<&FilterNode>,
    delta: bool,
) -> Vec<u8> {
    let mut commands = vec![format.encode_command(
        1,
        &Request::Connect(ConnectRequest {
            token: token.to_owned(),
            name: "plexus-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..ConnectRequest::default()
        }),
    )];
    if let Some(channel) = channel {
        commands.push(format.encode_command(
            2,
            &Request::Subscribe(SubscribeRequest {
                channel: channel.to_owned(),
                tf: tags_filter.cloned().map(Box::new),
                delta: if delta {
                    "fossil".into()
                } else {
                    String::new()
                },
                ..SubscribeRequest::default()
            }),
        ));
    }
    // Lines in JSON, a concatenation of length-prefixed commands in Protobuf.
    format.join_batch(commands)
}

/// What one message told a native client waiting for the answers to [`native_hello`]: how many
/// of them it carried, and whether a server ping (answer `{}`) came with them. An error reply
/// (or a message that is not replies) ends the client, and so does a subscribe reply without
/// delta compression when `delta` asked for it (the namespace does not allow it).
pub(crate) fn native_hello_replies(
    format: Format,
    data: &[u8],
    delta: bool,
) -> Result<(u32, bool), OpenError> {
    let mut answered = 0;
    let mut ping = false;
    for reply in format.parse_replies(data) {
        let reply = reply.map_err(|error| OpenError::Ws(format!("bad reply: {error}")))?;
        if reply.is_server_ping() {
            ping = true;
            continue;
        }
        let method = match reply.id {
            1 => "connect",
            2 => "subscribe",
            _ => continue, // a push: nothing is published yet, or it is not ours
        };
        if let Some(error) = reply.error {
            return Err(OpenError::Reply {
                method,
                code: error.code,
                message: error.message,
            });
        }
        if let Some(ReplyBody::Subscribe(result)) = &reply.body {
            if delta && !result.delta {
                return Err(OpenError::Ws(
                    "the server did not agree to deltas (is \"fossil\" in the namespace's \
                     allowed_delta_types?)"
                        .into(),
                ));
            }
        }
        answered += 1;
    }
    Ok((answered, ping))
}

async fn native_handshake(
    ws: &mut Ws,
    token: &str,
    channel: Option<&str>,
    tags_filter: Option<&FilterNode>,
    delta: bool,
) -> Result<(), OpenError> {
    let hello = native_hello(Format::Json, token, channel, tags_filter, delta);
    ws.send(Message::text(
        String::from_utf8(hello).expect("JSON commands are text"),
    ))
    .await
    .map_err(OpenError::from_ws)?;
    let mut waiting: u32 = if channel.is_some() { 2 } else { 1 };
    while waiting > 0 {
        let text = match next_data(ws).await? {
            Some(text) => text,
            None => continue,
        };
        let (answered, ping) = native_hello_replies(Format::Json, text.as_bytes(), delta)?;
        if ping {
            ws.send(Message::text("{}"))
                .await
                .map_err(OpenError::from_ws)?;
        }
        waiting = waiting.saturating_sub(answered);
    }
    Ok(())
}

/// The next text message, `None` for a binary or control message; an error for a close or the
/// end of the stream.
async fn next_data(ws: &mut Ws) -> Result<Option<String>, OpenError> {
    match ws.next().await {
        Some(Ok(Message::Text(text))) => Ok(Some(text.to_string())),
        Some(Ok(Message::Close(frame))) => {
            let (code, reason) = close_parts(frame.as_ref());
            Err(OpenError::Closed(code, reason))
        }
        Some(Ok(_)) => Ok(None),
        Some(Err(error)) => Err(OpenError::from_ws(error)),
        None => Err(OpenError::Ws("connection closed".into())),
    }
}

/// A close frame's code and reason; 1005 (no status) for a close without a code.
fn close_parts(frame: Option<&tungstenite::protocol::CloseFrame>) -> (u16, String) {
    match frame {
        Some(frame) => (u16::from(frame.code), frame.reason.to_string()),
        None => (1005, String::new()),
    }
}

/// What a received message means to a measuring client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Measured messages (or probes), in the order they came; `ping`: a native server ping
    /// came in the same message.
    Stamps {
        stamps: Vec<Stamp>,
        ping: bool,
    },
    /// The native server ping: answer `{}`.
    Ping,
    Other,
    /// The server closed: the end of this client.
    Closed(u16, String),
}

/// Reads what a raw or native message carries.
pub fn interpret(protocol: &Protocol, message: &Message) -> Received {
    match message {
        Message::Text(text) => interpret_text(protocol, text),
        Message::Close(frame) => {
            let (code, reason) = close_parts(frame.as_ref());
            Received::Closed(code, reason)
        }
        _ => Received::Other,
    }
}

/// Reads what a raw or native text message carries.
pub fn interpret_text(protocol: &Protocol, text: &str) -> Received {
    match protocol {
        Protocol::Raw => match parse_stamp(text) {
            Some(stamp) => Received::Stamps {
                stamps: vec![stamp],
                ping: false,
            },
            None => Received::Other,
        },
        Protocol::Native { .. } => interpret_native(Format::Json, text.as_bytes(), None),
    }
}

/// Reads what a native Protobuf (binary) message carries.
pub fn interpret_binary(protocol: &Protocol, data: &[u8]) -> Received {
    match protocol {
        Protocol::Native {
            format: Format::Protobuf,
            ..
        } => interpret_native(Format::Protobuf, data, None),
        _ => Received::Other,
    }
}

/// What a native message carries; `delta_base`, for a subscriber with delta compression: the
/// data of the last publication, which the next delta applies to (updated here).
pub(crate) fn interpret_native(
    format: Format,
    data: &[u8],
    mut delta_base: Option<&mut Vec<u8>>,
) -> Received {
    let mut stamps = Vec::new();
    let mut ping = false;
    for reply in format.parse_replies(data).into_iter().flatten() {
        if reply.is_server_ping() {
            ping = true;
            continue;
        }
        if let Some(ReplyBody::Push(push)) = &reply.body {
            if let PushBody::Publication(publication) = &push.body {
                let data = publication.data.as_ref().map(|data| data.as_bytes());
                let stamp = match (data, delta_base.as_deref_mut()) {
                    (Some(data), Some(base)) => rebuild(format, data, publication.delta, base)
                        .and_then(|data| std::str::from_utf8(data).ok().and_then(parse_stamp)),
                    (data, _) => data
                        .and_then(|data| std::str::from_utf8(data).ok())
                        .and_then(parse_stamp),
                };
                if let Some(stamp) = stamp {
                    stamps.push(stamp);
                }
            }
        }
    }
    if !stamps.is_empty() {
        Received::Stamps { stamps, ping }
    } else if ping {
        Received::Ping
    } else {
        Received::Other
    }
}

/// What a delta subscriber does with a publication's data: in JSON it is a JSON string, holding
/// the publication's JSON when whole, else the delta's text; in Protobuf, the bytes. A delta
/// applies to `base`; either way the result becomes the next base. `None` when it does not
/// apply (the server sent a delta from something else): counted as not received.
fn rebuild<'a>(
    format: Format,
    data: &[u8],
    delta: bool,
    base: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let text;
    let data = match format {
        Format::Json => {
            text = serde_json::from_slice::<String>(data).ok()?;
            text.as_bytes()
        }
        Format::Protobuf => data,
    };
    let next = if delta {
        plexus_protocol::fossil::apply(base, data).ok()?
    } else {
        data.to_vec()
    };
    *base = next;
    Some(base)
}

/// Closes politely: a close frame, then whatever the server still sends until its close, within
/// `limit`. Returns whether the closing handshake completed.
pub async fn close(mut ws: Ws, limit: Duration) -> bool {
    let closing = async {
        if ws.close(None).await.is_err() {
            return false;
        }
        loop {
            match ws.next().await {
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => return true,
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(limit, closing).await.unwrap_or(false)
}

/// Opens one client to check that the endpoint answers, and closes it. A refused connection
/// or a refused handshake is the clear error the run stops with.
pub async fn preflight(endpoint: &Endpoint) -> Result<(), BenchError> {
    // In JSON whatever the clients speak: what is checked is the endpoint, token and channel.
    let mut endpoint = endpoint.clone();
    if let Protocol::Native { format, .. } = &mut endpoint.protocol {
        *format = Format::Json;
    }
    match endpoint.open(u64::MAX).await {
        Ok(ws) => {
            close(ws, Duration::from_secs(2)).await;
            Ok(())
        }
        Err(error) => {
            let hint = match &error {
                OpenError::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
                    " (is `plexus serve` running there?)"
                }
                OpenError::Http(404) => " (no such endpoint: check the path)",
                _ => "",
            };
            Err(BenchError::Connect {
                target: endpoint.target.url.clone(),
                reason: format!("{}{hint}", error.reason()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_for_io_errors() {
        let reason = |error: io::Error| io_reason(&error);
        assert_eq!(
            reason(io::Error::from_raw_os_error(24)),
            "too many open files (EMFILE)"
        );
        assert!(is_fd_limit(&io::Error::from_raw_os_error(24)));
        assert!(is_fd_limit(&io::Error::from_raw_os_error(23)));
        assert!(!is_fd_limit(&io::Error::from(
            io::ErrorKind::ConnectionRefused
        )));
        assert_eq!(
            reason(io::ErrorKind::ConnectionRefused.into()),
            "connection refused"
        );
        assert_eq!(
            reason(io::ErrorKind::ConnectionReset.into()),
            "connection reset"
        );
        assert!(reason(io::ErrorKind::AddrNotAvailable.into()).contains("local ports"));
        assert!(OpenError::from_io(io::Error::from_raw_os_error(24)).is_fd_limit());
        assert_eq!(OpenError::Http(503).reason(), "HTTP 503");
        assert_eq!(
            OpenError::Closed(3500, "invalid token".into()).reason(),
            "closed 3500 invalid token"
        );
        assert_eq!(
            OpenError::Closed(1000, String::new()).reason(),
            "closed 1000"
        );
        assert_eq!(
            OpenError::Reply {
                method: "subscribe",
                code: 102,
                message: "unknown channel".into()
            }
            .reason(),
            "subscribe error 102: unknown channel"
        );
    }

    #[test]
    fn failures_are_counted_by_reason() {
        let failures = Failures::default();
        failures.add("HTTP 503".into());
        failures.add("timeout".into());
        failures.add("HTTP 503".into());
        let counted: Vec<_> = failures.snapshot().into_iter().collect();
        assert_eq!(
            counted,
            [("HTTP 503".to_owned(), 2), ("timeout".to_owned(), 1)]
        );
    }

    #[test]
    fn native_commands() {
        assert_eq!(
            native_publish(7, "chat:x", r#"{"seq":1,"t":2,"pad":""}"#.into()),
            r#"{"id":7,"publish":{"channel":"chat:x","data":{"seq":1,"t":2,"pad":""}}}"#
        );
    }

    #[test]
    fn interprets_raw_and_native_messages() {
        let raw = Protocol::Raw;
        let native = Protocol::Native {
            token: String::new(),
            channel: None,
            tags_filter: None,
            format: Format::Json,
            delta: false,
        };
        let stamp = Stamp { seq: 3, t: 9 };
        assert_eq!(
            interpret(&raw, &Message::text(r#"{"seq":3,"t":9,"pad":"xx"}"#)),
            Received::Stamps {
                stamps: vec![stamp],
                ping: false
            }
        );
        assert_eq!(interpret(&raw, &Message::text("hello")), Received::Other);
        assert_eq!(
            interpret(&raw, &Message::binary(vec![1, 2])),
            Received::Other
        );
        let pushes = concat!(
            r#"{"push":{"channel":"chat:x","pub":{"data":{"seq":3,"t":9,"pad":""},"offset":4}}}"#,
            "\n",
            r#"{"push":{"channel":"chat:x","pub":{"data":{"seq":4,"t":10},"offset":5}}}"#
        );
        assert_eq!(
            interpret(&native, &Message::text(pushes)),
            Received::Stamps {
                stamps: vec![stamp, Stamp { seq: 4, t: 10 }],
                ping: false
            }
        );
        let with_ping = format!("{{}}\n{pushes}");
        assert_eq!(
            interpret(&native, &Message::text(with_ping)),
            Received::Stamps {
                stamps: vec![stamp, Stamp { seq: 4, t: 10 }],
                ping: true
            }
        );
        assert_eq!(interpret(&native, &Message::text("{}")), Received::Ping);
        assert_eq!(
            interpret(&native, &Message::text(r#"{"id":5,"publish":{}}"#)),
            Received::Other
        );
        let close = Message::Close(Some(tungstenite::protocol::CloseFrame {
            code: 3008.into(),
            reason: "slow".into(),
        }));
        assert_eq!(
            interpret(&raw, &close),
            Received::Closed(3008, "slow".into())
        );
    }
}
