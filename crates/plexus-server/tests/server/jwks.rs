//! Tokens checked with an identity provider's JSON Web Key Set (`token_jwks_url`), served by
//! a real HTTP server of the test's own: a token's `kid` picks the key; a key rotation is
//! picked up when a token names the new `kid`; an unknown `kid` is refused.

use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use plexus_server::Config;
use serde_json::{json, Value};

use crate::util::*;

/// A P-256 key pair: the signer and the public JWK.
fn key(kid: &str) -> (EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw(); // 0x04 || x || y
    let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-256", "use": "sig",
                     "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                     "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    let signer = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    (signer, jwk)
}

fn token(signer: &EncodingKey, kid: &str, user: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &json!({"sub": user}), signer).unwrap()
}

/// Serves whatever set `keys` holds at the moment, at `/jwks.json`.
async fn identity_provider(keys: Arc<Mutex<Value>>) -> String {
    let app = Router::new().route(
        "/jwks.json",
        get(move || {
            let keys = keys.clone();
            async move { Json(keys.lock().unwrap().clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Connects with `token`; the connect reply or the close.
async fn connect(
    server: &plexus_server::ServerHandle,
    token: &str,
) -> Result<String, (u16, String)> {
    let mut socket = ws(server, "/connection/websocket").await;
    let connect = json!({"id": 1, "connect": {"token": token}});
    send_text(&mut socket, &connect.to_string()).await;
    match next(&mut socket).await {
        tokio_tungstenite::tungstenite::Message::Text(text) => {
            let reply: Value = serde_json::from_str(&text).unwrap();
            Ok(reply["connect"]["client"].as_str().unwrap().to_owned())
        }
        tokio_tungstenite::tungstenite::Message::Close(Some(frame)) => {
            Err((frame.code.into(), frame.reason.to_string()))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn tokens_signed_with_the_identity_providers_keys() {
    let (first, first_jwk) = key("k1");
    let (second, second_jwk) = key("k2");
    let (third, third_jwk) = key("k3");
    let keys = Arc::new(Mutex::new(json!({"keys": [first_jwk]})));
    let url = identity_provider(keys.clone()).await;
    let server = start(Config {
        token_jwks_url: Some(url),
        // Every unknown kid fetches the set again (10 s apart in production).
        token_jwks_refetch: std::time::Duration::ZERO,
        ..Config::for_tests()
    })
    .await;

    // Ann stays connected through the rotation below.
    let mut ann = ws(&server, "/connection/websocket").await;
    let hello = json!({"id": 1, "connect": {"token": token(&first, "k1", "ann")}});
    send_text(&mut ann, &hello.to_string()).await;
    assert_eq!(next_json(&mut ann).await["id"], 1);
    // Signed by someone else under the published kid.
    let (forger, _) = key("k1");
    assert_eq!(
        connect(&server, &token(&forger, "k1", "eve")).await,
        Err((3500, "invalid token".to_owned()))
    );
    // The provider rotates to k2: a token naming k2 makes the server fetch the set again,
    // for a new connection; and again for k3, for a connected client's refresh.
    keys.lock().unwrap()["keys"] = json!([second_jwk]);
    assert!(connect(&server, &token(&second, "k2", "bob")).await.is_ok());
    keys.lock().unwrap()["keys"] = json!([second_jwk, third_jwk]);
    let refresh = command(
        &mut ann,
        2,
        json!({"refresh": {"token": token(&third, "k3", "ann")}}),
    )
    .await;
    assert!(refresh.get("refresh").is_some(), "{refresh}");
    // k1 is gone from the new set; a kid nobody published is refused too.
    for (signer, kid) in [(&first, "k1"), (&second, "k4")] {
        assert_eq!(
            connect(&server, &token(signer, kid, "ann")).await,
            Err((3500, "invalid token".to_owned()))
        );
    }
    // The server's own HMAC tokens still work beside the set.
    let (mut native, _) = native(&server, "carol").await;
    let reply = command(&mut native, 2, json!({"ping": {}})).await;
    assert!(reply.get("ping").is_some(), "{reply}");
}
