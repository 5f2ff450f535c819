//! The WebSocket fallbacks of the native protocol: SSE (`GET /connection/sse`) and HTTP
//! streaming (`POST /connection/http_stream`), with commands through `POST /emulation`, driven
//! by hand over a TcpStream (chunked responses decoded here).

use std::time::Duration;

use plexus_server::{Config, ServerHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::util::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Sse,
    HttpStream,
}

/// Percent-encodes everything but unreserved characters (a query parameter's value).
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// One SSE or HTTP-streaming connection: its response head, then its replies one by one.
pub(crate) struct StreamClient {
    kind: Kind,
    reader: BufReader<TcpStream>,
    status: u16,
    head: String,
    /// Decoded body bytes not yet split into replies.
    pending: Vec<u8>,
    /// The body ended (the last chunk was read).
    ended: bool,
}

impl StreamClient {
    async fn open(server: &ServerHandle, kind: Kind, connect: &Value) -> StreamClient {
        Self::open_with(server, kind, &connect.to_string(), "").await
    }

    async fn open_with(
        server: &ServerHandle,
        kind: Kind,
        connect: &str,
        extra_headers: &str,
    ) -> StreamClient {
        let mut stream = TcpStream::connect(server.http_addr()).await.unwrap();
        let request = match kind {
            Kind::Sse => format!(
                "GET /connection/sse?cf_connect={} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra_headers}\r\n",
                url_encode(connect)
            ),
            Kind::HttpStream => format!(
                "POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{connect}",
                connect.len()
            ),
        };
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(TIMEOUT, reader.read_line(&mut line))
                .await
                .expect("response head in time")
                .unwrap();
            assert!(n > 0, "connection closed in the response head: {head}");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head[9..12].parse().unwrap();
        StreamClient {
            kind,
            reader,
            status,
            head: head.to_ascii_lowercase(),
            pending: Vec::new(),
            ended: false,
        }
    }

    /// Reads one chunk of the chunked body into `pending`; false at the body's end.
    async fn read_chunk(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let mut size = String::new();
        let n = self.reader.read_line(&mut size).await.unwrap();
        if n == 0 {
            self.ended = true;
            return false;
        }
        let size = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).await.unwrap();
        if size == 0 {
            self.ended = true;
            return false;
        }
        self.pending.extend_from_slice(&data[..size]);
        true
    }

    /// The next reply, or `None` once the stream has ended.
    async fn next(&mut self) -> Option<Value> {
        let separator: &[u8] = match self.kind {
            Kind::Sse => b"\n\n",
            Kind::HttpStream => b"\n",
        };
        loop {
            if let Some(at) = self
                .pending
                .windows(separator.len())
                .position(|window| window == separator)
            {
                let event: Vec<u8> = self.pending.drain(..at + separator.len()).collect();
                let text = String::from_utf8(event[..at].to_vec()).unwrap();
                let json = match self.kind {
                    Kind::Sse => text
                        .strip_prefix("data: ")
                        .unwrap_or_else(|| panic!("not an SSE data event: {text:?}"))
                        .to_owned(),
                    Kind::HttpStream => text,
                };
                return Some(
                    serde_json::from_str(&json).unwrap_or_else(|_| panic!("not JSON: {json}")),
                );
            }
            let more = tokio::time::timeout(TIMEOUT, self.read_chunk())
                .await
                .expect("a reply in time");
            if !more {
                assert!(self.pending.is_empty(), "a partial reply at the end");
                return None;
            }
        }
    }

    /// The next reply that is not a server ping.
    pub(crate) async fn reply(&mut self) -> Value {
        loop {
            let reply = self.next().await.expect("a reply before the end");
            if reply != json!({}) {
                return reply;
            }
        }
    }
}

/// A `POST` with extra headers; returns the status and the body text.
async fn post(server: &ServerHandle, path: &str, headers: &str, body: &str) -> (u16, String) {
    http_request(server, "POST", path, headers, body).await
}

pub(crate) async fn emulate(server: &ServerHandle, session: &str, node: &str, data: &str) -> u16 {
    let body = json!({"session": session, "node": node, "data": data}).to_string();
    post(server, "/emulation", "", &body).await.0
}

async fn api(server: &ServerHandle, method: &str, body: Value) -> Value {
    api_result(server, method, body).await
}

/// Connects as `user` over `kind`; returns the client and its session and node.
pub(crate) async fn connect(
    server: &ServerHandle,
    kind: Kind,
    user: &str,
) -> (StreamClient, String, String) {
    let connect = json!({"id": 1, "connect": {"token": token(user), "name": "emu"}});
    let mut client = StreamClient::open(server, kind, &connect).await;
    assert_eq!(client.status, 200, "{}", client.head);
    assert!(
        client.head.contains("cache-control: no-cache"),
        "{}",
        client.head
    );
    let content_type = match kind {
        Kind::Sse => "content-type: text/event-stream",
        Kind::HttpStream => "content-type: application/json",
    };
    assert!(client.head.contains(content_type), "{}", client.head);
    let reply = client.reply().await;
    assert_eq!(reply["id"], 1, "{reply}");
    let result = &reply["connect"];
    assert!(
        result["client"].as_str().is_some_and(|c| !c.is_empty()),
        "{reply}"
    );
    let session = result["session"].as_str().unwrap_or_default().to_owned();
    let node = result["node"].as_str().unwrap_or_default().to_owned();
    assert!(!session.is_empty() && !node.is_empty(), "{reply}");
    (client, session, node)
}

async fn subscribe_publish_and_receive(kind: Kind) {
    let server = start_default().await;
    let (mut client, session, node) = connect(&server, kind, "ann").await;
    let channel = format!("chat:emu-{kind:?}");
    let subscribe = json!({"id": 2, "subscribe": {"channel": channel}}).to_string();
    assert_eq!(emulate(&server, &session, &node, &subscribe).await, 200);
    let reply = client.reply().await;
    assert_eq!(reply["id"], 2, "{reply}");
    assert!(reply.get("subscribe").is_some(), "{reply}");

    // From the API.
    api(
        &server,
        "publish",
        json!({"channel": channel, "data": {"text": "from api"}}),
    )
    .await;
    let push = client.reply().await;
    assert_eq!(push["push"]["channel"], channel, "{push}");
    assert_eq!(push["push"]["pub"]["data"], json!({"text": "from api"}));

    // From the client itself, a pong and a publish batched in one request.
    let batch = format!(
        "{{}}\n{}",
        json!({"id": 3, "publish": {"channel": channel, "data": {"text": "mine"}}})
    );
    assert_eq!(emulate(&server, &session, &node, &batch).await, 200);
    let mut seen_reply = false;
    let mut seen_push = false;
    while !(seen_reply && seen_push) {
        let reply = client.reply().await;
        if reply["id"] == 3 {
            assert_eq!(reply["publish"], json!({}), "{reply}");
            seen_reply = true;
        } else {
            assert_eq!(
                reply["push"]["pub"]["data"],
                json!({"text": "mine"}),
                "{reply}"
            );
            assert_eq!(reply["push"]["pub"]["info"]["user"], "ann");
            seen_push = true;
        }
    }

    // Presence shows the stream's client.
    let presence = json!({"id": 4, "presence": {"channel": channel}}).to_string();
    assert_eq!(emulate(&server, &session, &node, &presence).await, 200);
    let reply = client.reply().await;
    assert_eq!(reply["id"], 4, "{reply}");
    assert_eq!(reply["presence"]["presence"].as_object().unwrap().len(), 1);

    // An API disconnect ends the stream with a disconnect push.
    api(
        &server,
        "disconnect",
        json!({"user": "ann", "disconnect": {"code": 3011, "reason": "force reconnect"}}),
    )
    .await;
    let push = client.reply().await;
    assert_eq!(push["push"]["disconnect"]["code"], 3011, "{push}");
    assert_eq!(push["push"]["disconnect"]["reason"], "force reconnect");
    assert_eq!(push["push"]["disconnect"]["reconnect"], true);
    assert_eq!(
        client.next().await,
        None,
        "the stream ends after the disconnect"
    );
    // The session is gone: its commands are refused.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(emulate(&server, &session, &node, "{}").await, 404);
}

#[tokio::test]
async fn http_stream_subscribes_publishes_and_is_disconnected() {
    subscribe_publish_and_receive(Kind::HttpStream).await;
}

#[tokio::test]
async fn sse_subscribes_publishes_and_is_disconnected() {
    subscribe_publish_and_receive(Kind::Sse).await;
}

#[tokio::test]
async fn emulation_refuses_unknown_sessions_and_bad_bodies() {
    let server = start_default().await;
    assert_eq!(emulate(&server, "no-such-session", "x", "{}").await, 404);
    assert_eq!(post(&server, "/emulation", "", "not json").await.0, 400);
    assert_eq!(
        post(&server, "/emulation", "", r#"{"session":1}"#).await.0,
        400
    );
    // A stream without a connect command is a bad request.
    let client = StreamClient::open_with(&server, Kind::HttpStream, "", "").await;
    assert_eq!(client.status, 400);
    let client = StreamClient::open_with(&server, Kind::Sse, "", "").await;
    assert_eq!(client.status, 400);
    // A foreign browser origin is refused, like a WebSocket upgrade.
    let connect = json!({"id": 1, "connect": {"token": token("x")}}).to_string();
    let client = StreamClient::open_with(
        &server,
        Kind::Sse,
        &connect,
        "Origin: https://evil.example\r\n",
    )
    .await;
    assert_eq!(client.status, 403);
}

#[tokio::test]
async fn a_bad_token_is_a_disconnect_push() {
    let server = start_default().await;
    for kind in [Kind::Sse, Kind::HttpStream] {
        let connect = json!({"id": 1, "connect": {"token": "forged"}});
        let mut client = StreamClient::open(&server, kind, &connect).await;
        assert_eq!(client.status, 200);
        let push = client.reply().await;
        assert_eq!(push["push"]["disconnect"]["code"], 3500, "{push}");
        // `reconnect: false` is the default, left out.
        assert_ne!(push["push"]["disconnect"]["reconnect"], true, "{push}");
        assert_eq!(client.next().await, None);
    }
}

#[tokio::test]
async fn pings_need_pongs_through_emulation() {
    let server = start(Config {
        ping_interval: Duration::from_millis(300),
        pong_timeout: Duration::from_millis(300),
        ..Config::for_tests()
    })
    .await;
    for kind in [Kind::Sse, Kind::HttpStream] {
        let (mut client, session, node) = connect(&server, kind, "pinged").await;
        // Answered pings keep the stream open.
        for _ in 0..3 {
            assert_eq!(client.next().await, Some(json!({})));
            assert_eq!(emulate(&server, &session, &node, "{}").await, 200);
        }
        // An unanswered one ends it with 3012.
        assert_eq!(client.next().await, Some(json!({})));
        let push = client.next().await.expect("a disconnect");
        assert_eq!(push["push"]["disconnect"]["code"], 3012, "{push}");
        assert_eq!(push["push"]["disconnect"]["reason"], "no pong");
        assert_eq!(client.next().await, None);
    }
}

#[tokio::test]
async fn shutdown_ends_streams_with_3001() {
    let server = start_default().await;
    let (mut sse, _, _) = connect(&server, Kind::Sse, "a").await;
    let (mut stream, _, _) = connect(&server, Kind::HttpStream, "b").await;
    let report = tokio::spawn(server.shutdown());
    for client in [&mut sse, &mut stream] {
        let push = client.reply().await;
        assert_eq!(push["push"]["disconnect"]["code"], 3001, "{push}");
        assert_eq!(push["push"]["disconnect"]["reason"], "shutdown");
        assert_eq!(client.next().await, None);
    }
    assert_eq!(report.await.unwrap().abandoned, 0);
}

#[tokio::test]
async fn a_stream_that_does_not_keep_up_is_cut_with_3008() {
    let server = start(Config {
        outbox_limit: 64 * 1024,
        ..Config::for_tests()
    })
    .await;
    let (mut client, session, node) = connect(&server, Kind::HttpStream, "slow").await;
    let channel = "chat:emu-slow";
    let subscribe = json!({"id": 2, "subscribe": {"channel": channel}}).to_string();
    assert_eq!(emulate(&server, &session, &node, &subscribe).await, 200);
    assert_eq!(client.reply().await["id"], 2);
    // The client reads nothing while far more than its socket, its queue and its outbox hold
    // is published.
    let text = "x".repeat(32 * 1024);
    let n = 400;
    for i in 0..n {
        api(
            &server,
            "publish",
            json!({"channel": channel, "data": {"i": i, "text": text}}),
        )
        .await;
    }
    let mut received = 0;
    loop {
        let reply = client.reply().await;
        if reply["push"].get("pub").is_some() {
            received += 1;
            continue;
        }
        assert_eq!(reply["push"]["disconnect"]["code"], 3008, "{reply}");
        assert_eq!(reply["push"]["disconnect"]["reason"], "slow");
        break;
    }
    assert!(received < n, "some publications were dropped ({received})");
    assert_eq!(client.next().await, None);
}

/// The connect proxy over the fallbacks: the backend sees the stream request's cookie, and
/// names the user of a client that sent no token.
#[tokio::test]
async fn the_connect_proxy_sees_the_stream_requests_cookie() {
    let (url, calls) = crate::proxies::backend().await;
    let server = start(crate::proxies::config(&url)).await;
    for kind in [Kind::Sse, Kind::HttpStream] {
        let connect = json!({"id": 1, "connect": {"name": "stream"}}).to_string();
        let mut client =
            StreamClient::open_with(&server, kind, &connect, "Cookie: session=ann\r\n").await;
        let reply = client.reply().await;
        assert_eq!(
            reply["connect"]["data"],
            json!({"welcome": true}),
            "{reply}"
        );
        let (_, body, cookie, _) = calls.lock().unwrap().last().cloned().unwrap();
        assert_eq!(cookie.as_deref(), Some("session=ann"));
        let transport = match kind {
            Kind::Sse => "sse",
            Kind::HttpStream => "http_stream",
        };
        assert_eq!(body["transport"], transport);
    }
}
