//! The client against the real server on a real port: calls, pushes, pings, reconnecting with
//! recovery after a server-side disconnect and after a server restart, and the closes that
//! must not be retried.

use std::time::Duration;

use plexus_client::{
    Client, Error, FilterNode, Format, Options, Payload, State, SubscribeOptions, Subscription,
    SubscriptionEvent,
};
use plexus_server::config::EngineKind;
use plexus_server::{Config, Server, ServerHandle};
use serde_json::{json, Value};

const SECRET: &str = "test-token-secret";
const WAIT: Duration = Duration::from_secs(10);

fn token(user: &str) -> String {
    mint(user, None)
}

fn token_for(user: &str, ttl: Duration) -> String {
    mint(user, Some(ttl))
}

fn mint(user: &str, ttl: Option<Duration>) -> String {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    plexus_auth::mint_hs256(
        SECRET,
        &plexus_auth::MintRequest {
            sub: user.into(),
            ttl,
            now_unix,
            ..Default::default()
        },
    )
}

fn url(server: &ServerHandle) -> String {
    format!("ws://{}/connection/websocket", server.http_addr())
}

fn client(server: &ServerHandle, user: &str) -> Client {
    client_in(server, user, Format::Json)
}

fn client_in(server: &ServerHandle, user: &str, format: Format) -> Client {
    let options = Options {
        min_reconnect_delay: Duration::from_millis(300),
        max_reconnect_delay: Duration::from_secs(1),
        format,
        ..Options::token(token(user))
    };
    Client::connect(url(server), options)
}

/// A server that pings every second and cuts a client silent for a second after a ping.
async fn fast_pinging_server() -> ServerHandle {
    Server::bind(Config {
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(1),
        ..Config::for_tests()
    })
    .await
    .unwrap()
}

/// A server with one more namespace.
async fn server_with(namespace: &str, options: plexus_core::ChannelOptions) -> ServerHandle {
    let mut namespaces = plexus_core::Namespaces::default();
    namespaces.insert(namespace, options);
    Server::bind(Config {
        namespaces,
        ..Config::for_tests()
    })
    .await
    .unwrap()
}

/// A server API call; its `result`.
async fn api(server: &ServerHandle, method: &str, body: Value) -> Value {
    let body = body.to_string();
    let request = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: test-api-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.http_addr())
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    let reply: Value = serde_json::from_str(body).unwrap();
    assert!(reply.get("error").is_none(), "{method}: {reply}");
    reply["result"].clone()
}

/// Publishes `data` into `channel` through the server API.
async fn publish(server: &ServerHandle, channel: &str, data: Value) {
    api(server, "publish", json!({"channel": channel, "data": data})).await;
}

async fn next(subscription: &mut Subscription) -> SubscriptionEvent {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
}

/// The data of the next event, which must be a publication.
async fn next_data(subscription: &mut Subscription) -> Value {
    match next(subscription).await {
        SubscriptionEvent::Publication(publication) => {
            publication.data.expect("data").parse().unwrap()
        }
        other => panic!("expected a publication, got {other:?}"),
    }
}

async fn wait_for_state(client: &Client, wanted: impl Fn(&State) -> bool) -> State {
    let started = std::time::Instant::now();
    loop {
        let state = client.state();
        if wanted(&state) {
            return state;
        }
        assert!(started.elapsed() < WAIT, "state {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const FIRST: SubscriptionEvent = SubscriptionEvent::Subscribed {
    recovered: false,
    was_recovering: false,
    delta: false,
};
const RECOVERED: SubscriptionEvent = SubscriptionEvent::Subscribed {
    recovered: true,
    was_recovering: true,
    delta: false,
};

/// A document much like the one before at every update.
fn quote(price: u64) -> Value {
    json!({"symbol": "BTC-USD", "name": "Биткоин", "price": price, "bid": price - 3, "ask": price + 3, "volume": 1_234_567})
}

/// With `delta` in a namespace that allows deltas, publications travel as
/// Fossil deltas and come out whole, live and after a reconnect that recovers, in JSON and in
/// Protobuf; a plain subscriber beside it gets the same.
#[tokio::test]
async fn delta_subscriptions_hand_over_whole_publications() {
    let server = server_with(
        "prices",
        plexus_core::ChannelOptions {
            fossil_delta: true,
            ..plexus_core::ChannelOptions::quotes()
        },
    )
    .await;
    for format in [Format::Json, Format::Protobuf] {
        let channel = format!("prices:{format:?}");
        let ann = client_in(&server, "ann", format);
        let bob = client_in(&server, "bob", format);
        let options = SubscribeOptions {
            delta: true,
            ..SubscribeOptions::default()
        };
        let mut deltas = ann.subscribe_with(&channel, options).await.unwrap();
        let mut plain = bob.subscribe(&channel).await.unwrap();
        let subscribed = |delta| SubscriptionEvent::Subscribed {
            recovered: false,
            was_recovering: false,
            delta,
        };
        assert_eq!(next(&mut deltas).await, subscribed(true));
        assert_eq!(next(&mut plain).await, subscribed(false));
        for price in 100..105 {
            publish(&server, &channel, quote(price)).await;
            assert_eq!(next_data(&mut deltas).await, quote(price), "{format:?}");
            assert_eq!(next_data(&mut plain).await, quote(price), "{format:?}");
        }
        // Away while three are published: recovered, the first whole and deltas after it.
        let cut = json!({"user": "ann", "disconnect": {"code": 3001, "reason": "test"}});
        api(&server, "disconnect", cut).await;
        for price in 200..203 {
            publish(&server, &channel, quote(price)).await;
        }
        assert_eq!(
            next(&mut deltas).await,
            SubscriptionEvent::Subscribed {
                recovered: true,
                was_recovering: true,
                delta: true
            }
        );
        for price in 200..203 {
            assert_eq!(next_data(&mut deltas).await, quote(price), "{format:?}");
        }
        publish(&server, &channel, quote(300)).await;
        assert_eq!(next_data(&mut deltas).await, quote(300), "{format:?}");
        ann.close().await;
        bob.close().await;
    }
}

#[tokio::test]
async fn subscribe_publish_history_and_presence() {
    let server = Server::bind(Config::for_tests()).await.unwrap();
    let ann = client(&server, "ann");
    let bob = client(&server, "bob");
    let ann_id = ann.connected().await.unwrap();
    let mut room = ann.subscribe("chat:room").await.unwrap();
    assert_eq!(next(&mut room).await, FIRST);
    bob.publish("chat:room", &json!({"text": "hi ann"}))
        .await
        .unwrap();
    assert_eq!(next_data(&mut room).await, json!({"text": "hi ann"}));

    let history = bob.history("chat:room", -1).await.unwrap();
    assert_eq!(history.publications.len(), 1);
    assert_eq!(history.offset, 1);
    let presence = ann.presence("chat:room").await.unwrap();
    assert_eq!(presence.presence.len(), 1);
    assert_eq!(presence.presence[&ann_id].user, "ann");
    let stats = ann.presence_stats("chat:room").await.unwrap();
    assert_eq!((stats.num_clients, stats.num_users), (1, 1));

    // The server's own refusals come back as errors, and the connection goes on.
    let refused = bob.publish("nowhere:x", &json!(1)).await.unwrap_err();
    assert!(
        matches!(refused, Error::Server { code: 102, .. }),
        "{refused:?}"
    );
    assert!(matches!(
        ann.subscribe("chat:room").await.unwrap_err(),
        Error::Server { code: 105, .. }
    ));
    // Dropping the subscription unsubscribes.
    drop(room);
    let started = std::time::Instant::now();
    loop {
        let channels = api(&server, "channels", json!({})).await;
        if channels["channels"].get("chat:room").is_none() {
            break;
        }
        assert!(started.elapsed() < WAIT, "ann left: {channels}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ann.close().await;
    assert!(matches!(ann.state(), State::Closed { code: 1000, .. }));
    assert!(matches!(
        ann.publish("chat:room", &json!(1)).await.unwrap_err(),
        Error::Closed { .. }
    ));
}

/// Cut by the server with a code that says "reconnect": the client comes back by itself with
/// a new client id and recovers what was published meanwhile, each publication once, in order.
#[tokio::test]
async fn reconnects_and_recovers_what_it_missed() {
    let server = Server::bind(Config::for_tests()).await.unwrap();
    let ann = client(&server, "ann");
    let first_id = ann.connected().await.unwrap();
    let mut room = ann.subscribe("chat:gap").await.unwrap();
    assert_eq!(next(&mut room).await, FIRST);
    publish(&server, "chat:gap", json!(1)).await;
    assert_eq!(next_data(&mut room).await, json!(1));

    let cut = json!({"user": "ann", "disconnect": {"code": 3001, "reason": "test"}});
    api(&server, "disconnect", cut).await;
    for n in 2..=4 {
        publish(&server, "chat:gap", json!(n)).await;
    }
    assert_eq!(next(&mut room).await, RECOVERED);
    for n in 2..=4 {
        assert_eq!(next_data(&mut room).await, json!(n));
    }
    let state = wait_for_state(&ann, |state| matches!(state, State::Connected { .. })).await;
    assert_ne!(state, State::Connected { client: first_id });
    publish(&server, "chat:gap", json!(5)).await;
    assert_eq!(next_data(&mut room).await, json!(5));
}

/// The durable engine keeps history across a restart: a client that was connected before
/// gets, after reconnecting to the restarted server, what was published while it was down.
#[tokio::test]
async fn recovers_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        engine: EngineKind::Embedded,
        data_dir: dir.path().to_path_buf(),
        ..Config::for_tests()
    };
    let server = Server::bind(config.clone()).await.unwrap();
    let addr = server.http_addr();
    let ann = client(&server, "ann");
    let mut room = ann.subscribe("chat:restart").await.unwrap();
    assert_eq!(next(&mut room).await, FIRST);
    publish(&server, "chat:restart", json!("before")).await;
    assert_eq!(next_data(&mut room).await, json!("before"));

    server.shutdown().await;
    wait_for_state(&ann, |state| *state == State::Connecting).await;
    let server = Server::bind(Config {
        listen: addr,
        ..config
    })
    .await
    .unwrap();
    publish(&server, "chat:restart", json!("while down")).await;
    assert_eq!(next(&mut room).await, RECOVERED);
    assert_eq!(next_data(&mut room).await, json!("while down"));
    server.shutdown().await;
}

/// 3503 (force disconnect) and a refused token end the client for good: no reconnecting,
/// subscriptions end, calls fail at once.
#[tokio::test]
async fn closes_that_must_not_be_retried() {
    let server = Server::bind(Config::for_tests()).await.unwrap();
    let ann = client(&server, "ann");
    let mut room = ann.subscribe("chat:end").await.unwrap();
    assert_eq!(next(&mut room).await, FIRST);
    api(&server, "disconnect", json!({"user": "ann"})).await;
    let state = wait_for_state(&ann, |state| matches!(state, State::Closed { .. })).await;
    assert_eq!(
        state,
        State::Closed {
            code: 3503,
            reason: "force disconnect".into()
        }
    );
    assert_eq!(tokio::time::timeout(WAIT, room.next()).await.unwrap(), None);
    assert!(matches!(
        ann.history("chat:end", 1).await.unwrap_err(),
        Error::Closed { code: 3503, .. }
    ));

    let forged = Client::connect(url(&server), Options::token("not.a.token"));
    let refused = forged.connected().await.unwrap_err();
    assert!(
        matches!(refused, Error::Closed { code: 3500, .. }),
        "{refused:?}"
    );
}

/// The server pings every second and cuts a client that does not answer within a second;
/// this one answers, so it keeps its connection (same client id) well past that.
#[tokio::test]
async fn answers_the_servers_pings() {
    let server = fast_pinging_server().await;
    let ann = client(&server, "ann");
    let id = ann.connected().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(ann.state(), State::Connected { client: id });
    ann.publish("chat:ping", &json!("still here"))
        .await
        .unwrap();
}

/// A path to the server that goes silent without closing (a dead NAT entry, a cable pulled
/// somewhere): the client notices that the server's pings stopped and reconnects.
#[tokio::test]
async fn reconnects_when_the_servers_pings_stop() {
    let server = Server::bind(Config {
        ping_interval: Duration::from_secs(1),
        ..Config::for_tests()
    })
    .await
    .unwrap();
    let proxy = FreezingProxy::start(server.http_addr()).await;
    let options = Options {
        max_ping_delay: Duration::from_millis(500),
        min_reconnect_delay: Duration::from_millis(100),
        ..Options::token(token("ann"))
    };
    let ann = Client::connect(format!("ws://{}/connection/websocket", proxy.addr), options);
    let first = ann.connected().await.unwrap();
    let mut room = ann.subscribe("chat:silent").await.unwrap();
    assert_eq!(next(&mut room).await, FIRST);
    // Connections open now stop carrying anything, both ways, and stay open.
    proxy.freeze.notify_waiters();
    publish(&server, "chat:silent", json!("unheard")).await;
    // The client gives up on the silent connection and comes back through a new one.
    assert_eq!(next(&mut room).await, RECOVERED);
    assert_eq!(next_data(&mut room).await, json!("unheard"));
    let state = ann.state();
    assert!(
        matches!(&state, State::Connected { client } if *client != first),
        "{state:?}"
    );
}

/// Forwards TCP connections to `upstream` until told to freeze the ones open at that moment.
struct FreezingProxy {
    addr: std::net::SocketAddr,
    freeze: std::sync::Arc<tokio::sync::Notify>,
}

impl FreezingProxy {
    async fn start(upstream: std::net::SocketAddr) -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let freeze = std::sync::Arc::new(tokio::sync::Notify::new());
        let freezes = freeze.clone();
        tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let mut upstream = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let freeze = freezes.clone();
                tokio::spawn(async move {
                    let frozen = freeze.notified();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {}
                        () = frozen => {
                            // Silent, not closed.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        FreezingProxy { addr, freeze }
    }
}

/// Unsubscribed by the server (API `unsubscribe`): the subscription ends with the code; a new
/// subscription to the same channel is not undone when the old one is dropped later.
#[tokio::test]
async fn server_unsubscribe_ends_a_subscription() {
    let server = Server::bind(Config::for_tests()).await.unwrap();
    let ann = client(&server, "ann");
    let mut old = ann.subscribe("chat:again").await.unwrap();
    assert_eq!(next(&mut old).await, FIRST);
    api(
        &server,
        "unsubscribe",
        json!({"user": "ann", "channel": "chat:again"}),
    )
    .await;
    assert!(
        matches!(
            next(&mut old).await,
            SubscriptionEvent::Unsubscribed { code: 2000, .. }
        ),
        "server unsubscribe"
    );
    assert_eq!(tokio::time::timeout(WAIT, old.next()).await.unwrap(), None);
    let mut new = ann.subscribe("chat:again").await.unwrap();
    assert_eq!(next(&mut new).await, FIRST);
    drop(old);
    publish(&server, "chat:again", json!("kept")).await;
    assert_eq!(next_data(&mut new).await, json!("kept"));
}

/// A subscribe that timed out (its connection went silent) is forgotten: after the client
/// reconnects, subscribing again works and the server holds one subscription, not two.
#[tokio::test]
async fn a_timed_out_subscribe_leaves_nothing_behind() {
    let server = Server::bind(Config {
        ping_interval: Duration::from_secs(1),
        ..Config::for_tests()
    })
    .await
    .unwrap();
    let proxy = FreezingProxy::start(server.http_addr()).await;
    let options = Options {
        timeout: Duration::from_millis(700),
        max_ping_delay: Duration::from_millis(500),
        min_reconnect_delay: Duration::from_millis(100),
        ..Options::token(token("ann"))
    };
    let ann = Client::connect(format!("ws://{}/connection/websocket", proxy.addr), options);
    let first = ann.connected().await.unwrap();
    proxy.freeze.notify_waiters();
    assert_eq!(
        ann.subscribe("chat:once").await.unwrap_err(),
        Error::Timeout
    );
    wait_for_state(
        &ann,
        |state| matches!(state, State::Connected { client } if *client != first),
    )
    .await;
    let mut once = ann.subscribe("chat:once").await.unwrap();
    assert_eq!(next(&mut once).await, FIRST);
    let presence = ann.presence("chat:once").await.unwrap();
    assert_eq!(presence.presence.len(), 1, "{presence:?}");
}

/// Tokens that expire every 2 s, from a token source: the connection is refreshed in place
/// before each expiry (the same client id throughout) and goes on delivering.
#[tokio::test]
async fn refreshes_expiring_tokens_from_a_source() {
    let server = Server::bind(Config::for_tests()).await.unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = asked.clone();
    let options = Options::token_source(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok(token_for("ann", Duration::from_secs(2))) }
    });
    let ann = Client::connect(url(&server), options);
    let id = ann.connected().await.unwrap();
    let mut room = ann.subscribe("chat:fresh").await.unwrap();
    assert_eq!(next(&mut room).await, FIRST);
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(ann.state(), State::Connected { client: id });
    assert!(
        asked.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the first token and at least two refreshes"
    );
    publish(&server, "chat:fresh", json!("still")).await;
    assert_eq!(next_data(&mut room).await, json!("still"));
}

/// Without a source, a connection ends with its token: the server closes it (3005) and the
/// same token is refused on reconnecting (109), which ends the client.
#[tokio::test]
async fn an_expired_token_without_a_source_ends_the_client() {
    let server = Server::bind(Config {
        expired_close_delay: Duration::ZERO,
        ..Config::for_tests()
    })
    .await
    .unwrap();
    let options = Options {
        min_reconnect_delay: Duration::from_millis(100),
        ..Options::token(token_for("ann", Duration::from_secs(1)))
    };
    let ann = Client::connect(url(&server), options);
    ann.connected().await.unwrap();
    let state = wait_for_state(&ann, |state| matches!(state, State::Closed { .. })).await;
    assert!(
        matches!(state, State::Closed { code: 109, .. }),
        "{state:?}"
    );
}

/// With `Format::Protobuf` the client speaks binary frames: any bytes pass unchanged between
/// Protobuf clients, a JSON client in the same channel gets them as base64, pings are answered,
/// and recovery works as in JSON.
#[tokio::test]
async fn speaks_protobuf_beside_json_clients() {
    let server = fast_pinging_server().await;
    let ann = client_in(&server, "ann", Format::Protobuf);
    let bob = client_in(&server, "bob", Format::Protobuf);
    let jay = client(&server, "jay");
    let ann_id = ann.connected().await.unwrap();
    let mut ann_room = ann.subscribe("chat:pb").await.unwrap();
    let mut jay_room = jay.subscribe("chat:pb").await.unwrap();
    assert_eq!(next(&mut ann_room).await, FIRST);
    assert_eq!(next(&mut jay_room).await, FIRST);

    let bytes = Payload::new(vec![0u8, 1, 254, 255]);
    bob.publish_payload("chat:pb", bytes.clone()).await.unwrap();
    match next(&mut ann_room).await {
        SubscriptionEvent::Publication(publication) => {
            assert_eq!(publication.data, Some(bytes.clone()));
            assert_eq!(publication.info.unwrap().user, "bob");
        }
        other => panic!("expected a publication, got {other:?}"),
    }
    assert_eq!(next_data(&mut jay_room).await, json!("AAH+/w=="));
    // A JSON connection refuses bytes that are not JSON before sending them.
    assert!(matches!(
        jay.publish_payload("chat:pb", bytes).await.unwrap_err(),
        Error::Server { code: 107, .. }
    ));
    // JSON through a Protobuf client, and its history.
    bob.publish("chat:pb", &json!({"n": 2})).await.unwrap();
    assert_eq!(next_data(&mut ann_room).await, json!({"n": 2}));
    assert_eq!(next_data(&mut jay_room).await, json!({"n": 2}));
    let history = ann.history("chat:pb", -1).await.unwrap();
    assert_eq!(history.publications.len(), 2);

    // Pings every second, answered: the same connection well past the pong timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(ann.state(), State::Connected { client: ann_id });

    // Cut by the server: back by itself, recovering what it missed.
    let cut = json!({"user": "ann", "disconnect": {"code": 3001, "reason": "test"}});
    api(&server, "disconnect", cut).await;
    publish(&server, "chat:pb", json!(3)).await;
    assert_eq!(next(&mut ann_room).await, RECOVERED);
    assert_eq!(next_data(&mut ann_room).await, json!(3));
}

/// A tags filter: only matching publications come, in JSON and Protobuf; where the namespace
/// allows none, the subscribe is refused with 107.
#[tokio::test]
async fn a_tags_filter_lets_only_matching_publications_through() {
    let server = server_with(
        "ticks",
        plexus_core::ChannelOptions {
            allow_tags_filter: true,
            ..plexus_core::ChannelOptions::quotes()
        },
    )
    .await;
    let btc = || SubscribeOptions {
        tags_filter: Some(FilterNode {
            key: "ticker".into(),
            cmp: "eq".into(),
            val: "BTC".into(),
            ..FilterNode::default()
        }),
        ..SubscribeOptions::default()
    };
    for format in [Format::Json, Format::Protobuf] {
        let channel = format!("ticks:{format:?}");
        let ann = client_in(&server, "ann", format);
        let mut sub = ann.subscribe_with(&channel, btc()).await.unwrap();
        assert_eq!(next(&mut sub).await, FIRST);
        for (n, ticker) in [(1, "ETH"), (2, "BTC"), (3, "SOL"), (4, "BTC")] {
            let body = json!({"channel": channel, "data": {"n": n}, "tags": {"ticker": ticker}});
            api(&server, "publish", body).await;
        }
        assert_eq!(next_data(&mut sub).await, json!({"n": 2}), "{format:?}");
        assert_eq!(next_data(&mut sub).await, json!({"n": 4}), "{format:?}");
        match ann.subscribe_with("chat:nofilter", btc()).await {
            Err(Error::Server { code: 107, .. }) => {}
            other => panic!("expected error 107, got {other:?}"),
        }
        ann.close().await;
    }
}
