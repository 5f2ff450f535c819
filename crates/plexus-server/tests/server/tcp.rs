//! The TCP echo and chat listeners.

use std::time::Duration;

use plexus_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

#[tokio::test]
async fn tcp_echo_returns_bytes_unchanged() {
    let server = start_default().await;
    let mut stream = TcpStream::connect(server.tcp_echo_addr().unwrap())
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let (mut read, mut write) = stream.split();
    let (_, echoed) = tokio::join!(
        async {
            write.write_all(&bytes).await.unwrap();
        },
        async {
            let mut echoed = vec![0; bytes.len()];
            tokio::time::timeout(TIMEOUT, read.read_exact(&mut echoed))
                .await
                .unwrap()
                .unwrap();
            echoed
        }
    );
    assert_eq!(echoed, bytes);
}

#[tokio::test]
async fn tcp_chat_commands() {
    let server = start_default().await;
    let addr = server.tcp_chat_addr().unwrap();
    let mut ann = LineClient::connect(addr).await;
    let mut ben = LineClient::connect(addr).await;
    assert!(ann
        .line()
        .await
        .unwrap()
        .starts_with("* welcome to Plexus chat"));
    assert!(ann.line().await.unwrap().contains("in room lobby (1 here)"));
    ben.line_where(|l| l.contains("in room lobby (2 here)"))
        .await;

    ann.send("/nick ann").await;
    assert_eq!(ann.line().await.unwrap(), "* you are now ann");
    ann.send("hi ben").await;
    assert_eq!(ben.line().await.unwrap(), "ann: hi ben");

    ben.send("/dance").await;
    assert_eq!(
        ben.line().await.unwrap(),
        "ERR unknown command /dance; try /help"
    );
    ben.send("/join bad:room").await;
    assert!(ben
        .line()
        .await
        .unwrap()
        .starts_with("ERR usage: /join ROOM"));
    ben.send("/help").await;
    assert!(ben.line().await.unwrap().starts_with("* commands:"));
    ben.send("/who").await;
    let who = ben.line().await.unwrap();
    assert!(
        who.starts_with("* in lobby: ") && who.contains("ann"),
        "{who}"
    );

    // Ben moves away: Ann's messages no longer reach him, and she does not hear her own.
    ben.send("/join quiet").await;
    assert!(ben.line().await.unwrap().contains("in room quiet (1 here)"));
    ann.send("anyone?").await;
    ben.send("/quit").await;
    assert_eq!(ben.line().await.unwrap(), "* bye");
    assert_eq!(ben.line().await, None, "closed after /quit");
    ann.send("/who").await;
    assert_eq!(ann.line().await.unwrap(), "* in lobby: ann");
}

#[tokio::test]
async fn tcp_chat_idle_clients_are_told_and_closed() {
    let server = start(Config {
        tcp_idle_timeout: Duration::from_millis(300),
        ..Config::for_tests()
    })
    .await;
    let mut idle = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    let line = idle.line_where(|l| l.starts_with("* disconnected")).await;
    assert_eq!(line, "* disconnected: idle for 300ms");
    assert_eq!(idle.line().await, None);
}

#[tokio::test]
async fn tcp_chat_overlong_line_is_refused() {
    let server = start(Config {
        max_message_size: 100,
        ..Config::for_tests()
    })
    .await;
    let mut client = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    client.send(&"y".repeat(500)).await;
    let line = client.line_where(|l| l.starts_with("ERR")).await;
    assert_eq!(line, "ERR line longer than 100 bytes");
    assert_eq!(client.line().await, None);
}

#[tokio::test]
async fn a_burst_of_own_lines_does_not_stall_delivery() {
    let server = start_default().await;
    let addr = server.tcp_chat_addr().unwrap();
    let mut ann = LineClient::connect(addr).await;
    ann.line_where(|l| l.contains("in room lobby")).await;
    let mut ben = LineClient::connect(addr).await;
    ben.line_where(|l| l.contains("in room lobby")).await;
    ben.send("/nick ben").await;
    ben.line().await;
    // Ann pastes thousands of lines: her outbox fills with her own messages, none for her.
    let burst = "a\n".repeat(4096);
    ann.send(burst.trim_end()).await;
    for _ in 0..4096 {
        ben.line_where(|l| l.ends_with(": a")).await;
    }
    ben.send("are you there?").await;
    assert_eq!(ann.line().await.unwrap(), "ben: are you there?");
}
