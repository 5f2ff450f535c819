//! Minting HS256 tokens, for `plexus token` and for tests.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::Value;

/// What to put in a minted token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MintRequest {
    /// The user id (`sub`); empty for an anonymous connection.
    pub sub: String,
    /// Lifetime: `exp` is `now_unix` plus its whole seconds; `None`: no `exp`, never expires.
    pub ttl: Option<Duration>,
    /// Server-side subscriptions (`channels`), left out when empty.
    pub channels: Vec<String>,
    /// Connection or channel info (`info`).
    pub info: Option<Value>,
    /// The channel of a subscription token (`channel`); `None` for a connection token.
    pub channel: Option<String>,
    /// Server-only metadata (`meta`), never shown to clients.
    pub meta: Option<Value>,
    /// The time of issue (`iat`), Unix seconds.
    pub now_unix: u64,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    channels: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a Value>,
}

/// Signs a token with HS256 and `secret` (its UTF-8 bytes), as Centrifugo's `gentoken` does.
pub fn mint_hs256(secret: &str, request: &MintRequest) -> String {
    let claims = MintClaims {
        sub: &request.sub,
        iat: request.now_unix,
        exp: request
            .ttl
            .map(|ttl| request.now_unix.saturating_add(ttl.as_secs())),
        channels: &request.channels,
        info: request.info.as_ref(),
        channel: request.channel.as_deref(),
        meta: request.meta.as_ref(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    // HMAC takes a key of any length and these claims always serialize.
    .expect("HS256 signing cannot fail")
}
