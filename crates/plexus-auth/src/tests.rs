//! Round trips through minting and verification, with the time passed in explicitly.

use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::{EncodeRsaPrivateKey as _, EncodeRsaPublicKey as _, LineEnding};
use rsa::pkcs8::EncodePublicKey as _;
use rsa::rand_core::{CryptoRng, RngCore};
use serde_json::{json, Value};

use crate::*;

const NOW: u64 = 1_700_000_000;
const SECRET: &str = "test-secret-0123456789";

fn hmac_verifier(secret: &str) -> TokenVerifier {
    TokenVerifier::new(&VerifierKeys {
        hmac_secret: Some(secret.to_owned()),
        ..VerifierKeys::default()
    })
    .unwrap()
}

fn connection(sub: &str, ttl: Option<u64>) -> MintRequest {
    MintRequest {
        sub: sub.to_owned(),
        ttl: ttl.map(Duration::from_secs),
        now_unix: NOW,
        ..MintRequest::default()
    }
}

/// Signs arbitrary claims with any algorithm and key.
fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

/// Builds a token from raw header and claims, with a given signature part.
fn raw_token(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn invalid(result: Result<impl std::fmt::Debug, TokenError>) -> InvalidReason {
    match result {
        Err(TokenError::Invalid(reason)) => reason,
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

/// The OS random source for the `rsa` crate's key generation, through `getrandom`.
struct OsRandom;

impl RngCore for OsRandom {
    fn next_u32(&mut self) -> u32 {
        getrandom::u32().unwrap()
    }
    fn next_u64(&mut self) -> u64 {
        getrandom::u64().unwrap()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        getrandom::fill(dest).unwrap();
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for OsRandom {}

/// An RSA key pair generated once per test run (2048-bit generation is slow in debug builds):
/// (private PKCS#1 PEM, public SPKI PEM, public PKCS#1 PEM).
fn rsa_pems() -> (String, String, String) {
    static PEMS: OnceLock<(String, String, String)> = OnceLock::new();
    PEMS.get_or_init(|| {
        let private = rsa::RsaPrivateKey::new(&mut OsRandom, 2048).unwrap();
        let public = private.to_public_key();
        (
            private.to_pkcs1_pem(LineEnding::LF).unwrap().to_string(),
            public.to_public_key_pem(LineEnding::LF).unwrap(),
            public.to_pkcs1_pem(LineEnding::LF).unwrap(),
        )
    })
    .clone()
}

/// A fresh ECDSA key pair: (private PKCS#8 PEM, public SPKI PEM).
fn ecdsa_pems(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    (pair.serialize_pem(), pair.public_key_pem())
}

#[test]
fn hs256_round_trip() {
    let token = mint_hs256(
        SECRET,
        &MintRequest {
            info: Some(json!({"name": "Ann"})),
            ..connection("42", Some(60))
        },
    );
    let claims = hmac_verifier(SECRET)
        .verify_connection(&token, NOW)
        .unwrap();
    assert_eq!(claims.sub, "42");
    assert_eq!(claims.exp, Some(NOW + 60));
    assert_eq!(claims.iat, Some(NOW));
    assert_eq!(claims.channels, Vec::<String>::new());
    assert_eq!(claims.meta, None);
    assert_eq!(claims.connection_expires_at(), Some(NOW + 60));
    let info: Value = serde_json::from_slice(claims.info.as_deref().unwrap()).unwrap();
    assert_eq!(info, json!({"name": "Ann"}));
}

#[test]
fn hs384_and_hs512_verify() {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(alg, &key, &json!({"sub": "7"}));
        let claims = hmac_verifier(SECRET)
            .verify_connection(&token, NOW)
            .unwrap();
        assert_eq!(claims.sub, "7");
    }
}

#[test]
fn wrong_secret_is_invalid() {
    let token = mint_hs256("another-secret", &connection("42", Some(60)));
    let reason = invalid(hmac_verifier(SECRET).verify_connection(&token, NOW));
    assert_eq!(reason, InvalidReason::BadSignature);
}

#[test]
fn tampered_payload_is_invalid() {
    let token = mint_hs256(SECRET, &connection("42", None));
    let parts: Vec<&str> = token.split('.').collect();
    let forged = raw_token(&json!({"alg": "HS256"}), &json!({"sub": "admin"}), parts[2]);
    let reason = invalid(hmac_verifier(SECRET).verify_connection(&forged, NOW));
    assert_eq!(reason, InvalidReason::BadSignature);
}

#[test]
fn expiry_is_exact() {
    let verifier = hmac_verifier(SECRET);
    let token = mint_hs256(SECRET, &connection("42", Some(60)));
    assert!(verifier.verify_connection(&token, NOW + 59).is_ok());
    assert_eq!(
        verifier.verify_connection(&token, NOW + 60),
        Err(TokenError::Expired)
    );
    assert_eq!(
        verifier.verify_connection(&token, NOW + 3600),
        Err(TokenError::Expired)
    );
}

#[test]
fn expired_token_with_bad_signature_is_invalid_not_expired() {
    let token = mint_hs256("another-secret", &connection("42", Some(60)));
    let reason = invalid(hmac_verifier(SECRET).verify_connection(&token, NOW + 3600));
    assert_eq!(reason, InvalidReason::BadSignature);
}

#[test]
fn no_exp_never_expires() {
    let token = mint_hs256(SECRET, &connection("42", None));
    let claims = hmac_verifier(SECRET)
        .verify_connection(&token, u64::MAX)
        .unwrap();
    assert_eq!(claims.exp, None);
    assert_eq!(claims.connection_expires_at(), None);
}

#[test]
fn fractional_exp_is_accepted_and_negative_refused() {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let verifier = hmac_verifier(SECRET);
    let token = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "1", "exp": NOW as f64 + 10.5}),
    );
    assert_eq!(
        verifier.verify_connection(&token, NOW).unwrap().exp,
        Some(NOW + 10)
    );
    let token = sign(Algorithm::HS256, &key, &json!({"sub": "1", "exp": -5}));
    assert!(matches!(
        invalid(verifier.verify_connection(&token, NOW)),
        InvalidReason::Claims(_)
    ));
}

#[test]
fn nbf_in_the_future_is_invalid() {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let token = sign(Algorithm::HS256, &key, &json!({"sub": "1", "nbf": NOW + 5}));
    let verifier = hmac_verifier(SECRET);
    assert_eq!(
        invalid(verifier.verify_connection(&token, NOW)),
        InvalidReason::NotYetValid
    );
    assert!(verifier.verify_connection(&token, NOW + 5).is_ok());
}

#[test]
fn expire_at_overrides_exp_for_the_connection_only() {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let verifier = hmac_verifier(SECRET);
    let never = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "1", "exp": NOW + 60, "expire_at": 0}),
    );
    let claims = verifier.verify_connection(&never, NOW).unwrap();
    assert_eq!(claims.expire_at, Some(0));
    assert_eq!(claims.connection_expires_at(), None);
    // The token itself still expires with exp.
    assert_eq!(
        verifier.verify_connection(&never, NOW + 60),
        Err(TokenError::Expired)
    );

    let later = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "1", "exp": NOW + 60, "expire_at": NOW + 600}),
    );
    let claims = verifier.verify_connection(&later, NOW).unwrap();
    assert_eq!(claims.connection_expires_at(), Some(NOW + 600));
}

#[test]
fn b64info_is_decoded_and_wins_over_info() {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let verifier = hmac_verifier(SECRET);
    let binary = [0u8, 159, 146, 150, 255];
    let token = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "1", "info": {"a": 1}, "b64info": STANDARD.encode(binary)}),
    );
    let claims = verifier.verify_connection(&token, NOW).unwrap();
    assert_eq!(claims.info.as_deref(), Some(&binary[..]));

    let token = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "1", "b64info": "not base64!"}),
    );
    assert_eq!(
        invalid(verifier.verify_connection(&token, NOW)),
        InvalidReason::B64Info
    );
}

#[test]
fn channels_and_meta_claims() {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let token = sign(
        Algorithm::HS256,
        &key,
        &json!({
            "sub": "",
            "channels": ["news", "chat:lobby"],
            "meta": {"plan": "pro"},
            "aud": "ignored",
        }),
    );
    let claims = hmac_verifier(SECRET)
        .verify_connection(&token, NOW)
        .unwrap();
    assert_eq!(claims.sub, "");
    assert_eq!(claims.channels, ["news", "chat:lobby"]);
    assert_eq!(claims.meta.unwrap()["plan"], "pro");

    let minted = mint_hs256(
        SECRET,
        &MintRequest {
            channels: vec!["news".to_owned()],
            ..connection("9", None)
        },
    );
    let claims = hmac_verifier(SECRET)
        .verify_connection(&minted, NOW)
        .unwrap();
    assert_eq!(claims.channels, ["news"]);

    let bad = sign(Algorithm::HS256, &key, &json!({"sub": "1", "meta": [1]}));
    assert!(matches!(
        invalid(hmac_verifier(SECRET).verify_connection(&bad, NOW)),
        InvalidReason::Claims(_)
    ));
}

#[test]
fn subscription_tokens() {
    let verifier = hmac_verifier(SECRET);
    let token = mint_hs256(
        SECRET,
        &MintRequest {
            channel: Some("chat:lobby".to_owned()),
            info: Some(json!({"role": "mod"})),
            ..connection("42", Some(60))
        },
    );
    let claims = verifier.verify_subscription(&token, NOW).unwrap();
    assert_eq!(claims.channel, "chat:lobby");
    assert_eq!(claims.subscription_expires_at(), Some(NOW + 60));
    assert_eq!(check_subscription(&claims, "42", "chat:lobby"), Ok(()));
    assert_eq!(
        check_subscription(&claims, "43", "chat:lobby"),
        Err(SubscriptionMismatch::User)
    );
    assert_eq!(
        check_subscription(&claims, "42", "chat:other"),
        Err(SubscriptionMismatch::Channel)
    );
    assert_eq!(
        verifier.verify_subscription(&token, NOW + 60),
        Err(TokenError::Expired)
    );

    // A subscription token cannot connect, and a connection token cannot subscribe.
    assert_eq!(
        invalid(verifier.verify_connection(&token, NOW)),
        InvalidReason::SubscriptionTokenForConnection
    );
    let connect = mint_hs256(SECRET, &connection("42", Some(60)));
    assert_eq!(
        invalid(verifier.verify_subscription(&connect, NOW)),
        InvalidReason::MissingChannel
    );
}

#[test]
fn rs256_with_generated_keys() {
    let (private_pem, spki_pem, pkcs1_pem) = rsa_pems();
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    for public_pem in [spki_pem, pkcs1_pem] {
        let verifier = TokenVerifier::new(&VerifierKeys {
            rsa_public_key_pem: Some(public_pem),
            ..VerifierKeys::default()
        })
        .unwrap();
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
            let token = sign(alg, &key, &json!({"sub": "r", "exp": NOW + 1}));
            assert_eq!(verifier.verify_connection(&token, NOW).unwrap().sub, "r");
            assert_eq!(
                verifier.verify_connection(&token, NOW + 1),
                Err(TokenError::Expired)
            );
        }
    }

    // A signature over other claims does not verify.
    let verifier = TokenVerifier::new(&VerifierKeys {
        rsa_public_key_pem: Some(rsa_pems().1),
        ..VerifierKeys::default()
    })
    .unwrap();
    let token = sign(Algorithm::RS256, &key, &json!({"sub": "r"}));
    let signature = token.rsplit('.').next().unwrap();
    let forged = raw_token(
        &json!({"alg": "RS256"}),
        &json!({"sub": "admin"}),
        signature,
    );
    assert_eq!(
        invalid(verifier.verify_connection(&forged, NOW)),
        InvalidReason::BadSignature
    );
}

#[test]
fn es256_and_es384_with_generated_keys() {
    let (p256_private, p256_public) = ecdsa_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
    let verifier = TokenVerifier::new(&VerifierKeys {
        ecdsa_public_key_pem: Some(p256_public),
        ..VerifierKeys::default()
    })
    .unwrap();
    let key = EncodingKey::from_ec_pem(p256_private.as_bytes()).unwrap();
    let token = sign(Algorithm::ES256, &key, &json!({"sub": "e", "exp": NOW + 1}));
    assert_eq!(verifier.verify_connection(&token, NOW).unwrap().sub, "e");
    assert_eq!(
        verifier.verify_connection(&token, NOW + 1),
        Err(TokenError::Expired)
    );

    let (p384_private, p384_public) = ecdsa_pems(&rcgen::PKCS_ECDSA_P384_SHA384);
    let key384 = EncodingKey::from_ec_pem(p384_private.as_bytes()).unwrap();
    let token384 = sign(Algorithm::ES384, &key384, &json!({"sub": "e"}));
    assert_eq!(
        invalid(verifier.verify_connection(&token384, NOW)),
        InvalidReason::WrongCurve {
            alg: "ES384",
            curve: "P-256"
        }
    );
    let verifier384 = TokenVerifier::new(&VerifierKeys {
        ecdsa_public_key_pem: Some(p384_public),
        ..VerifierKeys::default()
    })
    .unwrap();
    assert_eq!(
        verifier384.verify_connection(&token384, NOW).unwrap().sub,
        "e"
    );
}

#[test]
fn hs256_token_with_only_rsa_key_is_invalid() {
    let (_, spki_pem, _) = rsa_pems();
    let verifier = TokenVerifier::new(&VerifierKeys {
        rsa_public_key_pem: Some(spki_pem.clone()),
        ..VerifierKeys::default()
    })
    .unwrap();
    // Signed with the public key as the HMAC secret: the algorithm-confusion attack.
    let token = mint_hs256(&spki_pem, &connection("admin", None));
    let reason = invalid(verifier.verify_connection(&token, NOW));
    assert_eq!(
        reason,
        InvalidReason::NoKeyForAlgorithm {
            alg: "HS256",
            needs: KeyKind::Hmac
        }
    );
    assert_eq!(
        TokenError::Invalid(reason).to_string(),
        "invalid token: token is signed with HS256 but no HMAC secret is configured"
    );
}

#[test]
fn alg_none_is_refused() {
    let verifier = hmac_verifier(SECRET);
    for alg in ["none", "None", "NONE"] {
        let token = raw_token(&json!({"alg": alg, "typ": "JWT"}), &json!({"sub": "1"}), "");
        assert_eq!(
            invalid(verifier.verify_connection(&token, NOW)),
            InvalidReason::AlgNone
        );
    }
}

#[test]
fn unsupported_and_malformed_tokens() {
    let verifier = hmac_verifier(SECRET);
    let token = raw_token(&json!({"alg": "PS256"}), &json!({"sub": "1"}), "AAAA");
    assert_eq!(
        invalid(verifier.verify_connection(&token, NOW)),
        InvalidReason::UnsupportedAlgorithm("PS256".to_owned())
    );
    for token in ["", "a.b", "a.b.c.d", "!!!.e30.AAAA", "e30.e30.AAAA"] {
        assert!(matches!(
            invalid(verifier.verify_connection(token, NOW)),
            InvalidReason::Malformed(_)
        ));
    }
    let token = mint_hs256(SECRET, &connection("1", None));
    let bad_signature = format!("{}!", token);
    assert!(matches!(
        invalid(verifier.verify_connection(&bad_signature, NOW)),
        InvalidReason::Malformed(_)
    ));
}

#[test]
fn verifier_without_keys_refuses_everything() {
    let verifier = TokenVerifier::new(&VerifierKeys::default()).unwrap();
    let token = mint_hs256(SECRET, &connection("1", None));
    assert!(matches!(
        invalid(verifier.verify_connection(&token, NOW)),
        InvalidReason::NoKeyForAlgorithm { .. }
    ));
}

#[test]
fn bad_keys_fail_construction() {
    let empty = TokenVerifier::new(&VerifierKeys {
        hmac_secret: Some(String::new()),
        ..VerifierKeys::default()
    });
    assert_eq!(empty.unwrap_err(), KeyError::EmptyHmacSecret);

    let garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    for pem in ["not a pem", garbage] {
        let rsa = TokenVerifier::new(&VerifierKeys {
            rsa_public_key_pem: Some(pem.to_owned()),
            ..VerifierKeys::default()
        });
        assert!(matches!(rsa, Err(KeyError::InvalidRsaPem(_))), "{rsa:?}");
        let ec = TokenVerifier::new(&VerifierKeys {
            ecdsa_public_key_pem: Some(pem.to_owned()),
            ..VerifierKeys::default()
        });
        assert!(matches!(ec, Err(KeyError::InvalidEcdsaPem(_))), "{ec:?}");
    }

    // Keys of the wrong kind.
    let (_, ec_public) = ecdsa_pems(&rcgen::PKCS_ECDSA_P256_SHA256);
    let rsa = TokenVerifier::new(&VerifierKeys {
        rsa_public_key_pem: Some(ec_public),
        ..VerifierKeys::default()
    });
    assert!(matches!(rsa, Err(KeyError::InvalidRsaPem(_))), "{rsa:?}");
    let (_, rsa_public, _) = rsa_pems();
    let ec = TokenVerifier::new(&VerifierKeys {
        ecdsa_public_key_pem: Some(rsa_public),
        ..VerifierKeys::default()
    });
    assert!(matches!(ec, Err(KeyError::InvalidEcdsaPem(_))), "{ec:?}");
}

#[test]
fn debug_output_hides_the_secret() {
    let keys = VerifierKeys {
        hmac_secret: Some(SECRET.to_owned()),
        ..VerifierKeys::default()
    };
    assert!(!format!("{keys:?}").contains(SECRET));
    assert!(!format!("{:?}", TokenVerifier::new(&keys).unwrap()).contains(SECRET));
}

#[test]
fn generated_secrets_are_random_hex() {
    let a = generate_secret();
    let b = generate_secret();
    assert_eq!(a.len(), 64);
    assert!(a
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_ne!(a, b);
    // A generated secret works as an HMAC secret.
    let token = mint_hs256(&a, &connection("1", None));
    assert!(hmac_verifier(&a).verify_connection(&token, NOW).is_ok());
}

/// The public JWK of the test RSA key pair, as an identity provider publishes it.
fn rsa_jwk(kid: &str) -> Value {
    use rsa::pkcs1::DecodeRsaPrivateKey as _;
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::from_pkcs1_pem(&rsa_pems().0).unwrap();
    let public = private.to_public_key();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
           "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
           "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be())})
}

/// A fresh P-256 key pair: its private PEM and its public JWK.
fn p256_jwk(kid: &str) -> (String, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw(); // 0x04 || x || y
    let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-256",
                     "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                     "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    (pair.serialize_pem(), jwk)
}

fn sign_with_kid(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

#[test]
fn jwks_keys_by_kid() {
    let (ec_private, ec_jwk) = p256_jwk("e1");
    let set = json!({"keys": [
        rsa_jwk("r1"),
        ec_jwk,
        // Left out: symmetric, encryption, no kid, another curve's type, garbage.
        {"kty": "oct", "kid": "s1", "k": "c2VjcmV0"},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},
        {"nonsense": true}
    ]});
    let keys = JwkKeys::parse(set.to_string().as_bytes()).unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let jwks = Jwks::default();
    let verifier = TokenVerifier::new(&VerifierKeys::default())
        .unwrap()
        .with_jwks(jwks.clone());
    let rsa_key = EncodingKey::from_rsa_pem(rsa_pems().0.as_bytes()).unwrap();
    let ec_key = EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap();
    let claims = json!({"sub": "k", "exp": NOW + 1});
    let rs = sign_with_kid(Algorithm::RS256, &rsa_key, Some("r1"), &claims);
    // Before the set arrives the kid is unknown: the caller may fetch and retry.
    assert_eq!(
        invalid(verifier.verify_connection(&rs, NOW)),
        InvalidReason::UnknownKeyId("r1".into())
    );
    jwks.replace(keys);
    assert_eq!(verifier.verify_connection(&rs, NOW).unwrap().sub, "k");
    let es = sign_with_kid(Algorithm::ES256, &ec_key, Some("e1"), &claims);
    assert_eq!(verifier.verify_connection(&es, NOW).unwrap().sub, "k");
    assert_eq!(
        verifier.verify_connection(&es, NOW + 1),
        Err(TokenError::Expired)
    );
    // The kid's key must be one for the token's algorithm.
    let mismatched = sign_with_kid(Algorithm::RS256, &rsa_key, Some("e1"), &claims);
    assert_eq!(
        invalid(verifier.verify_connection(&mismatched, NOW)),
        InvalidReason::WrongKeyForAlgorithm {
            alg: "RS256",
            kid: "e1".into()
        }
    );
    // The set says r1 is for RS256 only.
    let other_alg = sign_with_kid(Algorithm::RS384, &rsa_key, Some("r1"), &claims);
    assert_eq!(
        invalid(verifier.verify_connection(&other_alg, NOW)),
        InvalidReason::WrongKeyForAlgorithm {
            alg: "RS384",
            kid: "r1".into()
        }
    );
    // Signed by someone else under a published kid.
    let (other_private, _) = p256_jwk("e1");
    let other = EncodingKey::from_ec_pem(other_private.as_bytes()).unwrap();
    let forged = sign_with_kid(Algorithm::ES256, &other, Some("e1"), &claims);
    assert_eq!(
        invalid(verifier.verify_connection(&forged, NOW)),
        InvalidReason::BadSignature
    );
    // No kid: the configured keys (none here). An HMAC token never uses a set's key.
    let no_kid = sign_with_kid(Algorithm::RS256, &rsa_key, None, &claims);
    assert!(matches!(
        invalid(verifier.verify_connection(&no_kid, NOW)),
        InvalidReason::NoKeyForAlgorithm { .. }
    ));
    let hmac = sign_with_kid(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"guess"),
        Some("r1"),
        &claims,
    );
    assert!(matches!(
        invalid(verifier.verify_connection(&hmac, NOW)),
        InvalidReason::NoKeyForAlgorithm { .. }
    ));
    // A new set replaces the old one for every verifier sharing it.
    let (_, rotated) = p256_jwk("e2");
    jwks.replace(JwkKeys::parse(json!({"keys": [rotated]}).to_string().as_bytes()).unwrap());
    assert_eq!(
        invalid(verifier.verify_connection(&rs, NOW)),
        InvalidReason::UnknownKeyId("r1".into())
    );
    for bad in [
        r#"{"keys": []}"#,
        "[]",
        "not json",
        r#"{"keys": [{"kty": "oct", "kid": "s", "k": "AA"}]}"#,
    ] {
        assert!(
            matches!(
                JwkKeys::parse(bad.as_bytes()),
                Err(KeyError::InvalidJwks(_))
            ),
            "{bad}"
        );
    }
}
