//! The claims of connection and subscription tokens, as Centrifugo defines them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use crate::error::{InvalidReason, SubscriptionMismatch, TokenError};

/// The claims of a verified connection token.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionClaims {
    /// The user id (`sub`); empty for anonymous connections.
    pub sub: String,
    /// When the token expires (`exp`, Unix seconds); `None`: never.
    pub exp: Option<u64>,
    /// When the token was issued (`iat`, Unix seconds), not checked.
    pub iat: Option<u64>,
    /// Connection info shown to others (join/leave, presence): the raw JSON text of `info`, or
    /// the decoded bytes of `b64info`, which wins when both are present.
    pub info: Option<Bytes>,
    /// Channels the server subscribes the connection to (`channels`).
    pub channels: Vec<String>,
    /// Server-only metadata (`meta`), never sent to clients.
    pub meta: Option<Map<String, Value>>,
    /// `expire_at`: when set, the connection's expiry instead of `exp`; `Some(0)`: never.
    pub expire_at: Option<u64>,
}

impl ConnectionClaims {
    /// When the connection (not the token) expires: `expire_at` if present (0: never), else `exp`.
    pub fn connection_expires_at(&self) -> Option<u64> {
        effective_expiry(self.exp, self.expire_at)
    }
}

/// The claims of a verified subscription token.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionClaims {
    /// The user the token was issued to (`sub`); must be the connection's user.
    pub sub: String,
    /// The channel the token grants (`channel`), never empty.
    pub channel: String,
    /// When the token expires (`exp`, Unix seconds); `None`: never.
    pub exp: Option<u64>,
    /// When the token was issued (`iat`, Unix seconds), not checked.
    pub iat: Option<u64>,
    /// Channel info: the raw JSON text of `info`, or the decoded bytes of `b64info` (which wins).
    pub info: Option<Bytes>,
    /// `expire_at`: when set, the subscription's expiry instead of `exp`; `Some(0)`: never.
    pub expire_at: Option<u64>,
}

impl SubscriptionClaims {
    /// When the subscription (not the token) expires: `expire_at` if present (0: never), else
    /// `exp`.
    pub fn subscription_expires_at(&self) -> Option<u64> {
        effective_expiry(self.exp, self.expire_at)
    }
}

/// Checks that a verified subscription token grants `channel` to the connection of `user`.
pub fn check_subscription(
    claims: &SubscriptionClaims,
    user: &str,
    channel: &str,
) -> Result<(), SubscriptionMismatch> {
    if claims.sub != user {
        return Err(SubscriptionMismatch::User);
    }
    if claims.channel != channel {
        return Err(SubscriptionMismatch::Channel);
    }
    Ok(())
}

fn effective_expiry(exp: Option<u64>, expire_at: Option<u64>) -> Option<u64> {
    match expire_at {
        Some(0) => None,
        Some(at) => Some(at),
        None => exp,
    }
}

/// Every claim either kind of token may carry; unknown claims (`aud`, `iss`, `jti`…) are ignored.
#[derive(Deserialize)]
pub(crate) struct RawClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    expire_at: Option<u64>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    b64info: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
    #[serde(default)]
    channel: Option<String>,
}

impl RawClaims {
    /// Parses a decoded payload.
    pub(crate) fn parse(payload: &[u8]) -> Result<RawClaims, InvalidReason> {
        serde_json::from_slice(payload).map_err(|e| InvalidReason::Claims(e.to_string()))
    }

    /// Checks `exp` and `nbf` against `now_unix`. A token is expired from the second `exp` on.
    pub(crate) fn check_time(&self, now_unix: u64) -> Result<(), TokenError> {
        if matches!(self.exp, Some(exp) if now_unix >= exp) {
            return Err(TokenError::Expired);
        }
        if matches!(self.nbf, Some(nbf) if now_unix < nbf) {
            return Err(InvalidReason::NotYetValid.into());
        }
        Ok(())
    }

    fn info(&self) -> Result<Option<Bytes>, InvalidReason> {
        match self.b64info.as_deref() {
            Some(b64) if !b64.is_empty() => STANDARD
                .decode(b64)
                .map(|bytes| Some(Bytes::from(bytes)))
                .map_err(|_| InvalidReason::B64Info),
            _ => Ok(self
                .info
                .as_ref()
                .map(|raw| Bytes::copy_from_slice(raw.get().as_bytes()))),
        }
    }

    pub(crate) fn into_connection(self) -> Result<ConnectionClaims, InvalidReason> {
        if self.channel.as_deref().is_some_and(|c| !c.is_empty()) {
            return Err(InvalidReason::SubscriptionTokenForConnection);
        }
        let info = self.info()?;
        Ok(ConnectionClaims {
            sub: self.sub.unwrap_or_default(),
            exp: self.exp,
            iat: self.iat,
            info,
            channels: self.channels.unwrap_or_default(),
            meta: self.meta,
            expire_at: self.expire_at,
        })
    }

    pub(crate) fn into_subscription(self) -> Result<SubscriptionClaims, InvalidReason> {
        let info = self.info()?;
        let channel = match self.channel {
            Some(channel) if !channel.is_empty() => channel,
            _ => return Err(InvalidReason::MissingChannel),
        };
        Ok(SubscriptionClaims {
            sub: self.sub.unwrap_or_default(),
            channel,
            exp: self.exp,
            iat: self.iat,
            info,
            expire_at: self.expire_at,
        })
    }
}

/// A JWT NumericDate: non-negative seconds, integer or (as some libraries write it) fractional,
/// which is truncated. `null` is the same as absent.
fn numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if let Some(seconds) = number.as_u64() {
        return Ok(Some(seconds));
    }
    match number.as_f64() {
        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(serde::de::Error::custom(format!(
            "{number} is not a valid time in seconds"
        ))),
    }
}
