//! The proxies: the application's backend takes part in what protocol clients do, as with
//! Centrifugo's HTTP proxies, so the server stays the only thing clients talk to and the
//! backend stays private.
//!
//! - **connect** (`connect_proxy_url`): a client that connects without a token is
//!   authenticated by the backend, from the headers of its request (`proxy_http_headers`:
//!   cookies, say) and its connect data; the backend names the user, and may give connection
//!   info, data for the client, an expiry and server-side channels.
//! - **subscribe** (`subscribe_proxy_url`, namespaces with `proxy_subscribe`): a subscribe
//!   without a token is allowed or refused by the backend, which may give channel info, data
//!   for the client and an expiry.
//! - **refresh** (`refresh_proxy_url`): a connection whose expiry came from the connect proxy is
//!   extended by the backend when it comes (`expire_at`), or ended (`expired: true`, 3005).
//! - **publish** (`publish_proxy_url`, namespaces with `proxy_publish`): a client's publish is
//!   allowed or refused by the backend, which may replace its data and skip history.
//! - **rpc** (`rpc_proxy_url`): a client's `rpc` is answered by the backend.
//!
//! Each is one JSON POST. The body has `client`, `transport` (`websocket`, `sse`,
//! `http_stream`), `protocol` (`json` or `protobuf`, what the client speaks), the call's own
//! fields, and the client's data: as `data` when it is JSON (`encoding` is `json`), else as
//! `b64data`, its base64 (`encoding` is `binary`; only a Protobuf client can send that). The
//! headers of the client's HTTP request named in `proxy_http_headers` come along as headers.
//!
//! The answer is `{"result":{...}}`, `{"error":{"code":N,"message":"..."}}` (the client gets
//! that error), or `{"disconnect":{"code":N,"reason":"..."}}` (the client is disconnected with
//! it; the code must be from 3000 to 4999, the reason at most 123 bytes). Data in a result is
//! `data` (JSON) or `b64data` (any bytes; a JSON client gets them as a base64 string), info
//! `info` or `b64info`. A backend that does not answer within its timeout, answers with
//! another HTTP status, or with something else, gives the client error 100 (internal) and a
//! warning in the log.

use std::time::Duration;

use crate::metrics::ProxyMetrics;
use crate::outbound::{http_client, HttpClient};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
// `null` in an answer reads as the default, as a missing field does (Centrifugo's backends may
// send either).
use plexus_protocol::client::null_default;
use plexus_protocol::client::{Error as ProtocolError, Payload, RawJson};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The most a backend's answer may hold.
const MAX_ANSWER: usize = 1 << 20;

/// Headers of a client's HTTP request that go to the backends with each of its calls.
pub(crate) type ForwardedHeaders = Vec<(HeaderName, HeaderValue)>;

/// The `proxy_http_headers` of `headers`, in the order configured.
pub(crate) fn forwarded(names: &[HeaderName], headers: &http::HeaderMap) -> ForwardedHeaders {
    names
        .iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                // A copy: the request's values are slices of its whole read buffer.
                .filter_map(move |value| {
                    HeaderValue::from_bytes(value.as_bytes())
                        .ok()
                        .map(|value| (name.clone(), value))
                })
        })
        .collect()
}

/// What the backend decided.
#[derive(Debug)]
pub(crate) enum Answer<R> {
    Result(R),
    Error(ProtocolError),
    Disconnect { code: u16, reason: String },
}

/// Why the backend gave no answer the client can have.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the backend: {0}")]
    Unreachable(String),
    #[error("the backend answered HTTP {0}")]
    Status(StatusCode),
    #[error("the backend's answer is not a proxy answer: {0}")]
    BadAnswer(String),
}

/// The fields every call has.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Caller<'a> {
    pub client: &'a str,
    pub transport: &'a str,
    pub protocol: &'static str,
}

/// A client's data as a backend gets it: `data` when JSON, else `b64data`.
#[derive(Debug, Serialize)]
struct DataFields<'a> {
    encoding: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    b64data: Option<String>,
}

impl<'a> DataFields<'a> {
    fn new(data: Option<&'a Payload>) -> DataFields<'a> {
        let json = data.map(|data| data.as_json());
        let binary = matches!(json, Some(None));
        DataFields {
            encoding: if binary { "binary" } else { "json" },
            data: json.flatten(),
            b64data: match data {
                Some(data) if binary => Some(BASE64.encode(data.as_bytes())),
                _ => None,
            },
        }
    }
}

/// The body of a call about a channel (subscribe, publish).
#[derive(Serialize)]
struct ChannelBody<'a> {
    #[serde(flatten)]
    caller: Caller<'a>,
    user: &'a str,
    channel: &'a str,
    #[serde(flatten)]
    data: DataFields<'a>,
}

/// JSON or base64 from an answer (`data`/`b64data`, `info`/`b64info`) as a payload.
fn payload(
    json: Option<RawJson>,
    b64: Option<String>,
    what: &str,
) -> Result<Option<Payload>, ProxyError> {
    match (json, b64) {
        (_, Some(b64)) => BASE64
            .decode(b64)
            .map(|bytes| Some(Payload::new(bytes)))
            .map_err(|error| ProxyError::BadAnswer(format!("b64{what}: {error}"))),
        (json, None) => Ok(json.map(Payload::from)),
    }
}

#[derive(Debug, Deserialize)]
struct Reply<R> {
    result: Option<R>,
    error: Option<ProtocolError>,
    disconnect: Option<DisconnectBody>,
}

#[derive(Debug, Deserialize)]
struct DisconnectBody {
    code: u16,
    #[serde(default)]
    reason: String,
}

/// One backend, with a pool of kept-alive connections.
pub(crate) struct Backend {
    /// `connect`, `refresh`, `subscribe`, `publish` or `rpc`: the `proxy` label of its metrics.
    name: &'static str,
    client: HttpClient,
    url: Uri,
    timeout: Duration,
    metrics: ProxyMetrics,
}

impl Backend {
    /// `url` is an `http://` or `https://` URL (checked by the configuration).
    pub(crate) fn new(
        name: &'static str,
        url: &str,
        timeout: Duration,
        metrics: ProxyMetrics,
    ) -> Result<Backend, http::uri::InvalidUri> {
        let url: Uri = url.parse()?;
        let client = http_client(timeout);
        Ok(Backend {
            name,
            client,
            url,
            timeout,
            metrics,
        })
    }

    /// One call, counted in the metrics.
    async fn post<R: DeserializeOwned>(
        &self,
        body: &impl Serialize,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<R>, ProxyError> {
        let started = std::time::Instant::now();
        let answer = self.exchange(body, headers).await;
        let outcome = match &answer {
            Ok(Answer::Result(_)) => "result",
            Ok(Answer::Error(_)) => "error",
            Ok(Answer::Disconnect { .. }) => "disconnect",
            Err(_) => "failed",
        };
        self.metrics
            .call(self.name, outcome, started.elapsed().as_secs_f64());
        answer
    }

    async fn exchange<R: DeserializeOwned>(
        &self,
        body: &impl Serialize,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<R>, ProxyError> {
        let body = serde_json::to_vec(body).expect("a call is JSON");
        let mut request = Request::post(self.url.clone())
            .body(Full::new(Bytes::from(body)))
            .expect("a POST to a parsed URI is a request");
        let request_headers = request.headers_mut();
        for (name, value) in headers {
            request_headers.append(name, value.clone());
        }
        request_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| ProxyError::Unreachable(error.to_string()))?;
            if response.status() != StatusCode::OK {
                return Err(ProxyError::Status(response.status()));
            }
            Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|error| ProxyError::BadAnswer(error.to_string()))
        };
        let body = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ProxyError::Timeout(self.timeout))??;
        let reply: Reply<R> = serde_json::from_slice(&body)
            .map_err(|error| ProxyError::BadAnswer(error.to_string()))?;
        match reply {
            // Only the range of close codes a WebSocket application may send: others mean
            // something to WebSocket itself.
            Reply {
                disconnect: Some(disconnect),
                ..
            } if (3000..=4999).contains(&disconnect.code) && disconnect.reason.len() <= 123 => {
                Ok(Answer::Disconnect {
                    code: disconnect.code,
                    reason: disconnect.reason,
                })
            }
            Reply {
                disconnect: Some(disconnect),
                ..
            } => Err(ProxyError::BadAnswer(format!(
                "disconnect code {} is not from 3000 to 4999 (or its reason is over 123 bytes)",
                disconnect.code
            ))),
            Reply {
                error: Some(error), ..
            } => Ok(Answer::Error(error)),
            Reply {
                result: Some(result),
                ..
            } => Ok(Answer::Result(result)),
            _ => Err(ProxyError::BadAnswer(
                "neither result, error nor disconnect".into(),
            )),
        }
    }

    /// Decodes the data fields of a result (after `post`), keeping the answer's shape.
    fn decode<R, T>(
        answer: Answer<R>,
        decode: impl FnOnce(R) -> Result<T, ProxyError>,
    ) -> Result<Answer<T>, ProxyError> {
        Ok(match answer {
            Answer::Result(result) => Answer::Result(decode(result)?),
            Answer::Error(error) => Answer::Error(error),
            Answer::Disconnect { code, reason } => Answer::Disconnect { code, reason },
        })
    }

    /// A client's `rpc`: the result's data.
    pub(crate) async fn rpc(
        &self,
        caller: Caller<'_>,
        user: &str,
        method: &str,
        data: Option<&Payload>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<Option<Payload>>, ProxyError> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(flatten)]
            caller: Caller<'a>,
            user: &'a str,
            method: &'a str,
            #[serde(flatten)]
            data: DataFields<'a>,
        }
        #[derive(Deserialize)]
        struct Result {
            data: Option<RawJson>,
            b64data: Option<String>,
        }
        let body = Body {
            caller,
            user,
            method,
            data: DataFields::new(data),
        };
        let answer = self.post::<Result>(&body, headers).await?;
        Backend::decode(answer, |result| {
            payload(result.data, result.b64data, "data")
        })
    }

    /// A client connecting without a token.
    pub(crate) async fn connect(
        &self,
        caller: Caller<'_>,
        name: &str,
        version: &str,
        data: Option<&Payload>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<Connected>, ProxyError> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(flatten)]
            caller: Caller<'a>,
            name: &'a str,
            version: &'a str,
            #[serde(flatten)]
            data: DataFields<'a>,
        }
        #[derive(Deserialize)]
        struct Result {
            #[serde(default, deserialize_with = "null_default")]
            user: String,
            #[serde(default, deserialize_with = "null_default")]
            expire_at: u64,
            info: Option<RawJson>,
            b64info: Option<String>,
            data: Option<RawJson>,
            b64data: Option<String>,
            #[serde(default, deserialize_with = "null_default")]
            channels: Vec<String>,
        }
        let body = Body {
            caller,
            name,
            version,
            data: DataFields::new(data),
        };
        let answer = self.post::<Result>(&body, headers).await?;
        Backend::decode(answer, |result| {
            Ok(Connected {
                user: result.user,
                expires_at: (result.expire_at > 0).then_some(result.expire_at),
                info: payload(result.info, result.b64info, "info")?.map(Payload::into_bytes),
                data: payload(result.data, result.b64data, "data")?,
                channels: result.channels,
            })
        })
    }

    /// A connection the connect proxy made is expiring: may it go on?
    pub(crate) async fn refresh(
        &self,
        caller: Caller<'_>,
        user: &str,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<Refreshed>, ProxyError> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(flatten)]
            caller: Caller<'a>,
            // No data to carry, but the field every call has.
            encoding: &'static str,
            user: &'a str,
        }
        #[derive(Deserialize)]
        struct Result {
            #[serde(default, deserialize_with = "null_default")]
            expired: bool,
            #[serde(default, deserialize_with = "null_default")]
            expire_at: u64,
        }
        let body = Body {
            caller,
            encoding: "json",
            user,
        };
        let answer = self.post::<Result>(&body, headers).await?;
        Backend::decode(answer, |result| {
            Ok(Refreshed {
                expires_at: if result.expired {
                    None
                } else {
                    Some(result.expire_at)
                },
            })
        })
    }

    /// A subscribe without a token in a namespace with `proxy_subscribe`.
    pub(crate) async fn subscribe(
        &self,
        caller: Caller<'_>,
        user: &str,
        channel: &str,
        data: Option<&Payload>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<Subscribed>, ProxyError> {
        #[derive(Deserialize)]
        struct Result {
            info: Option<RawJson>,
            b64info: Option<String>,
            data: Option<RawJson>,
            b64data: Option<String>,
            #[serde(default, deserialize_with = "null_default")]
            expire_at: u64,
        }
        let body = ChannelBody {
            caller,
            user,
            channel,
            data: DataFields::new(data),
        };
        let answer = self.post::<Result>(&body, headers).await?;
        Backend::decode(answer, |result| {
            Ok(Subscribed {
                info: payload(result.info, result.b64info, "info")?.map(Payload::into_bytes),
                data: payload(result.data, result.b64data, "data")?,
                expires_at: (result.expire_at > 0).then_some(result.expire_at),
            })
        })
    }

    /// A client's publish in a namespace with `proxy_publish`.
    pub(crate) async fn publish(
        &self,
        caller: Caller<'_>,
        user: &str,
        channel: &str,
        data: &Payload,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer<Published>, ProxyError> {
        #[derive(Deserialize)]
        struct Result {
            data: Option<RawJson>,
            b64data: Option<String>,
            #[serde(default, deserialize_with = "null_default")]
            skip_history: bool,
        }
        let body = ChannelBody {
            caller,
            user,
            channel,
            data: DataFields::new(Some(data)),
        };
        let answer = self.post::<Result>(&body, headers).await?;
        Backend::decode(answer, |result| {
            Ok(Published {
                data: payload(result.data, result.b64data, "data")?,
                skip_history: result.skip_history,
            })
        })
    }
}

/// The connect proxy's result.
#[derive(Debug)]
pub(crate) struct Connected {
    /// The user; empty for an anonymous one.
    pub user: String,
    /// When the connection expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
    /// Connection info, seen by others in presence and publications.
    pub info: Option<Bytes>,
    /// Data for the client, in its connect result.
    pub data: Option<Payload>,
    /// Channels to subscribe the client to (server-side subscriptions).
    pub channels: Vec<String>,
}

/// The refresh proxy's result.
#[derive(Debug)]
pub(crate) struct Refreshed {
    /// `None`: expired, the connection ends. `Some(0)`: it no longer expires; `Some(at)`: the
    /// new expiry (Unix seconds).
    pub expires_at: Option<u64>,
}

/// The subscribe proxy's result.
#[derive(Debug)]
pub(crate) struct Subscribed {
    /// Channel info, seen by others.
    pub info: Option<Bytes>,
    /// Data for the client, in its subscribe result.
    pub data: Option<Payload>,
    /// When the subscription expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
}

/// The publish proxy's result.
#[derive(Debug)]
pub(crate) struct Published {
    /// Data to publish instead of the client's.
    pub data: Option<Payload>,
    /// Publish without keeping it in history.
    pub skip_history: bool,
}
