//! Tags filters (`tf` in a subscribe request, Centrifugo's publication filtering): where the
//! namespace allows them, a subscriber gets only the publications whose tags match, live and
//! in what a recovering subscribe carries; a filter that is not allowed or not well formed is
//! refused with 107.

use plexus_core::ChannelOptions;
use serde_json::{json, Value};

use crate::util::*;

/// A server whose namespace `ticks` keeps history and allows tags filters.
async fn server() -> plexus_server::ServerHandle {
    let options = ChannelOptions {
        allow_tags_filter: true,
        allow_subscribe_for_anonymous: true,
        ..ChannelOptions::quotes()
    };
    start_with_namespace("ticks", options).await
}

async fn publish(server: &plexus_server::ServerHandle, ticker: Option<&str>, n: u32) -> u64 {
    let mut body = json!({"channel": "ticks:all", "data": {"n": n}});
    if let Some(ticker) = ticker {
        body["tags"] = json!({"ticker": ticker, "size": (n * 10).to_string()});
    }
    api_result(server, "publish", body).await["offset"]
        .as_u64()
        .unwrap()
}

/// The `n` of each publication a subscribe result carries.
fn recovered_ns(result: &Value) -> Vec<&Value> {
    result["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| &p["data"]["n"])
        .collect()
}

/// The `n` of the next publication pushed in `ticks:all`.
async fn next_n(socket: &mut Ws) -> Value {
    loop {
        let push = next_json(socket).await;
        if let Some(publication) = push["push"].get("pub") {
            return publication["data"]["n"].clone();
        }
    }
}

#[tokio::test]
async fn a_filtered_subscriber_gets_only_matching_publications() {
    let server = server().await;
    let (mut btc, _) = native(&server, "ann").await;
    let (mut big, _) = native(&server, "bob").await;
    let (mut all, _) = native(&server, "cat").await;
    let filter = json!({"key": "ticker", "cmp": "eq", "val": "BTC"});
    let reply = command(
        &mut btc,
        2,
        json!({"subscribe": {"channel": "ticks:all", "tf": filter}}),
    )
    .await;
    assert!(reply.get("error").is_none(), "{reply}");
    // `or` of an exact decimal comparison and a set.
    let filter = json!({"op": "or", "nodes": [
        {"key": "size", "cmp": "gte", "val": "40.0"},
        {"key": "ticker", "cmp": "in", "vals": ["SOL"]},
    ]});
    command(
        &mut big,
        2,
        json!({"subscribe": {"channel": "ticks:all", "tf": filter}}),
    )
    .await;
    command(&mut all, 2, json!({"subscribe": {"channel": "ticks:all"}})).await;

    let sent = [
        (Some("BTC"), 1),
        (Some("ETH"), 2),
        (None, 3),
        (Some("BTC"), 4),
        (Some("SOL"), 5),
        (Some("ETH"), 6),
    ];
    for (ticker, n) in sent {
        publish(&server, ticker, n).await;
    }
    for n in 1..=6 {
        assert_eq!(
            next_n(&mut all).await,
            n,
            "an unfiltered subscriber gets all"
        );
    }
    for n in [1, 4] {
        assert_eq!(next_n(&mut btc).await, n);
    }
    for n in [4, 5, 6] {
        assert_eq!(next_n(&mut big).await, n);
    }
    // Nothing else came: the next push after a marker is the marker.
    publish(&server, Some("BTC"), 7).await;
    assert_eq!(next_n(&mut btc).await, 7);
    assert_eq!(next_n(&mut big).await, 7, "size 70");
}

/// Cache recovery (the latest only) through a filter: the latest publication that passes,
/// even when the channel's latest does not.
#[tokio::test]
async fn cache_recovery_gives_the_latest_matching_publication() {
    let options = ChannelOptions {
        allow_tags_filter: true,
        recovery_mode: plexus_core::RecoveryMode::Cache,
        ..ChannelOptions::quotes()
    };
    let server = start_with_namespace("ticks", options).await;
    for (ticker, n) in [
        (Some("BTC"), 1),
        (Some("BTC"), 2),
        (Some("ETH"), 3),
        (None, 4),
    ] {
        publish(&server, ticker, n).await;
    }
    let (mut socket, _) = native(&server, "ann").await;
    let btc = json!({"key": "ticker", "cmp": "eq", "val": "BTC"});
    let reply = command(
        &mut socket,
        2,
        json!({"subscribe": {"channel": "ticks:all", "recover": true, "tf": btc}}),
    )
    .await;
    let result = &reply["subscribe"];
    assert_eq!(result["recovered"], true, "{reply}");
    let recovered = recovered_ns(result);
    assert_eq!(recovered, [2], "the newest BTC one: {reply}");
    // A client that already has it gets nothing again.
    let epoch = result["epoch"].clone();
    command(
        &mut socket,
        3,
        json!({"unsubscribe": {"channel": "ticks:all"}}),
    )
    .await;
    let reply = command(
        &mut socket,
        4,
        json!({"subscribe": {"channel": "ticks:all", "recover": true, "epoch": epoch, "offset": 2, "tf": btc}}),
    )
    .await;
    assert!(reply["subscribe"].get("publications").is_none(), "{reply}");
}

#[tokio::test]
async fn a_recovering_filtered_subscriber_gets_only_the_matching_missed_publications() {
    let server = server().await;
    let top = publish(&server, Some("BTC"), 1).await;
    let epoch =
        api_result(&server, "history", json!({"channel": "ticks:all"})).await["epoch"].clone();
    for (ticker, n) in [
        (Some("ETH"), 2),
        (Some("BTC"), 3),
        (None, 4),
        (Some("BTC"), 5),
    ] {
        publish(&server, ticker, n).await;
    }
    let (mut socket, _) = native(&server, "ann").await;
    let reply = command(
        &mut socket,
        2,
        json!({"subscribe": {"channel": "ticks:all", "recover": true, "epoch": epoch, "offset": top,
            "tf": {"key": "ticker", "cmp": "eq", "val": "BTC"}}}),
    )
    .await;
    let result = &reply["subscribe"];
    assert_eq!(result["recovered"], true, "{reply}");
    let recovered = recovered_ns(result);
    assert_eq!(recovered, [3, 5], "{reply}");
    // The stream position is the channel's, not the last match's.
    assert_eq!(result["offset"], 5, "{reply}");
}

#[tokio::test]
async fn filters_are_refused_where_not_allowed_or_not_well_formed() {
    let server = server().await;
    let (mut socket, _) = native(&server, "ann").await;
    let eq = json!({"key": "ticker", "cmp": "eq", "val": "BTC"});
    let refused = [
        // chat allows no filters.
        json!({"channel": "chat:lobby", "tf": eq}),
        json!({"channel": "ticks:all", "tf": {"key": "ticker", "cmp": "like", "val": "B"}}),
        json!({"channel": "ticks:all", "tf": {"key": "ticker", "cmp": "in", "val": "B"}}),
        json!({"channel": "ticks:all", "tf": {"op": "not", "nodes": [eq, eq]}}),
        // Not with delta compression.
        json!({"channel": "ticks:all", "tf": eq, "delta": "fossil"}),
    ];
    for (id, subscribe) in (2..).zip(refused) {
        let reply = command(&mut socket, id, json!({ "subscribe": subscribe })).await;
        assert_eq!(reply["error"]["code"], 107, "{subscribe}: {reply}");
    }
    // The connection goes on, and a good filter is taken.
    let reply = command(
        &mut socket,
        20,
        json!({"subscribe": {"channel": "ticks:all", "tf": eq}}),
    )
    .await;
    assert!(reply.get("error").is_none(), "{reply}");
}

/// A client that resubscribes with a filter while a publication of its unfiltered first
/// subscription is still queued for it does not get that publication if it does not pass: its
/// own publish (no tags), the unsubscribe and the filtered subscribe come in one message, in a
/// namespace that does not recover (nothing is dropped as already in a subscribe reply).
#[tokio::test]
async fn a_publication_queued_before_a_filtered_resubscribe_is_filtered_too() {
    let options = ChannelOptions {
        allow_tags_filter: true,
        allow_publish_for_client: true,
        recover: false,
        ..ChannelOptions::quotes()
    };
    let server = start_with_namespace("ticks", options).await;
    let (mut socket, _) = native(&server, "ann").await;
    let reply = command(
        &mut socket,
        2,
        json!({"subscribe": {"channel": "ticks:all"}}),
    )
    .await;
    assert!(reply.get("subscribe").is_some(), "{reply}");
    let filter = json!({"key": "ticker", "cmp": "ex"});
    let lines = [
        json!({"id": 3, "publish": {"channel": "ticks:all", "data": {"n": 1}}}),
        json!({"id": 4, "unsubscribe": {"channel": "ticks:all"}}),
        json!({"id": 5, "subscribe": {"channel": "ticks:all", "tf": filter}}),
    ];
    let batch: Vec<String> = lines.iter().map(Value::to_string).collect();
    send_text(&mut socket, &batch.join("\n")).await;
    // Replies and pushes may come several to a message, one per line.
    let mut after_subscribe = false;
    let mut after: Vec<Value> = Vec::new();
    while !after.iter().any(|n| n == 2) {
        let text = next_text(&mut socket).await;
        for line in text.lines() {
            let message: Value = serde_json::from_str(line).unwrap();
            if message["id"] == 5 {
                assert!(message.get("subscribe").is_some(), "{message}");
                after_subscribe = true;
                publish(&server, Some("BTC"), 2).await;
            } else if let Some(publication) = message["push"].get("pub") {
                if after_subscribe {
                    after.push(publication["data"]["n"].clone());
                }
            }
        }
    }
    assert_eq!(after, [json!(2)], "only what passes the filter");
}
