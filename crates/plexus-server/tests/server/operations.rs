//! Operations: bad upgrades, connection limits, health, metrics, graceful shutdown.

use plexus_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// Sends a raw HTTP/1.1 request and returns the whole response.
async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn bad_upgrades_get_an_http_error_with_a_reason() {
    let server = start_default().await;
    let addr = server.http_addr();
    let plain = http(
        addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    assert!(plain
        .to_ascii_lowercase()
        .contains("sec-websocket-version: 13"));
    assert!(plain.contains("missing 'Upgrade: websocket'"), "{plain}");

    let old_version = http(
        addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(old_version.starts_with("HTTP/1.1 426"), "{old_version}");
    assert!(old_version.contains("only 13"));

    let bad_key = http(
        addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
    )
    .await;
    assert!(bad_key.starts_with("HTTP/1.1 400"), "{bad_key}");
    assert!(bad_key.contains("Sec-WebSocket-Key"));
    assert!(server
        .metrics_text()
        .contains("plexus_refused_total{reason=\"bad_upgrade\"} 3"));
}

#[tokio::test]
async fn per_ip_limit_refuses_with_a_reason_and_counts() {
    let server = start(Config {
        max_connections_per_ip: 2,
        ..Config::for_tests()
    })
    .await;
    let _first = ws(&server, "/echo").await;
    let _second = ws(&server, "/echo").await;
    let refused = http(
        server.http_addr(),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too many connections from your address"));
    let mut tcp = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    assert_eq!(
        tcp.line().await.unwrap(),
        "ERR too many connections from your address"
    );
    assert!(server
        .metrics_text()
        .contains("plexus_refused_total{reason=\"address_full\"} 2"));
    // Another address is not affected by this address's limit.
    let other = TcpStream::connect((
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        server.http_addr().port(),
    ))
    .await;
    if let Ok(mut stream) = other {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}

#[tokio::test]
async fn global_limit_refuses() {
    let server = start(Config {
        max_connections: 1,
        ..Config::for_tests()
    })
    .await;
    let _only = ws(&server, "/echo").await;
    let refused = http(
        server.http_addr(),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("connection limit"));
}

#[tokio::test]
async fn health_and_metrics() {
    let server = start_default().await;
    let mut room = ws(&server, "/chat/metrics").await;
    send_text(&mut room, "count me").await;
    next_text(&mut room).await;
    let health = http(
        server.http_addr(),
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(health.contains("\"channels\":1"), "{health}");
    let metrics = http(
        server.http_addr(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    for expected in [
        "plexus_connections{transport=\"websocket\"} 1",
        "plexus_messages_received_total{transport=\"websocket\"} 1",
        "plexus_messages_sent_total{transport=\"websocket\"} 1",
        "plexus_publications_total 1",
        "plexus_bytes_received_total{transport=\"websocket\"}",
        "plexus_connections{transport=\"tcp_chat\"} 0",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    let missing = http(
        server.http_addr(),
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(missing.starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn graceful_shutdown_closes_websockets_with_1001_and_tells_tcp_clients() {
    let server = start_default().await;
    let mut echo = ws(&server, "/echo").await;
    let mut room = ws(&server, "/chat/bye").await;
    let mut chat = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    chat.line_where(|l| l.contains("in room lobby")).await;
    let http_addr = server.http_addr();
    let shutdown = tokio::spawn(server.shutdown());
    assert_eq!(
        expect_close(&mut echo).await,
        (1001, "server shutting down".into())
    );
    assert_eq!(
        expect_close(&mut room).await,
        (1001, "server shutting down".into())
    );
    assert_eq!(chat.line().await.unwrap(), "* server shutting down");
    assert_eq!(chat.line().await, None);
    drop((echo, room));
    let report = shutdown.await.unwrap();
    assert_eq!(report.abandoned, 0);
    assert!(
        TcpStream::connect(http_addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_request_head_not_finished_in_time_is_closed_and_counted() {
    let server = start(Config {
        handshake_timeout: std::time::Duration::from_millis(200),
        ..Config::for_tests()
    })
    .await;
    let mut stream = TcpStream::connect(server.http_addr()).await.unwrap();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the stalled connection")
        .ok();
    assert!(server
        .metrics_text()
        .contains("plexus_refused_total{reason=\"handshake_timeout\"} 1"));
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_after_write_timeout() {
    let server = start(Config {
        write_timeout: std::time::Duration::from_millis(300),
        ..Config::for_tests()
    })
    .await;
    let mut stalled = TcpStream::connect(server.http_addr()).await.unwrap();
    // Thousands of pipelined page requests, never reading the answers.
    let requests = "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
    let _ = tokio::time::timeout(TIMEOUT, stalled.write_all(requests.as_bytes())).await;
    let mut open = String::new();
    for _ in 0..100 {
        open = http(
            server.http_addr(),
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if open.contains("\"connections\":1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        open.contains("\"connections\":1"),
        "the stalled connection is gone: {open}"
    );
    drop(stalled);
}

/// A data directory whose write-ahead file fails every write (here `/dev/full`, ENOSPC):
/// publishing into a channel with history gets an error, the server stays up, and `/ready`
/// turns 503 so that a load balancer sends new clients elsewhere.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_failing_history_disk_makes_the_server_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.path().join("history.wal")).unwrap();
    let server = start(Config {
        engine: plexus_server::config::EngineKind::Embedded,
        data_dir: dir.path().to_path_buf(),
        ..Config::for_tests()
    })
    .await;
    let (status, body) = http_json(&server, "GET", "/ready", "", "").await;
    assert_eq!(
        (status, &body["engine"]),
        (200, &serde_json::json!("embedded"))
    );
    for _ in 0..2 {
        let reply = api_call(
            &server,
            "publish",
            serde_json::json!({"channel": "chat:disk", "data": {"n": 1}}),
        )
        .await;
        assert!(reply["error"]["message"].is_string(), "{reply}");
        assert!(reply.get("result").is_none(), "{reply}");
    }
    let (status, body) = http_json(&server, "GET", "/ready", "", "").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    let metrics = server.metrics_text();
    assert_eq!(metric(&metrics, "plexus_engine_ready"), Some(0.0));
    assert_eq!(
        metric(&metrics, "plexus_history_commit_failures_total"),
        Some(1.0),
        "the second publish was refused before a commit: {metrics}"
    );
    assert_eq!(metric(&metrics, "plexus_history_appends_total"), Some(0.0));
    // The server itself still answers.
    let (status, _) = http_json(&server, "GET", "/health", "", "").await;
    assert_eq!(status, 200);
}

/// The durable engine's own numbers are in `/metrics`: what it made durable, how many
/// `fdatasync`s and how long they took, how much is waiting for a checkpoint.
#[tokio::test]
async fn metrics_show_the_history_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Config {
        engine: plexus_server::config::EngineKind::Embedded,
        data_dir: dir.path().to_path_buf(),
        ..Config::for_tests()
    })
    .await;
    for n in 0..5 {
        api_result(
            &server,
            "publish",
            serde_json::json!({"channel": format!("chat:metrics-{}", n % 2), "data": {"n": n}}),
        )
        .await;
    }
    // Without history: delivered, not appended.
    api_result(
        &server,
        "publish",
        serde_json::json!({"channel": "chat:metrics-0", "data": {}, "skip_history": true}),
    )
    .await;
    let (status, metrics) = http_request(&server, "GET", "/metrics", "", "").await;
    assert_eq!(status, 200);
    let value =
        |name: &str| metric(&metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
    assert_eq!(value("plexus_engine_ready"), 1.0);
    assert_eq!(value("plexus_history_appends_total"), 5.0);
    // One publish at a time: one commit each.
    assert_eq!(value("plexus_history_commits_total"), 5.0);
    assert_eq!(value("plexus_history_largest_batch"), 1.0);
    assert!(value("plexus_history_commit_seconds_total") > 0.0);
    assert_eq!(value("plexus_history_commit_failures_total"), 0.0);
    assert_eq!(value("plexus_history_streams"), 2.0);
    // Five records, each a header and one publication, since no checkpoint yet.
    assert!(value("plexus_history_wal_bytes") > 5.0 * 64.0, "{metrics}");
    assert_eq!(value("plexus_history_checkpoint_failures_total"), 0.0);
}

/// The memory engine has no history log: its metrics say it is ready and nothing more.
#[tokio::test]
async fn metrics_of_the_memory_engine() {
    let server = start_default().await;
    let metrics = server.metrics_text();
    assert_eq!(metric(&metrics, "plexus_engine_ready"), Some(1.0));
    assert!(!metrics.contains("plexus_history_"), "{metrics}");
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// `max_messages_per_second`, per connection: a protocol client over it gets error 111 for
/// the extra commands and keeps its connection, whose rate comes back; a raw WebSocket client
/// over it is closed with 1008 and a TCP chat client with an `ERR` line, after what they sent
/// within the limit was delivered; the others in the room go on; the refusals are counted.
#[tokio::test]
async fn message_rate_limit_per_connection() {
    let server = start(Config {
        max_messages_per_second: 5,
        ..Config::for_tests()
    })
    .await;

    let (mut client, _) = native(&server, "ann").await;
    let pings: Vec<String> = (2..12)
        .map(|id| serde_json::json!({"id": id, "ping": {}}).to_string())
        .collect();
    send_text(&mut client, &pings.join("\n")).await;
    let mut replies = Vec::new();
    while replies.len() < 10 {
        let text = next_text(&mut client).await;
        for line in text.lines() {
            let reply: serde_json::Value = serde_json::from_str(line).unwrap();
            if reply.get("id").is_some() {
                replies.push(reply);
            }
        }
    }
    for (n, reply) in replies.iter().enumerate() {
        if n < 5 {
            assert!(reply.get("ping").is_some(), "{reply}");
        } else {
            assert_eq!(reply["error"]["code"], 111, "{reply}");
            assert_eq!(reply["error"]["message"], "too many requests");
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let reply = command(&mut client, 20, serde_json::json!({"ping": {}})).await;
    assert!(reply.get("ping").is_some(), "the rate came back: {reply}");

    let mut flooder = ws(&server, "/chat/limited").await;
    let mut other = ws(&server, "/chat/limited").await;
    // The other member is in the room once its own message comes back.
    send_text(&mut other, "other is here").await;
    assert_eq!(next_text(&mut other).await, "other is here");
    for n in 1..=10 {
        send_text(&mut flooder, &format!("flood {n}")).await;
    }
    assert_eq!(
        expect_close(&mut flooder).await,
        (1008, "message rate limit exceeded".to_owned())
    );
    for n in 1..=5 {
        assert_eq!(next_text(&mut other).await, format!("flood {n}"));
    }
    send_text(&mut other, "still here").await;
    assert_eq!(
        next_text(&mut other).await,
        "still here",
        "nothing past the limit"
    );

    let mut chat = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    chat.line_where(|l| l.contains("in room lobby")).await;
    for n in 1..=10 {
        chat.send(&format!("line {n}")).await;
    }
    chat.line_where(|l| l == "ERR message rate limit exceeded")
        .await;
    while chat.line().await.is_some() {}

    let metrics = server.metrics_text();
    // 5 commands, 1 raw message and 1 line refused.
    assert_eq!(
        metric(&metrics, "plexus_messages_rate_limited_total"),
        Some(7.0)
    );
}
