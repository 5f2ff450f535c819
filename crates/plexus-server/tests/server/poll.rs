//! `GET /poll/{channel}`: long polling over plain HTTP, with `curl`-like raw requests.

use std::time::Duration;

use plexus_core::{ChannelOptions, Namespaces};
use plexus_server::{Config, ServerHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// A GET with extra headers; returns the status and the JSON body.
async fn get(server: &ServerHandle, path: &str, headers: &str) -> (u16, Value) {
    http_json(server, "GET", path, headers, "").await
}

async fn publish(server: &ServerHandle, channel: &str, data: Value) -> Value {
    api_call(server, "publish", json!({"channel": channel, "data": data})).await
}

fn data(answer: &Value) -> Vec<Value> {
    answer["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect()
}

#[tokio::test]
async fn returns_missed_publications_at_once_then_waits_for_the_next() {
    let server = start_default().await;
    for n in 1..=3 {
        publish(&server, "chat:p", json!({"n": n})).await;
    }
    let (status, all) = get(&server, "/poll/chat:p", "").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        data(&all),
        [json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]
    );
    let next = all["next"].as_str().unwrap().to_owned();
    assert!(next.ends_with(":3"), "{next}");
    let epoch = next.rsplit_once(':').unwrap().0.to_owned();

    let (_, missed) = get(&server, &format!("/poll/chat:p?since={epoch}:1"), "").await;
    assert_eq!(data(&missed), [json!({"n": 2}), json!({"n": 3})]);
    assert_eq!(missed["recovered"], true);

    // Nothing new: the request waits until the next publication.
    let waiting = {
        let path = format!("/poll/chat:p?since={next}&timeout=10");
        let server_addr = server.http_addr();
        tokio::spawn(async move {
            let mut stream = TcpStream::connect(server_addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            serde_json::from_str::<Value>(response.split_once("\r\n\r\n").unwrap().1).unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a poll with nothing new waits");
    publish(&server, "chat:p", json!({"n": 4})).await;
    let woke = waiting.await.unwrap();
    assert_eq!(data(&woke), [json!({"n": 4})]);
    assert_eq!(woke["next"], format!("{epoch}:4"));
}

#[tokio::test]
async fn a_quiet_channel_times_out_with_the_same_position() {
    let server = start_default().await;
    publish(&server, "chat:q", json!("only")).await;
    let (_, first) = get(&server, "/poll/chat:q", "").await;
    let next = first["next"].as_str().unwrap();
    let (status, quiet) = get(&server, &format!("/poll/chat:q?since={next}&timeout=1"), "").await;
    assert_eq!(status, 200);
    assert_eq!(quiet["publications"], json!([]));
    assert_eq!(quiet["next"], next);
}

#[tokio::test]
async fn a_lost_position_is_said_not_hidden() {
    let server = start_default().await;
    publish(&server, "chat:l", json!(1)).await;
    let (_, answer) = get(&server, "/poll/chat:l?since=another-epoch:7", "").await;
    assert_eq!(answer["recovered"], false, "{answer}");
    assert_eq!(data(&answer), [json!(1)], "what is retained comes along");
    let (status, bad) = get(&server, "/poll/chat:l?since=garbage", "").await;
    assert_eq!(status, 400, "{bad}");
}

#[tokio::test]
async fn the_subscribe_rules_apply() {
    let mut namespaces = Namespaces::default();
    namespaces.insert(
        "members",
        ChannelOptions {
            allow_subscribe_for_anonymous: false,
            ..ChannelOptions::chat()
        },
    );
    let server = start(Config {
        namespaces,
        ..Config::for_tests()
    })
    .await;
    assert_eq!(get(&server, "/poll/members:x", "").await.0, 401);
    let bearer = format!("Authorization: Bearer {}\r\n", token("u1"));
    assert_eq!(get(&server, "/poll/members:x", &bearer).await.0, 200);
    assert_eq!(
        get(&server, "/poll/members:x?token=forged", "").await.0,
        401
    );
    assert_eq!(
        get(&server, "/poll/members:dm%23u2,u3", &bearer).await.0,
        403
    );
    assert_eq!(get(&server, "/poll/nope:x", "").await.0, 404);
    assert_eq!(
        get(&server, "/poll/plain", "").await.0,
        400,
        "no history in the default namespace"
    );
}
