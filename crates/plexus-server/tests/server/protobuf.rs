//! The Protobuf encoding of the native protocol over a real WebSocket: chosen by subprotocol or
//! query, binary frames both ways, beside JSON clients in the same channel.

use futures_util::SinkExt;
use plexus_protocol::client::{
    self as proto, Format, Payload, PushBody, Reply, ReplyBody, Request,
};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

/// How a client asks for Protobuf.
enum Ask {
    Subprotocol,
    Query,
}

/// A Protobuf client connected as `user`: the socket, its client id, and the subprotocol the
/// server named.
async fn protobuf_client(
    server: &plexus_server::ServerHandle,
    user: &str,
    ask: Ask,
) -> (Ws, String) {
    let url = match ask {
        Ask::Subprotocol => format!("ws://{}/connection/websocket", server.http_addr()),
        Ask::Query => format!(
            "ws://{}/connection/websocket?cf_protocol=protobuf",
            server.http_addr()
        ),
    };
    let mut request = url.into_client_request().unwrap();
    if let Ask::Subprotocol = ask {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "centrifuge-protobuf".parse().unwrap(),
        );
    }
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    let named = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|value| value.to_str().unwrap().to_owned());
    match ask {
        Ask::Subprotocol => assert_eq!(named.as_deref(), Some("centrifuge-protobuf")),
        Ask::Query => assert_eq!(named, None, "no subprotocol was asked for"),
    }
    let connect = Request::Connect(proto::ConnectRequest {
        token: token(user),
        ..Default::default()
    });
    let reply = call(&mut socket, 1, connect).await;
    let Some(ReplyBody::Connect(result)) = reply.body else {
        panic!("not a connect result: {reply:?}");
    };
    (socket, result.client)
}

pub(crate) async fn send(socket: &mut Ws, bytes: Vec<u8>) {
    socket.send(Message::Binary(bytes.into())).await.unwrap();
}

/// The replies in the next message, which must be binary.
pub(crate) async fn replies(socket: &mut Ws) -> Vec<Reply> {
    match next(socket).await {
        Message::Binary(bytes) => Format::Protobuf
            .parse_replies(&bytes)
            .into_iter()
            .map(|reply| reply.expect("a valid reply"))
            .collect(),
        other => panic!("expected a binary message, got {other:?}"),
    }
}

/// Sends one command and returns its reply (pushes before it skipped).
pub(crate) async fn call(socket: &mut Ws, id: u32, request: Request) -> Reply {
    send(socket, Format::Protobuf.encode_command(id, &request)).await;
    loop {
        if let Some(reply) = replies(socket).await.into_iter().find(|r| r.id == id) {
            return reply;
        }
    }
}

/// The data of the next publication pushed to `socket`.
pub(crate) async fn next_publication(socket: &mut Ws) -> proto::Publication {
    loop {
        for reply in replies(socket).await {
            if let Some(ReplyBody::Push(push)) = reply.body {
                if let PushBody::Publication(publication) = push.body {
                    return publication;
                }
            }
        }
    }
}

fn subscribe(channel: &str) -> Request {
    Request::Subscribe(proto::SubscribeRequest {
        channel: channel.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn protobuf_by_subprotocol_or_query_beside_json() {
    let server = start_default().await;
    let (mut ann, ann_id) = protobuf_client(&server, "ann", Ask::Subprotocol).await;
    let (mut bob, _) = protobuf_client(&server, "bob", Ask::Query).await;
    let (mut jay, _) = native(&server, "jay").await;
    for (socket, id) in [(&mut ann, 2), (&mut bob, 2)] {
        let reply = call(socket, id, subscribe("chat:pb")).await;
        assert!(reply.error.is_none(), "{reply:?}");
    }
    let reply = command(&mut jay, 2, json!({"subscribe": {"channel": "chat:pb"}})).await;
    assert!(reply.get("error").is_none(), "{reply}");

    // Binary data from a Protobuf client: unchanged for Protobuf, base64 for JSON.
    let publish = Request::Publish(proto::PublishRequest {
        channel: "chat:pb".into(),
        data: Some(Payload::new(vec![0u8, 159, 146, 150])),
    });
    let reply = call(&mut ann, 3, publish).await;
    assert!(reply.error.is_none(), "{reply:?}");
    let got = next_publication(&mut bob).await;
    assert_eq!(got.data.unwrap().as_bytes(), [0, 159, 146, 150]);
    let info = got.info.expect("publisher info");
    assert_eq!(
        (info.user.as_str(), info.client.as_str()),
        ("ann", ann_id.as_str())
    );
    let pushed = next_json(&mut jay).await;
    assert_eq!(pushed["push"]["pub"]["data"], "AJ+Slg==", "{pushed}");

    // Pretty-printed JSON from a Protobuf client: JSON clients read replies line by line, so
    // theirs comes on one line, the same value.
    let pretty = Request::Publish(proto::PublishRequest {
        channel: "chat:pb".into(),
        data: Some(Payload::new(&b"{\n  \"a\": [1,\r\n 2]\n}"[..])),
    });
    call(&mut ann, 5, pretty).await;
    let text = next_text(&mut jay).await;
    assert!(!text.contains('\n') && !text.contains('\r'), "{text:?}");
    let pushed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pushed["push"]["pub"]["data"], json!({"a": [1, 2]}));
    let got = next_publication(&mut bob).await;
    assert_eq!(got.data.unwrap().as_bytes(), b"{\n  \"a\": [1,\r\n 2]\n}");

    // JSON from the JSON client: its text's bytes for Protobuf clients.
    command(
        &mut jay,
        3,
        json!({"publish": {"channel": "chat:pb", "data": {"n": 1}}}),
    )
    .await;
    let got = next_publication(&mut bob).await;
    assert_eq!(got.data.unwrap().as_bytes(), br#"{"n":1}"#);
    assert_eq!(got.offset, 3);

    // History in Protobuf, both publications as stored.
    let history = call(
        &mut bob,
        3,
        Request::History(proto::HistoryRequest {
            channel: "chat:pb".into(),
            limit: -1,
            ..Default::default()
        }),
    )
    .await;
    let Some(ReplyBody::History(history)) = history.body else {
        panic!("not a history result: {history:?}");
    };
    let data: Vec<Vec<u8>> = history
        .publications
        .iter()
        .map(|p| p.data.as_ref().unwrap().as_bytes().to_vec())
        .collect();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0], [0, 159, 146, 150]);
    assert_eq!(data[2], br#"{"n":1}"#);

    // An error reply in Protobuf: a second subscribe to the same channel.
    let again = call(&mut ann, 4, subscribe("chat:pb")).await;
    assert_eq!(again.error.map(|e| e.code), Some(105));

    // A text message on a Protobuf connection is not a command, even one whose bytes would
    // be (a zero byte is the pong): closed with 3501, alone.
    ann.send(Message::Text("\0".into())).await.unwrap();
    assert_eq!(
        expect_close(&mut ann).await,
        (3501, "bad request".to_owned())
    );
    let ping = call(&mut bob, 5, Request::Ping(proto::PingRequest {})).await;
    assert!(matches!(ping.body, Some(ReplyBody::Ping(_))), "{ping:?}");
}

/// The RPC proxy and a Protobuf client: binary data goes to the backend as `b64data`
/// (`encoding` binary), and binary data comes back; JSON data still goes as `data`.
#[tokio::test]
async fn rpc_from_a_protobuf_client_carries_bytes() {
    let (url, calls) = crate::rpc::backend().await;
    let server = start(plexus_server::Config {
        rpc_proxy_url: Some(url),
        ..plexus_server::Config::for_tests()
    })
    .await;
    let (mut ann, ann_id) = protobuf_client(&server, "ann", Ask::Subprotocol).await;
    let rpc = |method: &str, data: Payload| {
        Request::Rpc(proto::RpcRequest {
            method: method.into(),
            data: Some(data),
        })
    };
    let reply = call(&mut ann, 2, rpc("reverse", Payload::new(vec![1u8, 2, 255]))).await;
    let Some(ReplyBody::Rpc(result)) = reply.body else {
        panic!("not an rpc result: {reply:?}");
    };
    assert_eq!(result.data.unwrap().as_bytes(), [255, 2, 1]);
    assert_eq!(
        calls.lock().unwrap()[0],
        json!({"client": ann_id, "transport": "websocket", "protocol": "protobuf",
               "encoding": "binary", "user": "ann", "method": "reverse", "b64data": "AQL/"})
    );
    // JSON data from a Protobuf client goes as JSON; the JSON answer comes back as its text.
    let reply = call(&mut ann, 3, rpc("echo", Payload::new(&br#"{"n":1}"#[..]))).await;
    let Some(ReplyBody::Rpc(result)) = reply.body else {
        panic!("not an rpc result: {reply:?}");
    };
    assert_eq!(result.data.unwrap().as_bytes(), br#"{"echoed":{"n":1}}"#);
    assert_eq!(calls.lock().unwrap()[1]["encoding"], "json");
    assert_eq!(calls.lock().unwrap()[1]["data"], json!({"n": 1}));
}

/// The server API publishes binary data with `b64data`: Protobuf subscribers get the bytes,
/// JSON subscribers their base64, raw room clients a binary message; `data` and `b64data`
/// together, or bad base64, are refused.
#[tokio::test]
async fn the_api_publishes_bytes_with_b64data() {
    let server = start_default().await;
    let (mut pb, _) = protobuf_client(&server, "ann", Ask::Subprotocol).await;
    call(&mut pb, 2, subscribe("chat:bytes")).await;
    let (mut jay, _) = native(&server, "jay").await;
    command(&mut jay, 2, json!({"subscribe": {"channel": "chat:bytes"}})).await;
    let mut raw = ws(&server, "/chat/bytes").await;

    let result = api_result(
        &server,
        "publish",
        json!({"channel": "chat:bytes", "b64data": "AP8B"}),
    )
    .await;
    assert_eq!(result["offset"], 1, "{result}");
    assert_eq!(
        next_publication(&mut pb).await.data.unwrap().as_bytes(),
        [0, 255, 1]
    );
    assert_eq!(next_json(&mut jay).await["push"]["pub"]["data"], "AP8B");
    match next(&mut raw).await {
        Message::Binary(bytes) => assert_eq!(&bytes[..], [0, 255, 1]),
        other => panic!("expected a binary message, got {other:?}"),
    }
    for bad in [
        json!({"channel": "chat:bytes", "b64data": "%%%"}),
        json!({"channel": "chat:bytes", "data": 1, "b64data": "AA=="}),
        json!({"channel": "chat:bytes"}),
    ] {
        let headers = format!("X-API-Key: {API_KEY}\r\n");
        let (status, reply) =
            http_json(&server, "POST", "/api/publish", &headers, &bad.to_string()).await;
        assert_eq!(
            (status, &reply["error"]["code"]),
            (400, &json!(107)),
            "{bad}: {reply}"
        );
    }
}
