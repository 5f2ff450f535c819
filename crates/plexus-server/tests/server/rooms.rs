//! `/chat/{room}`: raw WebSocket rooms, shared with the TCP chat, fan-out order and slow readers.

use futures_util::SinkExt;
use plexus_server::Config;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test]
async fn every_message_reaches_everyone_in_the_room_sender_included() {
    let server = start_default().await;
    let mut alice = ws(&server, "/chat/lobby").await;
    let mut bob = ws(&server, "/chat/lobby").await;
    let mut elsewhere = ws(&server, "/chat/other").await;
    send_text(&mut alice, "hi all").await;
    assert_eq!(next_text(&mut alice).await, "hi all");
    assert_eq!(next_text(&mut bob).await, "hi all");
    bob.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut alice).await,
        Message::Binary(vec![1, 2, 3].into())
    );
    assert_eq!(next(&mut bob).await, Message::Binary(vec![1, 2, 3].into()));
    // The other room heard nothing: its first message is its own.
    send_text(&mut elsewhere, "mine").await;
    assert_eq!(next_text(&mut elsewhere).await, "mine");
}

#[tokio::test]
async fn order_is_the_order_the_server_received() {
    let server = start_default().await;
    let mut writer_a = ws(&server, "/chat/order").await;
    let mut writer_b = ws(&server, "/chat/order").await;
    let mut reader = ws(&server, "/chat/order").await;
    for i in 0..100 {
        send_text(&mut writer_a, &format!("a{i}")).await;
        send_text(&mut writer_b, &format!("b{i}")).await;
    }
    // Every subscriber sees the same interleaving, and each writer's own order.
    let mut seen_by_reader = Vec::new();
    let mut seen_by_a = Vec::new();
    for _ in 0..200 {
        seen_by_reader.push(next_text(&mut reader).await);
        seen_by_a.push(next_text(&mut writer_a).await);
    }
    assert_eq!(seen_by_reader, seen_by_a);
    let a_only: Vec<_> = seen_by_reader
        .iter()
        .filter(|m| m.starts_with('a'))
        .cloned()
        .collect();
    assert_eq!(
        a_only,
        (0..100).map(|i| format!("a{i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn websocket_and_tcp_chat_share_rooms() {
    let server = start_default().await;
    let mut web = ws(&server, "/chat/shared").await;
    let mut carol = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    carol.line_where(|l| l.contains("you are guest-")).await;
    carol.send("/nick carol").await;
    assert_eq!(carol.line().await.unwrap(), "* you are now carol");
    carol.send("/join shared").await;
    assert_eq!(
        carol.line().await.unwrap(),
        "* you are carol in room shared (2 here)"
    );

    carol.send("hello from tcp").await;
    assert_eq!(next_text(&mut web).await, "carol: hello from tcp");

    send_text(&mut web, "hello from the browser").await;
    assert_eq!(next_text(&mut web).await, "hello from the browser");
    assert_eq!(carol.line().await.unwrap(), "hello from the browser");

    web.send(Message::Binary(vec![0; 5].into())).await.unwrap();
    assert_eq!(carol.line().await.unwrap(), "[binary message, 5 bytes]");

    carol.send("/who").await;
    let who = carol.line().await.unwrap();
    assert!(who.starts_with("* in shared: "), "{who}");
    assert!(who.contains("carol") && who.contains("ws-"), "{who}");
}

#[tokio::test]
async fn bad_room_name_is_refused_with_a_reason() {
    let server = start_default().await;
    let url = format!("ws://{}/chat/no%20spaces", server.http_addr());
    let error = tokio_tungstenite::connect_async(url).await.unwrap_err();
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 400);
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("room name"), "{body}");
        }
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reader_that_stalls_is_cut_with_3008_and_the_others_keep_receiving() {
    let server = start(Config {
        outbox_limit: 64 * 1024,
        max_message_size: 64 * 1024,
        ..Config::for_tests()
    })
    .await;
    // The stalled reader: a raw socket that reads nothing until the flood is over.
    let mut stalled = RawWs::connect(server.http_addr(), "/chat/flood", "").await;
    let mut publisher = ws(&server, "/chat/flood").await;
    let mut fast = ws(&server, "/chat/flood").await;
    let payload = "x".repeat(16 * 1024);
    // Publish until the server reports the stalled reader cut (bounded: 2000 x 16 KiB).
    let mut n_sent = 0;
    while !server
        .metrics_text()
        .contains("plexus_slow_disconnects_total 1")
    {
        assert!(n_sent < 2000, "the stalled reader was never cut");
        for _ in 0..10 {
            let message = format!("{n_sent}:{payload}");
            send_text(&mut publisher, &message).await;
            // The publisher and the fast reader keep up and get every message in order.
            assert_eq!(next_text(&mut publisher).await, message);
            assert_eq!(next_text(&mut fast).await, message);
            n_sent += 1;
        }
    }
    // The fast ones keep receiving after the cut.
    send_text(&mut publisher, "after").await;
    assert_eq!(next_text(&mut fast).await, "after");
    // Now the stalled reader reads: what the kernel held, then the server's close with 3008.
    let mut bytes = Vec::new();
    tokio::time::timeout(TIMEOUT, stalled.stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the stalled reader")
        .ok();
    let close_at = bytes
        .iter()
        .rposition(|&byte| byte == 0x88)
        .expect("a close frame at the end");
    let code = u16::from_be_bytes([bytes[close_at + 2], bytes[close_at + 3]]);
    assert_eq!(code, 3008);
    assert!(server
        .metrics_text()
        .contains("plexus_slow_disconnects_total 1"));
}

/// A subscriber that stops reading fills its socket part-way through a frame: what the server
/// could not write at once waits, and when the subscriber reads again every message arrives
/// whole and in order (no frame is cut, none is lost, the connection stays open).
#[tokio::test]
async fn a_reader_that_pauses_gets_every_message_whole_and_in_order_after() {
    use futures_util::StreamExt;

    let server = start(Config {
        outbox_limit: 16 << 20,
        ..Config::for_tests()
    })
    .await;
    // A small receive buffer, so the server's writes to this socket stop part-way.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.http_addr()).await.unwrap();
    let url = format!("ws://{}/chat/pause", server.http_addr());
    let (mut paused, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("handshake");
    let mut publisher = ws(&server, "/chat/pause").await;
    let payload = "y".repeat(16 * 1024 - 4);
    let n = 400; // 6.4 MiB: far past the socket buffers, within the outbox limit
    for i in 0..n {
        let message = format!("{i:03}:{payload}");
        send_text(&mut publisher, &message).await;
        assert_eq!(next_text(&mut publisher).await, message);
    }
    for i in 0..n {
        let message = tokio::time::timeout(TIMEOUT, paused.next())
            .await
            .expect("the paused reader gets the rest in time")
            .expect("still open")
            .expect("a well-formed frame");
        assert_eq!(message, Message::Text(format!("{i:03}:{payload}").into()));
    }
}
