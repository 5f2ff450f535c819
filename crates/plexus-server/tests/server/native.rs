//! The native protocol over WebSocket, driven frame by frame: refusals with their documented
//! codes, private and limited channels, the slow-subscriber cut.

use futures_util::SinkExt;
use plexus_core::{ChannelOptions, Namespaces};
use plexus_server::Config;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

fn config_with(namespace: &str, options: ChannelOptions) -> Config {
    let mut namespaces = Namespaces::default();
    namespaces.insert(namespace, options);
    Config {
        namespaces,
        ..Config::for_tests()
    }
}

async fn upgrade_with_origin(
    server: &plexus_server::ServerHandle,
    origin: &str,
) -> Result<Ws, u16> {
    let url = format!("ws://{}/connection/websocket", server.http_addr());
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", origin.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn foreign_origins_are_refused_same_origin_and_listed_ones_allowed() {
    let server = start_default().await;
    assert_eq!(
        upgrade_with_origin(&server, "https://evil.example")
            .await
            .err(),
        Some(403)
    );
    let same = format!("http://{}", server.http_addr());
    assert!(upgrade_with_origin(&server, &same).await.is_ok());
    assert!(server
        .metrics_text()
        .contains("plexus_refused_total{reason=\"bad_origin\"} 1"));
    let listed = start(Config {
        allowed_origins: vec!["https://app.example".into()],
        ..Config::for_tests()
    })
    .await;
    assert!(upgrade_with_origin(&listed, "https://app.example")
        .await
        .is_ok());
    assert_eq!(
        upgrade_with_origin(&listed, "https://evil.example")
            .await
            .err(),
        Some(403)
    );
}

#[tokio::test]
async fn tokens_are_required_unless_anonymous_is_allowed() {
    let server = start_default().await;
    let mut socket = ws(&server, "/connection/websocket").await;
    send_text(&mut socket, r#"{"id":1,"connect":{}}"#).await;
    assert_eq!(
        expect_close(&mut socket).await,
        (3500, "invalid token".into())
    );
    let mut forged = ws(&server, "/connection/websocket").await;
    let token = plexus_auth::mint_hs256(
        "another-secret",
        &plexus_auth::MintRequest {
            sub: "mallory".into(),
            ..Default::default()
        },
    );
    send_text(
        &mut forged,
        &json!({"id": 1, "connect": {"token": token}}).to_string(),
    )
    .await;
    assert_eq!(expect_close(&mut forged).await.0, 3500);
    // The process keeps serving.
    let (mut fine, _) = native(&server, "u1").await;
    assert_eq!(
        command(&mut fine, 2, json!({"ping": {}})).await,
        json!({"id": 2, "ping": {}})
    );

    let open = start(Config {
        allow_anonymous_connect_without_token: true,
        ..Config::for_tests()
    })
    .await;
    let mut anonymous = ws(&open, "/connection/websocket").await;
    send_text(&mut anonymous, r#"{"id":1,"connect":{}}"#).await;
    let reply = next_json(&mut anonymous).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    // Anonymous users may subscribe where the namespace allows it (chat) and not elsewhere.
    let chat = command(
        &mut anonymous,
        2,
        json!({"subscribe": {"channel": "chat:a"}}),
    )
    .await;
    assert!(chat["subscribe"].is_object(), "{chat}");
    let plain = command(
        &mut anonymous,
        3,
        json!({"subscribe": {"channel": "plain"}}),
    )
    .await;
    assert_eq!(plain["error"]["code"], 103, "{plain}");
}

#[tokio::test]
async fn commands_before_connect_and_garbage_are_bad_requests() {
    let server = start_default().await;
    let mut early = ws(&server, "/connection/websocket").await;
    send_text(&mut early, r#"{"id":1,"subscribe":{"channel":"chat:a"}}"#).await;
    assert_eq!(expect_close(&mut early).await, (3501, "bad request".into()));
    let (mut garbage, _) = native(&server, "u1").await;
    send_text(&mut garbage, "{not json").await;
    assert_eq!(expect_close(&mut garbage).await.0, 3501);
    let (mut rpc, _) = native(&server, "u1").await;
    let reply = command(&mut rpc, 2, json!({"rpc": {"method": "x", "data": {}}})).await;
    assert_eq!(reply["error"]["code"], 108, "{reply}");
}

#[tokio::test]
async fn private_channels_need_a_matching_subscription_token() {
    let server = start(config_with(
        "secret",
        ChannelOptions {
            private: true,
            ..ChannelOptions::chat()
        },
    ))
    .await;
    let (mut alice, _) = native(&server, "alice").await;
    let refused = command(
        &mut alice,
        2,
        json!({"subscribe": {"channel": "secret:plans"}}),
    )
    .await;
    assert_eq!(refused["error"]["code"], 103, "{refused}");
    let wrong_user = token_with("bob", Some("secret:plans"));
    let refused = command(
        &mut alice,
        3,
        json!({"subscribe": {"channel": "secret:plans", "token": wrong_user}}),
    )
    .await;
    assert_eq!(refused["error"]["code"], 103, "{refused}");
    let good = token_with("alice", Some("secret:plans"));
    let accepted = command(
        &mut alice,
        4,
        json!({"subscribe": {"channel": "secret:plans", "token": good}}),
    )
    .await;
    assert_eq!(accepted["subscribe"]["recoverable"], true, "{accepted}");
    let again = command(&mut alice, 5, json!({"subscribe": {"channel": "secret:plans", "token": token_with("alice", Some("secret:plans"))}})).await;
    assert_eq!(again["error"]["code"], 105, "{again}");
}

#[tokio::test]
async fn user_limited_and_full_channels() {
    let server = start(config_with(
        "room",
        ChannelOptions {
            max_subscribers: 1,
            ..ChannelOptions::chat()
        },
    ))
    .await;
    let (mut u42, _) = native(&server, "42").await;
    let (mut u44, _) = native(&server, "44").await;
    let ok = command(
        &mut u42,
        2,
        json!({"subscribe": {"channel": "chat:dialog#42,43"}}),
    )
    .await;
    assert!(ok["subscribe"].is_object(), "{ok}");
    let denied = command(
        &mut u44,
        2,
        json!({"subscribe": {"channel": "chat:dialog#42,43"}}),
    )
    .await;
    assert_eq!(denied["error"]["code"], 103, "{denied}");
    let first = command(&mut u42, 3, json!({"subscribe": {"channel": "room:x"}})).await;
    assert!(first["subscribe"].is_object(), "{first}");
    let full = command(&mut u44, 3, json!({"subscribe": {"channel": "room:x"}})).await;
    assert_eq!(full["error"]["code"], 106, "{full}");
    let unknown = command(&mut u44, 4, json!({"subscribe": {"channel": "nope:x"}})).await;
    assert_eq!(unknown["error"]["code"], 102, "{unknown}");
}

#[tokio::test]
async fn a_stalled_protocol_subscriber_is_cut_with_3008_slow() {
    let server = start(Config {
        outbox_limit: 64 * 1024,
        ..Config::for_tests()
    })
    .await;
    // The stalled one: subscribes, then reads nothing.
    let mut stalled = RawWs::connect(server.http_addr(), "/connection/websocket", "").await;
    let connect = json!({"id": 1, "connect": {"token": token("slow")}}).to_string();
    stalled.send(&client_frame(0x81, connect.as_bytes())).await;
    let subscribe = json!({"id": 2, "subscribe": {"channel": "chat:flood"}}).to_string();
    stalled
        .send(&client_frame(0x81, subscribe.as_bytes()))
        .await;
    let (mut fast, _) = native(&server, "fast").await;
    command(
        &mut fast,
        2,
        json!({"subscribe": {"channel": "chat:flood"}}),
    )
    .await;
    let payload = "x".repeat(16 * 1024);
    let mut n_sent = 0;
    while !server
        .metrics_text()
        .contains("plexus_slow_disconnects_total 1")
    {
        assert!(n_sent < 2000, "the stalled subscriber was never cut");
        let reply = command(
            &mut fast,
            10 + n_sent,
            json!({"publish": {"channel": "chat:flood", "data": {"n": n_sent, "pad": payload}}}),
        )
        .await;
        assert!(reply["publish"].is_object(), "{reply}");
        let push = next_json(&mut fast).await;
        assert_eq!(
            push["push"]["pub"]["data"]["n"], n_sent,
            "the fast one gets every publication in order"
        );
        n_sent += 1;
    }
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(
        TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut stalled.stream, &mut bytes),
    )
    .await;
    let close_at = bytes
        .iter()
        .rposition(|&b| b == 0x88)
        .expect("a close frame");
    assert_eq!(
        u16::from_be_bytes([bytes[close_at + 2], bytes[close_at + 3]]),
        3008
    );
    assert_eq!(&bytes[close_at + 4..], b"slow");
    // The cut one has left the channel as any other would: gone from presence.
    let started = std::time::Instant::now();
    loop {
        let presence = api_result(&server, "presence", json!({"channel": "chat:flood"})).await;
        let users: Vec<&serde_json::Value> = presence["presence"]
            .as_object()
            .unwrap()
            .values()
            .map(|client| &client["user"])
            .collect();
        if users == [&json!("fast")] {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "{presence}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    fast.send(Message::Close(None)).await.ok();
}

#[tokio::test]
async fn expiring_connections_and_subscriptions() {
    use std::time::Duration;
    // Without a grace, expiries are enforced when they come.
    let server = start(Config {
        expired_close_delay: Duration::ZERO,
        expired_sub_close_delay: Duration::ZERO,
        ..config_with(
            "secret",
            ChannelOptions {
                private: true,
                ..ChannelOptions::chat()
            },
        )
    })
    .await;
    // A connection token valid 1 s: the result says so, and the server closes it with 3005.
    let mut short = ws(&server, "/connection/websocket").await;
    let token = token_expiring("u1", None, Some(Duration::from_secs(1)));
    send_text(
        &mut short,
        &json!({"id": 1, "connect": {"token": token}}).to_string(),
    )
    .await;
    let reply = next_json(&mut short).await;
    assert_eq!(reply["connect"]["expires"], true, "{reply}");
    assert_eq!(
        expect_close(&mut short).await,
        (3005, "connection expired".into())
    );

    // A refreshed connection stays. (`exp` is in whole seconds, so a "1 s" token may have only
    // milliseconds left; this one has 1 to 2 s, time enough to refresh it on a loaded machine.)
    let mut refreshed = ws(&server, "/connection/websocket").await;
    let first_expiry = tokio::time::Instant::now() + Duration::from_secs(2);
    let token = token_expiring("u2", None, Some(Duration::from_secs(2)));
    send_text(
        &mut refreshed,
        &json!({"id": 1, "connect": {"token": token}}).to_string(),
    )
    .await;
    next_json(&mut refreshed).await;
    let longer = token_expiring("u2", None, Some(Duration::from_secs(600)));
    let reply = command(&mut refreshed, 2, json!({"refresh": {"token": longer}})).await;
    assert!(reply["refresh"]["ttl"].as_u64().unwrap() > 500, "{reply}");

    // A subscription token valid 1 s: an unsubscribe push (2501) ends it, unless refreshed.
    let (mut alice, _) = native(&server, "alice").await;
    let soon = token_expiring("alice", Some("secret:a"), Some(Duration::from_secs(1)));
    let subscribed = command(
        &mut alice,
        2,
        json!({"subscribe": {"channel": "secret:a", "token": soon}}),
    )
    .await;
    assert_eq!(subscribed["subscribe"]["expires"], true, "{subscribed}");
    let later = token_expiring("alice", Some("secret:b"), Some(Duration::from_secs(1)));
    command(
        &mut alice,
        3,
        json!({"subscribe": {"channel": "secret:b", "token": later}}),
    )
    .await;
    let fresh = token_expiring("alice", Some("secret:b"), Some(Duration::from_secs(600)));
    let reply = command(
        &mut alice,
        4,
        json!({"sub_refresh": {"channel": "secret:b", "token": fresh}}),
    )
    .await;
    assert_eq!(reply["sub_refresh"]["expires"], true, "{reply}");
    let push = loop {
        let message = next_json(&mut alice).await;
        if message.get("push").is_some() {
            break message;
        }
    };
    assert_eq!(push["push"]["channel"], "secret:a", "{push}");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2501, "{push}");
    // secret:b is still subscribed: a second subscribe is refused as a duplicate.
    let again = command(&mut alice, 5, json!({"subscribe": {"channel": "secret:b", "token": token_with("alice", Some("secret:b"))}})).await;
    assert_eq!(again["error"]["code"], 105, "{again}");
    // Past the first token's expiry, the refreshed connection still answers.
    tokio::time::sleep_until(first_expiry + Duration::from_millis(200)).await;
    assert_eq!(
        refreshed_alive(&mut refreshed).await,
        json!({"id": 9, "ping": {}})
    );
}

/// The official SDKs refresh when `ttl` runs out, at the expiry itself: the server waits
/// `expired_close_delay` (and `expired_sub_close_delay`) past the token's `exp` for them, then
/// closes (3005) or ends the subscription (2501) if no refresh came.
#[tokio::test]
async fn expiries_wait_for_a_late_refresh() {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let server = start(Config {
        expired_close_delay: Duration::from_secs(3),
        expired_sub_close_delay: Duration::from_secs(3),
        ..config_with("secret", ChannelOptions::chat())
    })
    .await;
    let mut late = ws(&server, "/connection/websocket").await;
    let mut never = ws(&server, "/connection/websocket").await;
    let token = token_expiring("u1", None, Some(Duration::from_secs(1)));
    for socket in [&mut late, &mut never] {
        let connect = json!({"id": 1, "connect": {"token": token}});
        send_text(socket, &connect.to_string()).await;
        let reply = next_json(socket).await;
        assert_eq!(reply["connect"]["expires"], true, "{reply}");
        assert_eq!(
            reply["connect"]["ttl"], 1,
            "the token's own expiry: {reply}"
        );
    }
    let soon = token_expiring("u1", Some("secret:a"), Some(Duration::from_secs(1)));
    let subscribe = json!({"subscribe": {"channel": "secret:a", "token": soon}});
    let reply = command(&mut late, 2, subscribe).await;
    assert_eq!(reply["subscribe"]["expires"], true, "{reply}");
    assert_eq!(reply["subscribe"]["ttl"], 1, "{reply}");
    // Wait until both tokens are past their `exp` (whole seconds, at most 1 s ahead).
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    let past = UNIX_EPOCH + Duration::from_secs(exp) + Duration::from_millis(300);
    tokio::time::sleep(past.duration_since(SystemTime::now()).unwrap_or_default()).await;

    // Expired, yet still here: a late refresh of both is accepted.
    let longer = token_expiring("u1", None, Some(Duration::from_secs(600)));
    let reply = command(&mut late, 3, json!({"refresh": {"token": longer}})).await;
    let ttl = reply["refresh"]["ttl"].as_u64().unwrap();
    assert!((590..=600).contains(&ttl), "{reply}");
    let fresh = token_expiring("u1", Some("secret:a"), Some(Duration::from_secs(600)));
    let refresh = json!({"sub_refresh": {"channel": "secret:a", "token": fresh}});
    let reply = command(&mut late, 4, refresh).await;
    assert_eq!(reply["sub_refresh"]["expires"], true, "{reply}");
    assert_eq!(
        refreshed_alive(&mut never).await,
        json!({"id": 9, "ping": {}})
    );

    // The one that never refreshed is closed once the delay is over; the other stays, and so
    // does its subscription (a second subscribe is a duplicate).
    assert_eq!(
        expect_close(&mut never).await,
        (3005, "connection expired".into())
    );
    // Had the refreshes not been taken, `late` would be closed (and its subscription ended)
    // about now too: give that time to happen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again =
        json!({"subscribe": {"channel": "secret:a", "token": token_with("u1", Some("secret:a"))}});
    let reply = command(&mut late, 5, again).await;
    assert_eq!(reply["error"]["code"], 105, "{reply}");
    assert_eq!(
        refreshed_alive(&mut late).await,
        json!({"id": 9, "ping": {}})
    );
}

async fn refreshed_alive(socket: &mut Ws) -> serde_json::Value {
    command(socket, 9, json!({"ping": {}})).await
}

#[tokio::test]
async fn a_client_that_never_connects_is_closed_as_stale() {
    let server = start(Config {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..Config::for_tests()
    })
    .await;
    let mut idle = ws(&server, "/connection/websocket").await;
    assert_eq!(expect_close(&mut idle).await, (3502, "stale".into()));
}

/// A guest token from `/app/token`, as the built-in chat page gets one.
async fn guest_token(server: &plexus_server::ServerHandle, name: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.http_addr())
        .await
        .unwrap();
    let request =
        format!("GET /app/token?name={name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap()
}

#[tokio::test]
async fn guests_of_the_built_in_pages_have_anonymous_rights_and_a_name() {
    let server = start_default().await;
    let guest = guest_token(&server, "Ann").await;
    let user = guest["user"].as_str().unwrap().to_owned();
    assert!(user.starts_with("guest-"), "{guest}");
    let mut socket = ws(&server, "/connection/websocket").await;
    let connect = json!({"id": 1, "connect": {"token": guest["token"]}});
    send_text(&mut socket, &connect.to_string()).await;
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["connect"]["expires"], true, "{reply}");
    let chat = command(
        &mut socket,
        2,
        json!({"subscribe": {"channel": "chat:guests"}}),
    )
    .await;
    assert!(chat["subscribe"].is_object(), "{chat}");
    let presence = command(
        &mut socket,
        3,
        json!({"presence": {"channel": "chat:guests"}}),
    )
    .await;
    let entry = presence["presence"]["presence"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        (entry["user"].as_str(), &entry["conn_info"]),
        (Some(user.as_str()), &json!({"name": "Ann"}))
    );
    // Where anonymous users may not go, neither may guests, even "their own" dialog.
    let plain = command(&mut socket, 4, json!({"subscribe": {"channel": "plain"}})).await;
    assert_eq!(plain["error"]["code"], 103, "{plain}");
    let dialog = command(
        &mut socket,
        5,
        json!({"subscribe": {"channel": format!("chat:dm#{user}")}}),
    )
    .await;
    assert_eq!(dialog["error"]["code"], 103, "{dialog}");
}

#[tokio::test]
async fn the_quotes_demo_streams_only_while_someone_watches() {
    let server = start_default().await;
    let (mut watcher, _) = native(&server, "viewer").await;
    let subscribed = command(
        &mut watcher,
        2,
        json!({"subscribe": {"channel": "quotes:ACME"}}),
    )
    .await;
    assert!(
        subscribed["subscribe"]["recoverable"].as_bool().unwrap(),
        "{subscribed}"
    );
    for _ in 0..2 {
        let push = loop {
            let message = next_json(&mut watcher).await;
            if message.get("push").is_some() {
                break message;
            }
        };
        assert_eq!(push["push"]["pub"]["data"]["symbol"], "ACME", "{push}");
        assert!(push["push"]["pub"]["data"]["price"].as_f64().unwrap() > 0.0);
    }
    command(
        &mut watcher,
        3,
        json!({"unsubscribe": {"channel": "quotes:ACME"}}),
    )
    .await;
    let top = |history: serde_json::Value| history["history"]["offset"].as_u64().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let before = top(command(
        &mut watcher,
        4,
        json!({"history": {"channel": "quotes:ACME", "limit": 0}}),
    )
    .await);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let after = top(command(
        &mut watcher,
        5,
        json!({"history": {"channel": "quotes:ACME", "limit": 0}}),
    )
    .await);
    assert!(before >= 2);
    assert_eq!(before, after, "no subscribers, no prices");
}
