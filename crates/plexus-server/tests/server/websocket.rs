//! `/echo` and the WebSocket rules: text and binary, sizes, fragments, bad payloads, heartbeats,
//! compression.

use std::io::Write as _;
use std::time::Duration;

use futures_util::SinkExt;
use plexus_server::Config;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test]
async fn echo_returns_text_and_binary_unchanged() {
    let server = start_default().await;
    let mut socket = ws(&server, "/echo").await;
    send_text(&mut socket, "hello, Plexus ✓").await;
    assert_eq!(next_text(&mut socket).await, "hello, Plexus ✓");
    let binary: Vec<u8> = (0..=255).collect();
    socket
        .send(Message::Binary(binary.clone().into()))
        .await
        .unwrap();
    assert_eq!(next(&mut socket).await, Message::Binary(binary.into()));
    send_text(&mut socket, "").await;
    assert_eq!(next_text(&mut socket).await, "");
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn one_mebibyte_message_with_the_limit_raised() {
    let server = start(Config {
        max_message_size: 2 << 20,
        ..Config::for_tests()
    })
    .await;
    let mut socket = ws(&server, "/echo").await;
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    socket
        .send(Message::Binary(big.clone().into()))
        .await
        .unwrap();
    assert_eq!(next(&mut socket).await, Message::Binary(big.into()));
}

#[tokio::test]
async fn over_the_limit_closes_with_1009() {
    let server = start_default().await;
    let mut socket = ws(&server, "/echo").await;
    socket
        .send(Message::Binary(vec![0u8; 65_537].into()))
        .await
        .unwrap();
    let (code, reason) = expect_close(&mut socket).await;
    assert_eq!(code, 1009);
    assert!(reason.contains("65536"), "{reason}");
    // The server keeps serving others.
    let mut other = ws(&server, "/echo").await;
    send_text(&mut other, "still here").await;
    assert_eq!(next_text(&mut other).await, "still here");
}

#[tokio::test]
async fn fragmented_message_with_a_ping_in_between() {
    let server = start_default().await;
    let mut raw = RawWs::connect(server.http_addr(), "/echo", "").await;
    let mut bytes = client_frame(0x01, b"frag");
    bytes.extend(client_frame(0x89, b"are you there"));
    bytes.extend(client_frame(0x00, b"men"));
    bytes.extend(client_frame(0x80, b"ted"));
    raw.send(&bytes).await;
    let pong = raw.frame().await;
    assert_eq!(pong.opcode(), 0xA);
    assert_eq!(pong.payload, b"are you there");
    let echo = raw.frame().await;
    assert_eq!(echo.first, 0x81, "one final text frame");
    assert_eq!(echo.payload, b"fragmented");
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = start_default().await;
    let mut raw = RawWs::connect(server.http_addr(), "/echo", "").await;
    raw.send(&client_frame(0x81, &[b'o', b'k', 0xC3, 0x28]))
        .await;
    let close = raw.frame().await;
    assert_eq!(close.close_code(), 1007);
    assert!(
        close.close_reason().contains("UTF-8"),
        "{}",
        close.close_reason()
    );
    raw.expect_eof().await;
}

#[tokio::test]
async fn unmasked_frame_closes_with_1002() {
    let server = start_default().await;
    let mut raw = RawWs::connect(server.http_addr(), "/echo", "").await;
    raw.send(&[0x81, 0x02, b'h', b'i']).await;
    let close = raw.frame().await;
    assert_eq!(close.close_code(), 1002);
    assert!(close.close_reason().contains("masked"));
}

#[tokio::test]
async fn client_close_is_answered_with_the_same_code() {
    let server = start_default().await;
    let mut raw = RawWs::connect(server.http_addr(), "/echo", "").await;
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"done");
    raw.send(&client_frame(0x88, &payload)).await;
    let close = raw.frame().await;
    assert_eq!(close.close_code(), 4000);
    raw.expect_eof().await;
}

#[tokio::test]
async fn silent_peer_is_closed_after_ping_and_pong_timeout() {
    let server = start(Config {
        ping_interval: Duration::from_millis(200),
        pong_timeout: Duration::from_millis(300),
        ..Config::for_tests()
    })
    .await;
    let mut raw = RawWs::connect(server.http_addr(), "/echo", "").await;
    let ping = raw.frame().await;
    assert_eq!(ping.opcode(), 0x9, "the server pings first");
    // Say nothing: the server gives up after pong_timeout.
    let close = raw.frame().await;
    assert_eq!(close.close_code(), 1008);
    assert_eq!(close.close_reason(), "ping timeout");
    raw.expect_eof().await;
    assert!(server
        .metrics_text()
        .contains("plexus_websocket_closes_total{code=\"1008\"} 1"));
}

#[tokio::test]
async fn peer_that_answers_pings_stays_connected() {
    let server = start(Config {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(200),
        ..Config::for_tests()
    })
    .await;
    let mut raw = RawWs::connect(server.http_addr(), "/echo", "").await;
    for _ in 0..5 {
        let ping = raw.frame().await;
        assert_eq!(ping.opcode(), 0x9);
        raw.send(&client_frame(0x8A, &ping.payload)).await;
    }
    raw.send(&client_frame(0x81, b"alive")).await;
    let echo = raw.frame().await;
    assert_eq!(echo.payload, b"alive");
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.flush().unwrap(); // sync flush: ends with 00 00 ff ff
    let mut out = encoder.get_ref().clone();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn raw_inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut decoder = flate2::write::DeflateDecoder::new(Vec::new());
    decoder.write_all(&input).unwrap();
    decoder.flush().unwrap();
    decoder.get_ref().clone()
}

#[tokio::test]
async fn permessage_deflate_when_enabled() {
    let server = start(Config {
        websocket_compression: true,
        ..Config::for_tests()
    })
    .await;
    let mut raw = RawWs::connect(
        server.http_addr(),
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert!(raw
        .response_head
        .to_ascii_lowercase()
        .contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"));
    let text = "compress me ".repeat(100);
    raw.send(&client_frame(0xC1, &raw_deflate(text.as_bytes())))
        .await;
    let echo = raw.frame().await;
    assert_eq!(echo.first, 0xC1, "compressed (RSV1) final text frame");
    assert!(echo.payload.len() < text.len() / 4);
    assert_eq!(raw_inflate(&echo.payload), text.as_bytes());
    // Small messages go uncompressed.
    raw.send(&client_frame(0x81, b"tiny")).await;
    let echo = raw.frame().await;
    assert_eq!((echo.first, echo.payload.as_slice()), (0x81, &b"tiny"[..]));
}

#[tokio::test]
async fn deflate_is_off_by_default() {
    let server = start_default().await;
    let mut raw = RawWs::connect(
        server.http_addr(),
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(!raw
        .response_head
        .to_ascii_lowercase()
        .contains("extensions"));
    // A compressed frame without the extension is a protocol error.
    raw.send(&client_frame(0xC1, &raw_deflate(b"x"))).await;
    assert_eq!(raw.frame().await.close_code(), 1002);
}

#[tokio::test]
async fn compressed_message_with_a_tiny_limit_does_not_break_the_server() {
    let server = start(Config {
        websocket_compression: true,
        max_message_size: 32,
        ..Config::for_tests()
    })
    .await;
    let mut raw = RawWs::connect(
        server.http_addr(),
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    raw.send(&client_frame(0xC1, &raw_deflate(b"hi"))).await;
    assert_eq!(raw.frame().await.payload, b"hi");
    raw.send(&client_frame(0xC1, &raw_deflate(&[b'z'; 100])))
        .await;
    assert_eq!(raw.frame().await.close_code(), 1009);
}
