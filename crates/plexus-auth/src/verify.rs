//! Signature verification: picks the key by the header's `alg`, refuses everything else.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use rsa::pkcs1::DecodeRsaPublicKey as _;
use serde::Deserialize;

use crate::claims::{ConnectionClaims, RawClaims, SubscriptionClaims};
use crate::error::{InvalidReason, KeyError, KeyKind, TokenError};
use crate::jwks::Jwks;

/// The keys a [`TokenVerifier`] accepts tokens from; each is optional.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct VerifierKeys {
    /// Shared secret for HS256/HS384/HS512, used as its UTF-8 bytes.
    pub hmac_secret: Option<String>,
    /// RSA public key for RS256/RS384/RS512: PEM, `PUBLIC KEY` (SPKI) or `RSA PUBLIC KEY` (PKCS#1).
    pub rsa_public_key_pem: Option<String>,
    /// ECDSA public key for ES256 (P-256) or ES384 (P-384): PEM, `PUBLIC KEY` (SPKI).
    pub ecdsa_public_key_pem: Option<String>,
}

impl fmt::Debug for VerifierKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierKeys")
            .field(
                "hmac_secret",
                &self.hmac_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("rsa_public_key_pem", &self.rsa_public_key_pem)
            .field("ecdsa_public_key_pem", &self.ecdsa_public_key_pem)
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
}

/// Verifies Centrifugo-style connection and subscription JWTs against configured keys.
///
/// Each algorithm family is checked only with its own key, so an HS256 token is never checked
/// against the RSA public key (the classic algorithm-confusion attack).
#[derive(Clone)]
pub struct TokenVerifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ecdsa: Option<(DecodingKey, Curve)>,
    /// Keys by `kid`, for tokens whose header names one.
    jwks: Option<Jwks>,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa", &self.rsa.is_some())
            .field("ecdsa", &self.ecdsa.as_ref().map(|(_, curve)| curve.name()))
            .field("jwks", &self.jwks.is_some())
            .finish()
    }
}

/// A base64url signature that decodes but matches nothing; used to make the crypto backend
/// parse a key without verifying anything.
const PROBE_SIGNATURE: &str = "AAAA";

impl TokenVerifier {
    /// Builds a verifier, parsing every PEM given. A verifier with no key refuses every token.
    pub fn new(keys: &VerifierKeys) -> Result<TokenVerifier, KeyError> {
        let hmac = match keys.hmac_secret.as_deref() {
            Some("") => return Err(KeyError::EmptyHmacSecret),
            Some(secret) => Some(DecodingKey::from_secret(secret.as_bytes())),
            None => None,
        };
        let rsa = keys
            .rsa_public_key_pem
            .as_deref()
            .map(parse_rsa)
            .transpose()?;
        let ecdsa = keys
            .ecdsa_public_key_pem
            .as_deref()
            .map(parse_ecdsa)
            .transpose()?;
        Ok(TokenVerifier {
            hmac,
            rsa,
            ecdsa,
            jwks: None,
        })
    }

    /// Also accepts tokens whose header names a `kid` of `jwks`'s current set, checked with
    /// that key (RS* and ES* only). A token with a `kid` is checked with the set's key alone:
    /// an unknown `kid` is [`InvalidReason::UnknownKeyId`], so the caller may fetch the set
    /// again and retry. Tokens without a `kid` are checked with the configured keys.
    pub fn with_jwks(mut self, jwks: Jwks) -> TokenVerifier {
        self.jwks = Some(jwks);
        self
    }

    /// Verifies a connection token: signature, `exp`/`nbf` against `now_unix`, and claims.
    pub fn verify_connection(
        &self,
        token: &str,
        now_unix: u64,
    ) -> Result<ConnectionClaims, TokenError> {
        let claims = self.verify(token, now_unix)?;
        Ok(claims.into_connection()?)
    }

    /// Verifies a subscription token: signature, `exp`/`nbf` against `now_unix`, and a
    /// non-empty `channel`. Then see [`crate::check_subscription`].
    pub fn verify_subscription(
        &self,
        token: &str,
        now_unix: u64,
    ) -> Result<SubscriptionClaims, TokenError> {
        let claims = self.verify(token, now_unix)?;
        Ok(claims.into_subscription()?)
    }

    fn verify(&self, token: &str, now_unix: u64) -> Result<RawClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidReason::Malformed("not three dot-separated parts").into());
        };

        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| InvalidReason::Malformed("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header)
            .map_err(|_| InvalidReason::Malformed("header is not a JSON object with an alg"))?;
        let (alg, alg_name, needs) = algorithm(&header.alg)?;

        let keys;
        let key = match (&self.jwks, header.kid) {
            (Some(jwks), Some(kid)) if needs != KeyKind::Hmac => {
                keys = jwks.current();
                let found = keys
                    .get(&kid)
                    .ok_or_else(|| InvalidReason::UnknownKeyId(kid.clone()))?;
                let wanted_curve = match alg {
                    Algorithm::ES256 => Some(Curve::P256),
                    Algorithm::ES384 => Some(Curve::P384),
                    _ => None,
                };
                if found.kind != needs
                    || found.curve != wanted_curve
                    || found.alg.is_some_and(|only| only != alg)
                {
                    return Err(InvalidReason::WrongKeyForAlgorithm { alg: alg_name, kid }.into());
                }
                Some(&found.key)
            }
            _ => self.static_key(alg, alg_name, needs)?,
        };
        let key = key.ok_or(InvalidReason::NoKeyForAlgorithm {
            alg: alg_name,
            needs,
        })?;
        check_signature(token, signature, key, alg)?;

        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| InvalidReason::Malformed("payload is not base64url"))?;
        let claims = RawClaims::parse(&payload)?;
        claims.check_time(now_unix)?;
        Ok(claims)
    }

    /// The configured key for `alg`'s family, if any.
    fn static_key(
        &self,
        alg: Algorithm,
        alg_name: &'static str,
        needs: KeyKind,
    ) -> Result<Option<&DecodingKey>, InvalidReason> {
        Ok(match needs {
            KeyKind::Hmac => self.hmac.as_ref(),
            KeyKind::Rsa => self.rsa.as_ref(),
            KeyKind::Ecdsa => match &self.ecdsa {
                Some((key, curve)) => {
                    let wanted = if alg == Algorithm::ES384 {
                        Curve::P384
                    } else {
                        Curve::P256
                    };
                    if *curve != wanted {
                        return Err(InvalidReason::WrongCurve {
                            alg: alg_name,
                            curve: curve.name(),
                        });
                    }
                    Some(key)
                }
                None => None,
            },
        })
    }
}

/// Checks `signature` over the token up to its last dot, exactly as sent.
fn check_signature(
    token: &str,
    signature: &str,
    key: &DecodingKey,
    alg: Algorithm,
) -> Result<(), InvalidReason> {
    let message = &token[..token.len() - signature.len() - 1];
    match jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, alg) {
        Ok(true) => Ok(()),
        Ok(false) => Err(InvalidReason::BadSignature),
        Err(e) => Err(match e.kind() {
            jsonwebtoken::errors::ErrorKind::Base64(_) => {
                InvalidReason::Malformed("signature is not base64url")
            }
            _ => InvalidReason::BadSignature,
        }),
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Maps a header's `alg` to the algorithm, its canonical name and the key kind it needs.
fn algorithm(name: &str) -> Result<(Algorithm, &'static str, KeyKind), InvalidReason> {
    Ok(match name {
        "HS256" => (Algorithm::HS256, "HS256", KeyKind::Hmac),
        "HS384" => (Algorithm::HS384, "HS384", KeyKind::Hmac),
        "HS512" => (Algorithm::HS512, "HS512", KeyKind::Hmac),
        "RS256" => (Algorithm::RS256, "RS256", KeyKind::Rsa),
        "RS384" => (Algorithm::RS384, "RS384", KeyKind::Rsa),
        "RS512" => (Algorithm::RS512, "RS512", KeyKind::Rsa),
        "ES256" => (Algorithm::ES256, "ES256", KeyKind::Ecdsa),
        "ES384" => (Algorithm::ES384, "ES384", KeyKind::Ecdsa),
        _ if name.eq_ignore_ascii_case("none") => return Err(InvalidReason::AlgNone),
        _ => return Err(InvalidReason::UnsupportedAlgorithm(name.to_owned())),
    })
}

fn parse_rsa(pem: &str) -> Result<DecodingKey, KeyError> {
    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|e| KeyError::InvalidRsaPem(e.to_string()))?;
    // The PEM layer only unwraps the DER; make sure it really is an RSA public key.
    let der = key
        .try_get_as_bytes()
        .map_err(|e| KeyError::InvalidRsaPem(e.to_string()))?;
    rsa::RsaPublicKey::from_pkcs1_der(der)
        .map_err(|e| KeyError::InvalidRsaPem(format!("not an RSA public key: {e}")))?;
    Ok(key)
}

fn parse_ecdsa(pem: &str) -> Result<(DecodingKey, Curve), KeyError> {
    let key = DecodingKey::from_ec_pem(pem.as_bytes())
        .map_err(|e| KeyError::InvalidEcdsaPem(e.to_string()))?;
    // The backend parses the point when it builds a verifier; an error means "not this curve".
    for (alg, curve) in [
        (Algorithm::ES256, Curve::P256),
        (Algorithm::ES384, Curve::P384),
    ] {
        if jsonwebtoken::crypto::verify(PROBE_SIGNATURE, b"", &key, alg).is_ok() {
            return Ok((key, curve));
        }
    }
    Err(KeyError::InvalidEcdsaPem(
        "not a P-256 or P-384 public key".to_owned(),
    ))
}
