//! The errors of this crate: one enum per question a caller asks.

use std::fmt;

/// Which kind of verification key a signing algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A shared HMAC secret (HS256, HS384, HS512).
    Hmac,
    /// An RSA public key (RS256, RS384, RS512).
    Rsa,
    /// An ECDSA public key (ES256 on P-256, ES384 on P-384).
    Ecdsa,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Hmac => "HMAC secret",
            KeyKind::Rsa => "RSA public key",
            KeyKind::Ecdsa => "ECDSA public key",
        })
    }
}

/// Why a [`crate::TokenVerifier`] could not be built from its [`crate::VerifierKeys`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// An empty HMAC secret would let anyone sign tokens.
    #[error("the HMAC secret is empty")]
    EmptyHmacSecret,
    /// The RSA public key is not a PEM-encoded RSA public key.
    #[error("invalid RSA public key PEM: {0}")]
    InvalidRsaPem(String),
    /// The ECDSA public key is not a PEM-encoded P-256 or P-384 public key.
    #[error("invalid ECDSA public key PEM: {0}")]
    InvalidEcdsaPem(String),
    /// A JSON Web Key Set that is not one, or holds no key this server can verify with.
    #[error("invalid JWKS: {0}")]
    InvalidJwks(String),
}

/// Why a token was refused.
///
/// `Expired` is kept apart from everything else: the signature was good and the claims were
/// well-formed, only the time is past, so a client may be told to refresh its token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is authentic but its `exp` is not after the given time.
    #[error("token expired")]
    Expired,
    /// The token cannot be trusted or cannot be used for this purpose.
    #[error("invalid token: {0}")]
    Invalid(InvalidReason),
}

impl From<InvalidReason> for TokenError {
    fn from(reason: InvalidReason) -> Self {
        TokenError::Invalid(reason)
    }
}

/// The reason behind [`TokenError::Invalid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    /// The token is not `header.payload.signature` in base64url, or its header is not JSON.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header says `alg: none`: unsigned tokens are always refused.
    #[error("unsigned tokens (alg none) are refused")]
    AlgNone,
    /// The header names an algorithm this server does not verify.
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The algorithm is supported, but no key of the kind it needs is configured.
    #[error("token is signed with {alg} but no {needs} is configured")]
    NoKeyForAlgorithm {
        /// The `alg` of the token's header.
        alg: &'static str,
        /// The kind of key that algorithm needs.
        needs: KeyKind,
    },
    /// An ECDSA token whose curve is not the configured key's curve.
    #[error("token is signed with {alg} but the configured ECDSA key is on {curve}")]
    WrongCurve {
        /// The `alg` of the token's header.
        alg: &'static str,
        /// The curve of the configured key.
        curve: &'static str,
    },
    /// The header names a `kid` that the JSON Web Key Set does not hold (yet).
    #[error("no key {0:?} in the JWKS")]
    UnknownKeyId(String),
    /// The `kid`'s key is not of the kind the token's `alg` needs (or not on its curve).
    #[error("token is signed with {alg} but key {kid:?} is not a key for it")]
    WrongKeyForAlgorithm { alg: &'static str, kid: String },
    /// The signature does not match the configured key.
    #[error("bad signature")]
    BadSignature,
    /// The payload is not a JSON object of well-typed claims.
    #[error("bad claims: {0}")]
    Claims(String),
    /// `b64info` is not standard (padded) base64.
    #[error("b64info is not valid base64")]
    B64Info,
    /// `nbf` is after the given time.
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// A subscription token has no `channel` claim (or an empty one).
    #[error("subscription token has no channel claim")]
    MissingChannel,
    /// A token with a `channel` claim (a subscription token) was offered as a connection token.
    #[error("a subscription token (with a channel claim) cannot be used to connect")]
    SubscriptionTokenForConnection,
}

/// Why a valid subscription token does not grant the subscription asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionMismatch {
    /// The token's `sub` is not the connection's user.
    #[error("subscription token was issued for another user")]
    User,
    /// The token's `channel` is not the channel asked for.
    #[error("subscription token was issued for another channel")]
    Channel,
}
