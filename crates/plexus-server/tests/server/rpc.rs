//! The RPC proxy: a protocol client's `rpc` goes to a real HTTP backend (an axum server of the
//! test's own on a free port), whose result, error or disconnect comes back to the client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use plexus_server::Config;
use serde_json::{json, Value};

use crate::util::*;

/// A backend answering by method, keeping every call it got.
pub(crate) async fn backend() -> (String, Arc<Mutex<Vec<Value>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let app = Router::new().route(
        "/rpc",
        post(move |Json(call): Json<Value>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(call.clone());
                let answer = match call["method"].as_str() {
                    Some("echo") => json!({"result": {"data": {"echoed": call["data"]}}}),
                    // Binary data back as binary, reversed.
                    Some("reverse") => {
                        use base64::Engine as _;
                        let b64 = base64::engine::general_purpose::STANDARD;
                        let mut bytes = b64.decode(call["b64data"].as_str().unwrap_or("")).unwrap();
                        bytes.reverse();
                        json!({"result": {"b64data": b64.encode(bytes)}})
                    }
                    Some("fail") => json!({"error": {"code": 1000, "message": "no such thing"}}),
                    Some("kick") => json!({"disconnect": {"code": 4501, "reason": "kicked"}}),
                    Some("badkick") => json!({"disconnect": {"code": 1006, "reason": "no"}}),
                    Some("slow") => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        json!({"result": {}})
                    }
                    _ => {
                        return (http::StatusCode::INTERNAL_SERVER_ERROR, Json(json!({})));
                    }
                };
                (http::StatusCode::OK, Json(answer))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/rpc", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

#[tokio::test]
async fn rpc_goes_to_the_backend_and_its_answer_comes_back() {
    let (url, calls) = backend().await;
    let server = start(Config {
        rpc_proxy_url: Some(url),
        rpc_proxy_timeout: Duration::from_millis(300),
        ..Config::for_tests()
    })
    .await;
    let (mut ann, ann_id) = native(&server, "ann").await;

    let reply = command(
        &mut ann,
        2,
        json!({"rpc": {"method": "echo", "data": {"n": 1}}}),
    )
    .await;
    assert_eq!(reply["rpc"]["data"], json!({"echoed": {"n": 1}}), "{reply}");
    let call = calls.lock().unwrap()[0].clone();
    assert_eq!(
        call,
        json!({"client": ann_id, "transport": "websocket", "protocol": "json",
               "encoding": "json", "user": "ann", "method": "echo", "data": {"n": 1}})
    );

    // The backend's own error, as it gave it.
    let reply = command(&mut ann, 3, json!({"rpc": {"method": "fail"}})).await;
    assert_eq!(
        reply["error"],
        json!({"code": 1000, "message": "no such thing"})
    );
    // A backend that fails or is too slow, or gives a disconnect code outside 3000-4999
    // (it would break the WebSocket close): internal error, and the connection goes on.
    for (id, method) in [(4, "broken"), (5, "slow"), (8, "badkick")] {
        let reply = command(&mut ann, id, json!({"rpc": {"method": method}})).await;
        assert_eq!(reply["error"]["code"], 100, "{method}: {reply}");
    }
    // The connection is not held while the backend thinks: a ping sent after a slow rpc is
    // answered first.
    let frame = [
        json!({"id": 9, "rpc": {"method": "slow"}}).to_string(),
        json!({"id": 10, "ping": {}}).to_string(),
    ];
    send_text(&mut ann, &frame.join("\n")).await;
    let mut order = Vec::new();
    while order.len() < 2 {
        let text = next_text(&mut ann).await;
        for line in text.lines() {
            let reply: Value = serde_json::from_str(line).unwrap();
            if let Some(id) = reply["id"].as_u64() {
                order.push(id);
            }
        }
    }
    assert_eq!(order, [10, 9]);
    // At most 32 wait for the backend per connection; more are refused at once.
    let slow: Vec<String> = (100..140)
        .map(|id| json!({"id": id, "rpc": {"method": "slow"}}).to_string())
        .collect();
    send_text(&mut ann, &slow.join("\n")).await;
    let mut codes = std::collections::BTreeMap::new();
    let mut answered = 0;
    while answered < 40 {
        let text = next_text(&mut ann).await;
        for line in text.lines() {
            let reply: Value = serde_json::from_str(line).unwrap();
            if reply.get("id").is_some() {
                answered += 1;
                *codes.entry(reply["error"]["code"].as_u64()).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(codes[&Some(111)], 8, "{codes:?}");
    assert_eq!(codes[&Some(100)], 32, "{codes:?}");
    // The backend may disconnect the client.
    send_text(
        &mut ann,
        &json!({"id": 7, "rpc": {"method": "kick"}}).to_string(),
    )
    .await;
    assert_eq!(expect_close(&mut ann).await, (4501, "kicked".to_owned()));
}

#[tokio::test]
async fn rpc_without_a_backend_is_not_available() {
    let server = start_default().await;
    let (mut ann, _) = native(&server, "ann").await;
    let reply = command(&mut ann, 2, json!({"rpc": {"method": "echo"}})).await;
    assert_eq!(reply["error"]["code"], 108, "{reply}");
}

/// Over SSE the reply comes on the stream like any other, and the backend learns the
/// transport.
#[tokio::test]
async fn rpc_over_sse() {
    let (url, calls) = backend().await;
    let server = start(Config {
        rpc_proxy_url: Some(url),
        ..Config::for_tests()
    })
    .await;
    let (mut client, session, node) =
        crate::emulation::connect(&server, crate::emulation::Kind::Sse, "ann").await;
    let command = json!({"id": 2, "rpc": {"method": "echo", "data": "hi"}}).to_string();
    assert_eq!(
        crate::emulation::emulate(&server, &session, &node, &command).await,
        200
    );
    let reply = client.reply().await;
    assert_eq!(reply["id"], 2, "{reply}");
    assert_eq!(reply["rpc"]["data"], json!({"echoed": "hi"}));
    assert_eq!(calls.lock().unwrap()[0]["transport"], "sse");
}
