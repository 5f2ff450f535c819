//! Delta compression (`delta: "fossil"` in a subscribe request), as Centrifugo's SDKs ask for
//! it: negotiated only where the namespace allows it, whole publications where the client
//! cannot hold the previous one, Fossil deltas from it otherwise, in JSON and in Protobuf.
//! (Not in the built-in `quotes` namespace, which allows deltas too: its demo publisher would
//! add publications of its own.)

use plexus_core::ChannelOptions;
use plexus_protocol::client::{self as proto, ReplyBody, Request};
use plexus_protocol::fossil;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::protobuf::{call, next_publication};
use crate::util::*;

/// A server with the namespace `prices`: history and recovery, deltas allowed.
async fn server() -> plexus_server::ServerHandle {
    let options = ChannelOptions {
        fossil_delta: true,
        allow_subscribe_for_anonymous: true,
        ..ChannelOptions::quotes()
    };
    start_with_namespace("prices", options).await
}

/// A quote as a dashboard would publish it: a document whose every version is much like the
/// one before.
fn quote(price: u32) -> Value {
    json!({
        "symbol": "BTC-USD",
        "name": "Биткоин",
        "price": price,
        "bid": price - 3,
        "ask": price + 3,
        "volume": 1_234_567,
        "exchange": "plexus",
        "updated": "2026-11-22T10:00:00Z",
    })
}

async fn publish(server: &plexus_server::ServerHandle, channel: &str, data: &Value) -> u64 {
    let result = api_result(server, "publish", json!({"channel": channel, "data": data})).await;
    result["offset"].as_u64().expect("an offset")
}

/// The next `pub` push in `channel` (other pushes and pings skipped).
async fn next_pub(socket: &mut Ws, channel: &str) -> Value {
    loop {
        let push = next_json(socket).await;
        if push["push"]["channel"] == channel && push["push"].get("pub").is_some() {
            return push["push"]["pub"].clone();
        }
    }
}

/// What a delta subscriber's client does with a publication: a whole one is a JSON string
/// holding the JSON; a delta applies to the bytes of the previous one. Returns the data and
/// the bytes the next delta applies to.
fn rebuild(publication: &Value, base: &[u8]) -> (Value, Vec<u8>) {
    let text = publication["data"]
        .as_str()
        .unwrap_or_else(|| panic!("delta subscribers get data as a string: {publication}"));
    let bytes = if publication["delta"] == true {
        fossil::apply(base, text.as_bytes()).expect("a delta that applies")
    } else {
        text.as_bytes().to_vec()
    };
    (serde_json::from_slice(&bytes).unwrap(), bytes)
}

#[tokio::test]
async fn json_subscribers_get_deltas_where_they_asked_and_the_namespace_allows() {
    let server = server().await;
    let channel = "prices:btc";
    let (mut delta, _) = native(&server, "ann").await;
    let (mut plain, _) = native(&server, "bob").await;
    let reply = command(
        &mut delta,
        2,
        json!({"subscribe": {"channel": channel, "delta": "fossil"}}),
    )
    .await;
    assert_eq!(reply["subscribe"]["delta"], true, "{reply}");
    let reply = command(&mut plain, 2, json!({"subscribe": {"channel": channel}})).await;
    assert!(reply["subscribe"].get("delta").is_none(), "{reply}");

    // The first publication goes whole: the subscriber holds nothing to apply a delta to.
    publish(&server, channel, &quote(50_000)).await;
    let first = next_pub(&mut delta, channel).await;
    assert!(first.get("delta").is_none(), "{first}");
    let (data, mut base) = rebuild(&first, &[]);
    assert_eq!(data, quote(50_000));
    assert_eq!(next_pub(&mut plain, channel).await["data"], quote(50_000));

    // Then deltas, much smaller than the publication, which rebuild it exactly.
    for price in [50_017, 50_020, 49_990] {
        publish(&server, channel, &quote(price)).await;
        let publication = next_pub(&mut delta, channel).await;
        assert_eq!(publication["delta"], true, "{publication}");
        let delta_len = publication["data"].as_str().unwrap().len();
        let whole_len = quote(price).to_string().len();
        assert!(
            delta_len * 2 < whole_len,
            "a delta of {delta_len} bytes for {whole_len}"
        );
        let (data, bytes) = rebuild(&publication, &base);
        assert_eq!(data, quote(price));
        base = bytes;
        // A subscriber that did not ask gets the publication as ever.
        assert_eq!(next_pub(&mut plain, channel).await["data"], quote(price));
    }

    // Data unlike the last goes whole again, where a delta would not be smaller.
    let other = json!({"note": "halted"});
    publish(&server, channel, &other).await;
    let publication = next_pub(&mut delta, channel).await;
    assert!(publication.get("delta").is_none(), "{publication}");
    let (data, mut base) = rebuild(&publication, &base);
    assert_eq!(data, other);

    // A publication outside history has no offset to chain by: it goes whole, so does the
    // next (the client holds one without an offset), and deltas resume after that.
    let result = api_result(
        &server,
        "publish",
        json!({"channel": channel, "data": quote(1_001), "skip_history": true}),
    )
    .await;
    assert!(result.get("offset").is_none(), "{result}");
    for (price, is_delta) in [(1_001, false), (1_002, false), (1_003, true)] {
        if price > 1_001 {
            publish(&server, channel, &quote(price)).await;
        }
        let publication = next_pub(&mut delta, channel).await;
        assert_eq!(
            publication.get("delta").is_some(),
            is_delta,
            "{publication}"
        );
        let (data, bytes) = rebuild(&publication, &base);
        assert_eq!(data, quote(price));
        base = bytes;
    }
}

#[tokio::test]
async fn a_recovering_delta_subscriber_continues_from_the_last_recovered_publication() {
    let server = server().await;
    let channel = "prices:eth";
    let top = publish(&server, channel, &quote(3_000)).await;
    let epoch = api_result(&server, "history", json!({"channel": channel, "limit": 0})).await
        ["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    publish(&server, channel, &quote(3_001)).await;
    publish(&server, channel, &quote(3_002)).await;

    let (mut socket, _) = native(&server, "ann").await;
    let reply = command(
        &mut socket,
        2,
        json!({"subscribe": {"channel": channel, "delta": "fossil", "recover": true, "epoch": epoch, "offset": top}}),
    )
    .await;
    let result = &reply["subscribe"];
    assert_eq!(result["delta"], true, "{reply}");
    assert_eq!(result["recovered"], true, "{reply}");
    // Recovered publications: the first whole, in the form delta subscribers parse, the next
    // a delta from it.
    let recovered = result["publications"].as_array().expect("publications");
    let mut base = Vec::new();
    for (i, (publication, price)) in recovered.iter().zip([3_001, 3_002]).enumerate() {
        assert_eq!(publication.get("delta").is_some(), i > 0, "{publication}");
        let (data, bytes) = rebuild(publication, &base);
        assert_eq!(data, quote(price));
        base = bytes;
    }
    assert_eq!(recovered.len(), 2, "{reply}");

    // The next publication is a delta from the last recovered one.
    publish(&server, channel, &quote(3_003)).await;
    let publication = next_pub(&mut socket, channel).await;
    assert_eq!(publication["delta"], true, "{publication}");
    assert_eq!(rebuild(&publication, &base).0, quote(3_003));

    // Subscribed again without recovering, the client holds nothing of this subscription:
    // whole first, deltas after.
    command(&mut socket, 3, json!({"unsubscribe": {"channel": channel}})).await;
    let reply = command(
        &mut socket,
        4,
        json!({"subscribe": {"channel": channel, "delta": "fossil"}}),
    )
    .await;
    assert_eq!(reply["subscribe"]["delta"], true, "{reply}");
    publish(&server, channel, &quote(3_004)).await;
    let publication = next_pub(&mut socket, channel).await;
    assert!(publication.get("delta").is_none(), "{publication}");
    let (data, base) = rebuild(&publication, &[]);
    assert_eq!(data, quote(3_004));
    publish(&server, channel, &quote(3_005)).await;
    let publication = next_pub(&mut socket, channel).await;
    assert_eq!(publication["delta"], true, "{publication}");
    assert_eq!(rebuild(&publication, &base).0, quote(3_005));
}

#[tokio::test]
async fn deltas_are_not_negotiated_where_the_namespace_does_not_allow_them() {
    let server = server().await;
    let (mut socket, _) = native(&server, "ann").await;
    // chat keeps history but allows no deltas; "xdelta" is no kind Plexus knows.
    for (id, channel, kind) in [(2, "chat:lobby", "fossil"), (3, "prices:sol", "xdelta")] {
        let reply = command(
            &mut socket,
            id,
            json!({"subscribe": {"channel": channel, "delta": kind}}),
        )
        .await;
        assert!(reply.get("error").is_none(), "{reply}");
        assert!(reply["subscribe"].get("delta").is_none(), "{reply}");
    }
    publish(&server, "chat:lobby", &json!({"text": "hi"})).await;
    let publication = next_pub(&mut socket, "chat:lobby").await;
    assert_eq!(publication["data"], json!({"text": "hi"}), "data as ever");
}

/// A Protobuf client, where data and deltas are bytes.
#[tokio::test]
async fn protobuf_subscribers_get_deltas_as_bytes() {
    let server = server().await;
    let channel = "prices:doge";
    let url = format!("ws://{}/connection/websocket", server.http_addr());
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "centrifuge-protobuf".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let connect = Request::Connect(proto::ConnectRequest {
        token: token("ann"),
        ..Default::default()
    });
    call(&mut socket, 1, connect).await;
    let subscribe = Request::Subscribe(proto::SubscribeRequest {
        channel: channel.into(),
        delta: "fossil".into(),
        ..Default::default()
    });
    let reply = call(&mut socket, 2, subscribe).await;
    let Some(ReplyBody::Subscribe(result)) = reply.body else {
        panic!("not a subscribe result: {reply:?}");
    };
    assert!(result.delta);

    let mut base: Vec<u8> = Vec::new();
    for (i, price) in [10, 11, 12].into_iter().enumerate() {
        let data = quote(price);
        publish(&server, channel, &data).await;
        let publication = next_publication(&mut socket).await;
        let bytes = publication.data.expect("data").as_bytes().to_vec();
        assert_eq!(publication.delta, i > 0, "publication {i}");
        let rebuilt = if publication.delta {
            assert!(bytes.len() * 2 < data.to_string().len());
            fossil::apply(&base, &bytes).unwrap()
        } else {
            bytes
        };
        assert_eq!(serde_json::from_slice::<Value>(&rebuilt).unwrap(), data);
        base = rebuilt;
    }
}

/// A client that unsubscribes and subscribes again while publications of its first
/// subscription are still queued for it gets them as the new subscription's, and each applies
/// to what it holds: the first whole (it starts over at the subscribe reply), then deltas.
/// Here its own publishes, the unsubscribe and the subscribe come in one message, so the
/// publications are queued before the new subscription exists; the namespace does not
/// recover, so they are not dropped as already in the subscribe reply.
#[tokio::test]
async fn publications_queued_before_a_resubscribe_apply_to_what_the_client_holds() {
    let options = ChannelOptions {
        recover: false,
        allow_publish_for_client: true,
        ..ChannelOptions::quotes()
    };
    let server = start_with_namespace("ticker", options).await;
    let channel = "ticker:eth";
    let (mut socket, _) = native(&server, "ann").await;
    let subscribe = json!({"subscribe": {"channel": channel, "delta": "fossil"}});
    let reply = command(&mut socket, 2, subscribe.clone()).await;
    assert_eq!(reply["subscribe"]["delta"], true, "{reply}");
    let mut base = Vec::new();
    for price in [3_000, 3_001] {
        publish(&server, channel, &quote(price)).await;
        let (data, bytes) = rebuild(&next_pub(&mut socket, channel).await, &base);
        assert_eq!(data, quote(price));
        base = bytes;
    }

    let lines = [
        json!({"id": 3, "publish": {"channel": channel, "data": quote(3_002)}}),
        json!({"id": 4, "publish": {"channel": channel, "data": quote(3_003)}}),
        json!({"id": 5, "unsubscribe": {"channel": channel}}),
        json!({"id": 6, "subscribe": {"channel": channel, "delta": "fossil"}}),
    ];
    let batch: Vec<String> = lines.iter().map(Value::to_string).collect();
    send_text(&mut socket, &batch.join("\n")).await;
    // Replies and pushes may come several to a message, one per line.
    let mut pending = std::collections::VecDeque::new();
    let mut next = async |socket: &mut Ws| -> Value {
        while pending.is_empty() {
            let text = next_text(socket).await;
            pending.extend(
                text.lines()
                    .map(|line| serde_json::from_str::<Value>(line).unwrap()),
            );
        }
        pending.pop_front().unwrap()
    };
    // Up to the subscribe reply, publications are the first subscription's.
    loop {
        let message = next(&mut socket).await;
        if message["id"] == 6 {
            assert_eq!(message["subscribe"]["delta"], true, "{message}");
            break;
        }
        if let Some(publication) = message["push"].get("pub") {
            base = rebuild(publication, &base).1;
        }
    }
    // From here the client holds nothing in the channel: what comes applies from scratch.
    let mut base = Vec::new();
    let mut seen = Vec::new();
    publish(&server, channel, &quote(3_004)).await;
    while seen.last() != Some(&quote(3_004)) {
        let message = next(&mut socket).await;
        let Some(publication) = message["push"].get("pub") else {
            continue;
        };
        let (data, bytes) = rebuild(publication, &base);
        seen.push(data);
        base = bytes;
    }
    assert!(seen.len() <= 3, "{seen:?}");
}
