//! Plexus authentication: Centrifugo-compatible JWTs for connections and subscriptions.
//!
//! What it does:
//! - [`TokenVerifier`] checks a token's signature with the key configured for its `alg`
//!   (HS256/384/512 with a shared secret, RS256/384/512 with an RSA public key, ES256/384 with
//!   an ECDSA P-256/P-384 public key), refuses `alg: none` and every other algorithm, checks
//!   `exp` and `nbf` against a time the caller passes (no leeway; a token is expired from the
//!   second `exp` on, and one without `exp` never expires), and returns the Centrifugo claims:
//!   [`ConnectionClaims`] (`sub`, `exp`, `iat`, `info`/`b64info`, `channels`, `meta`,
//!   `expire_at`) or [`SubscriptionClaims`] (`sub`, `channel`, `exp`, `iat`, `info`/`b64info`,
//!   `expire_at`). [`check_subscription`] matches a subscription token to a user and channel.
//! - [`mint_hs256`] signs tokens (for `plexus token` and tests); [`generate_secret`] makes an
//!   HMAC secret.
//!
//! What it does not do: no network or file I/O and no clock (callers pass `now_unix`); no JWKS
//! fetching, no `aud`/`iss` checks (those claims are ignored), no ES512 or PS* algorithms, no
//! token revocation, and no decision on what a user may do beyond the token's own claims.

mod claims;
mod error;
mod jwks;
mod mint;
mod secret;
mod verify;

pub use claims::{check_subscription, ConnectionClaims, SubscriptionClaims};
pub use error::{InvalidReason, KeyError, KeyKind, SubscriptionMismatch, TokenError};
pub use jwks::{JwkKeys, Jwks};
pub use mint::{mint_hs256, MintRequest};
pub use secret::generate_secret;
pub use verify::{TokenVerifier, VerifierKeys};

#[cfg(test)]
mod tests;
