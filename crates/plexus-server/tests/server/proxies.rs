//! The connect, subscribe and publish proxies: a real HTTP backend (an axum server of the
//! test's own) authenticates clients from their cookies, decides subscribes, and checks and
//! rewrites publishes.

use std::sync::{Arc, Mutex};

use axum::extract::Path;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use futures_util::SinkExt;
use plexus_core::{ChannelOptions, Namespaces};
use plexus_server::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

/// What the backend got: the path, the body, and the `cookie` and `x-other` headers.
pub(crate) type Calls = Arc<Mutex<Vec<(String, Value, Option<String>, Option<String>)>>>;

/// The application's backend: `/connect`, `/subscribe` and `/publish`.
pub(crate) async fn backend() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let app = Router::new().route(
        "/{kind}",
        post(
            move |Path(kind): Path<String>, headers: HeaderMap, Json(call): Json<Value>| {
                let seen = seen.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .map(|value| value.to_str().unwrap().to_owned())
                    };
                    let cookie = header("cookie");
                    seen.lock().unwrap().push((
                        kind.clone(),
                        call.clone(),
                        cookie.clone(),
                        header("x-other"),
                    ));
                    let refreshes = seen
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(path, ..)| path == "refresh")
                        .count();
                    let answer = match (kind.as_str(), cookie.as_deref()) {
                        // Extended once, by a second; then over.
                        ("refresh", _) if refreshes == 1 => {
                            json!({"result": {"expire_at": now_unix() + 1}})
                        }
                        ("refresh", _) => json!({"result": {"expired": true}}),
                        ("connect", Some("session=ann")) => json!({"result": {
                            "user": "ann",
                            "info": {"name": "Ann"},
                            "data": {"welcome": true},
                            "channels": ["news:ann"],
                        }}),
                        ("connect", Some("session=brief")) => json!({"result": {
                            "user": "brief", "expire_at": now_unix() + 1,
                        }}),
                        ("connect", Some("session=stale")) => json!({"result": {
                            "user": "stale", "expire_at": 1,
                        }}),
                        ("connect", Some("session=nulls")) => json!({"result": {
                            "user": "nulls", "expire_at": null, "channels": null,
                            "info": null, "data": null,
                        }}),
                        ("connect", Some("session=banned")) => {
                            json!({"disconnect": {"code": 4501, "reason": "banned"}})
                        }
                        ("connect", _) => json!({"error": {"code": 101, "message": "who?"}}),
                        ("subscribe", _) if call["channel"] == "room:open" => json!({"result": {
                            "info": {"role": "member"},
                            "data": {"motd": "hello"},
                        }}),
                        ("subscribe", _) => {
                            json!({"error": {"code": 103, "message": "members only"}})
                        }
                        ("publish", _) if call["data"]["text"] == "bad" => {
                            json!({"error": {"code": 1001, "message": "not here"}})
                        }
                        ("publish", _) => json!({"result": {
                            "data": {"text": call["data"]["text"], "checked": true},
                            "skip_history": call["data"]["ephemeral"] == true,
                        }}),
                        _ => return (http::StatusCode::NOT_FOUND, Json(json!({}))),
                    };
                    (http::StatusCode::OK, Json(answer))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

/// The first call the backend got at `path`.
fn first_call(calls: &Calls, path: &str) -> (String, Value, Option<String>, Option<String>) {
    calls
        .lock()
        .unwrap()
        .iter()
        .find(|(at, ..)| at == path)
        .cloned()
        .unwrap_or_else(|| panic!("no call to {path}"))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn config(url: &str) -> Config {
    let mut namespaces = Namespaces::default();
    namespaces.insert(
        "room",
        ChannelOptions {
            proxy_subscribe: true,
            proxy_publish: true,
            // Neither anonymous subscribers nor client publishes without the backend.
            allow_subscribe_for_anonymous: false,
            allow_publish_for_client: false,
            ..ChannelOptions::chat()
        },
    );
    namespaces.insert("news", ChannelOptions::chat());
    Config {
        connect_proxy_url: Some(format!("{url}/connect")),
        subscribe_proxy_url: Some(format!("{url}/subscribe")),
        publish_proxy_url: Some(format!("{url}/publish")),
        proxy_http_headers: vec![http::header::COOKIE],
        namespaces,
        ..Config::for_tests()
    }
}

/// A native client that sends `cookie` with its upgrade (and a header the backend must not
/// see), and its connect without a token.
async fn open_with_cookie(server: &plexus_server::ServerHandle, cookie: &str) -> Ws {
    let url = format!("ws://{}/connection/websocket", server.http_addr());
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    request
        .headers_mut()
        .insert("x-other", "private".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let connect = json!({"id": 1, "connect": {"name": "test", "data": {"hello": 1}}});
    socket
        .send(Message::Text(connect.to_string().into()))
        .await
        .unwrap();
    socket
}

/// The same, and the connect reply.
async fn connect_with_cookie(server: &plexus_server::ServerHandle, cookie: &str) -> (Ws, Value) {
    let mut socket = open_with_cookie(server, cookie).await;
    let reply = next_json(&mut socket).await;
    (socket, reply)
}

#[tokio::test]
async fn the_backend_authenticates_clients_from_their_cookies() {
    let (url, calls) = backend().await;
    let server = start(config(&url)).await;

    let (mut ann, reply) = connect_with_cookie(&server, "session=ann").await;
    let result = &reply["connect"];
    assert_eq!(result["data"], json!({"welcome": true}), "{reply}");
    assert!(
        result["subs"]["news:ann"].is_object(),
        "subscribed to the backend's channels: {reply}"
    );
    let client = result["client"].as_str().unwrap().to_owned();
    let (path, body, cookie, other) = calls.lock().unwrap()[0].clone();
    assert_eq!(path, "connect");
    assert_eq!(
        body,
        json!({"client": client, "transport": "websocket", "protocol": "json",
               "encoding": "json", "name": "test", "version": "", "data": {"hello": 1}})
    );
    assert_eq!(cookie.as_deref(), Some("session=ann"));
    assert_eq!(other, None, "only proxy_http_headers go to the backend");
    // The user and info the backend gave are who the client is.
    let presence = command(&mut ann, 2, json!({"presence": {"channel": "news:ann"}})).await;
    let me = &presence["presence"]["presence"][&client];
    assert_eq!(me["user"], "ann", "{presence}");
    assert_eq!(me["conn_info"], json!({"name": "Ann"}));

    // The backend's error goes to the client as the connect's error; its disconnect closes.
    let (_, reply) = connect_with_cookie(&server, "session=nobody").await;
    assert_eq!(reply["error"], json!({"code": 101, "message": "who?"}));
    let mut banned = open_with_cookie(&server, "session=banned").await;
    assert_eq!(expect_close(&mut banned).await, (4501, "banned".to_owned()));

    // A client with a token is not asked about.
    let before = calls.lock().unwrap().len();
    let (_with_token, _) = native(&server, "bob").await;
    assert_eq!(calls.lock().unwrap().len(), before);
}

#[tokio::test]
async fn the_backend_decides_subscribes_and_checks_publishes() {
    let (url, calls) = backend().await;
    let server = start(config(&url)).await;
    let (mut ann, _) = connect_with_cookie(&server, "session=ann").await;

    // Allowed with the backend's data and channel info; refused with its error.
    let reply = command(
        &mut ann,
        2,
        json!({"subscribe": {"channel": "room:open", "data": {"want": "in"}}}),
    )
    .await;
    assert_eq!(
        reply["subscribe"]["data"],
        json!({"motd": "hello"}),
        "{reply}"
    );
    let refused = command(&mut ann, 3, json!({"subscribe": {"channel": "room:vip"}})).await;
    assert_eq!(
        refused["error"],
        json!({"code": 103, "message": "members only"})
    );
    let presence = command(&mut ann, 4, json!({"presence": {"channel": "room:open"}})).await;
    let entries: Vec<&Value> = presence["presence"]["presence"]
        .as_object()
        .unwrap()
        .values()
        .collect();
    assert_eq!(entries[0]["chan_info"], json!({"role": "member"}));
    let subscribe_call = first_call(&calls, "subscribe");
    assert_eq!(subscribe_call.1["user"], "ann");
    assert_eq!(subscribe_call.1["channel"], "room:open");
    assert_eq!(subscribe_call.1["data"], json!({"want": "in"}));
    assert_eq!(subscribe_call.2.as_deref(), Some("session=ann"));

    // Publishes: the backend's data is what subscribers get; its error refuses; with
    // skip_history the publication is delivered but not kept.
    let reply = command(
        &mut ann,
        5,
        json!({"publish": {"channel": "room:open", "data": {"text": "hi"}}}),
    )
    .await;
    assert!(reply.get("error").is_none(), "{reply}");
    let pushed = next_json(&mut ann).await;
    assert_eq!(
        pushed["push"]["pub"]["data"],
        json!({"text": "hi", "checked": true}),
        "{pushed}"
    );
    let refused = command(
        &mut ann,
        6,
        json!({"publish": {"channel": "room:open", "data": {"text": "bad"}}}),
    )
    .await;
    assert_eq!(
        refused["error"],
        json!({"code": 1001, "message": "not here"})
    );
    command(
        &mut ann,
        7,
        json!({"publish": {"channel": "room:open", "data": {"text": "psst", "ephemeral": true}}}),
    )
    .await;
    let pushed = next_json(&mut ann).await;
    assert_eq!(pushed["push"]["pub"]["data"]["text"], "psst");
    let history = command(
        &mut ann,
        8,
        json!({"history": {"channel": "room:open", "limit": -1}}),
    )
    .await;
    let texts: Vec<&Value> = history["history"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["data"]["text"])
        .collect();
    assert_eq!(texts, [&json!("hi")], "{history}");

    // A namespace without the proxies keeps its own rules and never asks the backend.
    let before = calls.lock().unwrap().len();
    let reply = command(
        &mut ann,
        9,
        json!({"publish": {"channel": "news:x", "data": {"text": "plain"}}}),
    )
    .await;
    assert!(reply.get("error").is_none(), "{reply}");
    assert_eq!(calls.lock().unwrap().len(), before);

    // Every call is counted by proxy and outcome, and timed.
    let (_, metrics) = http_request(&server, "GET", "/metrics", "", "").await;
    for (proxy, outcome, count) in [
        ("connect", "result", 1),
        ("subscribe", "result", 1),
        ("subscribe", "error", 1),
        ("publish", "result", 2),
        ("publish", "error", 1),
    ] {
        let line = format!(
            "plexus_proxy_calls_total{{proxy=\"{proxy}\",outcome=\"{outcome}\"}} {count}\n"
        );
        assert!(metrics.contains(&line), "{line:?} in\n{metrics}");
    }
    assert!(metrics.contains("plexus_proxy_call_seconds_total{proxy=\"publish\"} "));
}

/// A backend that is down: connecting without a token gets error 100 (internal), and the
/// server goes on.
#[tokio::test]
async fn a_backend_that_is_down_is_an_internal_error() {
    let port = plexus_core::conformance::free_port();
    let server = start(config(&format!("http://127.0.0.1:{port}"))).await;
    let (_, reply) = connect_with_cookie(&server, "session=ann").await;
    assert_eq!(reply["error"]["code"], 100, "{reply}");
    let (_, client) = native(&server, "bob").await;
    assert!(!client.is_empty());
}

/// An expiry the backend gives is the server's to enforce: the client is not asked to refresh
/// (it has no token to refresh with) but is closed with 3005 when it comes, and connects again
/// through the backend; an expiry already past is error 110. Nulls in an answer are defaults.
/// A connection the backend refused may not try again.
#[tokio::test]
async fn backend_expiries_nulls_and_refusals() {
    let (url, _) = backend().await;
    let server = start(config(&url)).await;
    let (mut brief, reply) = connect_with_cookie(&server, "session=brief").await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    assert_eq!(reply["connect"].get("expires"), None, "{reply}");
    assert_eq!(reply["connect"].get("ttl"), None, "{reply}");
    let started = std::time::Instant::now();
    assert_eq!(
        expect_close(&mut brief).await,
        (3005, "connection expired".to_owned())
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(3));

    let (_, reply) = connect_with_cookie(&server, "session=stale").await;
    assert_eq!(reply["error"]["code"], 110, "{reply}");
    let (_, reply) = connect_with_cookie(&server, "session=nulls").await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");

    let (mut nobody, reply) = connect_with_cookie(&server, "session=nobody").await;
    assert_eq!(reply["error"]["code"], 101, "{reply}");
    nobody
        .send(Message::Text(
            json!({"id": 2, "connect": {}}).to_string().into(),
        ))
        .await
        .unwrap();
    assert_eq!(
        expect_close(&mut nobody).await,
        (3501, "bad request".to_owned())
    );
}

/// A guest of the built-in pages (a token from /app/token, a name without an account) is no
/// user to the backends.
#[tokio::test]
async fn guests_are_anonymous_to_the_backends() {
    let (url, calls) = backend().await;
    let server = start(config(&url)).await;
    let (status, body) = http_request(&server, "GET", "/app/token?name=Gus", "", "").await;
    assert_eq!(status, 200, "{body}");
    let guest_token = serde_json::from_str::<Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut guest = ws(&server, "/connection/websocket").await;
    let connect = json!({"id": 1, "connect": {"token": guest_token}});
    guest
        .send(Message::Text(connect.to_string().into()))
        .await
        .unwrap();
    let reply = next_json(&mut guest).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    command(
        &mut guest,
        2,
        json!({"subscribe": {"channel": "room:open"}}),
    )
    .await;
    let (_, body, ..) = first_call(&calls, "subscribe");
    assert_eq!(body["user"], "", "{body}");
}

/// Where subscribing or publishing needs the backend, clients that cannot show a token or be
/// asked about are kept out: raw rooms, TCP chat, and long polling without a subscription
/// token.
#[tokio::test]
async fn raw_rooms_tcp_chat_and_polling_cannot_go_around_the_backend() {
    let (url, _) = backend().await;
    let mut config = config(&url);
    config.namespaces.insert(
        "chat",
        plexus_core::ChannelOptions {
            proxy_subscribe: true,
            ..plexus_core::ChannelOptions::chat()
        },
    );
    let server = start(config).await;
    let mut raw = ws(&server, "/chat/lobby").await;
    assert_eq!(
        expect_close(&mut raw).await,
        (1008, "this room needs the native protocol".to_owned())
    );
    let mut chat = LineClient::connect(server.tcp_chat_addr().unwrap()).await;
    let refused = chat.line_where(|line| line.starts_with("ERR")).await;
    assert!(refused.contains("native protocol"), "{refused}");
    let (status, body) = http_request(
        &server,
        "GET",
        &format!("/poll/room:open?token={}", token("ann")),
        "",
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");
}

/// With a refresh proxy, a connection the connect proxy gave an expiry is extended by the
/// backend when it comes, on the same connection, until the backend says it is over (3005).
#[tokio::test]
async fn the_refresh_proxy_extends_connections_until_it_says_no() {
    let (url, calls) = backend().await;
    let server = start(Config {
        refresh_proxy_url: Some(format!("{url}/refresh")),
        ..config(&url)
    })
    .await;
    let (mut brief, reply) = connect_with_cookie(&server, "session=brief").await;
    let client = reply["connect"]["client"].as_str().unwrap().to_owned();
    assert_eq!(
        expect_close(&mut brief).await,
        (3005, "connection expired".to_owned())
    );
    // Two refreshes on the one connection: the first extended it, the second ended it.
    let refreshes: Vec<Value> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, ..)| path == "refresh")
        .map(|(_, body, ..)| body.clone())
        .collect();
    assert_eq!(refreshes.len(), 2, "{refreshes:?}");
    assert_eq!(refreshes[0]["client"], client.as_str());
    assert_eq!(refreshes[0]["user"], "brief");
    assert_eq!(refreshes[0]["transport"], "websocket");
}
