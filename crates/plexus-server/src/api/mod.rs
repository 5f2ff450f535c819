//! The server HTTP API, compatible with Centrifugo's API v5: `POST /api/{method}` with a JSON
//! request object, authorised by the server API key.
//!
//! HTTP statuses are for the request itself: 401 without the right key, 400 for a body that is
//! not JSON or lacks a required field, 404 for an unknown method. Everything else is HTTP 200
//! with `{"result":{...}}` or `{"error":{"code":N,"message":"..."}}`, the codes being the client
//! protocol's ([`ErrorCode`]).
//!
//! [`methods`] holds one function per method; [`reply`] the response shapes; this module the
//! route, the key check and the dispatch (including `batch`).

mod methods;
mod reply;
mod stats;

pub(crate) use stats::{host_name, local_channels};

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Json;
use http::{HeaderMap, StatusCode, Uri};
use plexus_protocol::client::{ErrorCode, RawJson};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Shared;
use reply::{BatchReply, ErrorBody, Reply};

/// The `/api/{method}` route. The API's own state (node id, start time) is created here, once
/// per server.
pub(crate) fn route<S>(shared: &Arc<Shared>) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let api = Arc::new(Api::new(shared.clone()));
    post(
        move |Path(method): Path<String>, uri: Uri, headers: HeaderMap, body: Bytes| {
            let api = api.clone();
            async move { api.handle(&method, &uri, &headers, &body).await }
        },
    )
}

/// Why a request was refused as a whole (not an error of the method itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ApiError {
    /// No key, or the wrong one.
    Unauthorized,
    /// The body is not JSON, or lacks a required field; the detail says which.
    BadRequest(String),
    MethodNotFound,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotFound => StatusCode::NOT_FOUND,
        }
    }

    /// The error as it appears in a body (also a batch reply's error).
    fn body(&self) -> ErrorBody {
        match self {
            ApiError::Unauthorized => ErrorCode::Unauthorized.into(),
            ApiError::MethodNotFound => ErrorCode::MethodNotFound.into(),
            ApiError::BadRequest(detail) => ErrorBody {
                code: ErrorCode::BadRequest.code(),
                message: format!("{}: {detail}", ErrorCode::BadRequest.message()).into(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: ErrorBody,
        }
        (self.status(), Json(Body { error: self.body() })).into_response()
    }
}

/// A request that is checked beyond its JSON shape (required values that must not be empty).
trait Validate {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A required string field: present and not empty.
fn required(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        Err(format!("{name} required"))
    } else {
        Ok(())
    }
}

/// Parses a method's request: an empty body reads as `{}`.
fn parse<T: DeserializeOwned + Validate>(params: &[u8]) -> Result<T, ApiError> {
    let params = if params.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        params
    };
    let request: T =
        serde_json::from_slice(params).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    request.validate().map_err(ApiError::BadRequest)?;
    Ok(request)
}

/// Parses the request, runs the method and serialises its result.
async fn call<T, R, F, Fut>(params: &[u8], method: F) -> Result<Reply, ApiError>
where
    T: DeserializeOwned + Validate,
    R: Serialize,
    F: FnOnce(T) -> Fut,
    Fut: Future<Output = Result<R, ErrorCode>>,
{
    let request = parse(params)?;
    Ok(match method(request).await {
        Ok(result) => Reply::result(&result),
        Err(code) => Reply::Error(code.into()),
    })
}

/// The API methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Publish,
    Broadcast,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Refresh,
    Presence,
    PresenceStats,
    History,
    HistoryRemove,
    Channels,
    Info,
    Batch,
}

impl Method {
    const ALL: [Method; 13] = [
        Method::Publish,
        Method::Broadcast,
        Method::Subscribe,
        Method::Unsubscribe,
        Method::Disconnect,
        Method::Refresh,
        Method::Presence,
        Method::PresenceStats,
        Method::History,
        Method::HistoryRemove,
        Method::Channels,
        Method::Info,
        Method::Batch,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Publish => "publish",
            Method::Broadcast => "broadcast",
            Method::Subscribe => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::Disconnect => "disconnect",
            Method::Refresh => "refresh",
            Method::Presence => "presence",
            Method::PresenceStats => "presence_stats",
            Method::History => "history",
            Method::HistoryRemove => "history_remove",
            Method::Channels => "channels",
            Method::Info => "info",
            Method::Batch => "batch",
        }
    }

    fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|method| method.name() == name)
    }
}

/// `batch`: commands such as `{"publish": {...}}`, run in order (or all at once with
/// `parallel`); the replies keep the commands' order.
#[derive(Debug, Deserialize)]
struct BatchRequest {
    commands: Vec<BTreeMap<String, RawJson>>,
    #[serde(default)]
    parallel: bool,
}

impl Validate for BatchRequest {}

#[derive(Debug, Serialize)]
struct BatchResult {
    replies: Vec<BatchReply>,
}

/// The API's state: the server's, and this node's identity for `info`.
struct Api {
    shared: Arc<Shared>,
    node: stats::NodeIdentity,
}

impl Api {
    fn new(shared: Arc<Shared>) -> Api {
        Api {
            node: stats::NodeIdentity::new(shared.emulation.node().to_string()),
            shared,
        }
    }

    async fn handle(
        self: &Arc<Self>,
        method: &str,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        if !authorized(&self.shared.api_key, headers, uri) {
            return ApiError::Unauthorized.into_response();
        }
        let Some(method) = Method::from_name(method) else {
            return ApiError::MethodNotFound.into_response();
        };
        let outcome = if method == Method::Batch {
            call(body, |request| self.batch(request)).await
        } else {
            self.dispatch(method, body).await
        };
        match outcome {
            Ok(reply) => (StatusCode::OK, Json(reply)).into_response(),
            Err(error) => error.into_response(),
        }
    }

    /// Runs one method other than `batch` (so a batch cannot nest).
    async fn dispatch(&self, method: Method, params: &[u8]) -> Result<Reply, ApiError> {
        let shared = &*self.shared;
        match method {
            Method::Publish => call(params, |r| methods::publish(&self.shared, r)).await,
            Method::Broadcast => call(params, |r| methods::broadcast(&self.shared, r)).await,
            Method::Subscribe => call(params, |r| methods::subscribe(shared, r)).await,
            Method::Unsubscribe => call(params, |r| methods::unsubscribe(shared, r)).await,
            Method::Disconnect => call(params, |r| methods::disconnect(shared, r)).await,
            Method::Refresh => call(params, |r| methods::refresh(shared, r)).await,
            Method::Presence => call(params, |r| methods::presence(shared, r)).await,
            Method::PresenceStats => call(params, |r| methods::presence_stats(shared, r)).await,
            Method::History => call(params, |r| methods::history(shared, r)).await,
            Method::HistoryRemove => call(params, |r| methods::history_remove(shared, r)).await,
            Method::Channels => call(params, |r| stats::channels(shared, r)).await,
            Method::Info => call(params, |r| stats::info(shared, &self.node, r)).await,
            Method::Batch => Err(ApiError::BadRequest("batch cannot be nested".into())),
        }
    }

    /// One command of a batch: `{"method": params}`.
    async fn batch_command(&self, command: BTreeMap<String, RawJson>) -> BatchReply {
        let mut entries = command.into_iter();
        let (Some((name, params)), None) = (entries.next(), entries.next()) else {
            let error = ApiError::BadRequest("a command names exactly one method".into());
            return BatchReply::Error(error.body());
        };
        let Some(method) = Method::from_name(&name) else {
            return BatchReply::Error(ApiError::MethodNotFound.body());
        };
        match self.dispatch(method, params.as_bytes()).await {
            Ok(Reply::Result(result)) => BatchReply::Result(method.name(), result),
            Ok(Reply::Error(error)) => BatchReply::Error(error),
            Err(error) => BatchReply::Error(error.body()),
        }
    }

    async fn batch(self: &Arc<Self>, request: BatchRequest) -> Result<BatchResult, ErrorCode> {
        let mut replies = Vec::with_capacity(request.commands.len());
        if !request.parallel {
            for command in request.commands {
                replies.push(self.batch_command(command).await);
            }
            return Ok(BatchResult { replies });
        }
        let tasks: Vec<_> = request
            .commands
            .into_iter()
            .map(|command| {
                let api = self.clone();
                tokio::spawn(async move { api.batch_command(command).await })
            })
            .collect();
        for task in tasks {
            replies.push(
                task.await
                    .unwrap_or_else(|_| BatchReply::Error(ErrorCode::Internal.into())),
            );
        }
        Ok(BatchResult { replies })
    }
}

/// Whether the request carries the API key: `X-API-Key: KEY`, `Authorization: apikey KEY` or
/// the `api_key` query parameter.
fn authorized(key: &str, headers: &HeaderMap, uri: &Uri) -> bool {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let from_authorization = header("authorization").and_then(|value| {
        let (scheme, credential) = value.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("apikey")
            .then_some(credential.trim())
    });
    let from_query = uri.query().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("api_key="))
    });
    [header("x-api-key"), from_authorization, from_query]
        .into_iter()
        .flatten()
        .any(|given| same_secret(given.as_bytes(), key.as_bytes()))
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn api_key_locations() {
        let uri: Uri = "/api/info".parse().unwrap();
        let check = |pairs: &[(&'static str, &str)], uri: &Uri, expected: bool| {
            assert_eq!(
                authorized("k3y", &headers(pairs), uri),
                expected,
                "{pairs:?} {uri}"
            );
        };
        check(&[("x-api-key", "k3y")], &uri, true);
        check(&[("authorization", "apikey k3y")], &uri, true);
        check(&[("authorization", "ApiKey k3y")], &uri, true);
        check(&[("authorization", "Bearer k3y")], &uri, false);
        check(&[("x-api-key", "k3")], &uri, false);
        check(&[("x-api-key", "k3yy")], &uri, false);
        check(&[], &uri, false);
        check(&[], &"/api/info?x=1&api_key=k3y".parse().unwrap(), true);
        check(&[], &"/api/info?api_key=nope".parse().unwrap(), false);
    }

    #[test]
    fn method_names_round_trip() {
        for method in Method::ALL {
            assert_eq!(Method::from_name(method.name()), Some(method));
        }
        assert_eq!(Method::from_name("Publish"), None);
    }

    #[test]
    fn request_errors() {
        let body = |error: ApiError| serde_json::to_string(&error.body()).unwrap();
        assert_eq!(
            body(ApiError::Unauthorized),
            r#"{"code":101,"message":"unauthorized"}"#
        );
        assert_eq!(
            body(ApiError::BadRequest("channel required".into())),
            r#"{"code":107,"message":"bad request: channel required"}"#
        );
        assert_eq!(
            body(ApiError::MethodNotFound),
            r#"{"code":104,"message":"method not found"}"#
        );
        assert!(matches!(
            parse::<BatchRequest>(b"{\"commands\": 1}"),
            Err(ApiError::BadRequest(detail)) if detail.contains("invalid type")
        ));
        assert!(parse::<BatchRequest>(b"  ").is_err()); // `{}` lacks `commands`
    }
}
