//! The server HTTP API (`POST /api/{method}`), Centrifugo-compatible: key checks, request
//! errors, and each method against real raw and native-protocol clients.

use std::time::Duration;

use plexus_server::ServerHandle;
use serde_json::{json, Value};

use crate::util::*;

const KEY: &str = API_KEY;

/// One `POST` with extra headers; returns the status and the JSON body.
async fn request(server: &ServerHandle, path: &str, headers: &str, body: &str) -> (u16, Value) {
    http_json(server, "POST", path, headers, body).await
}

async fn call(server: &ServerHandle, method: &str, body: Value) -> Value {
    api_call(server, method, body).await
}

async fn result(server: &ServerHandle, method: &str, body: Value) -> Value {
    api_result(server, method, body).await
}

/// A raw `/chat/{room}` client, known to be subscribed: its own first message came back.
async fn raw_subscriber(server: &ServerHandle, room: &str) -> Ws {
    let mut socket = ws(server, &format!("/chat/{room}")).await;
    send_text(&mut socket, "ready").await;
    assert_eq!(next_text(&mut socket).await, "ready");
    socket
}

#[tokio::test]
async fn key_body_and_method_errors_are_http_errors() {
    let server = start_default().await;
    let unauthorized = json!({"error": {"code": 101, "message": "unauthorized"}});
    let body = r#"{"channel":"chat:x","data":1}"#;
    assert_eq!(
        request(&server, "/api/publish", "", body).await,
        (401, unauthorized.clone())
    );
    let wrong = "X-API-Key: not-the-key\r\n";
    assert_eq!(
        request(&server, "/api/publish", wrong, body).await,
        (401, unauthorized.clone())
    );
    // Unknown methods are not revealed without the key either.
    assert_eq!(
        request(&server, "/api/nope", "", "{}").await,
        (401, unauthorized)
    );
    let authorization = format!("Authorization: apikey {KEY}\r\n");
    let (status, reply) = request(&server, "/api/publish", &authorization, body).await;
    assert_eq!((status, &reply["result"]["offset"]), (200, &json!(1)));

    let key = format!("X-API-Key: {KEY}\r\n");
    let bad = |status: u16, reply: &Value, detail: &str| {
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["code"], 107, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("bad request: ") && message.contains(detail),
            "{message}"
        );
    };
    let (status, reply) = request(&server, "/api/publish", &key, "{not json").await;
    bad(status, &reply, "key must be a string");
    let (status, reply) = request(&server, "/api/publish", &key, r#"{"data":1}"#).await;
    bad(status, &reply, "missing field `channel`");
    let (status, reply) =
        request(&server, "/api/publish", &key, r#"{"channel":"","data":1}"#).await;
    bad(status, &reply, "channel required");
    let (status, reply) = request(&server, "/api/disconnect", &key, r#"{"user":""}"#).await;
    bad(status, &reply, "user required");
    assert_eq!(
        request(&server, "/api/nope", &key, "{}").await,
        (
            404,
            json!({"error": {"code": 104, "message": "method not found"}})
        )
    );
    // A method's own error is HTTP 200 with an error body.
    assert_eq!(
        call(&server, "publish", json!({"channel": "nope:x", "data": 1})).await,
        json!({"error": {"code": 102, "message": "unknown channel"}})
    );
}

#[tokio::test]
async fn publish_reaches_raw_subscribers_and_history_keeps_it() {
    let server = start_default().await;
    let mut subscriber = raw_subscriber(&server, "api-pub").await; // its "ready" is offset 1
                                                                   // Sent as text: the data reaches raw subscribers exactly as written, keys in order.
    let key = format!("X-API-Key: {KEY}\r\n");
    let body = r#"{"channel": "chat:api-pub", "data": {"text":"hi","n":1}}"#;
    let (status, reply) = request(&server, "/api/publish", &key, body).await;
    assert_eq!(status, 200, "{reply}");
    let published = &reply["result"];
    assert_eq!(published["offset"], 2, "{reply}");
    let epoch = published["epoch"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty());
    assert_eq!(next_text(&mut subscriber).await, r#"{"text":"hi","n":1}"#);

    let history = result(
        &server,
        "history",
        json!({"channel": "chat:api-pub", "limit": -1}),
    )
    .await;
    assert_eq!(
        history,
        json!({
            "publications": [
                {"data": "ready", "info": history["publications"][0]["info"], "offset": 1},
                {"data": {"text": "hi", "n": 1}, "offset": 2},
            ],
            "epoch": epoch,
            "offset": 2,
        })
    );
    // limit 0 (the default): only the position; a position from another epoch: 112.
    let position = result(&server, "history", json!({"channel": "chat:api-pub"})).await;
    assert_eq!(
        position,
        json!({"publications": [], "epoch": epoch, "offset": 2})
    );
    let since =
        json!({"channel": "chat:api-pub", "limit": -1, "since": {"offset": 1, "epoch": "other"}});
    assert_eq!(call(&server, "history", since).await["error"]["code"], 112);
    let since =
        json!({"channel": "chat:api-pub", "limit": -1, "since": {"offset": 1, "epoch": epoch}});
    let newer = result(&server, "history", since).await;
    assert_eq!(newer["publications"].as_array().unwrap().len(), 1);

    // skip_history: delivered, not kept, no offset.
    let skipped = result(
        &server,
        "publish",
        json!({"channel": "chat:api-pub", "data": "quiet", "skip_history": true}),
    )
    .await;
    assert_eq!(skipped, json!({}));
    assert_eq!(next_text(&mut subscriber).await, r#""quiet""#);

    // The default namespace keeps no history: publish has no position, history is 108.
    assert_eq!(
        result(&server, "publish", json!({"channel": "plain", "data": 1})).await,
        json!({})
    );
    let not_available = json!({"error": {"code": 108, "message": "not available"}});
    assert_eq!(
        call(&server, "history", json!({"channel": "plain"})).await,
        not_available
    );

    assert_eq!(
        result(
            &server,
            "history_remove",
            json!({"channel": "chat:api-pub"})
        )
        .await,
        json!({})
    );
    let emptied = result(
        &server,
        "history",
        json!({"channel": "chat:api-pub", "limit": -1}),
    )
    .await;
    assert_eq!(
        emptied,
        json!({"publications": [], "epoch": epoch, "offset": 2})
    );
}

#[tokio::test]
async fn broadcast_answers_per_channel() {
    let server = start_default().await;
    let mut first = raw_subscriber(&server, "api-b1").await;
    let mut second = raw_subscriber(&server, "api-b2").await;
    let reply = result(
        &server,
        "broadcast",
        json!({"channels": ["chat:api-b1", "nope:x", "chat:api-b2"], "data": [1, 2]}),
    )
    .await;
    let responses = reply["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 3, "{reply}");
    assert_eq!(responses[0]["result"]["offset"], 2);
    assert_eq!(
        responses[1],
        json!({"error": {"code": 102, "message": "unknown channel"}})
    );
    assert_eq!(responses[2]["result"]["offset"], 2);
    assert_eq!(next_text(&mut first).await, "[1,2]");
    assert_eq!(next_text(&mut second).await, "[1,2]");
    let (status, _) = request(
        &server,
        "/api/broadcast",
        &format!("X-API-Key: {KEY}\r\n"),
        r#"{"channels":[],"data":1}"#,
    )
    .await;
    assert_eq!(status, 400);
}

/// `tags` on `publish` and `broadcast` reach protocol subscribers in the `pub` push and stay
/// in history; tags that are not strings are a 400.
#[tokio::test]
async fn tags_reach_subscribers_and_history() {
    let server = start_default().await;
    let (mut ann, _) = native(&server, "ann").await;
    let reply = command(&mut ann, 2, json!({"subscribe": {"channel": "chat:tags"}})).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let tagged = json!({"channel": "chat:tags", "data": {"t": 1}, "tags": {"kind": "alert", "region": "eu"}});
    result(&server, "publish", tagged).await;
    let push = next_json(&mut ann).await;
    assert_eq!(
        push["push"]["pub"]["tags"],
        json!({"kind": "alert", "region": "eu"}),
        "{push}"
    );
    result(
        &server,
        "broadcast",
        json!({"channels": ["chat:tags"], "data": 2, "tags": {"via": "broadcast"}}),
    )
    .await;
    let push = next_json(&mut ann).await;
    assert_eq!(
        push["push"]["pub"]["tags"],
        json!({"via": "broadcast"}),
        "{push}"
    );
    result(
        &server,
        "publish",
        json!({"channel": "chat:tags", "data": 3, "tags": null}),
    )
    .await;
    let push = next_json(&mut ann).await;
    assert!(push["push"]["pub"].get("tags").is_none(), "no tags: {push}");
    let history = result(
        &server,
        "history",
        json!({"channel": "chat:tags", "limit": -1}),
    )
    .await;
    let tags: Vec<&Value> = history["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|publication| &publication["tags"])
        .collect();
    assert_eq!(
        tags,
        [
            &json!({"kind": "alert", "region": "eu"}),
            &json!({"via": "broadcast"}),
            &Value::Null
        ]
    );
    let (status, reply) = request(
        &server,
        "/api/publish",
        &format!("X-API-Key: {KEY}\r\n"),
        r#"{"channel":"chat:tags","data":1,"tags":{"n":1}}"#,
    )
    .await;
    assert_eq!(status, 400, "{reply}");
}

/// With the durable engine a retry sent after a restart (the publish may have been made just
/// before the crash that lost its answer) is still recognised: the outcome is in the log.
#[tokio::test]
async fn idempotency_keys_outlive_a_restart_of_the_durable_engine() {
    let dir = tempfile::tempdir().unwrap();
    let config = || plexus_server::Config {
        engine: plexus_server::config::EngineKind::Embedded,
        data_dir: dir.path().to_path_buf(),
        ..plexus_server::Config::for_tests()
    };
    let publish = |channel: &str, key: &str| json!({"channel": channel, "data": {"order": 7}, "idempotency_key": key});
    let server = start(config()).await;
    let first = result(&server, "publish", publish("chat:orders", "order-7")).await;
    assert_eq!(first["offset"], 1, "{first}");
    server.shutdown().await;

    let server = start(config()).await;
    let retry = result(&server, "publish", publish("chat:orders", "order-7")).await;
    assert_eq!(
        retry, first,
        "the first publish's result, after the restart"
    );
    let history = result(
        &server,
        "history",
        json!({"channel": "chat:orders", "limit": -1}),
    )
    .await;
    assert_eq!(
        history["publications"].as_array().map(Vec::len),
        Some(1),
        "published once: {history}"
    );
    // Another key publishes.
    let next = result(&server, "publish", publish("chat:orders", "order-8")).await;
    assert_eq!(next["offset"], 2, "{next}");
    let metrics = server.metrics_text();
    assert_eq!(
        crate::operations::metric(&metrics, "plexus_history_streams"),
        Some(1.0),
        "the records' own stream is not a channel's: {metrics}"
    );
    server.shutdown().await;
}

/// `idempotency_key`: a retry with the same key answers the first publish's position and
/// publishes nothing, concurrent ones included; other keys and channels are independent; a
/// broadcast uses the key per channel.
#[tokio::test]
async fn idempotency_keys_publish_once() {
    let server = start_default().await;
    let mut room = raw_subscriber(&server, "idem").await; // "ready" is offset 1
    let mut other = raw_subscriber(&server, "idem2").await;
    let publish = |data: &str, key: &str| json!({"channel": "chat:idem", "data": data, "idempotency_key": key});
    let first = result(&server, "publish", publish("one", "k1")).await;
    assert_eq!(first["offset"], 2, "{first}");
    let retry = result(&server, "publish", publish("one again", "k1")).await;
    assert_eq!(retry, first, "the first publish's result");
    // Eight at once with a new key: one publication, every answer its position.
    let racing: Vec<_> = (0..8)
        .map(|n| {
            let body = publish(&format!("race {n}"), "k2");
            let server = &server;
            async move { result(server, "publish", body).await }
        })
        .collect();
    let answers = futures_util::future::join_all(racing).await;
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "{answers:?}"
    );
    assert_eq!(answers[0]["offset"], 3, "{answers:?}");
    // Without a key (or with a null one) every publish publishes.
    let plain = json!({"channel": "chat:idem", "data": "plain", "idempotency_key": null});
    assert_eq!(result(&server, "publish", plain.clone()).await["offset"], 4);
    assert_eq!(result(&server, "publish", plain).await["offset"], 5);
    // A broadcast with a key: once per channel; its retry answers the same.
    let broadcast =
        json!({"channels": ["chat:idem", "chat:idem2"], "data": "both", "idempotency_key": "b1"});
    let sent = result(&server, "broadcast", broadcast.clone()).await;
    assert_eq!(sent["responses"][0]["result"]["offset"], 6, "{sent}");
    assert_eq!(sent["responses"][1]["result"]["offset"], 2, "{sent}");
    assert_eq!(result(&server, "broadcast", broadcast).await, sent);

    let delivered = [
        next_text(&mut room).await,
        next_text(&mut room).await,
        next_text(&mut room).await,
        next_text(&mut room).await,
        next_text(&mut room).await,
    ];
    assert_eq!(delivered[0], r#""one""#);
    assert!(delivered[1].starts_with(r#""race "#), "{delivered:?}");
    assert_eq!(delivered[2..], [r#""plain""#, r#""plain""#, r#""both""#]);
    assert_eq!(next_text(&mut other).await, r#""both""#);
    let history = result(
        &server,
        "history",
        json!({"channel": "chat:idem", "limit": -1}),
    )
    .await;
    assert_eq!(history["offset"], 6, "{history}");
    assert_eq!(history["publications"].as_array().unwrap().len(), 6);
    // Without history the retry's answer is the same empty result; a key longer than 256
    // bytes is refused.
    let unkept = json!({"channel": "chat:idem", "data": "live", "skip_history": true, "idempotency_key": "s1"});
    assert_eq!(result(&server, "publish", unkept.clone()).await, json!({}));
    assert_eq!(result(&server, "publish", unkept).await, json!({}));
    assert_eq!(next_text(&mut room).await, r#""live""#);
    let long = json!({"channel": "chat:idem", "data": 1, "idempotency_key": "k".repeat(257)});
    let headers = format!("X-API-Key: {KEY}\r\n");
    let (status, refused) = request(&server, "/api/publish", &headers, &long.to_string()).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (400, &json!(107)),
        "{refused}"
    );
    // Nothing more was delivered: the next message is the next publish.
    result(&server, "publish", publish("last", "k3")).await;
    assert_eq!(next_text(&mut room).await, r#""last""#);
    let last = json!({"channel": "chat:idem2", "data": "last"});
    result(&server, "publish", last).await;
    assert_eq!(next_text(&mut other).await, r#""last""#);
}

#[tokio::test]
async fn presence_and_stats_of_a_room() {
    let server = start_default().await;
    let _one = raw_subscriber(&server, "api-presence").await;
    let _two = raw_subscriber(&server, "api-presence").await;
    let (mut native_client, client_id) = native(&server, "u1").await;
    let subscribe = json!({"id": 2, "subscribe": {"channel": "chat:api-presence"}});
    send_text(&mut native_client, &subscribe.to_string()).await;
    assert_eq!(next_json(&mut native_client).await["id"], 2);

    let presence = result(&server, "presence", json!({"channel": "chat:api-presence"})).await;
    let clients = presence["presence"].as_object().unwrap();
    assert_eq!(clients.len(), 3, "{presence}");
    assert_eq!(
        clients[&client_id],
        json!({"user": "u1", "client": client_id})
    );
    let stats = result(
        &server,
        "presence_stats",
        json!({"channel": "chat:api-presence"}),
    )
    .await;
    // Two anonymous raw clients (user "") and u1.
    assert_eq!(stats, json!({"num_clients": 3, "num_users": 2}));
    assert_eq!(
        call(&server, "presence", json!({"channel": "plain"})).await["error"]["code"],
        108
    );
    assert_eq!(
        result(&server, "presence_stats", json!({"channel": "chat:empty"})).await,
        json!({"num_clients": 0, "num_users": 0})
    );
}

#[tokio::test]
async fn disconnect_closes_the_users_connections() {
    let server = start_default().await;
    let (mut u1, _) = native(&server, "u1").await;
    let (mut u2, _) = native(&server, "u2").await;
    assert_eq!(
        result(&server, "disconnect", json!({"user": "u1"})).await,
        json!({})
    );
    assert_eq!(
        expect_close(&mut u1).await,
        (3503, "force disconnect".into())
    );
    // A custom code and reason, and one client only.
    let (mut again, client) = native(&server, "u2").await;
    let custom =
        json!({"user": "u2", "client": client, "disconnect": {"code": 4001, "reason": "bye"}});
    result(&server, "disconnect", custom).await;
    assert_eq!(expect_close(&mut again).await, (4001, "bye".into()));
    // u2's first connection is still there.
    send_text(&mut u2, r#"{"id":5,"ping":{}}"#).await;
    assert_eq!(next_json(&mut u2).await["id"], 5);
    let (status, reply) = request(
        &server,
        "/api/disconnect",
        &format!("X-API-Key: {KEY}\r\n"),
        r#"{"user":"u2","disconnect":{"code":1000}}"#,
    )
    .await;
    assert_eq!((status, &reply["error"]["code"]), (400, &json!(107)));
    // refresh with expired: 3005.
    result(&server, "refresh", json!({"user": "u2", "expired": true})).await;
    assert_eq!(
        expect_close(&mut u2).await,
        (3005, "connection expired".into())
    );
    assert_eq!(
        result(&server, "refresh", json!({"user": "u3"})).await,
        json!({})
    );
}

/// `refresh` with `expire_at` sets when a user's connections (or one client's) expire: one
/// given an expiry a second away is closed with 3005 then, another of the same user is not,
/// and one whose token expires in 2 s lives on past it once given a later expiry.
#[tokio::test]
async fn refresh_sets_when_connections_expire() {
    // No grace after a token's expiry: the 2-second token below must end at 2 s unless the
    // API extended it.
    let server = start(plexus_server::Config {
        expired_close_delay: Duration::ZERO,
        ..plexus_server::Config::for_tests()
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (mut soon, soon_client) = native(&server, "r1").await;
    let (mut other, _) = native(&server, "r1").await;
    let refresh = json!({"user": "r1", "client": soon_client, "expire_at": now + 1});
    assert_eq!(result(&server, "refresh", refresh).await, json!({}));
    let started = std::time::Instant::now();
    assert_eq!(
        expect_close(&mut soon).await,
        (3005, "connection expired".into())
    );
    assert!(started.elapsed() <= Duration::from_secs(3));
    send_text(&mut other, r#"{"id":2,"ping":{}}"#).await;
    assert_eq!(
        next_json(&mut other).await["id"],
        2,
        "the user's other client stays"
    );

    // A token that expires in 2 s, extended by the backend to 10 min: still there at 3 s.
    let mut extended = ws(&server, "/connection/websocket").await;
    let token = token_expiring("r2", None, Some(Duration::from_secs(2)));
    send_text(
        &mut extended,
        &json!({"id": 1, "connect": {"token": token}}).to_string(),
    )
    .await;
    assert_eq!(next_json(&mut extended).await["connect"]["expires"], true);
    let refresh = json!({"user": "r2", "expire_at": now + 600});
    assert_eq!(result(&server, "refresh", refresh).await, json!({}));
    tokio::time::sleep(Duration::from_secs(3)).await;
    send_text(&mut extended, r#"{"id":2,"ping":{}}"#).await;
    assert_eq!(
        next_json(&mut extended).await["id"],
        2,
        "extended past its token"
    );
    // An expiry already past closes at once; `expired` as before.
    let refresh = json!({"user": "r2", "expire_at": now - 10});
    result(&server, "refresh", refresh).await;
    assert_eq!(
        expect_close(&mut extended).await,
        (3005, "connection expired".into())
    );
}

/// `refresh` with `info` changes what others see of the connections: in presence at once, and
/// in the publications, joins and leaves that follow; other connections keep theirs.
#[tokio::test]
async fn refresh_with_info_changes_the_connection_info() {
    let server = start_default().await;
    let channel = "chat:info";
    let (mut ann, ann_client) = native(&server, "ann").await;
    let (mut bob, bob_client) = native(&server, "bob").await;
    // Ann subscribes with a token that gives her channel info: it stays.
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let host = plexus_auth::mint_hs256(
        "test-token-secret",
        &plexus_auth::MintRequest {
            sub: "ann".into(),
            channel: Some(channel.into()),
            info: Some(json!({"role": "host"})),
            now_unix,
            ..Default::default()
        },
    );
    let subscribes = [
        (
            &mut ann,
            json!({"channel": channel, "join_leave": true, "token": host}),
        ),
        (&mut bob, json!({"channel": channel, "join_leave": true})),
    ];
    for (socket, subscribe) in subscribes {
        let reply = command(socket, 2, json!({ "subscribe": subscribe })).await;
        assert!(reply.get("error").is_none(), "{reply}");
    }
    let refresh = json!({"user": "ann", "client": ann_client, "info": {"name": "Ann B."}});
    assert_eq!(result(&server, "refresh", refresh).await, json!({}));

    // Presence has it (the refresh is applied by the connection's task: wait for it).
    let mut presence = Value::Null;
    for _ in 0..100 {
        presence = result(&server, "presence", json!({"channel": channel})).await;
        if presence["presence"][&ann_client]["conn_info"] == json!({"name": "Ann B."}) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        presence["presence"][&ann_client]["conn_info"],
        json!({"name": "Ann B."}),
        "{presence}"
    );
    assert!(
        presence["presence"][&bob_client].get("conn_info").is_none(),
        "bob's own is unchanged: {presence}"
    );
    assert_eq!(
        presence["presence"][&ann_client]["chan_info"],
        json!({"role": "host"}),
        "the channel info stays: {presence}"
    );
    // Ann's publications carry it.
    let reply = command(
        &mut ann,
        3,
        json!({"publish": {"channel": channel, "data": {"text": "renamed"}}}),
    )
    .await;
    assert!(reply.get("error").is_none(), "{reply}");
    loop {
        let push = next_json(&mut bob).await;
        if let Some(publication) = push["push"].get("pub") {
            assert_eq!(publication["info"]["user"], "ann", "{push}");
            assert_eq!(
                publication["info"]["conn_info"],
                json!({"name": "Ann B."}),
                "{push}"
            );
            break;
        }
    }
    // Her leave too.
    command(&mut ann, 4, json!({"unsubscribe": {"channel": channel}})).await;
    loop {
        let push = next_json(&mut bob).await;
        if let Some(leave) = push["push"].get("leave") {
            assert_eq!(
                leave["info"]["conn_info"],
                json!({"name": "Ann B."}),
                "{push}"
            );
            break;
        }
    }
}

#[tokio::test]
async fn server_side_subscribe_and_unsubscribe_push_to_the_user() {
    let server = start_default().await;
    let (mut u1, client) = native(&server, "u1").await;
    let subscribe = json!({"user": "u1", "channel": "chat:api-srv"});
    assert_eq!(result(&server, "subscribe", subscribe).await, json!({}));
    let push = next_json(&mut u1).await;
    assert_eq!(push["push"]["channel"], "chat:api-srv", "{push}");
    assert!(push["push"]["subscribe"].is_object(), "{push}");

    // Subscribed for real: a publication arrives as a `pub` push.
    let published = json!({"channel": "chat:api-srv", "data": {"n": 1}});
    result(&server, "publish", published).await;
    let push = loop {
        let push = next_json(&mut u1).await;
        if push["push"].get("pub").is_some() {
            break push;
        }
    };
    assert_eq!(push["push"]["pub"]["data"], json!({"n": 1}), "{push}");

    // Unsubscribe naming the client.
    let unsubscribe = json!({"user": "u1", "channel": "chat:api-srv", "client": client});
    assert_eq!(result(&server, "unsubscribe", unsubscribe).await, json!({}));
    let push = loop {
        let push = next_json(&mut u1).await;
        if push["push"].get("unsubscribe").is_some() {
            break push;
        }
    };
    assert_eq!(
        push,
        json!({"push": {"channel": "chat:api-srv", "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}})
    );
    assert_eq!(
        call(
            &server,
            "subscribe",
            json!({"user": "u1", "channel": "nope:x"})
        )
        .await["error"]["code"],
        102
    );
}

#[tokio::test]
async fn batch_runs_commands_in_order() {
    let server = start_default().await;
    let mut subscriber = raw_subscriber(&server, "api-batch").await;
    for parallel in [false, true] {
        let reply = result(
            &server,
            "batch",
            json!({
                "parallel": parallel,
                "commands": [
                    {"publish": {"channel": "chat:api-batch", "data": "one"}},
                    {"frobnicate": {}},
                    {"publish": {"channel": "chat:api-batch"}},
                    {"presence_stats": {"channel": "chat:api-batch"}},
                    {"batch": {"commands": []}},
                ],
            }),
        )
        .await;
        let replies = reply["replies"].as_array().unwrap();
        assert_eq!(replies.len(), 5, "{reply}");
        assert!(replies[0]["publish"]["offset"].is_u64(), "{reply}");
        assert_eq!(replies[1]["error"]["code"], 104);
        assert_eq!(replies[2]["error"]["code"], 107);
        assert!(
            replies[2]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("data or b64data required"),
            "{reply}"
        );
        assert_eq!(
            replies[3],
            json!({"presence_stats": {"num_clients": 1, "num_users": 1}})
        );
        assert_eq!(replies[4]["error"]["code"], 107);
        assert_eq!(next_text(&mut subscriber).await, r#""one""#);
    }
    let two = json!({"commands": [
        {"publish": {"channel": "chat:api-batch", "data": "a"}},
        {"publish": {"channel": "chat:api-batch", "data": "b"}},
    ]});
    let reply = result(&server, "batch", two).await;
    assert_eq!(reply["replies"][0]["publish"]["offset"], 4);
    assert_eq!(reply["replies"][1]["publish"]["offset"], 5);
    assert_eq!(next_text(&mut subscriber).await, r#""a""#);
    assert_eq!(next_text(&mut subscriber).await, r#""b""#);
}

#[tokio::test]
async fn channels_and_info_describe_this_node() {
    let server = start_default().await;
    let _lobby = raw_subscriber(&server, "api-lobby").await;
    let _lobby_too = raw_subscriber(&server, "api-lobby").await;
    let _other = raw_subscriber(&server, "elsewhere").await;
    let all = result(&server, "channels", json!({})).await;
    assert_eq!(all["channels"]["chat:api-lobby"], json!({"num_clients": 2}));
    assert_eq!(all["channels"]["chat:elsewhere"], json!({"num_clients": 1}));
    let some = result(&server, "channels", json!({"pattern": "chat:api-*"})).await;
    assert_eq!(
        some,
        json!({"channels": {"chat:api-lobby": {"num_clients": 2}}})
    );
    // An empty body reads as `{}`.
    let (status, reply) = request(&server, "/api/info", &format!("X-API-Key: {KEY}\r\n"), "").await;
    assert_eq!(status, 200, "{reply}");
    let nodes = reply["result"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{reply}");
    let node = &nodes[0];
    assert!(!node["uid"].as_str().unwrap().is_empty());
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["num_clients"], 3);
    assert_eq!(node["num_channels"], 2);
    assert_eq!(node["num_subs"], 3);
    assert_eq!(node["num_users"], 1); // all anonymous
    assert!(node["uptime"].is_u64() && node["name"].is_string());
}
