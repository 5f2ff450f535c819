//! An identity provider's JSON Web Key Set (`token_jwks_url`): fetched at start (again every
//! few seconds until it works), every [`REFRESH`], and when a token names a `kid` the current
//! set lacks (a key rotation), at most once per `token_jwks_refetch` (10 s). The keys go to the token
//! verifier through a shared [`plexus_auth::Jwks`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use plexus_auth::{
    ConnectionClaims, InvalidReason, JwkKeys, Jwks, SubscriptionClaims, TokenError, TokenVerifier,
};
use tokio::time::Instant;

use crate::outbound::{http_client, HttpClient};
use crate::Shared;

/// How often the set is fetched again while all is well.
const REFRESH: Duration = Duration::from_secs(600);
/// Between tries while the set cannot be had.
const RETRY: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most a key set may hold.
const MAX_SET: usize = 1 << 20;

pub(crate) struct JwksSource {
    url: Uri,
    client: HttpClient,
    keys: Jwks,
    /// Fetches are one at a time, under this lock.
    fetches: tokio::sync::Mutex<Fetches>,
}

#[derive(Default)]
struct Fetches {
    /// When the last one started.
    last: Option<Instant>,
    /// Whether it failed (to log a failure once, and the recovery).
    failing: bool,
}

impl JwksSource {
    pub(crate) fn new(url: &str, keys: Jwks) -> Result<JwksSource, http::uri::InvalidUri> {
        let url: Uri = url.parse()?;
        if url.scheme_str() == Some("http") {
            tracing::warn!(%url, "token_jwks_url is http://: whoever can change the traffic on its way can put in keys of their own and sign any token; use https://");
        }
        Ok(JwksSource {
            url,
            client: http_client(TIMEOUT),
            keys,
            fetches: tokio::sync::Mutex::default(),
        })
    }

    /// Fetches the set and installs it; returns how many keys it has.
    async fn fetch(&self) -> Result<usize, String> {
        let request = Request::get(self.url.clone())
            .body(Full::new(Bytes::new()))
            .expect("a GET of a parsed URI is a request");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| format!("cannot reach it: {error}"))?;
            if response.status() != StatusCode::OK {
                return Err(format!("HTTP {}", response.status()));
            }
            Limited::new(response.into_body(), MAX_SET)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|error| format!("cannot read it: {error}"))
        };
        let body = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))??;
        let keys = JwkKeys::parse(&body).map_err(|error| error.to_string())?;
        let count = keys.len();
        self.keys.replace(keys);
        Ok(count)
    }

    /// Fetches now unless a fetch started within `min_interval` (then waits for it if it is
    /// still running, so the caller sees its set). Returns whether this call fetched.
    async fn refresh(&self, min_interval: Duration) -> bool {
        let mut fetches = self.fetches.lock().await;
        if fetches.last.is_some_and(|at| at.elapsed() < min_interval) {
            return false;
        }
        fetches.last = Some(Instant::now());
        let result = self.fetch().await;
        let failing = &mut fetches.failing;
        match result {
            Ok(count) => {
                if *failing {
                    tracing::info!(url = %self.url, keys = count, "token JWKS fetched again");
                } else {
                    tracing::debug!(url = %self.url, keys = count, "token JWKS fetched");
                }
                *failing = false;
                true
            }
            Err(error) => {
                if !*failing {
                    tracing::warn!(url = %self.url, %error, "cannot fetch the token JWKS");
                }
                *failing = true;
                false
            }
        }
    }
}

/// Keeps the set fresh until shutdown.
pub(crate) fn start(shared: &Arc<Shared>) {
    let Some(source) = shared.jwks.clone() else {
        return;
    };
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        loop {
            let wait = if source.refresh(Duration::ZERO).await {
                REFRESH
            } else {
                RETRY
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
}

/// Verifies with `verify`; a token naming a `kid` the current set lacks gets one more try after
/// the set is fetched again (a key rotation the periodic refresh has not seen yet).
async fn verify_fresh<T>(
    shared: &Shared,
    verify: impl Fn() -> Result<T, TokenError>,
) -> Result<T, TokenError> {
    let result = verify();
    match &shared.jwks {
        Some(source)
            if matches!(
                result,
                Err(TokenError::Invalid(InvalidReason::UnknownKeyId(_)))
            ) =>
        {
            // Fetched now, or by whoever fetched in the last moments: either way try again.
            source.refresh(shared.config.token_jwks_refetch).await;
            verify()
        }
        _ => result,
    }
}

/// A connection token, see [`verify_fresh`].
pub(crate) async fn verify_connection(
    shared: &Shared,
    verifier: &TokenVerifier,
    token: &str,
    now_unix: u64,
) -> Result<ConnectionClaims, TokenError> {
    verify_fresh(shared, || verifier.verify_connection(token, now_unix)).await
}

/// A subscription token, see [`verify_fresh`].
pub(crate) async fn verify_subscription(
    shared: &Shared,
    verifier: &TokenVerifier,
    token: &str,
    now_unix: u64,
) -> Result<SubscriptionClaims, TokenError> {
    verify_fresh(shared, || verifier.verify_subscription(token, now_unix)).await
}
