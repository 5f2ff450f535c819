//! Keys from a JSON Web Key Set (RFC 7517), the `keys` an identity provider publishes at its
//! JWKS URL: tokens whose header names a `kid` are checked with that key. Fetching the set is
//! the server's; this module only reads it and holds the current one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::DecodingKey;
use serde::Deserialize;

use crate::error::{KeyError, KeyKind};
use crate::verify::Curve;

/// One key of a set: what it verifies.
pub(crate) struct JwkKey {
    pub(crate) key: DecodingKey,
    pub(crate) kind: KeyKind,
    pub(crate) curve: Option<Curve>,
    /// The one algorithm the key is for, when the set says (`alg`).
    pub(crate) alg: Option<jsonwebtoken::Algorithm>,
}

/// The usable keys of one key set, by `kid`.
#[derive(Default)]
pub struct JwkKeys {
    by_kid: HashMap<String, JwkKey>,
}

impl std::fmt::Debug for JwkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.by_kid.keys().collect();
        kids.sort();
        f.debug_struct("JwkKeys").field("kids", &kids).finish()
    }
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

impl JwkKeys {
    /// Reads a key set: its RSA and P-256/P-384 keys that have a `kid` and are meant for
    /// signatures. Other keys (symmetric, other curves, encryption keys, no `kid`) are left
    /// out, as an identity provider's set may hold them; a set with none usable is an error.
    pub fn parse(json: &[u8]) -> Result<JwkKeys, KeyError> {
        let set: RawSet = serde_json::from_slice(json)
            .map_err(|error| KeyError::InvalidJwks(format!("not a key set: {error}")))?;
        let mut by_kid = HashMap::new();
        for value in set.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|usage| *usage != jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            let (kind, curve) = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => (KeyKind::Rsa, None),
                AlgorithmParameters::EllipticCurve(params) => match params.curve {
                    EllipticCurve::P256 => (KeyKind::Ecdsa, Some(Curve::P256)),
                    EllipticCurve::P384 => (KeyKind::Ecdsa, Some(Curve::P384)),
                    _ => continue,
                },
                _ => continue,
            };
            let alg = match jwk.common.key_algorithm {
                None => None,
                Some(alg) => match alg.to_string().parse::<jsonwebtoken::Algorithm>() {
                    Ok(alg) => Some(alg),
                    // For something this server does not verify (e.g. encryption).
                    Err(_) => continue,
                },
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            by_kid.insert(
                kid,
                JwkKey {
                    key,
                    kind,
                    curve,
                    alg,
                },
            );
        }
        if by_kid.is_empty() {
            return Err(KeyError::InvalidJwks(
                "no RSA or P-256/P-384 signing key with a kid".into(),
            ));
        }
        Ok(JwkKeys { by_kid })
    }

    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&JwkKey> {
        self.by_kid.get(kid)
    }
}

/// The current key set, shared by a [`crate::TokenVerifier`] and whoever fetches the set:
/// [`Jwks::replace`] swaps it for every verifier at once. Empty until the first set arrives.
#[derive(Clone, Default, Debug)]
pub struct Jwks(Arc<RwLock<Arc<JwkKeys>>>);

impl Jwks {
    pub fn replace(&self, keys: JwkKeys) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    pub fn current(&self) -> Arc<JwkKeys> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
