//! Helpers: start the real server on port 0, connect real clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use plexus_server::{Config, Server, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn start(config: Config) -> ServerHandle {
    Server::bind(config).await.expect("server binds")
}

/// A server with the default namespaces and one more.
pub async fn start_with_namespace(
    namespace: &str,
    options: plexus_core::ChannelOptions,
) -> ServerHandle {
    let mut namespaces = plexus_core::Namespaces::default();
    namespaces.insert(namespace, options);
    start(Config {
        namespaces,
        ..Config::for_tests()
    })
    .await
}

pub async fn start_default() -> ServerHandle {
    start(Config::for_tests()).await
}

pub async fn ws(server: &ServerHandle, path: &str) -> Ws {
    let url = format!("ws://{}{path}", server.http_addr());
    let (socket, response) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("WebSocket handshake succeeds");
    assert_eq!(response.status(), 101);
    socket
}

/// The next data or close message, skipping pings and pongs.
pub async fn next(socket: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .expect("a message in time")
            .expect("the stream is open")
            .expect("no protocol error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

pub async fn next_text(socket: &mut Ws) -> String {
    match next(socket).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn send_text(socket: &mut Ws, text: &str) {
    socket.send(Message::Text(text.into())).await.expect("send");
}

/// Reads until the server's close frame and returns its code and reason.
pub async fn expect_close(socket: &mut Ws) -> (u16, String) {
    loop {
        match next(socket).await {
            Message::Close(Some(frame)) => return (frame.code.into(), frame.reason.to_string()),
            Message::Close(None) => panic!("close frame without a code"),
            _ => {}
        }
    }
}

/// A TCP line client.
pub struct LineClient {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> LineClient {
        let stream = TcpStream::connect(addr).await.expect("TCP connect");
        let (read, write) = stream.into_split();
        LineClient {
            reader: BufReader::new(read),
            writer: write,
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write line");
    }

    /// The next line, without its newline; `None` at EOF.
    pub async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_line(&mut line))
            .await
            .expect("a line in time")
            .expect("read line");
        (n > 0).then(|| line.trim_end_matches('\n').to_owned())
    }

    /// Reads lines until one satisfies `wanted`; returns it.
    pub async fn line_where(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.line().await.expect("connection open");
            if wanted(&line) {
                return line;
            }
        }
    }
}

/// A WebSocket opened by hand, for sending frames a well-behaved client library would not.
pub struct RawWs {
    pub stream: TcpStream,
    pub response_head: String,
}

pub const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A masked client frame with the given first byte (FIN, RSV, opcode).
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    plexus_protocol::ws::push_client_frame(&mut out, first, payload, MASK);
    out
}

/// A server frame as read off the wire.
#[derive(Debug)]
pub struct ServerFrame {
    pub first: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    pub fn opcode(&self) -> u8 {
        self.first & 0x0F
    }
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode(), 0x8, "not a close frame: {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
    pub fn close_reason(&self) -> String {
        String::from_utf8(self.payload[2..].to_vec()).unwrap()
    }
}

impl RawWs {
    pub async fn connect(addr: SocketAddr, path: &str, extra_headers: &str) -> RawWs {
        let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(TIMEOUT, stream.read(&mut byte))
                .await
                .expect("response in time")
                .unwrap();
            assert!(n > 0, "connection closed during handshake");
            head.push(byte[0]);
        }
        let response_head = String::from_utf8(head).unwrap();
        assert!(response_head.starts_with("HTTP/1.1 101"), "{response_head}");
        assert!(
            response_head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{response_head}"
        );
        RawWs {
            stream,
            response_head,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write frame");
    }

    pub async fn frame(&mut self) -> ServerFrame {
        let mut head = [0u8; 2];
        tokio::time::timeout(TIMEOUT, self.stream.read_exact(&mut head))
            .await
            .expect("frame in time")
            .expect("frame header");
        assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
        let length = match head[1] & 0x7F {
            126 => u64::from(self.stream.read_u16().await.unwrap()),
            127 => self.stream.read_u64().await.unwrap(),
            short => u64::from(short),
        };
        let mut payload = vec![0; length as usize];
        self.stream.read_exact(&mut payload).await.unwrap();
        ServerFrame {
            first: head[0],
            payload,
        }
    }

    /// Reads frames until EOF; true if the connection ended cleanly.
    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, self.stream.read_to_end(&mut rest))
            .await
            .expect("EOF in time")
            .ok();
    }
}

/// A connection token for `user`, signed with the test secret (`Config::for_tests`).
pub fn token(user: &str) -> String {
    token_with(user, None)
}

/// A token for `user`; with `channel`, a subscription token for that channel.
pub fn token_with(user: &str, channel: Option<&str>) -> String {
    token_expiring(user, channel, None)
}

/// A token that expires `ttl` from now.
pub fn token_expiring(user: &str, channel: Option<&str>, ttl: Option<Duration>) -> String {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    plexus_auth::mint_hs256(
        "test-token-secret",
        &plexus_auth::MintRequest {
            sub: user.into(),
            channel: channel.map(str::to_owned),
            ttl,
            now_unix,
            ..Default::default()
        },
    )
}

/// The next native-protocol message as JSON (server pings `{}` included).
pub async fn next_json(socket: &mut Ws) -> serde_json::Value {
    let text = next_text(socket).await;
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// A native-protocol client connected as `user`; returns it and its client id.
pub async fn native(server: &ServerHandle, user: &str) -> (Ws, String) {
    let mut socket = ws(server, "/connection/websocket").await;
    let connect = serde_json::json!({"id": 1, "connect": {"token": token(user)}});
    send_text(&mut socket, &connect.to_string()).await;
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["id"], 1, "{reply}");
    let client = reply["connect"]["client"]
        .as_str()
        .unwrap_or_else(|| panic!("no client id: {reply}"))
        .to_owned();
    (socket, client)
}

/// Sends one native command and returns the reply with the same id (pushes before it skipped).
pub async fn command(socket: &mut Ws, id: u32, body: serde_json::Value) -> serde_json::Value {
    let mut command = body;
    command["id"] = id.into();
    send_text(socket, &command.to_string()).await;
    loop {
        let reply = next_json(socket).await;
        if reply["id"] == id {
            return reply;
        }
    }
}

/// The test API key of `Config::for_tests`.
pub const API_KEY: &str = "test-api-key";

/// One HTTP/1.1 request on its own connection (`Connection: close`); returns the status and the
/// body text. `headers` are extra header lines, each ending in `\r\n`.
pub async fn http_request(
    server: &ServerHandle,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(server.http_addr()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// [`http_request`] with the body read as JSON (`null` when it is not JSON).
pub async fn http_json(
    server: &ServerHandle,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, body) = http_request(server, method, path, headers, body).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A server API call with the test key; expects HTTP 200 and returns the whole answer.
pub async fn api_call(
    server: &ServerHandle,
    method: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let headers = format!("X-API-Key: {API_KEY}\r\n");
    let path = format!("/api/{method}");
    let (status, reply) = http_json(server, "POST", &path, &headers, &body.to_string()).await;
    assert_eq!(status, 200, "{method}: {reply}");
    reply
}

/// A server API call that must succeed; returns its `result`.
pub async fn api_result(
    server: &ServerHandle,
    method: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let reply = api_call(server, method, body).await;
    assert!(reply.get("error").is_none(), "{method}: {reply}");
    reply["result"].clone()
}
